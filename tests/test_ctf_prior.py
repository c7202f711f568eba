"""LlamaGen GPT and the CTF prior: parity with LlamaGen's own code (fixtures/llamagen), the converter, the
two-stage sampler, round trips, bad input."""

import argparse
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, DynamicCache

from hf_rq.checkpoint_utils import CheckpointError, check_state_dict
from hf_rq.ctf.clustering import build_coarse_labels
from hf_rq.ctf.conversion import (
    convert_ctf,
    convert_llamagen_gpt,
    convert_llamagen_gpt_state_dict,
    infer_llamagen_gpt_preset,
    llamagen_gpt_config_from_official,
)
from hf_rq.ctf.prior import (
    CTFAuxiliaryModel,
    CTFConfig,
    CTFForImageGeneration,
    LlamaGenConfig,
    LlamaGenForImageGeneration,
    llamagen_top_p_logits,
)

# fixtures/llamagen/README.md: official float32 vs float64 deviation of the logits is 2e-6; it suggests
# atol/rtol 1e-4 for logits, 1e-5 for losses, and exact equality for every generated token.
LOGIT_TOL = dict(atol=1e-4, rtol=1e-4)
LOSS_TOL = dict(atol=1e-5, rtol=0)
CASES = ["topk1_nocfg", "topk1_cfg4", "topk1_cfg4_interval3", "argmax_cfg2", "multinomial_cfg2",
         "multinomial_cfg1.5_t0.8_k20_p0.9"]


@pytest.fixture(scope="module")
def ref(fixtures_dir):
    return load_file(fixtures_dir / "llamagen" / "tensors.safetensors")


@pytest.fixture(scope="module")
def official(fixtures_dir):
    return (load_file(fixtures_dir / "llamagen" / "gpt.safetensors"),
            json.loads((fixtures_dir / "llamagen" / "gpt_config.json").read_text()))


@pytest.fixture(scope="module")
def sampling_cases(fixtures_dir):
    return json.loads((fixtures_dir / "llamagen" / "sampling_args.json").read_text())["cases"]


@pytest.fixture(scope="module")
def gpt(official):
    return convert_llamagen_gpt(*official)


# ------------------------------------------------------------------------------------------- GPT parity


@torch.no_grad()
def test_teacher_forced_parity(gpt, ref):
    codes, labels = ref["gpt.input_codes"], ref["labels"]
    assert gpt.config.grid_size == 4 and gpt.config.intermediate_size == 256 and gpt.config.null_class_id == 10
    out = gpt(codes, labels, labels=codes, output_hidden_states=True)
    torch.testing.assert_close(out.logits, ref["gpt.logits_cond"], **LOGIT_TOL)
    torch.testing.assert_close(out.loss, ref["gpt.loss_cond"], **LOSS_TOL)
    for hidden, key in zip(out.hidden_states, ["gpt.hidden.input", "gpt.hidden.layer0_out", "gpt.hidden.layer1_out"]):
        torch.testing.assert_close(hidden, ref[key], **LOGIT_TOL)
    embeds = torch.cat([gpt.model.embed_classes(labels), gpt.model.embed_tokens(codes[:, :-1])], 1)
    torch.testing.assert_close(gpt.model(embeds).last_hidden_state, ref["gpt.hidden.final_norm_out"], **LOGIT_TOL)
    null = gpt(codes.view(4, 4, 4), torch.full_like(labels, 10), labels=codes.view(4, 4, 4))  # (B, h, w) codes work too
    torch.testing.assert_close(null.logits, ref["gpt.logits_null"], **LOGIT_TOL)
    torch.testing.assert_close(null.loss, ref["gpt.loss_null"], **LOSS_TOL)


def test_rotary_table_parity(gpt, ref):
    # Adjacent-pair 2D layout, row angles then column angles, all-zero class-token row.
    torch.testing.assert_close(gpt.model.rotary_table("cpu"), ref["gpt.freqs_cis"], atol=1e-6, rtol=0)
    assert gpt.model.rotary_table("cpu")[0].abs().max() == 0


@torch.no_grad()
def test_kv_cache_parity(gpt, ref):
    codes, labels = ref["gpt.input_codes"], ref["labels"]
    cache = DynamicCache()
    steps = [gpt.forward_incremental(class_labels=labels, past_key_values=cache)]
    steps += [gpt.forward_incremental(codes[:, t:t + 1], past_key_values=cache) for t in range(15)]
    torch.testing.assert_close(torch.cat(steps, 1), ref["gpt.logits_cond_kvcache"], **LOGIT_TOL)
    # A chunk on top of a cache (explicit causal mask) gives the same logits as the full forward.
    cache = DynamicCache()
    head = gpt.forward_incremental(codes[:, :5], class_labels=labels, past_key_values=cache)
    tail = gpt.forward_incremental(codes[:, 5:15], past_key_values=cache)
    torch.testing.assert_close(torch.cat([head, tail], 1), ref["gpt.logits_cond"], **LOGIT_TOL)


@pytest.mark.parametrize("case", CASES)
def test_generation_parity(gpt, ref, sampling_cases, case):
    """Token for token, the seeded multinomial cases included: a generator seeded like LlamaGen's
    ``torch.manual_seed`` gives the same single multinomial draw per token."""
    args = sampling_cases[case]
    kw = args["kwargs"]
    out = gpt.generate(
        ref["labels"], generator=torch.Generator().manual_seed(args["seed"]), guidance_scale=kw["cfg_scale"],
        cfg_interval=kw["cfg_interval"], temperature=kw["temperature"], top_k=kw["top_k"], top_p=kw["top_p"],
        do_sample=kw["sample_logits"], return_dict_in_generate=True, output_logits=True,
    )
    assert out.sequences.shape == (4, 4, 4) and out.sequences.dtype == torch.int64
    assert torch.equal(out.sequences.view(4, 16), ref[f"gen.{case}.tokens"].long())
    torch.testing.assert_close(out.logits, ref[f"gen.{case}.step_logits"], **LOGIT_TOL)


@torch.no_grad()
def test_cached_generation_matches_full_forward(gpt):
    """The logits every token was drawn from equal the uncached forward on the sampled tokens (CFG combined
    while guidance is on, conditional afterwards)."""
    labels = torch.tensor([1, 5])
    out = gpt.generate(labels, generator=torch.Generator().manual_seed(0), guidance_scale=3.0, cfg_interval=6,
                       return_dict_in_generate=True, output_logits=True)
    codes = out.sequences.view(2, -1)
    cond = gpt(codes, labels).logits
    uncond = gpt(codes, torch.full_like(labels, 10)).logits
    expected = torch.where(torch.arange(16)[None, :, None] <= 7, uncond + (cond - uncond) * 3.0, cond)
    torch.testing.assert_close(out.logits, expected, **LOGIT_TOL)


def test_top_p_matches_llamagen_rule():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    probs = logits.softmax(-1)[0]  # 0.543, 0.200, 0.121, 0.073, 0.027
    kept = llamagen_top_p_logits(logits, 0.7).isfinite()[0].tolist()
    # cumulative: .543 .743 .864 ...: tokens after the first one whose cumulative mass exceeds 0.7 are dropped
    assert kept == [True, True, False, False, False] and probs[:2].sum() > 0.7
    assert llamagen_top_p_logits(logits, 0.01).isfinite()[0].tolist() == [True, False, False, False, False]
    assert torch.equal(llamagen_top_p_logits(logits, 1.0), logits)


def test_generate_is_reproducible_and_unconditional(gpt):
    a = gpt.generate([2, 3], generator=torch.Generator().manual_seed(1))
    b = gpt.generate(torch.tensor([2, 3]), generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    unconditional = gpt.generate(batch_size=3, generator=torch.Generator().manual_seed(1))
    assert unconditional.shape == (3, 4, 4)


def test_generate_bad_input(gpt):
    with pytest.raises(TypeError, match="unexpected keyword"):
        gpt.generate([1], num_beams=4)
    with pytest.raises(ValueError, match="top_p"):
        gpt.generate([1], top_p=1.5)
    with pytest.raises(ValueError, match="temperature"):
        gpt.generate([1], temperature=-1.0)
    with pytest.raises(ValueError, match="guidance_scale"):
        gpt.generate([1], guidance_scale=0.5)
    with pytest.raises(ValueError, match="cfg_interval"):
        gpt.generate([1], cfg_interval=-2)
    with pytest.raises(ValueError, match="out of range"):
        gpt.generate([10])
    with pytest.raises(TypeError, match="integer"):
        gpt.generate(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="batch_size"):
        gpt.generate()
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        gpt(torch.full((1, 16), 256), torch.tensor([0]))
    with pytest.raises(ValueError, match="tokens per sample"):
        gpt(torch.zeros(1, 17, dtype=torch.long), torch.tensor([0]))
    no_null = LlamaGenForImageGeneration(LlamaGenConfig(vocab_size=8, num_classes=3, class_dropout_prob=0.0,
                                                        hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                        grid_size=2))
    assert no_null.model.class_embedding.num_embeddings == 3
    with pytest.raises(ValueError, match="null class"):
        no_null.generate([0], guidance_scale=2.0)
    no_null.generate([0], guidance_scale=1.0)


def test_config_errors():
    with pytest.raises(ValueError, match="head_dim"):
        LlamaGenConfig(hidden_size=24, num_attention_heads=4)
    with pytest.raises(ValueError, match="divisible"):
        LlamaGenConfig(hidden_size=30, num_attention_heads=4)
    assert LlamaGenConfig(hidden_size=768).intermediate_size == 2048
    assert LlamaGenConfig(hidden_size=1024, num_attention_heads=16).intermediate_size == 2816
    assert LlamaGenConfig(hidden_size=3200, num_attention_heads=32).intermediate_size == 8704


def test_save_load_roundtrip(gpt, tmp_path):
    gpt.generation_config.guidance_scale = 4.0
    gpt.generation_config.cfg_interval = 3
    gpt.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(reloaded, LlamaGenForImageGeneration)
    assert reloaded.generation_config.guidance_scale == 4.0 and reloaded.generation_config.cfg_interval == 3
    a = gpt.generate([1, 2], generator=torch.Generator().manual_seed(5))
    b = reloaded.generate([1, 2], generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    gpt.generation_config.guidance_scale, gpt.generation_config.cfg_interval = 2.0, -1


def test_training_forward_and_checkpointing(official):
    model = convert_llamagen_gpt(*official).train()
    model.activation_checkpointing_enable()
    codes = torch.randint(0, 256, (3, 16))
    out = model(codes, torch.tensor([0, 1, 2]), labels=codes)
    out.loss.backward()
    assert model.model.embed_tokens.weight.grad is not None and torch.isfinite(out.loss)
    fresh = LlamaGenForImageGeneration(LlamaGenConfig(vocab_size=32, num_classes=4, hidden_size=16,
                                                      num_hidden_layers=1, num_attention_heads=2, grid_size=2))
    # LlamaGen's zero-initialised head: the initial loss is ln(vocab).
    loss = fresh(torch.zeros(2, 4, dtype=torch.long), torch.tensor([0, 1]), labels=torch.zeros(2, 4, dtype=torch.long)).loss
    torch.testing.assert_close(loss, torch.log(torch.tensor(32.0)))


# --------------------------------------------------------------------------------------------- converter


def _meta_state_dict(layout: dict) -> dict:
    return {k: torch.empty(shape, device="meta") for k, shape in layout.items()}


@pytest.mark.parametrize("name, image_size, grid", [("gpt_B.json", 256, 16), ("gpt_B.json", 384, 24),
                                                    ("gpt_3B.json", 384, 24)])
def test_released_layouts_convert(fixtures_dir, name, image_size, grid):
    """Every key of the released c2i checkpoints (listed by LlamaGen's own constructors) maps onto our model."""
    released = json.loads((fixtures_dir / "llamagen" / "released" / name).read_text())
    kwargs = llamagen_gpt_config_from_official(released, image_size=image_size)
    assert kwargs["grid_size"] == grid and kwargs["hidden_size"] == released["model_args_common"]["dim"]
    with torch.device("meta"):
        model = LlamaGenForImageGeneration(LlamaGenConfig(**kwargs))
    state = _meta_state_dict(released["state_dict"])
    state["freqs_cis"] = torch.empty(1 + grid * grid, 8, 2, device="meta")  # a stale entry the loaders ignore
    check_state_dict(convert_llamagen_gpt_state_dict(state), model, name)
    assert sum(p.numel() for p in model.parameters()) == released["num_parameters"]
    assert model.config.intermediate_size == released["derived"]["ffn_hidden_dim"]
    assert infer_llamagen_gpt_preset(state) == released["preset"]


def test_converter_is_strict(official):
    state, config = official
    extra = dict(state, **{"layers.0.attention.kv_cache.k_cache": torch.zeros(1)})
    convert_llamagen_gpt(extra, config)  # known non-weights are dropped
    prefixed = {f"module.{k}": v for k, v in state.items()}
    assert torch.equal(convert_llamagen_gpt(prefixed, config).lm_head.weight, state["output.weight"])
    with pytest.raises(CheckpointError, match="missing keys"):
        convert_llamagen_gpt({k: v for k, v in state.items() if k != "norm.weight"}, config)
    with pytest.raises(CheckpointError, match="does not understand"):
        convert_llamagen_gpt(dict(state, **{"layers.0.attention.bias": torch.zeros(1)}), config)
    with pytest.raises(CheckpointError, match="shape"):
        convert_llamagen_gpt(dict(state, **{"output.weight": torch.zeros(10, 64)}), config)
    with pytest.raises(CheckpointError, match="t2i|c2i"):
        convert_llamagen_gpt(state, {"model_args": dict(config["model_args"], model_type="t2i")})
    with pytest.raises(CheckpointError, match="unknown field"):
        convert_llamagen_gpt(state, {"model_args": dict(config["model_args"], n_experts=4)})
    with pytest.raises(CheckpointError, match="preset"):
        convert_llamagen_gpt(state, "GPT-Q")


def test_cli_and_pickle_opt_in(official, tmp_path, fixtures_dir):
    from hf_rq.convert import main

    state, config = official
    # LlamaGen's trainer stores its argparse.Namespace next to the weights.
    torch.save({"model": state, "steps": 10, "args": argparse.Namespace(gpt_model="tiny")}, tmp_path / "c2i_tiny_64.pt")
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    args = ["llamagen-gpt", "--checkpoint", str(tmp_path / "c2i_tiny_64.pt"), "--config", str(tmp_path / "cfg.json"),
            "--output", str(tmp_path / "out")]
    assert main(args) == 2  # refused without --allow-pickle
    assert main(args + ["--allow-pickle"]) == 0  # file name says 64 px -> 4x4 grid, as in the config
    model = AutoModel.from_pretrained(tmp_path / "out")
    assert torch.equal(model.lm_head.weight, state["output.weight"]) and model.config.grid_size == 4


# ------------------------------------------------------------------------------------------------- CTF

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2)


def _randomize(model, seed=0):
    """Random weights as in the reference (the zero-initialised head would hide most errors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif "embed" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    return model


@pytest.fixture(scope="module")
def codebook():
    return torch.randn(64, 4, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def ctf(codebook):
    config = CTFConfig(coarse_config=TINY, fine_config=dict(TINY, num_hidden_layers=1), num_clusters=8,
                       codebook_size=64, codebook_dim=4, num_classes=5, grid_size=4)
    model = _randomize(CTFForImageGeneration(config)).eval()
    model.set_coarse_labels(build_coarse_labels(codebook, 8, seed=0, n_init=2))
    return model


def test_ctf_config_derives_stage_vocabularies():
    config = CTFConfig(coarse_config=TINY, fine_config=TINY, num_clusters=8, codebook_size=64, num_classes=5,
                       grid_size=4)
    assert (config.coarse_config.vocab_size, config.coarse_config.input_vocab_size) == (8, 8)
    assert (config.fine_config.vocab_size, config.fine_config.input_vocab_size) == (64, 8)
    assert config.coarse_config.is_causal and not config.fine_config.is_causal
    assert config.fine_config.num_classes == 5 and config.fine_config.grid_size == 4
    with pytest.raises(ValueError, match="fine_config.vocab_size"):
        CTFConfig(fine_config=dict(TINY, vocab_size=100), num_clusters=8, codebook_size=64)
    with pytest.raises(ValueError, match="num_clusters"):
        CTFConfig(num_clusters=128, codebook_size=64)


def test_ctf_generate_and_in_cluster_mask(ctf):
    out = ctf.generate([0, 1, 2, 3, 4, 0], generator=torch.Generator().manual_seed(0), in_cluster_mask=True,
                       return_dict_in_generate=True, output_logits=True)
    assert out.sequences.shape == (6, 4, 4) and out.coarse_labels.shape == (6, 4, 4)
    assert torch.equal(ctf.fine_to_coarse[out.sequences], out.coarse_labels)  # every fine code is in its cluster
    assert out.coarse_logits.shape == (6, 16, 8) and out.fine_logits.shape == (6, 16, 64)
    # Without the mask these random weights put fine codes outside their cluster: the mask is what does it.
    free = ctf.generate([0, 1, 2, 3, 4, 0], generator=torch.Generator().manual_seed(0), return_dict_in_generate=True)
    assert not torch.equal(ctf.fine_to_coarse[free.sequences], free.coarse_labels)
    # With top-k inside the mask, too.
    topk = ctf.generate([1, 2], generator=torch.Generator().manual_seed(0), in_cluster_mask=True, fine_top_k=2,
                        return_dict_in_generate=True)
    assert torch.equal(ctf.fine_to_coarse[topk.sequences], topk.coarse_labels)


def test_ctf_stage1_is_the_llamagen_sampler(ctf):
    """Stage 1 draws first, with LlamaGen's sampler: the coarse map equals the coarse GPT's own generate()."""
    kw = dict(guidance_scale=3.0, temperature=1.1, cfg_interval=5)
    out = ctf.generate([1, 2], generator=torch.Generator().manual_seed(7), return_dict_in_generate=True, **kw)
    alone = ctf.coarse_model.generate([1, 2], generator=torch.Generator().manual_seed(7), **kw)
    assert torch.equal(out.coarse_labels, alone)


@torch.no_grad()
def test_ctf_stage2_cfg_and_temperature(ctf):
    labels = torch.tensor([3, 4])
    out = ctf.generate(labels, generator=torch.Generator().manual_seed(2), fine_guidance_scale=2.5,
                       return_dict_in_generate=True, output_logits=True)
    coarse = out.coarse_labels.view(2, -1)
    cond = ctf.fine_model(coarse, labels).logits
    uncond = ctf.fine_model(coarse, torch.full_like(labels, 5)).logits
    torch.testing.assert_close(out.fine_logits, uncond + (cond - uncond) * 2.5, **LOGIT_TOL)
    greedy = ctf.generate(labels, do_sample=False, fine_guidance_scale=2.5, return_dict_in_generate=True)
    cond = ctf.fine_model(greedy.coarse_labels, labels).logits
    uncond = ctf.fine_model(greedy.coarse_labels, torch.full_like(labels, 5)).logits
    assert torch.equal(greedy.sequences.view(2, -1), (uncond + (cond - uncond) * 2.5).argmax(-1))


@torch.no_grad()
def test_ctf_stage2_is_bidirectional(ctf):
    coarse = torch.randint(0, 8, (1, 16), generator=torch.Generator().manual_seed(0))
    changed = coarse.clone()
    changed[0, -1] = (coarse[0, -1] + 1) % 8
    labels = torch.tensor([1])
    fine_a, fine_b = ctf.fine_model(coarse, labels).logits, ctf.fine_model(changed, labels).logits
    assert not torch.allclose(fine_a[0, 0], fine_b[0, 0])  # position 0 sees the last label
    coarse_a, coarse_b = ctf.coarse_model(coarse, labels).logits, ctf.coarse_model(changed, labels).logits
    torch.testing.assert_close(coarse_a, coarse_b)  # stage 1 is causal: the last label is never read


def test_ctf_forward_losses(ctf):
    codes = torch.randint(0, 64, (2, 4, 4))
    labels = torch.tensor([0, 1])
    out = ctf(codes, labels, labels=codes)
    assert torch.equal(out.coarse_labels, ctf.fine_to_coarse[codes.view(2, -1)])
    torch.testing.assert_close(out.loss, out.coarse_loss + out.fine_loss)
    torch.testing.assert_close(out.coarse_loss, ctf.coarse_model(out.coarse_labels, labels, labels=out.coarse_labels).loss)
    fine_only = ctf(codes, labels, labels=codes, stage="fine")
    assert fine_only.coarse_logits is None and torch.equal(fine_only.loss, fine_only.fine_loss)


def test_ctf_bad_input(ctf, codebook):
    fresh = CTFForImageGeneration(ctf.config)
    with pytest.raises(ValueError, match="no fine_to_coarse"):
        fresh.generate([0])
    with pytest.raises(ValueError, match=r"shape \(63,\)"):
        fresh.set_coarse_labels(torch.zeros(63, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        fresh.set_coarse_labels(torch.arange(64) % 9)
    with pytest.raises(ValueError, match="without any fine code"):
        fresh.set_coarse_labels(torch.arange(64) % 7)
    with pytest.raises(ValueError, match="coarse_labels must lie"):
        ctf.fine_model(torch.full((1, 16), 8), torch.tensor([0]))
    with pytest.raises(ValueError, match="all 16 coarse labels"):
        ctf.fine_model(torch.zeros(1, 15, dtype=torch.long), torch.tensor([0]))
    # The tokenizer check: vocabulary, code width, and the clustering itself.
    ctf.check_tokenizer(codebook)
    with pytest.raises(ValueError, match="predicts 64 fine codes but the tokenizer's codebook has 128"):
        ctf.check_tokenizer(torch.randn(128, 4))
    with pytest.raises(ValueError, match="4-d code vectors"):
        ctf.check_tokenizer(torch.randn(64, 8))
    with pytest.raises(ValueError, match="inconsistent with this tokenizer"):
        ctf.check_tokenizer(codebook[torch.randperm(64, generator=torch.Generator().manual_seed(0))])
    with pytest.raises(ValueError, match="fine_guidance_scale"):
        ctf.generate([0], fine_guidance_scale=0.0)
    with pytest.raises(TypeError, match="in_cluster_mask"):
        ctf.generate([0], in_cluster_mask="yes")


def test_ctf_roundtrip_and_from_stages(ctf, tmp_path):
    ctf.save_pretrained(tmp_path / "ctf")
    reloaded = AutoModel.from_pretrained(tmp_path / "ctf")
    assert isinstance(reloaded, CTFForImageGeneration) and reloaded.config.has_centroids
    assert torch.equal(reloaded.fine_to_coarse, ctf.fine_to_coarse)
    assert reloaded.generation_config.fine_temperature == 1.1 and reloaded.generation_config.temperature == 1.1
    kw = dict(generator=torch.Generator().manual_seed(4), in_cluster_mask=True)
    a = ctf.generate([1, 2], **kw)
    kw["generator"] = torch.Generator().manual_seed(4)
    assert torch.equal(a, reloaded.generate([1, 2], **kw))
    rebuilt = CTFForImageGeneration.from_stages(ctf.coarse_model, ctf.fine_model, ctf.fine_to_coarse,
                                                ctf.coarse_centroids)
    assert all(torch.equal(v, rebuilt.state_dict()[k]) for k, v in ctf.state_dict().items())
    other = CTFAuxiliaryModel(LlamaGenConfig(vocab_size=64, input_vocab_size=16, is_causal=False, num_classes=5,
                                             grid_size=4, **TINY))
    with pytest.raises(ValueError, match="reads 16 coarse labels but stage 1 predicts 8"):
        CTFForImageGeneration.from_stages(ctf.coarse_model, other, ctf.fine_to_coarse)


def test_convert_ctf_bundle(ctf):
    """The bundle layout METHOD.md proposes: LlamaGen GPT keys under stage1./stage2. + the table."""
    inverse = {
        "model.class_embedding.weight": "cls_embedding.embedding_table.weight",
        "model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
        "lm_head.weight": "output.weight",
    }
    layer = {"self_attn.qkv_proj": "attention.wqkv", "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1",
             "mlp.up_proj": "feed_forward.w3", "mlp.down_proj": "feed_forward.w2", "input_layernorm": "attention_norm",
             "post_attention_layernorm": "ffn_norm"}

    def official(module):
        out = {}
        for k, v in module.state_dict().items():
            if k in inverse:
                out[inverse[k]] = v
            else:
                i, rest = k.split(".")[2], ".".join(k.split(".")[3:-1])
                out[f"layers.{i}.{layer[rest]}.weight"] = v
        return out

    bundle = {f"stage1.{k}": v for k, v in official(ctf.coarse_model).items()}
    bundle.update({f"stage2.{k}": v for k, v in official(ctf.fine_model).items()})
    bundle.update(fine_to_coarse=ctf.fine_to_coarse, coarse_centroids=ctf.coarse_centroids)

    def args(c):
        return dict(dim=c.hidden_size, n_layer=c.num_hidden_layers, n_head=c.num_attention_heads, vocab_size=c.vocab_size,
                    num_classes=c.num_classes, block_size=c.grid_size ** 2)

    config = {"stage1": args(ctf.config.coarse_config), "stage2": args(ctf.config.fine_config), "kmeans_seed": 0}
    converted = convert_ctf(bundle, config)
    assert all(torch.equal(v, converted.state_dict()[k]) for k, v in ctf.state_dict().items())
    with pytest.raises(CheckpointError, match="fine_to_coarse"):
        convert_ctf({k: v for k, v in bundle.items() if k != "fine_to_coarse"}, config)
    with pytest.raises(CheckpointError, match="inconsistent CTF bundle"):
        convert_ctf(dict(bundle, fine_to_coarse=torch.arange(64) % 9), config)


def test_inverse_cdf_sampler_distribution():
    from hf_rq.ctf.prior import sample_by_inverse_cdf

    probs = torch.tensor([0.5, 0.0, 0.2, 0.3, 0.0]).repeat(40000, 1)
    draws = sample_by_inverse_cdf(probs, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=5).double() / len(draws)
    assert freq[1] == 0 and freq[4] == 0  # zero-probability entries are never drawn
    torch.testing.assert_close(freq, probs[0].double(), atol=0.01, rtol=0)
    again = sample_by_inverse_cdf(probs, torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)
