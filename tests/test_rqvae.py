"""RQ-VAE: parity with the authors' code (reference tensors in fixtures/rq), round trips, bad input."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_rq import RQVAEModel
from hf_rq.checkpoint_utils import CheckpointError, load_state_dict
from hf_rq.rq.conversion import convert_rqvae

# Tolerances from fixtures/rq/README.md (official float32 vs float64 deviations are ~1e-6 .. 1e-5).
LATENT_TOL = dict(atol=1e-5, rtol=1e-5)
IMAGE_TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def ref(fixtures_dir):
    return load_file(fixtures_dir / "rq" / "tensors.safetensors")


@pytest.fixture(scope="module")
def official(fixtures_dir):
    return (
        load_file(fixtures_dir / "rq" / "rqvae.safetensors"),
        json.loads((fixtures_dir / "rq" / "rqvae_config.json").read_text()),
    )


@pytest.fixture()
def model(official):
    return convert_rqvae(*official)


def nhwc(x):
    return x.permute(0, 2, 3, 1)


@torch.no_grad()
def test_eval_parity(model, ref):
    x = ref["images"]
    enc = model.encode(x, return_codes=True)
    torch.testing.assert_close(nhwc(enc.latents), ref["rqvae.latent"], **LATENT_TOL)
    assert torch.equal(enc.codes, ref["rqvae.codes"])
    q = model.quantize(enc.latents)
    assert torch.equal(q.codes, ref["rqvae.codes"])
    torch.testing.assert_close(nhwc(q.quantized), ref["rqvae.quant"], **LATENT_TOL)
    torch.testing.assert_close(q.commitment_loss, ref["rqvae.commitment_loss"], rtol=1e-5, atol=0)
    torch.testing.assert_close(model.decode(q.quantized, force_not_quantize=True).sample, ref["rqvae.recon"], **IMAGE_TOL)
    torch.testing.assert_close(model.decode_codes(q.codes).sample, ref["rqvae.decode_code"], **IMAGE_TOL)
    torch.testing.assert_close(model.get_code_embeddings(q.codes), ref["rqvae.code_emb_with_depth"], **LATENT_TOL)
    partial = torch.stack([model.decode_codes(q.codes, depth=d + 1).sample for d in range(4)])
    torch.testing.assert_close(partial, ref["rqvae.partial_recon_add"], **IMAGE_TOL)
    out = model(x)
    torch.testing.assert_close(out.sample, ref["rqvae.recon"], **IMAGE_TOL)
    loss = (out.sample - x).pow(2).mean() + model.config.commitment_weight * out.commitment_loss
    torch.testing.assert_close(loss, ref["rqvae.loss_total"], rtol=1e-5, atol=0)


def test_soft_codes_parity(model, ref):
    soft, codes = model.get_soft_codes(ref["images"], temperature=0.5, stochastic=False)
    torch.testing.assert_close(soft, ref["rqvae.soft_codes"], atol=1e-6, rtol=1e-5)
    assert torch.equal(codes, ref["rqvae.soft_codes_argmin"])
    torch.testing.assert_close(soft.sum(-1), torch.ones_like(soft[..., 0]))


def test_stochastic_soft_codes_follow_generator(model, ref):
    x = ref["images"]
    a = model.get_soft_codes(x, 0.5, stochastic=True, generator=torch.Generator().manual_seed(3))[1]
    b = model.get_soft_codes(x, 0.5, stochastic=True, generator=torch.Generator().manual_seed(3))[1]
    c = model.get_soft_codes(x, 0.5, stochastic=True, generator=torch.Generator().manual_seed(4))[1]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_ema_step_parity(model, ref):
    """One training-mode forward updates the shared codebook D times, in depth order (restart off)."""
    model.train()
    model.quantizer.codebooks[0].restart_unused_codes = False
    with torch.no_grad():
        q = model.quantize(model.encode(ref["images"]).latents)
    assert torch.equal(q.codes, ref["ema_step.codes"])
    torch.testing.assert_close(nhwc(q.quantized), ref["ema_step.quant"], **LATENT_TOL)
    torch.testing.assert_close(q.commitment_loss, ref["ema_step.commitment_loss"], rtol=1e-5, atol=0)
    book = model.quantizer.codebooks[0]
    for name in ("weight", "cluster_size_ema", "embed_ema"):
        torch.testing.assert_close(getattr(book, name), ref[f"ema_step.codebooks.0.{name}"], atol=1e-5, rtol=1e-5)


def test_restart_revives_dead_codes():
    model = RQVAEModel(sample_size=16, block_out_channels=(32, 32), layers_per_block=1, attn_resolutions=(),
                       latent_channels=32, embed_dim=4, codebook_size=64, code_depth=2).train()
    torch.manual_seed(0)
    book = model.quantizer.codebooks[0]
    with torch.no_grad():
        model(torch.rand(2, 3, 16, 16) * 2 - 1)
    # every code either was used or was restarted to count 1, so none is below the threshold
    assert (book.cluster_size_ema >= 1 - 1e-6).all()


def test_gradients_are_straight_through(model, ref):
    model.train()
    x = ref["images"].clone()
    out = model(x)
    ((out.sample - x).pow(2).mean() + 0.25 * out.commitment_loss).backward()
    assert model.encoder.conv_in.weight.grad is not None and model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert all(not b.requires_grad for b in model.quantizer.buffers())


def test_shared_codebook_stored_once(model):
    keys = [k for k in model.state_dict() if k.startswith("quantizer.")]
    assert sorted(keys) == [
        "quantizer.codebooks.0.cluster_size_ema",
        "quantizer.codebooks.0.embed_ema",
        "quantizer.codebooks.0.weight",
    ]
    separate = RQVAEModel(sample_size=16, block_out_channels=(32, 32), layers_per_block=1, attn_resolutions=(),
                          latent_channels=32, embed_dim=4, codebook_size=8, code_depth=3, shared_codebook=False)
    assert len([k for k in separate.state_dict() if k.endswith(".weight") and "codebooks" in k]) == 3


@torch.no_grad()
def test_save_and_load_round_trip(model, ref, tmp_path):
    model.train()
    model(ref["images"])  # move the EMA buffers away from their initial values
    model.eval()
    model.save_pretrained(tmp_path / "rqvae")
    assert (tmp_path / "rqvae" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = RQVAEModel.from_pretrained(tmp_path / "rqvae")
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    assert torch.equal(model(ref["images"]).sample, loaded(ref["images"]).sample)


@torch.no_grad()
def test_offline_hub_cache_round_trip(model, ref, tmp_path):
    from hub_utils import put_in_hub_cache

    model.save_pretrained(tmp_path / "rqvae")
    put_in_hub_cache(tmp_path / "rqvae", "hf-rq-test/rqvae-small")
    loaded = RQVAEModel.from_pretrained("hf-rq-test/rqvae-small")
    assert torch.equal(model(ref["images"]).sample, loaded(ref["images"]).sample)
    with pytest.raises(OSError):
        RQVAEModel.from_pretrained("hf-rq-test/does-not-exist")


def test_bad_inputs(model):
    with pytest.raises(ValueError, match="shape"):
        model.encode(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="divisible"):
        model.encode(torch.zeros(1, 3, 30, 32))
    with pytest.raises(TypeError, match="float"):
        model.encode(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        model.decode_codes(torch.full((1, 8, 8, 4), 64))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        model.decode_codes(torch.full((1, 8, 8, 4), -1))
    with pytest.raises(ValueError, match="shape"):
        model.decode_codes(torch.zeros(1, 8, 8, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        model.decode_codes(torch.zeros(1, 8, 8, 4))
    for depth in (0, 5, 1.5):
        with pytest.raises(ValueError, match="depth"):
            model.decode_codes(torch.zeros(1, 8, 8, 4, dtype=torch.long), depth=depth)
    with pytest.raises(ValueError, match="latents"):
        model.decode(torch.zeros(1, 3, 8, 8))


def test_converter_rejects_mismatches(official):
    sd, arch = official
    bad = dict(sd)
    bad["quantizer.codebooks.2.weight"] = bad["quantizer.codebooks.2.weight"] + 1
    with pytest.raises(CheckpointError, match="differs"):
        convert_rqvae(bad, arch)
    missing = {k: v for k, v in sd.items() if k != "decoder.conv_out.bias"}
    with pytest.raises(CheckpointError, match="decoder.conv_out.bias"):
        convert_rqvae(missing, arch)
    extra = dict(sd, **{"foo.bar": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="foo.bar"):
        convert_rqvae(extra, arch)
    wider = json.loads(json.dumps(arch))
    wider["hparams"]["embed_dim"] = 32
    wider["hparams"]["latent_shape"][2] = 32
    with pytest.raises(CheckpointError, match="shape"):
        convert_rqvae(sd, wider)
    with pytest.raises(CheckpointError, match="hparams"):
        convert_rqvae(sd, {"ddconfig": arch["ddconfig"]})


def test_pickle_needs_opt_in(official, tmp_path):
    sd, _ = official
    torch.save({"state_dict": sd}, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match="allow_pickle"):
        load_state_dict(tmp_path / "ckpt.pt")
    assert set(load_state_dict(tmp_path / "ckpt.pt", allow_pickle=True)) == set(sd)

    import argparse

    torch.save({"state_dict": sd, "evil": argparse.Namespace(x=1)}, tmp_path / "evil.pt")  # not allow-listed
    with pytest.raises(CheckpointError, match="weights_only"):
        load_state_dict(tmp_path / "evil.pt", allow_pickle=True)


def test_convert_command(official, fixtures_dir, ref, tmp_path):
    sd, _ = official
    save_file({k: v.clone() for k, v in sd.items()}, tmp_path / "rqvae.safetensors")
    yaml_cfg = tmp_path / "stage1.yaml"
    import yaml

    yaml_cfg.write_text(yaml.safe_dump({"arch": json.loads((fixtures_dir / "rq" / "rqvae_config.json").read_text())}))
    cmd = [sys.executable, "-m", "hf_rq.convert", "rqvae", "--checkpoint", str(tmp_path / "rqvae.safetensors"),
           "--config", str(yaml_cfg), "--output", str(tmp_path / "out")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    loaded = RQVAEModel.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(loaded.encode(ref["images"], return_codes=True).codes, ref["rqvae.codes"])
    bad = subprocess.run(cmd[:5] + [str(tmp_path / "missing.safetensors")] + cmd[6:], capture_output=True, text=True)
    assert bad.returncode == 2 and "not found" in bad.stderr and "Traceback" not in bad.stderr
