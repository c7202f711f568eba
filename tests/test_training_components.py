"""hf_rq.training building blocks, in-process: data, LPIPS, GAN loss, NaN guard, checkpoints, code cache, hub."""

import argparse
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from hf_rq import RQVAEModel
from hf_rq.checkpoint_utils import CheckpointError
from hf_rq.training import (
    LPIPS, DataConfigError, DiscriminatorLoss, ImageDataset, ImageTransform, LPIPSWeightsNotFoundError,
    NLayerDiscriminator, NonFiniteGuard, TokenizerLoss, TokenizerLossConfig, TrainState, add_data_arguments,
    adaptive_gan_weight, cache_codes, check_resolution, codebook_statistics, hinge_d_loss, latest_checkpoint,
    list_checkpoints, load_image_data, load_lpips, make_model_card, push_folder_to_hub, resolve_resume_checkpoint,
    save_checkpoint, step_generator, tokenizer_fingerprint,
)
from hf_rq.training import lpips as lpips_module
from hf_rq.training.checkpointing import MARKER

REPO = Path(__file__).resolve().parents[1]
IMAGES = Path(__file__).parent / "fixtures" / "images"
TINY_RQVAE = json.loads((REPO / "training" / "configs" / "rqvae_tiny.json").read_text())



def data_args(**overrides):
    parser = argparse.ArgumentParser()
    add_data_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(["--train_data_dir", str(IMAGES), "--resolution", "16"])
    for k, v in overrides.items():
        setattr(args, k, v)
    return args


def tiny_rqvae(seed=0):
    torch.manual_seed(seed)
    return RQVAEModel(**TINY_RQVAE, sample_size=16)


# ------------------------------------------------------------------------------------------------- data
def test_imagefolder_classes_become_id2label_and_splits_are_found():
    data = load_image_data(data_args())
    assert data.id2label == {0: "animals_nature", 1: "smileys_emotion"}
    assert len(data.train) == 8 and len(data.validation) == 2
    item = data.train[5]
    assert item["pixel_values"].shape == (3, 16, 16) and item["pixel_values"].dtype == torch.float32
    assert -1 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1
    assert item["class_labels"] == 1 and item["index"] == 5


def test_transforms_depend_only_on_seed_epoch_index():
    data = load_image_data(data_args(random_flip=True, center_crop=False, resolution=24))
    ds = data.train
    first = [ds[i]["pixel_values"] for i in range(8)]
    again = [ds[i]["pixel_values"] for i in reversed(range(8))][::-1]  # order of access does not matter
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    ds.set_epoch(1)
    other = [ds[i]["pixel_values"] for i in range(8)]
    assert any(not torch.equal(a, b) for a, b in zip(first, other)), "augmentation must change with the epoch"
    # a flip is exactly a mirror of the unflipped crop when the crop is central
    tf = ImageTransform(16, center_crop=True)
    import PIL.Image

    image = PIL.Image.open(next((IMAGES / "train" / "animals_nature").iterdir()))
    assert torch.equal(tf(image, flip=True), tf(image, flip=False).flip(-1))


def test_dataset_name_with_custom_columns_and_string_labels(tmp_path):
    """A Hub-style dataset (here a local parquet folder given to --dataset_name): named columns, string labels."""
    import io

    import datasets
    import PIL.Image

    rows = {"img": [], "category": []}
    for path in sorted((IMAGES / "train").glob("*/*.png")):
        buf = io.BytesIO()
        PIL.Image.open(path).save(buf, format="PNG")
        rows["img"].append({"bytes": buf.getvalue(), "path": None})
        rows["category"].append("animal" if path.parent.name == "animals_nature" else "face")
    features = datasets.Features({"img": datasets.Image(), "category": datasets.Value("string")})
    (tmp_path / "hub_dataset" / "data").mkdir(parents=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "hub_dataset" / "data" / "train.parquet"))
    args = data_args(train_data_dir=None, dataset_name=str(tmp_path / "hub_dataset"), image_column="img",
                     label_column="category")
    data = load_image_data(args)
    assert data.id2label == {0: "animal", 1: "face"} and data.validation is None
    assert [data.train[i]["class_labels"] for i in (0, 7)] == [0, 1]
    assert data.train[0]["pixel_values"].shape == (3, 16, 16)
    with pytest.raises(DataConfigError, match="no label column"):
        load_image_data(data_args(train_data_dir=None, dataset_name=str(tmp_path / "hub_dataset"), image_column="img"),
                        need_labels=True)
    with pytest.raises(DataConfigError, match="exactly one of --dataset_name"):
        load_image_data(data_args(dataset_name="x/y"))


def test_bad_data_configuration_fails_clearly(tmp_path):
    with pytest.raises(DataConfigError, match="--label_column 'category' is not a column"):
        load_image_data(data_args(label_column="category"))
    with pytest.raises(DataConfigError, match="--image_column 'img' is not a column"):
        load_image_data(data_args(image_column="img"))
    empty = tmp_path / "empty"
    (empty / "train" / "cats").mkdir(parents=True)
    (empty / "train" / "cats" / "notes.txt").write_text("no images here")
    with pytest.raises(DataConfigError, match="no images"):
        load_image_data(data_args(train_data_dir=str(empty)))
    with pytest.raises(DataConfigError, match="not a directory"):
        load_image_data(data_args(train_data_dir=str(tmp_path / "missing")))
    with pytest.raises(DataConfigError, match="--validation_split 'dev' not found"):
        load_image_data(data_args(validation_split="dev"))
    with pytest.raises(DataConfigError, match="not divisible by the downsampling factor 8"):
        check_resolution(60, 8, "RQVAEModel")
    check_resolution(64, 8)


# ------------------------------------------------------------------------------------------------ LPIPS
def random_lpips_file(path, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(v.shape, generator=g) * 0.05 if k.startswith("vgg") else torch.rand(v.shape, generator=g)
          for k, v in LPIPS().state_dict().items()}
    save_file(sd, str(path))
    return sd


def lpips_reference(sd, x, y):
    """Independent re-computation of LPIPS with functional ops from a state dict."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def feats(z):
        z = (z - shift) / scale
        out, i = [], 0
        for block in ([0, 2], [5, 7], [10, 12, 14], [17, 19, 21], [24, 26, 28]):
            if i:
                z = F.max_pool2d(z, 2)
            for j in block:
                z = F.relu(F.conv2d(z, sd[f"vgg.features.{j}.weight"], sd[f"vgg.features.{j}.bias"], padding=1))
            out.append(z)
            i += 1
        return out

    total = 0
    for l, (a, b) in enumerate(zip(feats(x), feats(y))):
        a = a / (a.norm(dim=1, keepdim=True) + 1e-10)
        b = b / (b.norm(dim=1, keepdim=True) + 1e-10)
        total = total + (F.conv2d((a - b) ** 2, sd[f"lin{l}.model.1.weight"])).mean(dim=(2, 3))
    return total.flatten()


def test_lpips_with_explicit_random_weights(tmp_path):
    sd = random_lpips_file(tmp_path / "lpips.safetensors")
    model = load_lpips(lpips_weights=tmp_path / "lpips.safetensors")
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    d = model(x, y)
    assert d.shape == (2,)
    torch.testing.assert_close(d, lpips_reference(sd, x, y), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(model(x, x), torch.zeros(2), atol=1e-7, rtol=0)
    assert (d > 0).all()
    x.requires_grad_(True)
    model(x, y).sum().backward()
    assert x.grad.abs().sum() > 0 and all(p.grad is None for p in model.parameters())
    model.train()
    assert not model.training, "LPIPS must stay in eval mode (no dropout)"


def test_lpips_accepts_torchvision_and_lpips_layouts(tmp_path):
    sd = random_lpips_file(tmp_path / "combined.safetensors")
    torchvision_sd = {k.removeprefix("vgg."): v for k, v in sd.items() if k.startswith("vgg.")}
    torchvision_sd["classifier.0.weight"] = torch.zeros(4, 4)  # the full vgg16 file has a classifier: ignored
    save_file(torchvision_sd, str(tmp_path / "vgg16.safetensors"))
    save_file({k: v for k, v in sd.items() if k.startswith("lin")}, str(tmp_path / "lin.safetensors"))
    model = load_lpips(vgg_weights=tmp_path / "vgg16.safetensors", lpips_weights=tmp_path / "lin.safetensors")
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    torch.save({k: v for k, v in sd.items() if k.startswith("lin")}, tmp_path / "vgg.pth")
    with pytest.raises(CheckpointError, match="pickle"):
        load_lpips(vgg_weights=tmp_path / "vgg16.safetensors", lpips_weights=tmp_path / "vgg.pth")
    loaded = load_lpips(vgg_weights=tmp_path / "vgg16.safetensors", lpips_weights=tmp_path / "vgg.pth", allow_pickle=True)
    assert torch.equal(loaded.lin4.model[1].weight, sd["lin4.model.1.weight"])
    # the converter writes the combined file
    lpips_module.main(["--vgg", str(tmp_path / "vgg16.safetensors"), "--linear", str(tmp_path / "vgg.pth"),
                       "--output", str(tmp_path / "out.safetensors"), "--allow_pickle"])
    assert set(load_file(str(tmp_path / "out.safetensors"))) == set(LPIPS().state_dict())


def test_lpips_missing_weights_error_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch_hub"))
    monkeypatch.setattr(lpips_module, "default_linear_paths", lambda: [tmp_path / "nowhere" / "vgg.pth"])
    with pytest.raises(LPIPSWeightsNotFoundError) as err:
        load_lpips()
    msg = str(err.value)
    assert "--lpips_weights" in msg and "--perceptual_weight 0" in msg
    sd = random_lpips_file(tmp_path / "c.safetensors")
    save_file({k: v for k, v in sd.items() if k.startswith("lin")}, str(tmp_path / "lin.safetensors"))
    with pytest.raises(LPIPSWeightsNotFoundError, match="VGG16 weights.*vgg16-397923af.pth.*--perceptual_weight 0"):
        load_lpips(lpips_weights=tmp_path / "lin.safetensors")
    # torchvision's cache location is searched
    vgg = {k.removeprefix("vgg."): v for k, v in sd.items() if k.startswith("vgg.")}
    (tmp_path / "torch_hub" / "checkpoints").mkdir(parents=True)
    torch.save(vgg, tmp_path / "torch_hub" / "checkpoints" / "vgg16-397923af.pth")
    model = load_lpips(lpips_weights=tmp_path / "lin.safetensors", allow_pickle=True)
    assert torch.equal(model.vgg.features[28].weight, sd["vgg.features.28.weight"])


# ------------------------------------------------------------------------------------------ GAN losses
def test_patchgan_hinge_and_adaptive_weight():
    torch.manual_seed(0)
    disc = NLayerDiscriminator(3, ndf=8, n_layers=2)
    assert disc(torch.randn(2, 3, 32, 32)).shape == (2, 1, 6, 6)
    convs = [m for m in disc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert abs(torch.cat([c.weight.flatten() for c in convs]).std().item() - 0.02) < 0.004
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.75))
    w = torch.randn(4, 3, requires_grad=True)
    x = torch.randn(5, 4)
    nll, gan = (x @ w).pow(2).mean(), -(x @ w).mean()
    g1 = torch.autograd.grad(nll, w, retain_graph=True)[0]
    g2 = torch.autograd.grad(gan, w, retain_graph=True)[0]
    expected = (g1.norm() / (g2.norm() + 1e-4)).clamp(0, 1e4)
    torch.testing.assert_close(adaptive_gan_weight(nll, gan, w), expected)
    assert adaptive_gan_weight(nll, gan, w, max_weight=1e-3).item() == pytest.approx(1e-3)


def test_tokenizer_loss_terms_and_disc_start():
    model = tiny_rqvae()
    disc = NLayerDiscriminator(3, 8, 1)
    cfg = TokenizerLossConfig(perceptual_weight=0.0, disc_weight=0.5, disc_start=3, commitment_weight=0.25)
    loss_fn = TokenizerLoss(cfg, None, disc)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    out = model(images)
    early = loss_fn(out, images, step=2, last_layer=model.decoder.conv_out.weight)
    assert set(early) == {"reconstruction", "commitment", "loss"}
    torch.testing.assert_close(early["loss"], early["reconstruction"] + 0.25 * early["commitment"])
    late = loss_fn(out, images, step=3, last_layer=model.decoder.conv_out.weight)
    assert {"generator_adv", "adaptive_weight"} <= set(late)
    torch.testing.assert_close(late["loss"], late["reconstruction"] + 0.25 * late["commitment"]
                               + late["adaptive_weight"] * 0.5 * late["generator_adv"])
    late["loss"].backward()
    assert all(p.grad is None for p in disc.parameters()), "the generator loss must not train the discriminator"
    assert all(p.requires_grad for p in disc.parameters())
    d = DiscriminatorLoss(disc, weight=0.5)(images, out.sample)
    d["disc_loss"].backward()
    assert all(p.grad is not None for p in disc.parameters())
    with pytest.raises(ValueError, match="perceptual network"):
        TokenizerLoss(TokenizerLossConfig(perceptual_weight=1.0, disc_weight=0), None, None)


def test_nonfinite_guard_names_step_and_term():
    guard = NonFiniteGuard(max_skips=1)
    ok = {"reconstruction": torch.tensor(0.5), "perceptual": torch.tensor(0.1)}
    assert guard.check(ok, step=3)
    bad = {"reconstruction": torch.tensor(0.5), "perceptual": torch.tensor(float("nan"))}
    assert guard.check(bad, step=4) is False and guard.skipped == [4]
    with pytest.raises(FloatingPointError, match=r"step 7: term\(s\) 'perceptual'.*already skipped steps \[4\]"):
        guard.check(bad, step=7)
    with pytest.raises(FloatingPointError, match=r"step 1: term\(s\) 'loss' \(loss=inf\).*--max_nan_skips"):
        NonFiniteGuard().check({"loss": torch.tensor(float("inf"))}, step=1)


def test_codebook_statistics_and_step_generator():
    stats = codebook_statistics(torch.tensor([5, 5, 0, 0]))
    assert stats["codebook_usage"] == 0.5 and stats["codebook_perplexity"] == pytest.approx(2.0)
    a = torch.rand(3, generator=step_generator(0, 1, 5, 2))
    assert torch.equal(a, torch.rand(3, generator=step_generator(0, 1, 5, 2)))
    assert not torch.equal(a, torch.rand(3, generator=step_generator(0, 0, 5, 2)))


# ----------------------------------------------------------------------------------------- checkpoints
class FakeAccelerator:
    """Single-process stand-in for `save_state`: writes one file per call, like Accelerate does."""

    is_main_process = True
    project_configuration = SimpleNamespace(iteration=0)

    def __init__(self, fail_at=None):
        self.fail_at = fail_at

    def wait_for_everyone(self):
        pass

    def save_state(self, path):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "model.safetensors").write_bytes(b"weights")
        if self.fail_at is not None and self.fail_at in str(path):
            raise KeyboardInterrupt("killed while saving")
        (Path(path) / "optimizer.bin").write_bytes(b"optimizer")


def test_checkpoint_rotation_latest_and_interrupted_save(tmp_path):
    acc = FakeAccelerator()
    for step in (2, 4, 6):
        save_checkpoint(acc, tmp_path, TrainState(step=step), total_limit=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-6"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "checkpoint-6"
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(FakeAccelerator(fail_at="checkpoint-8"), tmp_path, TrainState(step=8), total_limit=2)
    assert (tmp_path / "checkpoints" / ".tmp-checkpoint-8").is_dir()
    assert latest_checkpoint(tmp_path).name == "checkpoint-6"
    assert resolve_resume_checkpoint("latest", tmp_path).name == "checkpoint-6"
    # a folder with a checkpoint name but no completion marker is never chosen
    (tmp_path / "checkpoints" / "checkpoint-9").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("checkpoint-9\n")
    assert latest_checkpoint(tmp_path).name == "checkpoint-6"
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve_resume_checkpoint(str(tmp_path / "checkpoints" / "checkpoint-9"), tmp_path)
    assert resolve_resume_checkpoint("checkpoint-4", tmp_path).name == "checkpoint-4"
    save_checkpoint(acc, tmp_path, TrainState(step=8), total_limit=2)  # cleans the leftover
    assert not (tmp_path / "checkpoints" / ".tmp-checkpoint-8").exists()
    assert json.loads((tmp_path / "checkpoints" / "checkpoint-8" / MARKER).read_text())["step"] == 8
    assert resolve_resume_checkpoint("latest", tmp_path / "elsewhere") is None
    assert resolve_resume_checkpoint(None, tmp_path) is None


# ------------------------------------------------------------------------------------------- code cache
def test_code_cache_is_reused_and_invalidated_by_the_tokenizer(tmp_path, monkeypatch):
    data = load_image_data(data_args())
    tok = tiny_rqvae().eval()
    calls = []
    original = RQVAEModel.encode

    def counting(self, *a, **k):
        calls.append(1)
        return original(self, *a, **k)

    monkeypatch.setattr(RQVAEModel, "encode", counting)
    rng = torch.random.get_rng_state()
    first = cache_codes(tok, data.train, tmp_path, batch_size=4, store_latents=True, show_progress=False)
    assert len(first) == 8 and len(calls) == 2
    assert torch.equal(rng, torch.random.get_rng_state()), "building a cache must not change the training run"
    row = first.with_format("torch")[3]
    with torch.no_grad():
        images = data.train[3]["pixel_values"][None]
        enc = original(tok, images, return_codes=True)
    assert torch.equal(row["codes"].long(), enc.codes[0]) and row["class_labels"].item() == 0
    torch.testing.assert_close(row["latents"], enc.latents[0])
    again = cache_codes(tok, data.train, tmp_path, batch_size=4, store_latents=True, show_progress=False)
    assert len(calls) == 2 and len(again) == 8, "a matching cache must be read, not recomputed"
    fp = tokenizer_fingerprint(tok)
    with torch.no_grad():
        tok.quantizer.codebooks[0].weight[0, 0] += 1e-3  # a codebook buffer changes -> another cache
    assert tokenizer_fingerprint(tok) != fp
    cache_codes(tok, data.train, tmp_path, batch_size=4, store_latents=True, show_progress=False)
    assert len(calls) == 4 and len(list(tmp_path.glob("codes-*"))) == 2
    flipped = ImageDataset(data.train.dataset, "image", "label", ImageTransform(16), flip_all=True)
    both = cache_codes(tok, flipped, tmp_path, batch_size=16, show_progress=False)
    assert len(both) == 16 and sum(both["flipped"]) == 8 and "latents" not in both.column_names


def test_soft_codes_from_cached_latents_equal_get_soft_codes():
    tok = tiny_rqvae().eval()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    soft_a, codes_a = tok.get_soft_codes(images, temperature=0.5, stochastic=True,
                                         generator=torch.Generator().manual_seed(3))
    latents = tok.encode(images).latents.permute(0, 2, 3, 1)
    soft_b, codes_b = tok.quantizer.soft_codes(latents, 0.5, True, torch.Generator().manual_seed(3))
    assert torch.equal(codes_a, codes_b)
    torch.testing.assert_close(soft_a, soft_b, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- hub / card
def _fake_hub():
    """Patch the Hub write API so uploads land in the offline hub cache (HF_CONVENTIONS.md section 5)."""
    import hashlib
    import time
    from unittest import mock

    from huggingface_hub import HfApi, constants

    def create_repo(self, repo_id, *a, **k):
        return SimpleNamespace(repo_id=repo_id, url=f"local://{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, path_in_repo=None, repo_type=None, ignore_patterns=None, **k):
        folder = Path(constants.HF_HUB_CACHE) / f"{repo_type or 'model'}s--{repo_id.replace('/', '--')}"
        commit = hashlib.sha1(f"{repo_id}{time.time_ns()}".encode()).hexdigest()
        snap = folder / "snapshots" / commit
        shutil.copytree(folder_path, snap / (path_in_repo or ""), ignore=shutil.ignore_patterns(
            *[p.split("/")[0] for p in ignore_patterns or []]))
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / "main").write_text(commit)
        return SimpleNamespace(commit_url=f"local://{commit}", oid=commit)

    return mock.patch.multiple(HfApi, create_repo=create_repo, upload_folder=upload_folder)


def test_model_card_and_push_round_trip(tmp_path):
    model = tiny_rqvae()
    folder = tmp_path / "run"
    model.save_pretrained(folder)
    (folder / "checkpoints" / "checkpoint-1").mkdir(parents=True)
    (folder / "checkpoints" / "checkpoint-1" / "optimizer.bin").write_bytes(b"x")
    args = SimpleNamespace(dataset_name="someone/emoji", train_data_dir=None, pretrained_model_name_or_path=None,
                           resolution=16, train_batch_size=2, learning_rate=1e-4, seed=0,
                           argv=["--dataset_name", "someone/emoji", "--hub_token", "secret"])
    card = make_model_card(folder, repo_id="org/tiny-rqvae", kind="tokenizer", model_class="RQVAEModel",
                           script="train_tokenizer.py", args=args, metrics={"val_psnr": 20.5},
                           usage="from hf_rq import RQVAEModel", tags=["rqvae"])
    text = (folder / "README.md").read_text()
    assert card.data.library_name == "hf_rq" and "someone/emoji" in card.data.datasets
    assert "val_psnr | 20.5" in text and "secret" not in text and "--hub_token '***'" in text
    with _fake_hub():
        assert push_folder_to_hub(folder, "org/tiny-rqvae") == "org/tiny-rqvae"
    loaded = RQVAEModel.from_pretrained("org/tiny-rqvae")
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    from huggingface_hub import ModelCard, try_to_load_from_cache

    assert ModelCard.load(try_to_load_from_cache("org/tiny-rqvae", "README.md")).data.library_name == "hf_rq"
    assert try_to_load_from_cache("org/tiny-rqvae", "checkpoints/checkpoint-1/optimizer.bin") is None
