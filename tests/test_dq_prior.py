"""DQ-Transformer: teacher-forced and sampler parity with the authors' code, cached vs uncached, converter, bad input."""

import json

import pytest
import torch
from safetensors.torch import load_file

from hf_rq import DQTransformerConfig, DQTransformerForImageGeneration
from hf_rq.checkpoint_utils import CheckpointError
from hf_rq.dq.conversion import convert_dqtransformer
from hf_rq.dq.tokens import DQTokens, codes_to_tokens

SEQUENCES = ("coarse_content", "coarse_position", "fine_content", "fine_position")
GREEDY = dict(do_sample=False, top_k=None, top_p=None, position_top_k=None, position_top_p=None)



@pytest.fixture(scope="module")
def dq(fixtures_dir):
    return fixtures_dir / "dq"


@pytest.fixture(scope="module")
def configs(dq):
    return json.loads((dq / "configs.json").read_text())


@pytest.fixture(scope="module")
def weights(dq):
    return load_file(dq / "transformer_weights.safetensors")


@pytest.fixture(scope="module")
def prior(weights, configs):
    return convert_dqtransformer(weights, configs["dualformer"])


@pytest.fixture(scope="module")
def tf(dq):
    return load_file(dq / "transformer_teacher_forced.safetensors")


@pytest.fixture(scope="module")
def sample(dq):
    return load_file(dq / "transformer_sample.safetensors")


def tiny(num_classes=3, seed=0, **overrides):
    """A random model small enough for the uncached path: 4x4 coarse / 8x8 fine grid, 16 codes."""
    torch.manual_seed(seed)
    config = DQTransformerConfig(**dict(dict(codebook_size=16, coarse_grid_size=4, num_classes=num_classes, hidden_size=32,
                                             num_position_layers=2, num_content_layers=2, num_attention_heads=4,
                                             max_position_embeddings=90), **overrides))
    model = DQTransformerForImageGeneration(config).eval()
    with torch.no_grad():  # sharper than the 0.02 init, so that sequences stop at varied lengths
        for head in (model.position_head, model.content_head):
            head.weight.normal_(0, 0.3)
    return model


def tokens_of(prefix, sample):
    return DQTokens(*(sample[prefix + name].clone() for name in SEQUENCES))


@torch.no_grad()
def test_teacher_forced_parity(prior, tf, dq):
    tokens = tokens_of("perm_rowfirst_", tf)
    seq = prior.prepare_sequences(tokens, tf["labels"])
    for name in SEQUENCES:  # start tokens: class offset into all three vocabularies
        assert torch.equal(seq[name], tf["in_" + name]), name
    out = prior(tokens=tokens, class_labels=tf["labels"])
    torch.testing.assert_close(out.position_logits, tf["position_logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.content_logits, tf["content_logits"], atol=1e-5, rtol=1e-5)
    for ours, theirs in (("loss", "loss_total"), ("content_loss", "loss_content"), ("position_loss", "loss_position"),
                         ("coarse_position_loss", "loss_coarse_position"), ("fine_position_loss", "loss_fine_position")):
        torch.testing.assert_close(getattr(out, ours).reshape(1), tf[theirs], rtol=1e-5, atol=0)
    # The same through codes + granularity (what training passes), as DQVAEModel.encode returns them.
    vae = load_file(dq / "vae_entropy_outputs.safetensors")
    again = prior(codes=vae["codes"], granularity=vae["grain_indices"], class_labels=tf["labels"])
    assert torch.equal(again.content_logits, out.content_logits)


@pytest.mark.parametrize("fixed", [False, True], ids=["sampled-fine-positions", "fixed-fine-positions"])
def test_greedy_samples_match_reference(prior, sample, fixed):
    prefix = "fixedpos_" if fixed else ""
    out = prior.generate(class_labels=sample["labels"], fix_fine_position=fixed, return_dict_in_generate=True, **GREEDY)
    for name in SEQUENCES:  # exact, including end tokens, the pad content at end steps and trailing pads
        assert torch.equal(getattr(out.tokens, name), sample[prefix + name]), name
    assert torch.equal(out.codes, sample[prefix + "code_map"])
    # Quirk kept: the last coarse cell (index 63) is never coarse.
    assert (out.granularity.reshape(3, -1)[:, -1] == 1).all()
    codes, granularity = prior.generate(class_labels=sample["labels"], fix_fine_position=fixed, **GREEDY)
    assert torch.equal(codes, out.codes) and torch.equal(granularity, out.granularity)


@pytest.mark.parametrize("fixed", [False, True], ids=["sampled-fine-positions", "fixed-fine-positions"])
@pytest.mark.parametrize("num_classes", [3, 0], ids=["class", "uncond"])
def test_cached_and_uncached_agree_step_by_step(fixed, num_classes):
    model = tiny(num_classes)
    labels = dict(class_labels=[0, 2, 1]) if num_classes else dict(batch_size=3)
    kwargs = dict(labels, do_sample=True, temperature=0.9, top_k=12, top_p=0.95, position_top_k=40, position_top_p=0.9,
                  fix_fine_position=fixed, output_scores=True, return_dict_in_generate=True)
    cached = model.generate(generator=torch.Generator().manual_seed(3), **kwargs)
    full = model.generate(generator=torch.Generator().manual_seed(3), use_cache=False, **kwargs)
    assert len(cached.content_scores) == len(full.content_scores) > 20
    assert len(cached.position_scores) == len(full.position_scores)
    for a, b in zip(cached.position_scores + cached.content_scores, full.position_scores + full.content_scores):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for name in SEQUENCES:
        assert torch.equal(getattr(cached.tokens, name), getattr(full.tokens, name)), name
    assert torch.equal(cached.codes, full.codes) and torch.equal(cached.granularity, full.granularity)


def test_generator_and_sequences_are_well_formed():
    model = tiny()
    a = model.generate(class_labels=[1, 1], generator=torch.Generator().manual_seed(0), return_dict_in_generate=True)
    b = model.generate(class_labels=[1, 1], generator=torch.Generator().manual_seed(0), return_dict_in_generate=True)
    c = model.generate(class_labels=[1, 1], generator=torch.Generator().manual_seed(1), return_dict_in_generate=True)
    assert all(torch.equal(getattr(a.tokens, n), getattr(b.tokens, n)) for n in SEQUENCES)
    assert not all(torch.equal(getattr(a.tokens, n), getattr(c.tokens, n)) for n in SEQUENCES)
    v = model.config.vocabulary
    for b_ in range(2):  # coarse cells distinct and not the last one; fine cells never inside coarse cells
        cp = a.tokens.coarse_position[b_]
        cells = cp[: (cp == v.coarse_eos).nonzero()[0, 0]]
        assert cells.unique().numel() == cells.numel() and (cells < v.num_coarse_positions - 1).all()
        fp = a.tokens.fine_position[b_]
        fine = fp[: (fp == v.fine_eos).nonzero()[0, 0]]
        assert fine.unique().numel() == fine.numel()
        coarse_up = (a.granularity[b_] == 0).repeat_interleave(2, 0).repeat_interleave(2, 1).reshape(-1)
        assert not coarse_up[fine].any()
        # contents at end-of-part steps are the pad code K, never the end code K + 1
        assert a.tokens.coarse_content[b_][cp == v.coarse_eos].item() == v.content_pad
        assert (a.tokens.fine_content < v.content_eos).all() and (a.tokens.coarse_content < v.content_eos).all()


def test_progress_bar_and_length_check():
    model = tiny()
    seen = []

    def bar(iterable):
        for item in iterable:
            seen.append(item)
            yield item

    out = model.generate(class_labels=[0], generator=torch.Generator().manual_seed(0), progress_bar=bar,
                         return_dict_in_generate=True)
    assert len(seen) == out.tokens.coarse_content.shape[1] + out.tokens.fine_content.shape[1]
    short = tiny(max_position_embeddings=20)
    with pytest.raises(RuntimeError, match="more than max_position_embeddings=20"):
        short.generate(class_labels=[0], generator=torch.Generator().manual_seed(0))


def test_unconditional_variant():
    model = tiny(num_classes=0)
    v = model.config.vocabulary
    assert (model.config.content_vocab_size, model.config.coarse_position_vocab_size,
            model.config.fine_position_vocab_size) == (19, 19, 67)  # one start token per vocabulary
    codes, granularity = model.generate(batch_size=2, generator=torch.Generator().manual_seed(0))
    assert codes.shape == (2, 8, 8) and granularity.shape == (2, 4, 4)
    seq = model.prepare_sequences(codes_to_tokens(codes, granularity, 16))
    assert seq["coarse_content"][0, 0] == v.codebook_size + 2 and seq["fine_position"][0, 0] == v.num_fine_positions + 2
    loss = model(codes=codes, granularity=granularity).loss
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="unconditional"):
        model.generate(class_labels=[0])
    with pytest.raises(ValueError, match="unconditional"):
        model(codes=codes, granularity=granularity, class_labels=torch.tensor([0, 0]))


def test_bad_inputs(prior, tf, dq):
    with pytest.raises(ValueError, match=r"class id 10 is out of range \[0, 10\)"):
        prior.generate(class_labels=[3, 10])
    with pytest.raises(ValueError, match="class-conditional"):
        prior.generate()
    with pytest.raises(TypeError, match="unexpected keyword arguments: \\['top_kk'\\]"):
        prior.generate(class_labels=[1], top_kk=3)
    with pytest.raises(ValueError, match="classifier-free guidance"):
        prior.generate(class_labels=[1], guidance_scale=2.0)
    with pytest.raises(ValueError, match="top_k=-1: must be an integer >= 1"):
        prior.generate(class_labels=[1], top_k=-1)  # 0 means "no top-k" in every family (hf_rq.sampling_args)
    with pytest.raises(ValueError, match="batch_size=2 disagrees"):
        prior.generate(class_labels=[1], batch_size=2)
    vae = load_file(dq / "vae_entropy_outputs.safetensors")
    codes, grain = vae["codes"], vae["grain_indices"]
    with pytest.raises(ValueError, match=r"class id out of range \[0, 10\)"):
        prior(codes=codes, granularity=grain, class_labels=torch.tensor([0, 1, 12]))
    with pytest.raises(ValueError, match="pass class_labels"):
        prior(codes=codes, granularity=grain)
    with pytest.raises(ValueError, match=r"granularity must have shape \(B, 8, 8\)"):
        prior(codes=codes, granularity=grain[:, :4, :4], class_labels=tf["labels"])
    broken = codes.clone()
    b, i, j = (grain == 0).nonzero()[0].tolist()
    broken[b, 2 * i, 2 * j] = (broken[b, 2 * i, 2 * j] + 1) % 128
    with pytest.raises(ValueError, match="granularity map inconsistent with the codes"):
        prior(codes=broken, granularity=grain, class_labels=tf["labels"])
    tokens = tokens_of("perm_rowfirst_", tf)
    tokens.fine_position[0, 0] = 300  # beyond the fine end token
    with pytest.raises(ValueError, match="do not fit this model's vocabulary"):
        prior(tokens=tokens, class_labels=tf["labels"])


def test_training_backward_keeps_pad_rows_frozen(weights, configs, tf):
    model = convert_dqtransformer(weights, configs["dualformer"]).train()
    out = model(tokens=tokens_of("perm_rowfirst_", tf), class_labels=tf["labels"])
    out.loss.backward()
    v = model.config.vocabulary
    assert model.content_embedding.weight.grad[v.content_pad].abs().sum() == 0
    assert model.coarse_position_embedding.weight.grad[v.coarse_pad].abs().sum() == 0
    assert model.content_embedding.weight.grad[v.content_eos].abs().sum() > 0
    assert model.sequence_position_embedding.grad.abs().sum() > 0
    # a fresh model draws the padding rows too (the authors' init), and starts the sequence embedding at zero
    fresh = tiny()
    assert fresh.content_embedding.weight[16].abs().sum() > 0 and fresh.sequence_position_embedding.abs().sum() == 0


def test_config_validation():
    with pytest.raises(Exception, match="not divisible by num_attention_heads"):
        DQTransformerConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(Exception, match="fine_position_order"):
        DQTransformerConfig(fine_position_order="column-first")
    with pytest.raises(Exception, match="num_classes must be >= 0"):
        DQTransformerConfig(num_classes=-1)
    c = DQTransformerConfig()  # the published class-conditional ImageNet sizes
    assert (c.content_vocab_size, c.coarse_position_vocab_size, c.fine_position_vocab_size) == (2026, 1258, 2026)


def test_save_load_auto_and_generation_config(prior, sample, tmp_path):
    from transformers import AutoModel

    prior.generation_config.position_top_k = 50
    try:
        prior.save_pretrained(tmp_path / "prior")
    finally:
        prior.generation_config.position_top_k = None
    again = AutoModel.from_pretrained(tmp_path / "prior")
    assert isinstance(again, DQTransformerForImageGeneration)
    assert again.generation_config.position_top_k == 50 and again.generation_config.fix_fine_position is False
    for name, param in prior.state_dict().items():
        assert torch.equal(param, again.state_dict()[name]), name
    out = again.generate(class_labels=sample["labels"], return_dict_in_generate=True, **GREEDY)
    assert torch.equal(out.codes, sample["code_map"])


def test_converter_masks_and_checks(weights, configs, tmp_path):
    from hf_rq.convert import main as convert_main

    n = 512
    masks = {f"transformer.{stack}_transformer.{i}.attn.mask": torch.ones(n, n).tril().view(1, 1, n, n)
             for stack in ("position", "content") for i in range(2)}
    full = {"transformer." + k: v for k, v in weights.items()} | masks
    model = convert_dqtransformer(full, configs["dualformer"], prefix="transformer.")
    assert not any("mask" in k for k in model.state_dict())
    bad = dict(full)
    bad["transformer.content_transformer.1.attn.mask"] = torch.ones(1, 1, n, n)
    with pytest.raises(CheckpointError, match="not the causal lower-triangular mask"):
        convert_dqtransformer(bad, configs["dualformer"], prefix="transformer.")
    with pytest.raises(CheckpointError, match="does not understand"):
        convert_dqtransformer(dict(weights, extra_head=torch.zeros(1)), configs["dualformer"])
    with pytest.raises(CheckpointError, match="missing keys"):
        convert_dqtransformer({k: v for k, v in weights.items() if k != "seg_emb.weight"}, configs["dualformer"])
    cfg = json.loads(json.dumps(configs["dualformer"]))
    cfg["params"]["permuter_config"]["params"]["content_eos_code"] = 130
    with pytest.raises(CheckpointError, match="content_eos_code=130 differs"):
        convert_dqtransformer(weights, cfg)
    cfg = json.loads(json.dumps(configs["dualformer"]))
    cfg["params"]["class_cond_stage_config"]["params"]["threshold_fine_position"] = 257
    with pytest.raises(CheckpointError, match="threshold_fine_position=257"):
        convert_dqtransformer(weights, cfg)
    # CLI: a .pt needs --allow-pickle (read with weights_only=True)
    torch.save({"state_dict": full}, tmp_path / "stage2.pt")
    (tmp_path / "stage2.json").write_text(json.dumps({"model": configs["dualformer"]}))
    args = ["dqtransformer", "--checkpoint", str(tmp_path / "stage2.pt"), "--config", str(tmp_path / "stage2.json"),
            "--output", str(tmp_path / "out")]
    assert convert_main(args) == 2
    assert convert_main(args + ["--allow-pickle"]) == 0
    assert DQTransformerForImageGeneration.from_pretrained(tmp_path / "out").config.num_classes == 10
