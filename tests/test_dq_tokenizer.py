"""DQ-VAE: parity with the authors' code (fixtures/dq), token form, entropy thresholds, triple grain, converter, bad input."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from hf_rq import DQVAEModel
from hf_rq.checkpoint_utils import CheckpointError
from hf_rq.convert import main as convert_main
from hf_rq.dq.conversion import convert_dqvae
from hf_rq.dq.entropy import compute_entropy_thresholds, patch_entropy, ratio_key, threshold_for_ratio
from hf_rq.dq.tokens import DQTokens, codes_to_tokens, tokens_to_codes

# Tolerances from fixtures/dq/README.md ("Expected agreement"); float32 official vs float64 differ by ~1e-6.
FEATURE_TOL = dict(atol=1e-5, rtol=1e-5)
IMAGE_TOL = dict(atol=1e-4, rtol=1e-4)
THRESHOLD = 1.6777750253677368  # key "50" of the authors' ImageNet thresholds (fixtures/dq/meta.json)
SEQUENCES = ("coarse_content", "coarse_position", "fine_content", "fine_position")



@pytest.fixture(scope="module")
def dq(fixtures_dir):
    return fixtures_dir / "dq"


@pytest.fixture(scope="module")
def configs(dq):
    return json.loads((dq / "configs.json").read_text())


@pytest.fixture(scope="module")
def images(dq):
    return load_file(dq / "inputs.safetensors")["images"]


@pytest.fixture(scope="module")
def official_weights(dq):
    entropy = load_file(dq / "vae_weights.safetensors")
    return {"entropy": entropy, "feature": {**entropy, **load_file(dq / "vae_feature_router_weights.safetensors")}}


def build(kind, official_weights, configs):
    extra = dict(entropy_threshold=THRESHOLD) if kind == "entropy" else {}
    return convert_dqvae(official_weights[kind], configs[f"vae_{kind}"], **extra)


@pytest.fixture(scope="module")
def entropy_model(official_weights, configs):
    return build("entropy", official_weights, configs)


@pytest.fixture(scope="module")
def feature_model(official_weights, configs):
    return build("feature", official_weights, configs)


@pytest.mark.parametrize("kind", ["entropy", "feature"])
@torch.no_grad()
def test_eval_parity(kind, entropy_model, feature_model, images, dq):
    model = entropy_model if kind == "entropy" else feature_model
    ref = load_file(dq / f"vae_{kind}_outputs.safetensors")
    enc = model.encode(images)
    torch.testing.assert_close(enc.features[0], ref["h_coarse"], **FEATURE_TOL)
    torch.testing.assert_close(enc.features[1], ref["h_fine"], **FEATURE_TOL)
    torch.testing.assert_close(enc.latents, ref["h_quant_in"], **FEATURE_TOL)
    assert torch.equal(enc.granularity, ref["grain_indices"])  # router decisions: exact
    assert torch.equal(enc.codes, ref["codes"])  # codes at the fine grid: exact
    torch.testing.assert_close(enc.quantized, ref["quant"], **FEATURE_TOL)
    if kind == "entropy":
        torch.testing.assert_close(enc.entropy, ref["entropy"], atol=1e-5, rtol=0)
        assert enc.gate.dtype == torch.int64 and torch.equal(enc.gate.permute(0, 3, 1, 2), ref["gate"])
    else:  # raw gate logits in eval
        # The router itself is exact on the authors' features; end to end, its per-channel GroupNorm (64 values a
        # channel on the coarse grid) amplifies the ~4e-6 feature differences to ~4e-5, far below the smallest
        # |logit_fine - logit_coarse| of 0.074 (meta.json), hence the looser end-to-end tolerance.
        on_ref = model.router([ref["h_coarse"], ref["h_fine"]]).permute(0, 3, 1, 2)
        torch.testing.assert_close(on_ref, ref["gate"], **FEATURE_TOL)
        torch.testing.assert_close(enc.router_logits.permute(0, 3, 1, 2), ref["gate"], atol=1e-4, rtol=1e-5)
    # The authors' VQ loss: beta * commitment + codebook term, both equal in value.
    vq_loss = model.config.commitment_weight * enc.commitment_loss + enc.commitment_loss
    torch.testing.assert_close(vq_loss.reshape(1), ref["emb_loss"], rtol=1e-5, atol=0)
    torch.testing.assert_close(model.decode(enc.quantized, force_not_quantize=True).sample, ref["decoded"], **IMAGE_TOL)
    torch.testing.assert_close(model.decode_codes(enc.codes, enc.granularity).sample, ref["decoded"], **IMAGE_TOL)
    out = model(images)
    torch.testing.assert_close(out.sample, ref["decoded"], **IMAGE_TOL)
    assert torch.equal(out.granularity, ref["grain_indices"])
    if kind == "feature":
        torch.testing.assert_close(out.extra_loss.reshape(1), ref["budget_loss_on_hard_gate"], rtol=1e-6, atol=0)
        hard = model.budget_loss(F.one_hot(ref["grain_indices"], 2).float())
        fine_ratio = ref["grain_indices"].float().mean()
        torch.testing.assert_close(hard, 2 * 10.0 * (fine_ratio - 0.5) ** 2, rtol=1e-5, atol=0)
    else:
        assert out.extra_loss is None


def test_token_form_parity_and_round_trip(dq):
    """Grid form -> token form is the authors' permuter (both fine orders); and back is its forward_back."""
    vae = load_file(dq / "vae_entropy_outputs.safetensors")
    tf = load_file(dq / "transformer_teacher_forced.safetensors")
    for order, tag in (("row-first", "rowfirst"), ("region-first", "regionfirst")):
        tokens = codes_to_tokens(vae["codes"], vae["grain_indices"], 128, order)
        for name in SEQUENCES:
            assert torch.equal(getattr(tokens, name), tf[f"perm_{tag}_{name}"]), (order, name)
        codes, granularity = tokens_to_codes(tokens, 128, 8)
        assert torch.equal(codes, vae["codes"]) and torch.equal(granularity, vae["grain_indices"])
    sample = load_file(dq / "transformer_sample.safetensors")
    for prefix in ("", "fixedpos_"):
        tokens = DQTokens(*(sample[prefix + name] for name in SEQUENCES))
        assert torch.equal(tokens_to_codes(tokens, 128, 8)[0], sample[prefix + "code_map"])


def test_token_form_bad_input(dq):
    vae = load_file(dq / "vae_entropy_outputs.safetensors")
    codes, grain = vae["codes"].clone(), vae["grain_indices"]
    coarse = (grain[0] == 0).nonzero()[0]
    codes[0, 2 * coarse[0], 2 * coarse[1] + 1] += 1  # break one coarse 2x2 block
    with pytest.raises(ValueError, match="inconsistent with the codes"):
        codes_to_tokens(codes, grain, 128)
    with pytest.raises(ValueError, match="does not fit codes"):
        codes_to_tokens(vae["codes"], grain[:, :4, :4], 128)
    with pytest.raises(ValueError, match=r"lie in \[0, 128\)"):
        codes_to_tokens(vae["codes"] + 200, grain, 128)
    with pytest.raises(ValueError, match="0 \\(coarse\\) or 1"):
        codes_to_tokens(vae["codes"], grain * 2, 128)
    with pytest.raises(ValueError, match="fine_position_order"):
        codes_to_tokens(vae["codes"], grain, 128, "column-first")
    tokens = codes_to_tokens(vae["codes"], grain, 128)
    tokens.fine_content[0, 0] = 128  # a pad where a code must be
    with pytest.raises(ValueError, match="before its end token"):
        tokens_to_codes(tokens, 128, 8)


def test_patch_entropy_definitions(images, dq):
    ref = load_file(dq / "vae_entropy_outputs.safetensors")
    torch.testing.assert_close(patch_entropy(images, 8), ref["entropy"], atol=1e-5, rtol=0)
    # With the [0, 1] bins of the authors' threshold script, an all-dark patch has no kernel mass: its entropy is
    # 32 * 1e-40 * ln(1e40) = 2.947e-37, the value of percentiles 1..19 of their shipped ImageNet JSON.
    dark = -torch.ones(1, 3, 16, 16)
    torch.testing.assert_close(patch_entropy(dark, 16, (0.0, 1.0)), torch.full((1, 1, 1), 2.947292990206026e-37), rtol=1e-3, atol=0)
    assert patch_entropy(dark, 16).item() < 1e-3  # one bin holds all the mass under the (-1, 1) definition
    with pytest.raises(ValueError, match="multiple of the entropy patch size"):
        patch_entropy(images[:, :, :60], 8)


def test_entropy_thresholds_helper(fixtures_dir, tmp_path):
    from datasets import load_dataset

    from hf_rq.training.data import ImageTransform

    ds = load_dataset("imagefolder", data_dir=str(fixtures_dir / "images"), split="train")
    out = tmp_path / "thresholds.json"
    thresholds = compute_entropy_thresholds(ds, patch_size=8, image_size=32, batch_size=3, output_path=out)
    assert sorted(thresholds, key=int) == [str(p) for p in range(1, 100)]
    assert json.loads(out.read_text()) == thresholds
    transform = ImageTransform(32)
    every = patch_entropy(torch.stack([transform(row["image"]) for row in ds]), 8).reshape(-1).sort().values
    n = every.numel()  # 8 images x 16 patches
    for p in (1, 30, 50, 99):
        assert thresholds[str(p)] == pytest.approx(every[(n * p) // 100].item(), abs=0)
    assert threshold_for_ratio(out, 0.5) == thresholds["50"]
    assert threshold_for_ratio(thresholds, 0.3) == thresholds["70"]
    # The authors' float truncation of the key is kept: r = 0.55 -> "44", r = 0.56 -> "43".
    assert (ratio_key(0.5), ratio_key(0.55), ratio_key(0.56)) == ("50", "44", "43")
    del thresholds["50"]
    out.write_text(json.dumps(thresholds))
    with pytest.raises(ValueError, match=r"no threshold for fine ratio 0.5 \(key '50'"):
        threshold_for_ratio(out, 0.5)
    with pytest.raises(FileNotFoundError, match="thresholds file not found"):
        threshold_for_ratio(tmp_path / "missing.json", 0.5)
    with pytest.raises(ValueError, match="in \\(0, 1\\)"):
        threshold_for_ratio({"50": 1.0}, 1.5)


def test_bad_images_and_codes(entropy_model, images, dq):
    with pytest.raises(ValueError, match="works at 64x64"):
        entropy_model.encode(images[:, :, :32, :32])
    with pytest.raises(ValueError, match="square images only"):
        entropy_model.encode(images[:, :, :, :32])
    with pytest.raises(TypeError, match="float tensor"):
        entropy_model.encode((images * 100).long())
    with pytest.raises(ValueError, match=r"shape \(B, 3, H, W\)"):
        entropy_model.encode(images[:, :1])
    vae = load_file(dq / "vae_entropy_outputs.safetensors")
    codes, grain = vae["codes"].clone(), vae["grain_indices"]
    coarse = (grain[1] == 0).nonzero()[0]
    codes[1, 2 * coarse[0] + 1, 2 * coarse[1]] = (codes[1, 2 * coarse[0], 2 * coarse[1]] + 1) % 128
    with pytest.raises(ValueError, match="granularity map inconsistent with the codes"):
        entropy_model.decode_codes(codes, grain)
    with pytest.raises(ValueError, match=r"shape \(B, 8, 8\)"):
        entropy_model.decode_codes(vae["codes"], grain[:, :4])
    with pytest.raises(ValueError, match=r"shape \(B, 16, 16\)"):
        entropy_model.decode_codes(vae["codes"][:, :8, :8])
    with pytest.raises(ValueError, match=r"lie in \[0, 128\)"):
        entropy_model.decode_codes(vae["codes"] + 128)


def test_config_validation():
    small = dict(sample_size=32, block_out_channels=(32, 32, 64), layers_per_block=1, attn_resolutions=(),
                 decoder_block_out_channels=(32, 32), decoder_layers_per_block=1, decoder_attn_resolutions=(),
                 latent_channels=32, embed_dim=8, codebook_size=16)
    DQVAEModel(**small)
    with pytest.raises(ValueError, match="needs entropy_threshold"):
        DQVAEModel(**small, entropy_threshold=None)
    with pytest.raises(ValueError, match="router_type"):
        DQVAEModel(**small, router_type="random")
    with pytest.raises(ValueError, match="entropy router has two granularities"):
        DQVAEModel(**dict(small, block_out_channels=(32, 32, 32, 64)), num_grains=3)
    with pytest.raises(ValueError, match="decoder_block_out_channels must have 2 levels"):
        DQVAEModel(**dict(small, decoder_block_out_channels=(32, 32, 32)))
    with pytest.raises(ValueError, match="multiple of the GroupNorm groups"):
        DQVAEModel(**dict(small, latent_channels=48))


def test_feature_router_training_step(official_weights, configs, images):
    """Training mode: hard Gumbel gate (straight-through), budget loss with gradient, EMA codebook update."""
    model = build("feature", official_weights, configs).train()
    before = model.quantizer.embed_ema.clone()
    torch.manual_seed(0)  # F.gumbel_softmax draws from the global generator
    out = model(images)
    assert out.extra_loss.requires_grad
    (out.sample.pow(2).mean() + out.commitment_loss + out.extra_loss).backward()
    assert model.router.gate[0].weight.grad.abs().sum() > 0  # the router learns through the gate
    assert model.encoder.fine_head.conv_out.weight.grad.abs().sum() > 0
    assert not torch.equal(model.quantizer.embed_ema, before)
    model.eval()  # back to the arg-max of the raw logits
    with torch.no_grad():
        again = model.encode(images)
    assert torch.equal(again.gate, again.router_logits)
    assert torch.equal(again.granularity, again.router_logits.argmax(-1))


def test_triple_grain_config(tmp_path):
    torch.manual_seed(0)
    model = DQVAEModel(sample_size=32, block_out_channels=(32, 32, 32, 64), layers_per_block=1, attn_resolutions=(8,),
                       decoder_block_out_channels=(32, 32), decoder_layers_per_block=1, decoder_attn_resolutions=(),
                       latent_channels=32, embed_dim=8, codebook_size=16, num_grains=3, router_type="feature",
                       entropy_threshold=None, fine_grain_ratio=0.3, median_grain_ratio=0.3, budget_gamma=1.0).eval()
    assert (model.coarse_grid_size, model.fine_grid_size, model.downsample_factor) == (4, 16, 2)
    with torch.no_grad():
        model.router.gate[2].bias.copy_(torch.tensor([0.0, 0.0, 0.0]))
        model.router.gate[2].weight.normal_(0, 1.0)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        enc = model.encode(x)
        recon = model.decode_codes(enc.codes, enc.granularity).sample
    assert enc.codes.shape == (4, 16, 16) and enc.granularity.shape == (4, 4, 4) and recon.shape == (4, 3, 32, 32)
    assert set(enc.granularity.unique().tolist()) == {0, 1, 2}  # this seed routes to all three granularities
    model.check_codes(enc.codes, enc.granularity)  # coarse = 4x4 blocks, median = 2x2 blocks of one code
    for level in (0, 1):
        b, i, j = (enc.granularity == level).nonzero()[0].tolist()
        bad = enc.codes.clone()
        bad[b, 4 * i, 4 * j] = (bad[b, 4 * i, 4 * j] + 1) % 16
        with pytest.raises(ValueError, match="inconsistent with the codes"):
            model.check_codes(bad, enc.granularity)
    model.train()
    out = model(x)
    out.extra_loss.backward()  # triple budget loss: gamma (fine - r_f)^2 + (median - r_m)^2
    assert model.router.gate[0].weight.grad.abs().sum() > 0
    model.save_pretrained(tmp_path / "triple")
    again = DQVAEModel.from_pretrained(tmp_path / "triple")
    assert again.config.num_grains == 3 and again.config.router_type == "feature"


def test_save_load_round_trip(entropy_model, images, tmp_path):
    entropy_model.save_pretrained(tmp_path / "dqvae")
    config = json.loads((tmp_path / "dqvae" / "config.json").read_text())
    assert config["entropy_threshold"] == THRESHOLD and config["router_type"] == "entropy"
    again = DQVAEModel.from_pretrained(tmp_path / "dqvae")
    with torch.no_grad():
        a, b = entropy_model.encode(images), again.encode(images)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.granularity, b.granularity)
    assert again.quantizer.weight.shape == (129, 32)  # K + 1 rows, the padding row kept


def test_converter_cli(official_weights, configs, images, tmp_path, dq):
    ckpt = tmp_path / "feature.safetensors"
    save_file({**official_weights["feature"], "loss.discriminator.main.0.weight": torch.zeros(1)}, str(ckpt))
    (tmp_path / "feature.json").write_text(json.dumps({"model": configs["vae_feature"]}))
    assert convert_main(["dqvae", "--checkpoint", str(ckpt), "--config", str(tmp_path / "feature.json"),
                         "--output", str(tmp_path / "out_feature")]) == 0
    model = DQVAEModel.from_pretrained(tmp_path / "out_feature")
    ref = load_file(dq / "vae_feature_outputs.safetensors")
    with torch.no_grad():
        assert torch.equal(model.encode(images).codes, ref["codes"])

    # Entropy router: the config's json_path points into the authors' repository, which is not here.
    pt = tmp_path / "entropy.pt"
    torch.save({"state_dict": official_weights["entropy"]}, pt)
    (tmp_path / "entropy.json").write_text(json.dumps(configs["vae_entropy"]))
    base = ["dqvae", "--checkpoint", str(pt), "--config", str(tmp_path / "entropy.json"), "--output", str(tmp_path / "out")]
    assert convert_main(base) == 2  # pickle refused without --allow-pickle
    assert convert_main(base + ["--allow-pickle"]) == 2  # no threshold available
    (tmp_path / "thr.json").write_text(json.dumps({str(p): p / 10 for p in range(1, 100) if p != 50}))
    assert convert_main(base + ["--allow-pickle", "--entropy-thresholds", str(tmp_path / "thr.json")]) == 2  # no "50"
    (tmp_path / "thr.json").write_text(json.dumps({"50": THRESHOLD}))
    assert convert_main(base + ["--allow-pickle", "--entropy-thresholds", str(tmp_path / "thr.json")]) == 0
    assert DQVAEModel.from_pretrained(tmp_path / "out").config.entropy_threshold == THRESHOLD


def test_converter_rejects_mismatches(official_weights, configs):
    sd = dict(official_weights["entropy"])
    del sd["decoder.position_bias_learned.row_embed.weight"]
    with pytest.raises(CheckpointError, match="missing keys"):
        convert_dqvae(sd, configs["vae_entropy"], entropy_threshold=THRESHOLD)
    sd = dict(official_weights["entropy"], **{"encoder.mid_extra.block_1.conv1.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="does not understand"):
        convert_dqvae(sd, configs["vae_entropy"], entropy_threshold=THRESHOLD)
    sd = dict(official_weights["entropy"])
    sd["quantize.codebook.weight"] = sd["quantize.codebook.weight"][:-1]  # K rows instead of K + 1
    with pytest.raises(CheckpointError, match="shape mismatches"):
        convert_dqvae(sd, configs["vae_entropy"], entropy_threshold=THRESHOLD)
    # The feature-router weights in an entropy-router config are unexpected keys.
    with pytest.raises(CheckpointError, match="unexpected keys"):
        convert_dqvae(official_weights["feature"], configs["vae_entropy"], entropy_threshold=THRESHOLD)
    bad = json.loads(json.dumps(configs["vae_feature"]))
    bad["params"]["decoderconfig"]["params"]["position_type"] = "relative"
    with pytest.raises(CheckpointError, match="position_type"):
        convert_dqvae(official_weights["feature"], bad)
