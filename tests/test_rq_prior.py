"""RQ-Transformer prior: parity with the authors' code (fixtures/rq), cached decoding, conversion, bad input."""

import json

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError
from safetensors.torch import load_file, save_file

from hf_rq import RQTransformerConfig, RQTransformerForImageGeneration, RQVAEModel
from hf_rq.checkpoint_utils import CheckpointError
from hf_rq.rq.conversion import convert_rqtransformer, convert_rqvae

# fixtures/rq/README.md: official float32 vs float64 deviations ~1e-6 on hidden states and logits.
HIDDEN_TOL = dict(atol=1e-4, rtol=1e-4)
LOSS_TOL = dict(atol=0, rtol=1e-5)
# Our own cached and uncached paths run the same float32 ops in a different grouping (guidance scales
# the differences by up to 2s - 1).
STEP_TOL = dict(atol=1e-4, rtol=1e-5)


@pytest.fixture(scope="module")
def ref(fixtures_dir):
    return load_file(fixtures_dir / "rq" / "tensors.safetensors")


@pytest.fixture(scope="module")
def official(fixtures_dir):
    d = fixtures_dir / "rq"
    return dict(
        rqvae=load_file(d / "rqvae.safetensors"),
        rqvae_arch=json.loads((d / "rqvae_config.json").read_text()),
        tf=load_file(d / "rqtransformer.safetensors"),
        tf_arch=json.loads((d / "rqtransformer_config.json").read_text()),
    )


@pytest.fixture(scope="module")
def vqvae(official):
    return convert_rqvae(official["rqvae"], official["rqvae_arch"])


@pytest.fixture(scope="module")
def prior(official, vqvae):
    return convert_rqtransformer(official["tf"], official["tf_arch"], vqvae)



def tiny_config(**overrides):
    """A small prior on the reference tokenizer's code grid (8x8x4, K=64, C=16)."""
    kw = dict(codebook_size=64, grid_height=8, grid_width=8, code_depth=4, code_embed_dim=16, hidden_size=32,
              num_spatial_layers=2, num_depth_layers=1, num_attention_heads=2, num_classes=10)
    kw.update(overrides)
    return RQTransformerConfig(**kw)


@pytest.fixture(scope="module")
def cfg_prior(vqvae):
    torch.manual_seed(0)
    model = RQTransformerForImageGeneration.from_tokenizer(tiny_config(use_null_class=True), vqvae).eval()
    with torch.no_grad():  # sharper logits and classes that matter, so that guidance visibly changes samples
        model.class_embedding.weight.normal_(0.0, 1.0)
        model.lm_head.weight.normal_(0.0, 1.0)
    return model


@pytest.fixture(scope="module")
def uncond_prior(vqvae):
    torch.manual_seed(1)
    return RQTransformerForImageGeneration.from_tokenizer(tiny_config(num_classes=0), vqvae).eval()


# --------------------------------------------------------------------------------------------- parity
@torch.no_grad()
def test_forward_parity(prior, ref):
    out = prior(ref["tf.codes"], ref["tf.cond"], labels=ref["tf.codes"], output_hidden_states=True)
    torch.testing.assert_close(out.spatial_inputs, ref["tf.body_input"], **HIDDEN_TOL)
    torch.testing.assert_close(out.spatial_hidden_states, ref["tf.body_output"], **HIDDEN_TOL)
    torch.testing.assert_close(out.depth_inputs, ref["tf.head_input"], **HIDDEN_TOL)
    torch.testing.assert_close(out.depth_hidden_states, ref["tf.head_output"], **HIDDEN_TOL)
    torch.testing.assert_close(out.logits, ref["tf.logits"], **HIDDEN_TOL)
    torch.testing.assert_close(out.loss, ref["tf.loss_ce"], **LOSS_TOL)
    torch.testing.assert_close(out.loss_per_depth, ref["tf.loss_ce_per_depth"], **LOSS_TOL)
    soft = prior(ref["tf.codes"], ref["tf.cond"], soft_labels=ref["rqvae.soft_codes"])
    # The authors' log-softmax has +1e-7 inside the log; ours is exact. Both reference values agree to 1e-7.
    torch.testing.assert_close(soft.loss, ref["tf.loss_soft_ce"], **LOSS_TOL)
    torch.testing.assert_close(soft.loss, ref["tf.loss_soft_ce_exact_logsoftmax"], **LOSS_TOL)
    torch.testing.assert_close(soft.loss_per_depth, ref["tf.loss_soft_ce_per_depth"], **LOSS_TOL)
    loss, logits, per_depth = prior(ref["tf.codes"], ref["tf.cond"], labels=ref["tf.codes"], return_dict=False)
    assert logits.shape == (4, 8, 8, 4, 64) and per_depth.shape == (4,)


@torch.no_grad()
def test_cached_logits_parity(prior, ref):
    """Teacher forcing through the cached decoding path reproduces the authors' cached_forward logits."""
    out = prior.generate(ref["tf.cond"], prefix_codes=ref["tf.codes"], output_logits=True, return_dict_in_generate=True)
    assert torch.equal(out.codes, ref["tf.codes"])
    torch.testing.assert_close(out.logits, ref["tf.cached_logits"], **HIDDEN_TOL)


@torch.no_grad()
def test_greedy_sample_parity(prior, vqvae, ref):
    greedy = prior.generate(ref["tf.cond"], do_sample=False)
    assert torch.equal(greedy, ref["sample.codes"])
    # the authors' call: top_k=1 with sampling
    top1 = prior.generate(ref["tf.cond"], top_k=1, generator=torch.Generator().manual_seed(5))
    assert torch.equal(top1, ref["sample.codes"])
    torch.testing.assert_close(vqvae.decode_codes(greedy).sample, ref["sample.images"], atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------ cached decoding
@torch.no_grad()
@pytest.mark.parametrize("guidance_scale", [None, 3.0])
def test_cached_generate_matches_full_forward(cfg_prior, guidance_scale):
    """Every logit the cached sampler drew from equals the uncached full forward on the final codes."""
    labels = torch.tensor([3, 7, 0])
    out = cfg_prior.generate(labels, generator=torch.Generator().manual_seed(0), guidance_scale=guidance_scale,
                             output_logits=True, return_dict_in_generate=True)
    full = cfg_prior(out.codes, labels).logits
    if guidance_scale is not None:
        null = cfg_prior(out.codes, torch.full_like(labels, cfg_prior.config.null_class_id)).logits
        full = null + guidance_scale * (full - null)
    torch.testing.assert_close(out.logits, full, **STEP_TOL)
    # the uncached reference path draws the same codes from the same logits
    slow = cfg_prior.generate(labels, generator=torch.Generator().manual_seed(0), guidance_scale=guidance_scale,
                              use_cache=False, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(slow.codes, out.codes)
    torch.testing.assert_close(slow.logits, out.logits, **STEP_TOL)


@torch.no_grad()
def test_prefix_codes_continue_sampling(cfg_prior, ref):
    codes = ref["tf.codes"][:2]
    out = cfg_prior.generate([1, 2], prefix_codes=codes.reshape(2, 64, 4)[:, :10], generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.reshape(2, 64, 4)[:, :10], codes.reshape(2, 64, 4)[:, :10])
    assert not torch.equal(out, codes)


@torch.no_grad()
def test_generator_reproducible_and_unconditional(uncond_prior):
    a = uncond_prior.generate(batch_size=3, generator=torch.Generator().manual_seed(11))
    b = uncond_prior.generate(batch_size=3, generator=torch.Generator().manual_seed(11))
    c = uncond_prior.generate(batch_size=3, generator=torch.Generator().manual_seed(12))
    assert a.shape == (3, 8, 8, 4) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert uncond_prior.generate().shape == (1, 8, 8, 4)
    out = uncond_prior.generate(batch_size=2, output_logits=True, return_dict_in_generate=True,
                                generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.logits, uncond_prior(out.codes).logits, **STEP_TOL)


@torch.no_grad()
def test_per_depth_filters(cfg_prior):
    labels = torch.tensor([1, 2])
    out = cfg_prior.generate(labels, top_k=[1, 64, 64, 64], generator=torch.Generator().manual_seed(0),
                             output_logits=True, return_dict_in_generate=True)
    # depth 0 is greedy, the other depths are sampled
    assert torch.equal(out.codes[..., 0], out.logits[..., 0, :].argmax(-1))
    assert not torch.equal(out.codes[..., 1:], out.logits[..., 1:, :].argmax(-1))
    greedy = cfg_prior.generate(labels, do_sample=False)
    assert torch.equal(cfg_prior.generate(labels, top_k=[1, 1, 1, 1]), greedy)
    assert torch.equal(cfg_prior.generate(labels, top_p=[0.001] * 4, temperature=[1.0, 0.5, 2, 1]), greedy)


@torch.no_grad()
def test_guidance(prior, cfg_prior, uncond_prior):
    with pytest.raises(ValueError, match="null class"):
        prior.generate([1], guidance_scale=2.0)
    with pytest.raises(ValueError, match="unconditional"):
        uncond_prior.generate(batch_size=1, guidance_scale=2.0)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.equal(cfg_prior.generate([4], generator=g(), guidance_scale=1.0), cfg_prior.generate([4], generator=g()))
    assert not torch.equal(cfg_prior.generate([4], generator=g(), guidance_scale=4.0), cfg_prior.generate([4], generator=g()))
    assert prior.generation_config.guidance_scale is None  # off by default


# ----------------------------------------------------------------------------------------- bad input
def test_bad_generate_inputs(prior, uncond_prior):
    with pytest.raises(ValueError, match="out of range"):
        prior.generate([10])
    with pytest.raises(ValueError, match="out of range"):
        prior.generate([-1])
    with pytest.raises(ValueError, match="unknown class name"):
        prior.generate(["zebra"])
    with pytest.raises(ValueError, match="unconditional"):
        uncond_prior.generate([0])
    with pytest.raises(ValueError, match="class-conditional"):
        prior.generate()
    with pytest.raises(ValueError, match="top_p"):
        prior.generate([1], top_p=0.0)
    with pytest.raises(ValueError, match="top_p"):
        prior.generate([1], top_p=1.5)
    with pytest.raises(ValueError, match="one entry per code depth"):
        prior.generate([1], top_k=[5, 5, 5])
    with pytest.raises(ValueError, match="temperature"):
        prior.generate([1], temperature=-1.0)
    with pytest.raises(ValueError, match="temperature"):
        prior.generate([1], temperature=[1.0, 1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="top_k"):
        prior.generate([1], top_k=-1)  # 0 means "no top-k" in every family (hf_rq.sampling_args)
    with pytest.raises(TypeError, match="unexpected"):
        prior.generate([1], topk=5)
    with pytest.raises(ValueError, match="batch_size"):
        prior.generate([1, 2], batch_size=3)
    with pytest.raises(ValueError, match="batch_size"):
        uncond_prior.generate(batch_size=0)
    with pytest.raises(ValueError, match="prefix_codes"):
        prior.generate([1], prefix_codes=torch.zeros(1, 65, 4, dtype=torch.long))


def test_bad_forward_inputs(prior, uncond_prior, ref):
    codes = ref["tf.codes"]
    with pytest.raises(ValueError, match="shape"):
        prior(codes[..., :3], ref["tf.cond"])
    with pytest.raises(TypeError, match="integer"):
        prior(codes.float(), ref["tf.cond"])
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        prior(codes + 64, ref["tf.cond"])
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        prior(codes, torch.tensor([0, 1, 2, 10]))
    with pytest.raises(ValueError, match="4 code grids"):
        prior(codes, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="unconditional"):
        uncond_prior(codes, ref["tf.cond"])
    with pytest.raises(ValueError, match="class-conditional"):
        prior(codes)
    with pytest.raises(ValueError, match="not both"):
        prior(codes, ref["tf.cond"], labels=codes, soft_labels=ref["rqvae.soft_codes"])
    with pytest.raises(ValueError, match="soft_labels"):
        prior(codes, ref["tf.cond"], soft_labels=ref["rqvae.soft_codes"][..., :10])


def test_config_validation():
    with pytest.raises(StrictDataclassClassValidationError, match="divisible"):
        tiny_config(hidden_size=30, num_attention_heads=4)
    with pytest.raises(StrictDataclassClassValidationError, match="use_null_class"):
        tiny_config(num_classes=0, use_null_class=True)
    with pytest.raises(StrictDataclassClassValidationError, match="use_null_class"):
        tiny_config(class_dropout_prob=0.1)
    with pytest.raises(StrictDataclassClassValidationError, match="num_spatial_layers"):
        tiny_config(num_spatial_layers=0)


def test_codebook_checks(vqvae, prior):
    fresh = RQTransformerForImageGeneration(tiny_config())
    with pytest.raises(ValueError, match="load_codebook_from"):
        fresh.generate([1])
    with pytest.raises(ValueError, match="differs"):
        fresh.check_codebook(vqvae)
    fresh.load_codebook_from(vqvae)
    fresh.check_codebook(vqvae)
    assert torch.equal(fresh.code_embeddings, prior.code_embeddings)
    other = RQVAEModel(sample_size=32, block_out_channels=(32, 32, 64), layers_per_block=1, attn_resolutions=(8,),
                       latent_channels=32, embed_dim=8, codebook_size=64, code_depth=4)
    with pytest.raises(ValueError, match="embed_dim"):
        fresh.load_codebook_from(other)


# ------------------------------------------------------------------------------------------- training
def test_training_step_and_class_dropout(vqvae, ref):
    torch.manual_seed(0)
    model = RQTransformerForImageGeneration.from_tokenizer(tiny_config(use_null_class=True, class_dropout_prob=0.5),
                                                           vqvae).train()
    codes = ref["tf.codes"]
    out = model(codes, ref["tf.cond"], soft_labels=ref["rqvae.soft_codes"])
    out.loss.backward()
    assert model.class_embedding.weight.grad[10].abs().sum() > 0  # the null row was used
    assert model.spatial_transformer.blocks[0].attn.query.weight.grad.abs().sum() > 0
    assert not model.code_embeddings.requires_grad and "code_embeddings" not in dict(model.named_parameters())
    model.eval()
    with torch.no_grad():
        a = model(codes, ref["tf.cond"]).logits
        b = model(codes, ref["tf.cond"]).logits
    assert torch.equal(a, b)  # no dropout of any kind in eval mode


# --------------------------------------------------------------------------------- save / load / hub
@torch.no_grad()
def test_save_load_round_trip(prior, ref, tmp_path):
    from transformers import AutoModel

    prior.generation_config.top_k = 9
    try:
        prior.save_pretrained(tmp_path / "prior")
    finally:
        prior.generation_config.top_k = None
    assert (tmp_path / "prior" / "model.safetensors").is_file()
    for cls in (RQTransformerForImageGeneration, AutoModel):
        loaded = cls.from_pretrained(tmp_path / "prior")
        assert isinstance(loaded, RQTransformerForImageGeneration) and not loaded.training
        # every parameter and the codebook buffer come back exactly (transformers 5 builds on the meta device)
        for k, v in prior.state_dict().items():
            assert torch.equal(v, loaded.state_dict()[k]), k
        assert loaded.generation_config.top_k == 9 and loaded.generation_config.do_sample is True
        assert torch.equal(loaded.generate(ref["tf.cond"], do_sample=False), ref["sample.codes"])


@torch.no_grad()
def test_offline_hub_cache_round_trip(prior, ref, tmp_path):
    from hub_utils import put_in_hub_cache

    prior.save_pretrained(tmp_path / "prior")
    put_in_hub_cache(tmp_path / "prior", "hf-rq-test/rqtransformer-small")
    loaded = RQTransformerForImageGeneration.from_pretrained("hf-rq-test/rqtransformer-small")
    assert torch.equal(loaded.generate(ref["tf.cond"], do_sample=False), ref["sample.codes"])


# ----------------------------------------------------------------------------------------- conversion
def test_converter_cli(official, vqvae, ref, tmp_path):
    from hf_rq.convert import main

    save_file(official["tf"], tmp_path / "tf.safetensors")
    save_file(official["rqvae"], tmp_path / "rqvae.safetensors")
    # the published yaml layout: arch block, vocab size from the dataset block, sampling defaults
    arch = {k: v for k, v in official["tf_arch"].items() if k != "vocab_size"}
    config = {"dataset": {"vocab_size": 64}, "arch": arch, "experiment": {"sample": {"top_k": 32, "top_p": 0.92}}}
    (tmp_path / "tf.json").write_text(json.dumps(config))
    (tmp_path / "rqvae.json").write_text(json.dumps(official["rqvae_arch"]))
    names = {str(i): f"class_{i}" for i in range(10)}
    (tmp_path / "names.json").write_text(json.dumps(names))
    argv = ["rqtransformer", "--checkpoint", str(tmp_path / "tf.safetensors"), "--config", str(tmp_path / "tf.json"),
            "--rqvae-checkpoint", str(tmp_path / "rqvae.safetensors"), "--rqvae-config", str(tmp_path / "rqvae.json"),
            "--id2label", str(tmp_path / "names.json"), "--output", str(tmp_path / "out")]
    assert main(argv) == 0
    loaded = RQTransformerForImageGeneration.from_pretrained(tmp_path / "out")
    assert loaded.generation_config.top_k == 32 and loaded.generation_config.top_p == 0.92
    assert loaded.config.id2label[3] == "class_3"
    with torch.no_grad():
        torch.testing.assert_close(loaded(ref["tf.codes"], ref["tf.cond"]).logits, ref["tf.logits"], **HIDDEN_TOL)
    # a converted RQVAEModel folder works as the codebook source too
    vqvae.save_pretrained(tmp_path / "vq")
    argv2 = argv[:5] + ["--rqvae", str(tmp_path / "vq"), "--output", str(tmp_path / "out2")]
    assert main(argv2) == 0
    assert torch.equal(RQTransformerForImageGeneration.from_pretrained(tmp_path / "out2").code_embeddings,
                       loaded.code_embeddings)
    assert main(argv[:5] + ["--output", str(tmp_path / "out3")]) == 2  # no RQ-VAE given


def test_converter_rejects_mismatches(official, vqvae):
    sd, arch = official["tf"], official["tf_arch"]
    missing = {k: v for k, v in sd.items() if k != "head_transformer.blocks.1.mlp.2.bias"}
    with pytest.raises(CheckpointError, match="depth_transformer.blocks.1.mlp.fc_out.bias"):
        convert_rqtransformer(missing, arch, vqvae)
    with pytest.raises(CheckpointError, match="foo.bar"):
        convert_rqtransformer(dict(sd, **{"foo.bar": torch.zeros(1)}), arch, vqvae)
    wrong = dict(sd, pos_emb_hw=torch.zeros(1, 63, 64))
    with pytest.raises(CheckpointError, match="spatial_position_embedding"):
        convert_rqtransformer(wrong, arch, vqvae)
    for key, value, match in (("shared_cls_emb", False, "shared_cls_emb"), ("block_size_cond", 32, "block_size_cond"),
                              ("cumsum_depth_ctx", False, "cumsum_depth_ctx"), ("vocab_size", 128, "codebook_size"),
                              ("something_new", 1, "something_new")):
        with pytest.raises(CheckpointError, match=match):
            convert_rqtransformer(sd, dict(arch, **{key: value}), vqvae)
    bad_gelu = json.loads(json.dumps(arch))
    bad_gelu["head"]["block"]["gelu"] = "v2"
    with pytest.raises(CheckpointError, match="gelu"):
        convert_rqtransformer(sd, bad_gelu, vqvae)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, None), (0.7, 4, None), (1.3, None, 0.8),
                                                     (1.0, 5, 0.6), (0.5, 64, 1.0)])
def test_draw_matches_the_authors_filter(temperature, top_k, top_p):
    """The one-pass draw follows the distribution of sampling.rq_filter_probs (the authors' filter order)."""
    from hf_rq.rq.prior import draw_rq_code
    from hf_rq.sampling import rq_filter_probs

    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -1.0], [0.0, 0.0, 3.0, -2.0, 1.0, 1.0]])
    expected = rq_filter_probs(logits, temperature, top_k, top_p)
    n = 20000
    draws = draw_rq_code(logits.repeat(n, 1), temperature, top_k, top_p, generator=torch.Generator().manual_seed(0))
    freq = torch.stack([torch.bincount(draws.view(n, 2)[:, i], minlength=6).float() / n for i in range(2)])
    assert (freq[expected == 0] == 0).all()  # filtered tokens are never drawn
    torch.testing.assert_close(freq, expected, atol=0.015, rtol=0)  # ~4 standard deviations
    assert torch.equal(draw_rq_code(logits, temperature, top_k, top_p, do_sample=False), logits.argmax(-1))
