"""LlamaGen VQ tokenizer: parity with the official code (fixtures/llamagen), conversion, round trips, bad input."""

import argparse
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_rq import LlamaGenVQModel
from hf_rq.checkpoint_utils import CheckpointError, check_state_dict
from hf_rq.ctf.conversion import (
    convert_llamagen_vq,
    convert_llamagen_vq_state_dict,
    llamagen_vq_config_from_official,
    load_llamagen_checkpoint,
)
from hf_rq.quantizers import VectorQuantizer

# fixtures/llamagen/README.md: official float32 vs float64 deviations are 2e-6 (latent) .. 2e-5 (images);
# it suggests atol 1e-4 for the decoded images (|values| reach 4), codes exactly.
LATENT_TOL = dict(atol=2e-5, rtol=1e-5)
UNIT_TOL = dict(atol=1e-6, rtol=0)  # l2-normalised vectors: official deviation 4.6e-8
IMAGE_TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def ref(fixtures_dir):
    return load_file(fixtures_dir / "llamagen" / "tensors.safetensors")


@pytest.fixture(scope="module")
def official(fixtures_dir):
    return (
        load_file(fixtures_dir / "llamagen" / "vq.safetensors"),
        json.loads((fixtures_dir / "llamagen" / "vq_config.json").read_text()),
    )


@pytest.fixture(scope="module")
def frozen(official):
    """A converted model shared by the tests that neither train nor modify it."""
    return convert_llamagen_vq(*official)


@pytest.fixture()
def model(official):
    return convert_llamagen_vq(*official)


@torch.no_grad()
def test_eval_parity(frozen, ref):
    x = ref["images"]
    torch.testing.assert_close(frozen.encoder(x), ref["vq.encoder_out"], **LATENT_TOL)
    enc = frozen.encode(x, return_codes=True)
    torch.testing.assert_close(enc.latents, ref["vq.latent"], **LATENT_TOL)
    assert enc.codes.dtype == torch.int64 and torch.equal(enc.codes, ref["vq.codes"])
    q = frozen.quantize(enc.latents)
    assert torch.equal(q.codes, ref["vq.codes"])
    torch.testing.assert_close(q.quantized, ref["vq.quant"], **UNIT_TOL)
    torch.testing.assert_close(frozen.codes_to_latents(q.codes), ref["vq.codebook_entry"], **UNIT_TOL)
    torch.testing.assert_close(frozen.post_quant_conv(q.quantized), ref["vq.decoder_in"], **UNIT_TOL)
    torch.testing.assert_close(frozen.decode(q.quantized, force_not_quantize=True).sample, ref["vq.recon"], **IMAGE_TOL)
    torch.testing.assert_close(frozen.decode_codes(ref["vq.codes"]).sample, ref["vq.decode_code"], **IMAGE_TOL)
    requantized = frozen.decode(enc.latents)  # decode() quantizes a raw latent first
    torch.testing.assert_close(requantized.sample, ref["vq.recon"], **IMAGE_TOL)
    out = frozen(x)
    assert torch.equal(out.codes, ref["vq.codes"])
    torch.testing.assert_close(out.sample, ref["vq.recon"], **IMAGE_TOL)


def test_training_losses_parity(model, ref):
    """The official training-mode quantizer: codebook loss weight 1, commitment loss weight beta = 0.25."""
    model.train()
    out = model(ref["images"])
    torch.testing.assert_close(out.codebook_loss, ref["vq.train.codebook_loss"], rtol=1e-5, atol=0)
    torch.testing.assert_close(
        model.config.commitment_weight * out.commitment_loss, ref["vq.train.commit_loss"], rtol=1e-5, atol=0
    )
    torch.testing.assert_close(out.sample.detach(), ref["vq.train.recon"], **IMAGE_TOL)


def test_gradients_follow_the_vq_losses(model, ref):
    model.train()
    x = ref["images"]
    book = model.quantizer.embedding.weight
    # reconstruction: straight through to the encoder, nothing to the codebook
    model(x).sample.pow(2).mean().backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert book.grad is None or not book.grad.any()
    model.zero_grad()
    # codebook loss trains only the codebook, the commitment loss only the encoder side
    q = model.quantize(model.encode(x).latents)
    q.codebook_loss.backward(retain_graph=True)
    assert book.grad.abs().sum() > 0 and model.quant_conv.weight.grad is None
    model.zero_grad()
    q.commitment_loss.backward()
    assert model.quant_conv.weight.grad.abs().sum() > 0 and (book.grad is None or not book.grad.any())


@torch.no_grad()
def test_codebook_accessor_is_the_searched_codebook(frozen, ref):
    book = frozen.codebook
    assert book.shape == (frozen.config.codebook_size, frozen.config.embed_dim)
    torch.testing.assert_close(book.norm(dim=-1), torch.ones(len(book)))
    stored = frozen.quantizer.embedding.weight
    assert not torch.allclose(stored.norm(dim=-1), torch.ones(len(stored)), atol=1e-2)  # rows are rescaled in the fixture
    # nearest codeword by cosine on the normalised latent (what a clustering of `codebook` assumes)
    z = ref["vq.latent_l2norm"].permute(0, 2, 3, 1)
    assert torch.equal((z @ book.T).argmax(-1), ref["vq.codes"])
    torch.testing.assert_close(frozen.get_code_embeddings(ref["vq.codes"]), book[ref["vq.codes"]], rtol=0, atol=0)


@torch.no_grad()
def test_save_and_load_round_trip(model, ref, tmp_path):
    model.save_pretrained(tmp_path / "vq")
    assert (tmp_path / "vq" / "diffusion_pytorch_model.safetensors").is_file()
    config = json.loads((tmp_path / "vq" / "config.json").read_text())
    assert config["_class_name"] == "LlamaGenVQModel" and config["codebook_size"] == 256 and config["embed_dim"] == 8
    loaded = LlamaGenVQModel.from_pretrained(tmp_path / "vq")
    assert not loaded.training
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert set(state) == set(loaded_state) and "quantize.codebook_used" not in state
    for k, v in state.items():
        assert torch.equal(v, loaded_state[k]), k
    a, b = model(ref["images"]), loaded(ref["images"])
    assert torch.equal(a.sample, b.sample) and torch.equal(a.codes, b.codes)


@torch.no_grad()
def test_offline_hub_cache_round_trip(frozen, ref, tmp_path):
    from hub_utils import put_in_hub_cache

    frozen.save_pretrained(tmp_path / "vq")
    put_in_hub_cache(tmp_path / "vq", "hf-rq-test/llamagen-vq-small")
    loaded = LlamaGenVQModel.from_pretrained("hf-rq-test/llamagen-vq-small")
    assert torch.equal(loaded.encode(ref["images"], return_codes=True).codes, ref["vq.codes"])
    assert torch.equal(frozen.decode_codes(ref["vq.codes"]).sample, loaded.decode_codes(ref["vq.codes"]).sample)
    with pytest.raises(OSError):
        LlamaGenVQModel.from_pretrained("hf-rq-test/does-not-exist")


@torch.no_grad()
def test_bad_inputs(frozen):
    with pytest.raises(ValueError, match="shape"):
        frozen.encode(torch.zeros(1, 1, 64, 64))
    with pytest.raises(ValueError, match="divisible"):
        frozen.encode(torch.zeros(1, 3, 64, 56))
    with pytest.raises(TypeError, match="float"):
        frozen.encode(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        frozen.decode_codes(torch.full((1, 4, 4), 256))
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        frozen.decode_codes(torch.full((1, 4, 4), -1))
    with pytest.raises(ValueError, match="shape"):
        frozen.decode_codes(torch.zeros(1, 16, dtype=torch.long))  # flat sequences must be reshaped to (N, h, w)
    with pytest.raises(TypeError, match="integer"):
        frozen.decode_codes(torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="latents"):
        frozen.decode(torch.zeros(1, 3, 4, 4))
    with pytest.raises(TypeError, match="latents"):
        frozen.quantize(torch.zeros(1, 8, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="norm_num_groups"):
        LlamaGenVQModel(block_out_channels=(32, 48))


def test_separate_decoder_widths_and_codes_in_any_dtype():
    model = LlamaGenVQModel(block_out_channels=(32, 32), decoder_block_out_channels=(32, 64), layers_per_block=1,
                            latent_channels=32, embed_dim=4, codebook_size=16).eval()
    assert model.decoder.up_blocks[0].resnets[0].conv1.out_channels == 64
    with torch.no_grad():
        codes = model.encode(torch.rand(2, 3, 8, 8) * 2 - 1, return_codes=True).codes
        assert codes.shape == (2, 4, 4)
        assert model.decode_codes(codes.int()).sample.shape == (2, 3, 8, 8)


def test_vector_quantizer_without_l2_norm():
    torch.manual_seed(0)
    vq = VectorQuantizer(32, 4, l2_normalize=False)
    x = torch.randn(5, 7, 4, requires_grad=True)
    quantized, codes, commit, codebook = vq(x)
    expected = torch.cdist(x.detach().reshape(-1, 4), vq.embedding.weight.detach()).argmin(-1).reshape(5, 7)
    assert torch.equal(codes, expected)
    torch.testing.assert_close(quantized.detach(), vq.embedding.weight.detach()[codes])
    torch.testing.assert_close(commit, (x.detach() - quantized.detach()).pow(2).mean())
    quantized.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))  # straight-through
    stats = vq.usage_statistics(codes)
    assert 0 < stats["usage"] <= 1 and 1 <= stats["perplexity"] <= 32


# ----------------------------------------------------------------------------------------------- conversion
def _released(fixtures_dir, name):
    info = json.loads((fixtures_dir / "llamagen" / "released" / f"{name}.json").read_text())
    # meta tensors: the released key/shape layout without allocating 72M parameters
    state_dict = {k: torch.empty(shape, device="meta") for k, shape in info["state_dict"].items()}
    config = {k: info[k] for k in ("model_args", "encoder_kwargs", "decoder_kwargs")}
    return state_dict, config, info


@pytest.mark.parametrize("name, preset", [("vq_ds16_c2i", "VQ-16"), ("vq_ds8_c2i", "VQ-8")])
def test_converter_accepts_released_layouts(fixtures_dir, name, preset):
    state_dict, config, info = _released(fixtures_dir, name)
    assert "quantize.codebook_used" in state_dict
    kwargs = llamagen_vq_config_from_official(config)
    assert kwargs == llamagen_vq_config_from_official(preset)
    converted = convert_llamagen_vq_state_dict(state_dict, config)
    with torch.device("meta"):
        model = LlamaGenVQModel(**kwargs)
    check_state_dict(converted, model, name)
    assert sum(p.numel() for p in model.parameters()) == info["num_parameters"]
    assert sum(v.numel() for v in converted.values()) == info["num_parameters"]
    assert model.downsample_factor == info["downsample_factor"]


def test_converter_rejects_mismatches(official):
    sd, config = official
    with pytest.raises(CheckpointError, match="decoder.conv_out.bias"):
        convert_llamagen_vq({k: v for k, v in sd.items() if k != "decoder.conv_out.bias"}, config)
    with pytest.raises(CheckpointError, match="codebook_used"):
        convert_llamagen_vq({k: v for k, v in sd.items() if k != "quantize.codebook_used"}, config)
    with pytest.raises(CheckpointError, match="foo.bar"):
        convert_llamagen_vq(dict(sd, **{"foo.bar": torch.zeros(1)}), config)
    with pytest.raises(CheckpointError, match="encoder.conv_blocks.9.extra"):
        convert_llamagen_vq(dict(sd, **{"encoder.conv_blocks.9.extra.weight": torch.zeros(1)}), config)
    with pytest.raises(CheckpointError, match="shape"):
        convert_llamagen_vq(sd, "VQ-16")  # full-width preset vs the narrow fixture weights
    wrong = json.loads(json.dumps(config))
    wrong["model_args"]["codebook_size"] = 512
    with pytest.raises(CheckpointError, match="quantizer.embedding.weight"):
        convert_llamagen_vq(sd, wrong)
    for field, value, match in [("entropy_loss_ratio", 0.1, "entropy"), ("foo", 1, "unknown")]:
        bad = json.loads(json.dumps(config))
        bad["model_args"][field] = value
        with pytest.raises(CheckpointError, match=match):
            convert_llamagen_vq(sd, bad)
    bad = json.loads(json.dumps(config))
    bad["encoder_kwargs"]["ch_mult"] = [2, 2, 2, 2, 2]
    with pytest.raises(CheckpointError, match="start with 1"):
        convert_llamagen_vq(sd, bad)
    with pytest.raises(CheckpointError, match="preset"):
        convert_llamagen_vq(sd, "VQ-32")


def test_pickle_checkpoint_and_convert_command(official, ref, tmp_path):
    """The released layout: a torch.save'd dict with the weights under "model" (plus the training args)."""
    from hf_rq.convert import main

    sd, config = official
    ckpt = tmp_path / "vq_small_c2i.pt"
    torch.save({"model": sd, "steps": 10, "args": argparse.Namespace(vq_model="VQ-16", codebook_size=256)}, ckpt)
    with pytest.raises(CheckpointError, match="allow_pickle"):
        load_llamagen_checkpoint(ckpt)
    assert set(load_llamagen_checkpoint(ckpt, allow_pickle=True)) == set(sd)
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    args = ["llamagen-vq", "--checkpoint", str(ckpt), "--config", str(tmp_path / "cfg.json"),
            "--output", str(tmp_path / "out")]
    assert main(args) == 2  # no --allow-pickle
    assert main(args + ["--allow-pickle"]) == 0
    loaded = LlamaGenVQModel.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(loaded.encode(ref["images"], return_codes=True).codes, ref["vq.codes"])
    save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, tmp_path / "vq_bf16.safetensors")
    bf16 = convert_llamagen_vq(load_llamagen_checkpoint(tmp_path / "vq_bf16.safetensors"), config)
    assert bf16.quantizer.embedding.weight.dtype == torch.float32  # cast on load
    assert main(["llamagen-vq", "--checkpoint", str(tmp_path / "missing.pt"), "--output", str(tmp_path / "x")]) == 2
