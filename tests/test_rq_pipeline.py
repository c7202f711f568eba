"""RQTransformerPipeline: output types, class names, reproducibility, save/load (folder, hub cache, generic loader)."""

import io
import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file

from hf_rq import RQTransformerConfig, RQTransformerForImageGeneration, RQTransformerPipeline, RQVAEModel
from hf_rq.rq.conversion import convert_rqtransformer, convert_rqvae

SHIM = Path(__file__).resolve().parents[1] / "pipelines" / "pipeline_rq.py"
NAMES = ["apple", "bear", "cat", "dog", "eagle", "fish", "goat", "horse", "ibis", "jaguar"]



@pytest.fixture(scope="module")
def ref(fixtures_dir):
    return load_file(fixtures_dir / "rq" / "tensors.safetensors")


@pytest.fixture(scope="module")
def pipe(fixtures_dir):
    d = fixtures_dir / "rq"
    vqvae = convert_rqvae(load_file(d / "rqvae.safetensors"), json.loads((d / "rqvae_config.json").read_text()))
    prior = convert_rqtransformer(load_file(d / "rqtransformer.safetensors"),
                                  json.loads((d / "rqtransformer_config.json").read_text()), vqvae,
                                  id2label=dict(enumerate(NAMES)))
    pipe = RQTransformerPipeline(vqvae=vqvae, transformer=prior)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def test_greedy_images_match_reference(pipe, ref):
    out = pipe(ref["tf.cond"].tolist(), do_sample=False, output_type="pt")
    torch.testing.assert_close(out.images, (ref["sample.images"] * 0.5 + 0.5).clamp(0, 1), atol=1e-4, rtol=1e-4)
    codes = pipe(ref["tf.cond"], do_sample=False, output_type="latent").images
    assert torch.equal(codes, ref["sample.codes"])


@torch.no_grad()
def test_output_types_and_names(pipe):
    pil = pipe(["cat", "Dog"], generator=seeded()).images
    assert len(pil) == 2 and isinstance(pil[0], PIL.Image.Image) and pil[0].size == (32, 32)
    arr = pipe([2, 3], generator=seeded(), output_type="np").images
    assert arr.shape == (2, 32, 32, 3) and arr.dtype == np.float32 and 0 <= arr.min() and arr.max() <= 1
    np.testing.assert_array_equal(np.asarray(pil[1]), (arr[1] * 255).round().astype(np.uint8))
    pt = pipe("cat", num_images_per_prompt=3, generator=seeded(), output_type="pt", return_dict=False)[0]
    assert pt.shape == (3, 3, 32, 32)
    codes = pipe([2, 3], generator=seeded(), output_type="latent").images
    assert codes.shape == (2, 8, 8, 4) and codes.dtype == torch.long
    assert torch.equal(codes, pipe.transformer.generate([2, 3], generator=seeded()))
    assert pipe.get_label_ids(["horse", "ibis"]) == [7, 8]


@torch.no_grad()
def test_same_generator_same_images(pipe):
    a = pipe([1, 5], generator=seeded(3), output_type="np").images
    b = pipe([1, 5], generator=seeded(3), output_type="np").images
    c = pipe([1, 5], generator=seeded(4), output_type="np").images
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # sampling arguments reach the prior: a tiny nucleus is greedy
    greedy = pipe([1, 5], do_sample=False, output_type="latent").images
    assert torch.equal(pipe([1, 5], top_p=1e-3, generator=seeded(), output_type="latent").images, greedy)
    assert torch.equal(pipe([1, 5], top_k=[1, 1, 1, 1], generator=seeded(), output_type="latent").images, greedy)


def test_bad_inputs(pipe):
    with pytest.raises(ValueError, match="out of range"):
        pipe([10])
    with pytest.raises(ValueError, match="unknown class name"):
        pipe(["zebra"])
    with pytest.raises(ValueError, match="class-conditional"):
        pipe()
    with pytest.raises(ValueError, match="output_type"):
        pipe([1], output_type="jpg")
    with pytest.raises(ValueError, match="top_p"):
        pipe([1], top_p=2.0)
    with pytest.raises(ValueError, match="one entry per code depth"):
        pipe([1], temperature=[1.0, 1.0])
    with pytest.raises(ValueError, match="temperature"):
        pipe([1], temperature=-0.5)
    with pytest.raises(ValueError, match="null class"):
        pipe([1], guidance_scale=3.0)
    with pytest.raises(ValueError, match="num_images_per_prompt"):
        pipe([1], num_images_per_prompt=0)


@torch.no_grad()
def test_unconditional_pipeline_and_codebook_check(pipe):
    vqvae = pipe.vqvae
    torch.manual_seed(0)
    config = RQTransformerConfig(codebook_size=64, grid_height=8, grid_width=8, code_depth=4, code_embed_dim=16,
                                 hidden_size=32, num_spatial_layers=1, num_depth_layers=1, num_attention_heads=2)
    prior = RQTransformerForImageGeneration.from_tokenizer(config, vqvae).eval()
    uncond = RQTransformerPipeline(vqvae=vqvae, transformer=prior)
    uncond.set_progress_bar_config(disable=True)
    images = uncond(num_images_per_prompt=2, generator=seeded(), output_type="np").images
    assert images.shape == (2, 32, 32, 3)
    with pytest.raises(ValueError, match="unconditional"):
        uncond([1])
    # a prior paired with another tokenizer is refused, naming the problem
    other = RQVAEModel(**vqvae.config)
    mismatched = RQTransformerPipeline(vqvae=other, transformer=prior)
    with pytest.raises(ValueError, match="codebook differs"):
        mismatched(num_images_per_prompt=1)


@torch.no_grad()
def test_progress_bar_counts_spatial_positions(pipe):
    stream = io.StringIO()
    pipe.set_progress_bar_config(file=stream, disable=False)
    try:
        pipe([1], generator=seeded(), output_type="latent")
    finally:
        pipe.set_progress_bar_config(disable=True)
    assert "64/64" in stream.getvalue()


@torch.no_grad()
def test_save_and_load(pipe, tmp_path):
    from hub_utils import put_in_hub_cache

    pipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["transformer"] == ["hf_rq.rq.prior", "RQTransformerForImageGeneration"]
    assert index["vqvae"] == ["hf_rq.rq.tokenizer", "RQVAEModel"]
    expected = pipe(["cat", "dog"], generator=seeded(7), output_type="np").images

    loaded = RQTransformerPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.id2label == dict(enumerate(NAMES))
    np.testing.assert_array_equal(loaded(["cat", "dog"], generator=seeded(7), output_type="np").images, expected)

    put_in_hub_cache(tmp_path / "pipe", "hf-rq-test/rq-pipeline-small")
    hub = RQTransformerPipeline.from_pretrained("hf-rq-test/rq-pipeline-small")
    hub.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(hub(["cat", "dog"], generator=seeded(7), output_type="np").images, expected)


@torch.no_grad()
def test_generic_loader_with_custom_pipeline(pipe, tmp_path):
    """diffusers' generic loader finds our class through the one-line shim in pipelines/ (offline)."""
    from diffusers import DiffusionPipeline

    pipe.save_pretrained(tmp_path / "pipe")
    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained(tmp_path / "pipe", custom_pipeline=str(SHIM))
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "pipe", custom_pipeline=str(SHIM), trust_remote_code=True)
    assert type(loaded).__name__ == "RQTransformerPipeline"
    assert isinstance(loaded.transformer, RQTransformerForImageGeneration)
    loaded.set_progress_bar_config(disable=True)
    expected = pipe([4], generator=seeded(1), output_type="latent").images
    assert torch.equal(loaded([4], generator=seeded(1), output_type="latent").images, expected)
