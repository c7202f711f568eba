"""The evaluation models and end-to-end evaluators: bundled classifier, name resolution, FID Inception loading,
evaluate_images / evaluate_pipeline / evaluate_reconstruction, reconstruction pictures."""

import json

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file, save_file

from evaluation_utils import EMOJI_CLASSES, tiny_rq_pipeline, tiny_rqvae
from hf_rq import hub
from hf_rq.checkpoint_utils import CheckpointError
from hf_rq.evaluation import (
    CNNImageClassifier,
    ClassifierFeatureExtractor,
    InceptionV3FeatureExtractor,
    InceptionWeightsNotFoundError,
    ReferenceFeatures,
    evaluate_images,
    evaluate_pipeline,
    evaluate_reconstruction,
    extract_features,
    load_imagefolder,
    load_reference_features,
)
from hf_rq.evaluation import metrics as M
from hf_rq.evaluation.evaluator import class_counts, map_classes_to_classifier
from hf_rq.evaluation.inception import resize_bilinear_tf1
from hf_rq.evaluation.visualization import granularity_overlay, labeled_grid, reconstruction_columns
from hub_utils import put_in_hub_cache

CLASSIFIER = "hf-rq/emoji-classifier-64"


@pytest.fixture(scope="module")
def emoji(fixtures_dir):
    """18 real emoji test images (2 per class), uint8 (18, 3, 64, 64)."""
    return load_imagefolder(fixtures_dir / "emoji64", "test")


@pytest.fixture(scope="module")
def classifier():
    return CNNImageClassifier.from_pretrained(CLASSIFIER)


# ------------------------------------------------------------------------------------------ name resolution
def test_bundled_names_resolve_offline(tmp_path):
    assert CLASSIFIER in hub.list_bundled_models()
    folder = hub.resolve_pretrained(CLASSIFIER)
    assert folder == str(hub.BUNDLED_DIR / "emoji-classifier-64")
    # Everything else is passed through unchanged: other ids go to the Hub, local folders stay local.
    for name in ("someone/emoji-classifier-64", "hf-rq/not-bundled", "hf-rq/../hf_rq", "hf-rq/emoji-classifier-64/x"):
        assert hub.resolve_pretrained(name) == name
    assert hub.resolve_pretrained(tmp_path) == str(tmp_path)
    # A local folder of the same name wins over the bundled model, as it would over a Hub id.
    (tmp_path / "hf-rq" / "emoji-classifier-64").mkdir(parents=True)
    import os

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert hub.resolve_pretrained(CLASSIFIER) == CLASSIFIER
    finally:
        os.chdir(cwd)


def test_classifier_loads_by_short_name_and_other_ids_use_the_hub(classifier, tmp_path):
    assert classifier.config.num_classes == 9 and list(classifier.id2label.values()) == EMOJI_CLASSES
    put_in_hub_cache(hub.BUNDLED_DIR / "emoji-classifier-64", "some-org/emoji-clf")
    from_hub = CNNImageClassifier.from_pretrained("some-org/emoji-clf")
    for a, b in zip(classifier.parameters(), from_hub.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # A cached repo without model_index.json is a model, not a pipeline; an uncached one is unknown.
    assert hub.read_model_json("some-org/emoji-clf", "model_index.json") is None
    assert hub.read_model_json("some-org/emoji-clf", "config.json")["_class_name"] == "CNNImageClassifier"
    with pytest.raises(ValueError, match="not a pipeline"):
        hub.pipeline_class_for("some-org/emoji-clf")
    with pytest.raises(OSError):
        CNNImageClassifier.from_pretrained("hf-rq/no-such-model")  # not bundled -> Hub -> offline miss
    with pytest.raises(hub.ModelNotFoundError, match="unknown model 'hf-rq/no-such-model'.*bundled:"):
        hub.load_pipeline("hf-rq/no-such-model")


def test_bundled_classifier_folder_is_complete():
    folder = hub.BUNDLED_DIR / "emoji-classifier-64"
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "diffusion_pytorch_model.safetensors", "reference_features.safetensors", "README.md",
            "training_results.json", "ATTRIBUTION.txt", "LICENSE-Noto-Emoji-Apache-2.0.txt",
            "LICENSE-emoji-data-MIT.txt"} <= names
    assert (folder / "diffusion_pytorch_model.safetensors").stat().st_size < 2_000_000
    readme = (folder / "README.md").read_text()
    results = json.loads((folder / "training_results.json").read_text())
    assert results["command"] in readme and f"seed {results['seed']}" in readme
    assert f"{results['eval']['accuracy']:.3f}" in readme and results["eval"]["num_images"] == 183


def test_bundled_classifier_on_real_test_images(classifier, emoji):
    """The shipped weights classify real held-out emoji, and the shipped reference features are theirs."""
    out = extract_features(classifier, emoji.images)
    accuracy = M.class_consistency(out.logits, emoji.labels)
    assert accuracy >= 0.5, accuracy  # 2 per class; the full test split is in training_results.json
    reference = load_reference_features(CLASSIFIER)
    assert reference.features.shape == (183, classifier.feature_dim) and reference.labels.shape == (183,)
    # Each fixture image is one of the 183 test images: its features must be a row of the stored reference.
    distances = torch.cdist(out.features.double(), reference.features.double()).min(1).values
    assert distances.max() < 1e-3 * reference.features.norm(dim=1).mean()


def test_classifier_round_trip_and_input_checks(tmp_path):
    torch.manual_seed(0)
    model = CNNImageClassifier(sample_size=32, block_out_channels=(8, 16), num_classes=3,
                               id2label={"0": "a", "1": "b", "2": "c"}).eval()
    model.save_pretrained(tmp_path)
    again = CNNImageClassifier.from_pretrained(tmp_path).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(model(x).logits, again(x).logits, rtol=0, atol=0)
    assert again(x).features.shape == (2, 16) and again.id2label == {0: "a", 1: "b", 2: "c"}
    with pytest.raises(ValueError, match=r"\(N, 3, 32, 32\)"):
        model(torch.rand(2, 3, 64, 64))
    with pytest.raises(TypeError, match="float"):
        model(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="id2label has 2 entries"):
        CNNImageClassifier(num_classes=3, id2label={0: "a", 1: "b"})
    # The feature extractor resizes other sizes and takes [0, 1] images.
    feats = ClassifierFeatureExtractor(model)(torch.rand(2, 3, 48, 48))
    assert feats.features.shape == (2, 16) and feats.logits.shape == (2, 3)


# ------------------------------------------------------------------------------------------ FID Inception
@pytest.fixture(scope="module")
def random_inception():
    torch.manual_seed(0)
    model = InceptionV3FeatureExtractor()
    # Non-trivial BatchNorm statistics, so that a wrongly loaded buffer shows.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model


def test_inception_architecture_and_loading(random_inception, tmp_path, monkeypatch):
    # torchvision's Inception-v3 without the aux head has 23,834,568 parameters with 1000 classes; 1008 adds 16,392.
    assert sum(p.numel() for p in random_inception.parameters()) == 23_850_960
    state = {k: v for k, v in random_inception.state_dict().items() if not k.endswith("num_batches_tracked")}
    save_file(state, str(tmp_path / "weights-inception-2015-12-05-6726825d.safetensors"))
    torch.save(state, tmp_path / "pt_inception-2015-12-05-6726825d.pth")

    loaded = InceptionV3FeatureExtractor.from_pretrained(tmp_path / "weights-inception-2015-12-05-6726825d.safetensors")
    x = torch.rand(1, 3, 40, 40)
    out, ref = loaded(x), random_inception(x)
    assert out.features.shape == (1, 2048) and out.logits.shape == (1, 1008)
    torch.testing.assert_close(out.features, ref.features, rtol=0, atol=0)
    # torch-fidelity's IS logits have no bias; pytorch-fid's do.
    torch.testing.assert_close(out.logits, out.features @ random_inception.fc.weight.T, rtol=1e-5, atol=1e-5)

    with pytest.raises(CheckpointError, match="allow_pickle"):
        InceptionV3FeatureExtractor.from_pretrained(tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    fid_style = InceptionV3FeatureExtractor.from_pretrained(tmp_path / "pt_inception-2015-12-05-6726825d.pth",
                                                            preset="pytorch-fid", allow_pickle=True)
    fid_out = fid_style(x)
    torch.testing.assert_close(fid_out.logits, fid_out.features @ random_inception.fc.weight.T
                               + random_inception.fc.bias, rtol=1e-5, atol=1e-5)
    # The two presets differ in input handling only: uint8 + TF1 resize + (x - 128) / 128 vs float resize + 2x - 1.
    torch.testing.assert_close(loaded.preprocess(x), (resize_bilinear_tf1((x * 255).round(), 299) - 128) / 128)
    torch.testing.assert_close(fid_style.preprocess(x), torch.nn.functional.interpolate(
        x, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1)
    assert (loaded.preprocess(x) - fid_style.preprocess(x)).abs().max() > 1e-3

    bad = {"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1008)}
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing keys.*shape mismatches \(1\): \['fc.weight"):
        InceptionV3FeatureExtractor.from_pretrained(tmp_path / "bad.safetensors")

    # Default search: HF_RQ_INCEPTION_WEIGHTS, then the torch hub cache; a clear error when absent.
    monkeypatch.delenv("HF_RQ_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty_hub"))
    with pytest.raises(InceptionWeightsNotFoundError, match="weights-inception-2015-12-05-6726825d.pth.*downloads nothing"):
        InceptionV3FeatureExtractor.from_pretrained()
    monkeypatch.setenv("HF_RQ_INCEPTION_WEIGHTS", str(tmp_path / "weights-inception-2015-12-05-6726825d.safetensors"))
    assert InceptionV3FeatureExtractor.find_weights().name.endswith(".safetensors")


def test_tf1_bilinear_resize_matches_its_definition():
    rng = np.random.default_rng(0)
    x = rng.random((1, 1, 5, 7))
    out = resize_bilinear_tf1(torch.from_numpy(x), 12).numpy()[0, 0]

    def ref_1d(n_in, n_out):
        rows = np.zeros((n_out, n_in))
        for i in range(n_out):
            src = i * n_in / n_out
            lo = int(np.floor(src))
            hi = min(lo + 1, n_in - 1)
            rows[i, lo] += 1 - (src - lo)
            rows[i, hi] += src - lo
        return rows

    np.testing.assert_allclose(out, ref_1d(5, 12) @ x[0, 0] @ ref_1d(7, 12).T, rtol=1e-12)


# ---------------------------------------------------------------------------------------------- evaluators
def test_evaluate_images_on_real_images(classifier, emoji):
    """Real test images as 'samples': class-consistency is the classifier's accuracy; FID is small vs noise."""
    real = evaluate_images(emoji.images, emoji.labels, classifier=classifier)
    logits = extract_features(classifier, emoji.images).logits
    assert real["class_consistency"] == M.class_consistency(logits, emoji.labels)
    assert set(real["class_consistency_per_class"]) == set(EMOJI_CLASSES)
    assert real["num_generated"] == 18 and real["num_reference"] == 183 and "emoji" in real["reference"]
    noise = evaluate_images(torch.rand(18, 3, 64, 64), emoji.labels, classifier=classifier)
    assert real["fid"] < 0.5 * noise["fid"] and real["precision"] > noise["precision"]
    for key in ("kid_mean", "kid_std", "recall", "inception_score_mean", "inception_score_std"):
        assert np.isfinite(real[key])
    # A custom extractor needs its own reference.
    with pytest.raises(ValueError, match="reference"):
        evaluate_images(emoji.images, extractor=lambda x: x.mean(dim=(2, 3)), classifier=classifier)
    custom = evaluate_images(emoji.images, extractor=lambda x: x.flatten(2).std(-1), classifier=None,
                             reference=ReferenceFeatures(torch.rand(30, 3)))
    assert "class_consistency" not in custom and np.isfinite(custom["fid"])


def test_evaluate_pipeline_maps_classes_by_name(classifier):
    # A pipeline whose classes are a permuted subset of the classifier's: ids must be mapped by name.
    names = ["flags", "smileys_emotion", "activities"]
    pipe = tiny_rq_pipeline(class_names=names)
    out = evaluate_pipeline(pipe, num_images_per_class=2, batch_size=4, generator=torch.Generator().manual_seed(0),
                            classifier=classifier, return_images=True, progress=False, temperature=1.0,
                            class_balance="uniform")
    assert out["num_generated"] == 6 and len(out["images"]) == 6 and out["class_ids"] == [0, 0, 1, 1, 2, 2]
    assert out["class_balance"] == "uniform"
    assert set(out["class_consistency_per_class"]) == set(names)
    assert 0 <= out["class_consistency"] <= 1 and out["images_per_second"] > 0
    # Recompute class-consistency from the returned images with the classifier's ids.
    logits = extract_features(classifier, out["images"]).logits
    expected = torch.tensor([EMOJI_CLASSES.index(names[c]) for c in out["class_ids"]])
    assert out["class_consistency"] == M.class_consistency(logits, expected)
    assert map_classes_to_classifier(dict(enumerate(names)), 3, classifier.id2label) == {0: 2, 1: 6, 2: 0}
    with pytest.raises(ValueError, match="does not know"):
        map_classes_to_classifier({0: "cats"}, 1, classifier.id2label)
    with pytest.raises(ValueError, match="unnamed"):
        map_classes_to_classifier(None, 3, classifier.id2label)


def test_class_counts_follow_the_reference():
    labels = torch.tensor([0] * 46 + [1] * 8 + [2] * 23 + [3] * 3)  # reference ids
    to_ref = {0: 0, 1: 1, 2: 2, 3: 3}
    assert class_counts([0, 1, 2, 3], 80, labels, to_ref) == [46, 8, 23, 3]
    counts = class_counts([0, 1, 2, 3], 20, labels, to_ref)
    assert sum(counts) == 20 and min(counts) >= 1 and counts[0] > counts[2] > counts[1]
    assert class_counts([2, 1], 9, labels, to_ref) == [7, 2]  # only the requested classes share the total
    assert class_counts([0, 1, 2], 7, None, to_ref) == [3, 2, 2]
    with pytest.raises(ValueError, match="none of the requested"):
        class_counts([0], 4, torch.tensor([1, 1]), to_ref)


def test_evaluate_reconstruction(emoji, classifier):
    vqvae = tiny_rqvae()
    images = torch.nn.functional.interpolate(emoji.images.float() / 255, size=(32, 32), mode="area")
    out = evaluate_reconstruction(vqvae, images, batch_size=8, extractor=ClassifierFeatureExtractor(classifier))
    recon = (vqvae(images * 2 - 1).sample.clamp(-1, 1) + 1) / 2
    assert out["psnr"] == pytest.approx(float(M.psnr(recon, images).mean()), rel=1e-4)
    assert out["ssim"] == pytest.approx(float(M.ssim(recon, images).mean()), rel=1e-4)
    codes = vqvae.encode(images * 2 - 1, return_codes=True).codes
    assert {k: v for k, v in out.items() if k.startswith("codebook")} == pytest.approx(M.codebook_usage(codes, 16, -1))
    assert "codebook_usage_depth3" in out and out["rfid"] > 0 and out["num_images"] == 18
    assert "rfid" not in evaluate_reconstruction(vqvae, images[:4], extractor=None)


# ------------------------------------------------------------------------------------------- pictures
def test_reconstruction_columns_rq_depths(emoji):
    vqvae = tiny_rqvae()
    pil = [PIL.Image.fromarray(a).resize((32, 32)) for a in emoji.images[:2].permute(0, 2, 3, 1).numpy()]
    titles, rows = reconstruction_columns(vqvae, pil)
    assert titles == ["input", "depth 1", "depth 2", "depth 3 (full)"] and len(rows) == 2 and len(rows[0]) == 4
    from hf_rq import postprocess_images, preprocess_images

    full = postprocess_images(vqvae(preprocess_images(pil)).sample, "np")
    np.testing.assert_allclose(np.asarray(rows[1][3]) / 255.0, full[1], atol=1 / 255 + 1e-6)
    grid = labeled_grid(rows, titles)
    assert grid.size == (4 * 32 + 3 * 2, 14 + 2 * 32 + 2)


def test_granularity_overlay():
    image = PIL.Image.new("RGB", (8, 8), (255, 255, 255))
    g = torch.tensor([[0, 1], [1, 0]])
    out = np.asarray(granularity_overlay(image, g)).astype(int)
    assert (out[1:3, 1:3] == 255).all()  # coarse region: untouched (away from the grid lines)
    assert (out[1:3, 5:7, 1:] < 255).all() and (out[1:3, 5:7, 0] > out[1:3, 5:7, 1]).all()  # fine: red tint
    assert (out[4, :, 0] == 128).all()  # region boundary
    with pytest.raises(ValueError, match="multiple"):
        granularity_overlay(PIL.Image.new("RGB", (9, 9)), g)


def test_train_classifier_is_reproducible(fixtures_dir, tmp_path):
    from hf_rq.evaluation import train_classifier

    argv = ["--data_dir", fixtures_dir / "emoji64", "--train_split", "test", "--eval_split", "test", "--epochs", "2",
            "--batch_size", "8", "--block_out_channels", "8", "16", "--seed", "1"]
    for name in ("a", "b"):
        assert train_classifier.main([str(a) for a in argv] + ["--output_dir", str(tmp_path / name)]) == 0
    a = load_file(str(tmp_path / "a" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    results = json.loads((tmp_path / "a" / "training_results.json").read_text())
    assert results["eval"]["num_images"] == 18 and len(results["log"]) == 2
    assert (tmp_path / "a" / "LICENSE-Noto-Emoji-Apache-2.0.txt").is_file()
    assert "--seed 1" in (tmp_path / "a" / "README.md").read_text()
    reference = load_reference_features(tmp_path / "a")
    assert reference.features.shape == (18, 16)
    with pytest.raises(SystemExit):
        train_classifier.main(["--data_dir", "x", "--output_dir", "y", "--validation_fraction", "1.5"])
    assert train_classifier.main(["--data_dir", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "c")]) == 2
