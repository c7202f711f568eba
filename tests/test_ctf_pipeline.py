"""LlamaGenPipeline and CTFPipeline: parity of a full sample with LlamaGen's code, the pipeline contract
(ids or names, output types, generator, progress bar), round trips through a folder and an offline hub cache."""

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

from hf_rq import CTFPipeline, LlamaGenPipeline
from hf_rq.ctf.clustering import build_coarse_labels
from hf_rq.ctf.conversion import convert_llamagen_gpt, convert_llamagen_vq
from hf_rq.ctf.pipeline import CTFPipelineOutput, coarse_labels_to_pil
from hf_rq.ctf.prior import CTFConfig, CTFForImageGeneration
from hf_rq.image_processing import postprocess_images
from hub_utils import put_in_hub_cache

REPO_ROOT = Path(__file__).resolve().parents[1]
NAMES = {i: name for i, name in enumerate(["tench", "goldfish", "shark", "hen", "ostrich", "finch", "junco",
                                           "robin", "bulbul", "jay"])}
TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2)


@pytest.fixture(scope="module")
def ref(fixtures_dir):
    return load_file(fixtures_dir / "llamagen" / "tensors.safetensors")


@pytest.fixture(scope="module")
def vq(fixtures_dir):
    return convert_llamagen_vq(load_file(fixtures_dir / "llamagen" / "vq.safetensors"),
                               json.loads((fixtures_dir / "llamagen" / "vq_config.json").read_text()))


@pytest.fixture(scope="module")
def llamagen(fixtures_dir, vq):
    gpt = convert_llamagen_gpt(load_file(fixtures_dir / "llamagen" / "gpt.safetensors"),
                               json.loads((fixtures_dir / "llamagen" / "gpt_config.json").read_text()),
                               id2label=NAMES)
    pipe = LlamaGenPipeline(vqvae=vq, transformer=gpt)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.rand(p.shape, generator=g) + 0.5 if p.ndim == 1 else
                    torch.randn(p.shape, generator=g) / (1.0 if "embed" in name else p.shape[1] ** 0.5))
    return model


def _ctf_for(codebook_size=256, num_clusters=16, seed=0):
    config = CTFConfig(coarse_config=TINY, fine_config=TINY, num_clusters=num_clusters, codebook_size=codebook_size,
                       codebook_dim=8, num_classes=10, grid_size=4, id2label=NAMES)
    return _randomize(CTFForImageGeneration(config), seed).eval()


@pytest.fixture(scope="module")
def ctf(vq):
    prior = _ctf_for()
    prior.set_coarse_labels(build_coarse_labels(vq, 16, seed=0, n_init=2))
    pipe = CTFPipeline(vqvae=vq, transformer=prior)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------------------- LlamaGen


def test_llamagen_pipeline_parity(llamagen, ref):
    """The seeded multinomial CFG-2 sample of LlamaGen's generate(), decoded by its VQ, from one pipeline call."""
    kw = dict(guidance_scale=2.0, temperature=1.0, top_k=0, top_p=1.0)
    codes = llamagen([3, 7, 0, 9], generator=torch.Generator().manual_seed(20240915), output_type="latent", **kw).images
    assert torch.equal(codes.view(4, 16), ref["gen.multinomial_cfg2.tokens"].long())
    images = llamagen(["hen", "robin", "tench", "jay"], generator=torch.Generator().manual_seed(20240915),
                      output_type="pt", **kw).images
    torch.testing.assert_close(images, postprocess_images(ref["gen.multinomial_cfg2.images"], "pt"), atol=1e-4, rtol=0)


def test_llamagen_pipeline_contract(llamagen, capsys):
    out = llamagen(class_labels=[1, "Shark"], num_images_per_prompt=2, generator=torch.Generator().manual_seed(0))
    assert len(out.images) == 4 and all(isinstance(im, PIL.Image.Image) and im.size == (64, 64) for im in out.images)
    array = llamagen(2, generator=torch.Generator().manual_seed(0), output_type="np").images
    again = llamagen("shark", generator=torch.Generator().manual_seed(0), output_type="np", return_dict=False)[0]
    assert array.shape == (1, 64, 64, 3) and np.array_equal(array, again)
    assert llamagen.get_label_ids(["goldfish", "jay"]) == [1, 9]
    assert llamagen(None, num_images_per_prompt=2, output_type="latent").images.shape == (2, 4, 4)
    llamagen.set_progress_bar_config(disable=False)
    llamagen([0], output_type="latent", do_sample=False)
    llamagen.set_progress_bar_config(disable=True)
    assert "16/16" in capsys.readouterr().err  # one step per token
    with pytest.raises(ValueError, match="unknown class name"):
        llamagen("dragon")
    with pytest.raises(ValueError, match="out of range"):
        llamagen(10)
    with pytest.raises(ValueError, match="output_type"):
        llamagen(0, output_type="jpeg")
    with pytest.raises(ValueError, match="num_images_per_prompt"):
        llamagen(0, num_images_per_prompt=0)


def test_llamagen_pipeline_roundtrip(llamagen, tmp_path):
    llamagen.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["transformer"] == ["hf_rq.ctf.llamagen", "LlamaGenForImageGeneration"]
    assert index["vqvae"] == ["hf_rq.ctf.tokenizer", "LlamaGenVQModel"]
    expected = llamagen([4, 5], generator=torch.Generator().manual_seed(3), output_type="latent").images
    put_in_hub_cache(tmp_path / "pipe", "hf-rq-test/llamagen-tiny")
    for source in (tmp_path / "pipe", "hf-rq-test/llamagen-tiny"):
        reloaded = LlamaGenPipeline.from_pretrained(source)
        reloaded.set_progress_bar_config(disable=True)
        assert reloaded.transformer.config.id2label[3] == "hen"
        got = reloaded(["ostrich", "finch"], generator=torch.Generator().manual_seed(3), output_type="latent").images
        assert torch.equal(got, expected)



def test_llamagen_folder_saved_before_the_module_split_loads(llamagen, tmp_path):
    """Folders written before LlamaGen's GPT moved to hf_rq.ctf.llamagen record hf_rq.ctf.prior; they must still load."""
    llamagen.save_pretrained(tmp_path)
    index_path = tmp_path / "model_index.json"
    index = json.loads(index_path.read_text())
    index["transformer"] = ["hf_rq.ctf.prior", "LlamaGenForImageGeneration"]
    index_path.write_text(json.dumps(index))
    reloaded = LlamaGenPipeline.from_pretrained(tmp_path)
    assert type(reloaded.transformer).__name__ == "LlamaGenForImageGeneration"
    reloaded.set_progress_bar_config(disable=True)
    expected = llamagen([1], generator=torch.Generator().manual_seed(0), output_type="latent").images
    got = reloaded([1], generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert torch.equal(got, expected)

def test_llamagen_generic_loader(llamagen, tmp_path):
    """DiffusionPipeline.from_pretrained(..., custom_pipeline=<shim>, trust_remote_code=True), offline."""
    llamagen.save_pretrained(tmp_path)
    pipe = DiffusionPipeline.from_pretrained(tmp_path, custom_pipeline=str(REPO_ROOT / "pipelines" / "pipeline_llamagen.py"),
                                             trust_remote_code=True)
    assert type(pipe).__name__ == "LlamaGenPipeline"


def test_llamagen_pipeline_rejects_mismatched_tokenizer(llamagen):
    from hf_rq import LlamaGenVQModel

    other = LlamaGenVQModel(block_out_channels=(8, 8), layers_per_block=1, latent_channels=8, codebook_size=128,
                            norm_num_groups=4)
    with pytest.raises(ValueError, match="predicts 256 codes but the tokenizer's codebook has 128"):
        LlamaGenPipeline(vqvae=other, transformer=llamagen.transformer)(0)


# ------------------------------------------------------------------------------------------------ CTF


def test_ctf_pipeline_outputs_and_coarse_map(ctf):
    out = ctf(["hen", 7], num_images_per_prompt=2, generator=torch.Generator().manual_seed(0),
              return_coarse_labels=True, in_cluster_mask=True)
    assert isinstance(out, CTFPipelineOutput) and len(out.images) == 4 and out.coarse_labels.shape == (4, 4, 4)
    codes = ctf(["hen", 7], num_images_per_prompt=2, generator=torch.Generator().manual_seed(0),
                in_cluster_mask=True, output_type="latent").images
    assert torch.equal(ctf.transformer.fine_to_coarse[codes], out.coarse_labels)
    shown = ctf.show_coarse_labels(out)
    assert len(shown) == 4 and shown[0].size == (64 * 2 + 2, 64)
    maps = coarse_labels_to_pil(out.coarse_labels, 16)
    assert maps[0].size == (64, 64)
    # Same label -> same colour; the map is piecewise constant over each token's 16x16 cell.
    arr = np.asarray(maps[0])
    labels = out.coarse_labels[0]
    assert (arr[:16, :16] == arr[0, 0]).all()
    same = [(i, j) for i in range(4) for j in range(4) if labels[i, j] == labels[0, 0]]
    assert all((arr[16 * i, 16 * j] == arr[0, 0]).all() for i, j in same)
    images, coarse = ctf([1], generator=torch.Generator().manual_seed(0), return_coarse_labels=True, output_type="pt",
                         return_dict=False)
    assert images.shape == (1, 3, 64, 64) and 0 <= images.min() and images.max() <= 1 and coarse.shape == (1, 4, 4)
    with pytest.raises(ValueError, match="return_coarse_labels"):
        ctf.show_coarse_labels(ctf([1], generator=torch.Generator().manual_seed(0)))


def test_ctf_pipeline_rejects_mismatched_prior(ctf, vq):
    wrong_clustering = _ctf_for()
    shuffled = vq.codebook.detach()[torch.randperm(256, generator=torch.Generator().manual_seed(0))]
    wrong_clustering.set_coarse_labels(build_coarse_labels(shuffled, 16, seed=0, n_init=1))
    with pytest.raises(ValueError, match="inconsistent with this tokenizer"):
        CTFPipeline(vqvae=vq, transformer=wrong_clustering)(0)
    small_vocab = _ctf_for(codebook_size=128)
    small_vocab.set_coarse_labels(torch.arange(128) % 16)
    with pytest.raises(ValueError, match="stage-2 model predicts 128 fine codes but the tokenizer's codebook has 256"):
        CTFPipeline(vqvae=vq, transformer=small_vocab)(0)


def test_ctf_pipeline_roundtrip(ctf, tmp_path):
    kw = dict(generator=torch.Generator().manual_seed(5), output_type="latent", fine_guidance_scale=1.5,
              return_coarse_labels=True)
    expected = ctf(["jay", "robin"], **kw)
    ctf.save_pretrained(tmp_path / "pipe")
    put_in_hub_cache(tmp_path / "pipe", "hf-rq-test/ctf-tiny")
    reloaded = CTFPipeline.from_pretrained("hf-rq-test/ctf-tiny")
    reloaded.set_progress_bar_config(disable=True)
    assert reloaded.transformer.config.has_centroids
    kw["generator"] = torch.Generator().manual_seed(5)
    got = reloaded(["jay", "robin"], **kw)
    assert torch.equal(got.images, expected.images) and torch.equal(got.coarse_labels, expected.coarse_labels)
    generic = DiffusionPipeline.from_pretrained(tmp_path / "pipe", trust_remote_code=True,
                                                custom_pipeline=str(REPO_ROOT / "pipelines" / "pipeline_ctf.py"))
    assert type(generic).__name__ == "CTFPipeline"
