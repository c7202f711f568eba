"""DQTransformerPipeline: reference images, granularity output and overlay, class names, save/load (hub cache, shim)."""

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file

from hf_rq import DQTransformerPipeline, DQVAEModel
from hf_rq.dq.conversion import convert_dqtransformer, convert_dqvae

SHIM = Path(__file__).resolve().parents[1] / "pipelines" / "pipeline_dq.py"
NAMES = ["apple", "bear", "cat", "dog", "eagle", "fish", "goat", "horse", "ibis", "jaguar"]
GREEDY = dict(do_sample=False, top_k=None, top_p=None, position_top_k=None, position_top_p=None)



@pytest.fixture(scope="module")
def dq(fixtures_dir):
    return fixtures_dir / "dq"


@pytest.fixture(scope="module")
def sample(dq):
    return load_file(dq / "transformer_sample.safetensors")


@pytest.fixture(scope="module")
def pipe(dq):
    configs = json.loads((dq / "configs.json").read_text())
    vqvae = convert_dqvae(load_file(dq / "vae_weights.safetensors"), configs["vae_entropy"],
                          entropy_threshold=1.6777750253677368)
    prior = convert_dqtransformer(load_file(dq / "transformer_weights.safetensors"), configs["dualformer"],
                                  id2label=dict(enumerate(NAMES)))
    pipe = DQTransformerPipeline(vqvae=vqvae, transformer=prior)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("fixed", [False, True], ids=["sampled-fine-positions", "fixed-fine-positions"])
def test_greedy_images_match_reference(pipe, sample, fixed):
    prefix = "fixedpos_" if fixed else ""
    out = pipe(class_labels=["bear", 4, "ibis"], fix_fine_position=fixed, output_type="pt", return_granularity=True,
               **GREEDY)
    expected = (sample[prefix + "decoded"] / 2 + 0.5).clamp(0, 1)  # the authors' decode_to_img, in [0, 1]
    torch.testing.assert_close(out.images, expected, atol=1e-4, rtol=1e-4)
    coarse = sample[prefix + "coarse_position"]
    for b in range(3):  # granularity: 0 exactly at the sampled coarse cells
        cells = coarse[b][coarse[b] < 64]
        assert set((out.granularity[b].reshape(-1) == 0).nonzero().reshape(-1).tolist()) == set(cells.tolist())
    latent = pipe(class_labels=[1, 4, 8], fix_fine_position=fixed, output_type="latent", **GREEDY)
    assert torch.equal(latent.images, sample[prefix + "code_map"]) and latent.granularity is None


def test_output_types_and_granularity_overlay(pipe):
    out = pipe(class_labels="cat", num_images_per_prompt=2, generator=seeded(), return_granularity=True)
    assert len(out.images) == 2 and isinstance(out.images[0], PIL.Image.Image) and out.images[0].size == (64, 64)
    assert out.granularity.shape == (2, 8, 8) and out.granularity.dtype == torch.long
    drawn = pipe.draw_granularity(out.images, out.granularity)
    assert len(drawn) == 2 and drawn[0].size == (64, 64)
    fine = out.granularity[0].repeat_interleave(8, 0).repeat_interleave(8, 1).numpy().astype(bool)
    delta = np.abs(np.asarray(drawn[0], dtype=np.float64) - np.asarray(out.images[0], dtype=np.float64)).sum(-1)
    interior = np.ones((64, 64), bool)
    interior[::8, :] = interior[:, ::8] = False  # grid lines are drawn on every region's border
    assert (delta[fine & interior] > 0).mean() > 0.9 and (delta[~fine & interior] == 0).all()
    np_out = pipe(class_labels=[2], generator=seeded(), output_type="np")
    assert np_out.images.shape == (1, 64, 64, 3) and 0 <= np_out.images.min() and np_out.images.max() <= 1
    pt_out = pipe(class_labels=[2], generator=seeded(), output_type="pt", return_granularity=True)
    assert len(pipe.draw_granularity(pt_out.images, pt_out.granularity)) == 1
    images, granularity = pipe(class_labels=[2], generator=seeded(), output_type="np", return_granularity=True,
                               return_dict=False)
    np.testing.assert_allclose(images, np_out.images)
    assert granularity.shape == (1, 8, 8)
    assert pipe.get_label_ids(["dog", "Eagle"]) == [3, 4]


def test_same_generator_same_images(pipe):
    a = pipe(class_labels=[0, 5], generator=seeded(1), output_type="latent", return_granularity=True)
    b = pipe(class_labels=[0, 5], generator=seeded(1), output_type="latent", return_granularity=True)
    c = pipe(class_labels=[0, 5], generator=seeded(2), output_type="latent", return_granularity=True)
    assert torch.equal(a.images, b.images) and torch.equal(a.granularity, b.granularity)
    assert not torch.equal(a.images, c.images)


def test_bad_inputs(pipe):
    with pytest.raises(ValueError, match=r"class id 10 is out of range \[0, 10\)"):
        pipe(class_labels=10)
    with pytest.raises(ValueError, match="unknown class name 'zebra'"):
        pipe(class_labels="zebra")
    with pytest.raises(ValueError, match="class-conditional"):
        pipe()
    with pytest.raises(ValueError, match="output_type"):
        pipe(class_labels=1, output_type="jpeg")
    with pytest.raises(ValueError, match="num_images_per_prompt"):
        pipe(class_labels=1, num_images_per_prompt=0)
    with pytest.raises(ValueError, match="got 2 images but 1 granularity maps"):
        pipe.draw_granularity([PIL.Image.new("RGB", (64, 64))] * 2, torch.zeros(1, 8, 8, dtype=torch.long))
    other = DQVAEModel(sample_size=32, block_out_channels=(32, 32, 32, 64), layers_per_block=1, attn_resolutions=(),
                       decoder_block_out_channels=(32, 32, 32), decoder_layers_per_block=1,
                       decoder_attn_resolutions=(), latent_channels=32, embed_dim=32, codebook_size=128)
    with pytest.raises(ValueError, match="does not fit the DQ-Transformer"):
        DQTransformerPipeline(vqvae=other, transformer=pipe.transformer)(class_labels=1)


def test_progress_bar_counts_sampler_steps(pipe):
    calls = []
    original = pipe.progress_bar

    def counting(iterable=None, total=None):
        def gen():
            for item in iterable:
                calls.append(item)
                yield item
        return gen()

    pipe.progress_bar = counting
    try:
        out = pipe(class_labels=[1], output_type="latent", **GREEDY)
    finally:
        pipe.progress_bar = original
    codes = out.images
    assert codes.shape == (1, 16, 16) and 5 < len(calls) < 64 + 256 + 3


def test_save_load_through_hub_cache_and_shim(pipe, sample, tmp_path):
    from diffusers import DiffusionPipeline

    from hub_utils import put_in_hub_cache

    pipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["vqvae"] == ["hf_rq.dq.tokenizer", "DQVAEModel"]
    assert index["transformer"] == ["hf_rq.dq.prior", "DQTransformerForImageGeneration"]
    put_in_hub_cache(tmp_path / "pipe", "some-org/dq-small")
    loaded = DQTransformerPipeline.from_pretrained("some-org/dq-small")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.id2label[1] == "bear"
    out = loaded(class_labels=["bear", "eagle", "ibis"], output_type="latent", **GREEDY)
    assert torch.equal(out.images, sample["code_map"])
    a = loaded(class_labels=[7], generator=seeded(5), output_type="latent").images
    b = pipe(class_labels=[7], generator=seeded(5), output_type="latent").images
    assert torch.equal(a, b)
    generic = DiffusionPipeline.from_pretrained(tmp_path / "pipe", custom_pipeline=str(SHIM), trust_remote_code=True)
    assert type(generic).__name__ == "DQTransformerPipeline"


def test_stage2_checkpoint_to_pipeline_cli(dq, sample, tmp_path):
    """A Dualformer checkpoint holds StackGPT (transformer.*, with mask buffers) and the DQ-VAE (first_stage_model.*)."""
    from hf_rq.convert import main as convert_main

    configs = json.loads((dq / "configs.json").read_text())
    state = {"transformer." + k: v for k, v in load_file(dq / "transformer_weights.safetensors").items()}
    state |= {f"transformer.{s}_transformer.{i}.attn.mask": torch.ones(512, 512).tril()[None, None]
              for s in ("position", "content") for i in range(2)}
    state |= {"first_stage_model." + k: v for k, v in load_file(dq / "vae_weights.safetensors").items()}
    torch.save({"state_dict": state}, tmp_path / "dualformer.ckpt")
    (tmp_path / "class.json").write_text(json.dumps({"model": configs["dualformer"]}))
    args = ["dqtransformer", "--checkpoint", str(tmp_path / "dualformer.ckpt"), "--allow-pickle",
            "--config", str(tmp_path / "class.json"), "--output", str(tmp_path / "out"), "--pipeline"]
    assert convert_main(args) == 2  # the entropy threshold's json_path is not available here
    assert convert_main(args + ["--entropy-threshold", "1.6777750253677368"]) == 0
    loaded = DQTransformerPipeline.from_pretrained(tmp_path / "out")
    loaded.set_progress_bar_config(disable=True)
    out = loaded(class_labels=[1, 4, 8], output_type="pt", **GREEDY)
    torch.testing.assert_close(out.images, (sample["decoded"] / 2 + 0.5).clamp(0, 1), atol=1e-4, rtol=1e-4)
