"""Classifier-free guidance for the DQ-Transformer: null class, class dropout, guided sampling (not in the authors' code)."""

import pytest
import torch

from hf_rq import DQTransformerConfig, DQTransformerForImageGeneration

SEQUENCES = ("coarse_content", "coarse_position", "fine_content", "fine_position")
SAMPLING = dict(do_sample=True, temperature=0.9, top_k=12, top_p=0.95, position_top_k=40, position_top_p=0.9)


def tiny(num_classes=3, seed=0, **overrides):
    """A random 4x4 coarse / 8x8 fine model with 16 codes and a null class, sharp enough to stop at varied lengths."""
    torch.manual_seed(seed)
    config = DQTransformerConfig(**dict(dict(codebook_size=16, coarse_grid_size=4, num_classes=num_classes, hidden_size=32,
                                             num_position_layers=2, num_content_layers=2, num_attention_heads=4,
                                             max_position_embeddings=90, use_null_class=num_classes > 0), **overrides))
    model = DQTransformerForImageGeneration(config).eval()
    with torch.no_grad():
        for head in (model.position_head, model.content_head):
            head.weight.normal_(0, 0.3)
    return model


def generate(model, scale, seed=3, **kwargs):
    return model.generate(class_labels=[0, 2, 1], generator=torch.Generator().manual_seed(seed), guidance_scale=scale,
                          output_scores=True, return_dict_in_generate=True, **{**SAMPLING, **kwargs})


def test_null_class_vocabulary_and_config():
    with_null, without = DQTransformerConfig(num_classes=5, use_null_class=True), DQTransformerConfig(num_classes=5)
    assert with_null.null_class_id == 5 and without.null_class_id is None
    for size in ("content_vocab_size", "coarse_position_vocab_size", "fine_position_vocab_size"):
        assert getattr(with_null, size) == getattr(without, size) + 1
    v = with_null.vocabulary  # the null start tokens come after the class ones; nothing else moves
    assert [int(t[0]) for t in v.start_tokens(torch.tensor([5]))] == [1024 + 2 + 5, 256 + 2 + 5, 1024 + 2 + 5]
    assert (v.content_pad, v.coarse_eos, v.fine_eos) == (without.vocabulary.content_pad, 257, 1025)
    with pytest.raises(Exception, match="use_null_class needs a class-conditional model"):
        DQTransformerConfig(num_classes=0, use_null_class=True)
    with pytest.raises(Exception, match="class_dropout_prob > 0 needs use_null_class=True"):
        DQTransformerConfig(num_classes=5, class_dropout_prob=0.1)
    with pytest.raises(Exception, match=r"class_dropout_prob must be in \[0, 1\)"):
        DQTransformerConfig(num_classes=5, use_null_class=True, class_dropout_prob=1.0)


def test_guidance_one_is_no_guidance():
    model = tiny()
    a, b = generate(model, None), generate(model, 1.0)
    assert all(torch.equal(getattr(a.tokens, n), getattr(b.tokens, n)) for n in SEQUENCES)
    assert all(torch.equal(x, y) for x, y in zip(a.position_scores + a.content_scores, b.position_scores + b.content_scores))
    c = generate(model, 3.0)
    assert not all(torch.equal(getattr(a.tokens, n), getattr(c.tokens, n)) for n in SEQUENCES)


@pytest.mark.parametrize("fixed", [False, True], ids=["sampled-fine-positions", "fixed-fine-positions"])
def test_guided_cached_equals_uncached_step_by_step(fixed):
    model = tiny()
    cached = generate(model, 2.5, fix_fine_position=fixed)
    full = generate(model, 2.5, fix_fine_position=fixed, use_cache=False)
    assert len(cached.content_scores) == len(full.content_scores) > 20
    assert len(cached.position_scores) == len(full.position_scores)
    for a, b in zip(cached.position_scores + cached.content_scores, full.position_scores + full.content_scores):
        assert a.shape[0] == 3  # the mixed logits of the three images, not of the doubled batch
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for name in SEQUENCES:
        assert torch.equal(getattr(cached.tokens, name), getattr(full.tokens, name)), name
    assert torch.equal(cached.codes, full.codes) and torch.equal(cached.granularity, full.granularity)


def test_guided_logits_mix_conditional_and_null_forward():
    # The coarse phase samples exactly the teacher-forced rows (training alignment), so each guided score must be
    # u + s * (c - u) of the forward logits under the class and under the null class, for the tokens it drew.
    model, scale = tiny(), 2.5
    out = generate(model, scale)
    cond = model(tokens=out.tokens, class_labels=torch.tensor([0, 2, 1]))
    null = model(tokens=out.tokens, class_labels=torch.full((3,), model.config.null_class_id))
    steps = out.tokens.coarse_content.shape[1]
    for t in range(steps):
        for guided, c, u in ((out.position_scores[t], cond.position_logits[:, t], null.position_logits[:, t]),
                             (out.content_scores[t], cond.content_logits[:, t], null.content_logits[:, t])):
            torch.testing.assert_close(guided, u + scale * (c - u), atol=1e-4, rtol=1e-4)


def test_guidance_needs_a_null_class():
    for model, what in ((tiny(use_null_class=False), "without a null class"), (tiny(num_classes=0), "unconditional")):
        labels = dict(class_labels=[1]) if model.config.num_classes else {}
        with pytest.raises(ValueError, match=f"classifier-free guidance needs .*null class.*{what}"):
            model.generate(guidance_scale=2.0, **labels)
    with pytest.raises(ValueError, match="guidance_scale=0.5"):  # below 1 is refused in every family
        tiny().generate(class_labels=[1], guidance_scale=0.5)
    with pytest.raises(ValueError, match=r"class id 3 is out of range \[0, 3\)"):  # the null id is not a class to sample
        tiny().generate(class_labels=[3])


def test_class_dropout_replaces_whole_sequences_by_the_null_class():
    model = tiny(class_dropout_prob=0.5)
    gen = model.generate(class_labels=[0, 1, 2, 0], generator=torch.Generator().manual_seed(0),
                         return_dict_in_generate=True)
    labels = torch.arange(64) % 3
    tokens = type(gen.tokens)(*(t.repeat(16, 1) for t in (gen.tokens.coarse_content, gen.tokens.coarse_position,
                                                          gen.tokens.fine_content, gen.tokens.fine_position)))
    v, null = model.config.vocabulary, model.config.null_class_id
    model.train()
    torch.manual_seed(0)
    seq = model.prepare_sequences(tokens, labels)
    ids = seq["coarse_content"][:, 0] - v.content_eos - 1
    dropped = ids == null
    assert 10 < dropped.sum() < 54 and torch.equal(ids[~dropped], labels[~dropped])
    starts = v.start_tokens(ids)  # every start token of a row names the same class
    assert torch.equal(seq["coarse_position"][:, 0], starts[1]) and torch.equal(seq["fine_position"][:, 0], starts[2])
    assert torch.equal(seq["fine_content"][:, 0], starts[0])
    model.eval()  # no dropout outside training
    assert torch.equal(model.prepare_sequences(tokens, labels)["coarse_content"][:, 0] - v.content_eos - 1, labels)


def test_add_null_class_keeps_every_weight():
    model = tiny(use_null_class=False)
    gen = model.generate(class_labels=[0, 1], generator=torch.Generator().manual_seed(0), return_dict_in_generate=True)
    before = model(tokens=gen.tokens, class_labels=torch.tensor([0, 1]))
    rows = model.content_embedding.weight[16 + 2:16 + 5].mean(0)
    model.add_null_class()
    assert model.config.use_null_class and model.content_embedding.weight.shape[0] == model.config.content_vocab_size
    torch.testing.assert_close(model.content_embedding.weight[-1], rows)
    assert model.content_embedding.padding_idx == model.config.vocabulary.content_pad
    after = model(tokens=gen.tokens, class_labels=torch.tensor([0, 1]))
    torch.testing.assert_close(after.position_logits[..., :-1], before.position_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after.content_logits[..., :-1], before.content_logits, atol=1e-5, rtol=1e-5)
    model.generate(class_labels=[0], guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="already has a null class"):
        model.add_null_class()
    with pytest.raises(ValueError, match="needs a class-conditional model"):
        tiny(num_classes=0).add_null_class()


def test_guidance_with_per_image_generators_and_save_load(tmp_path):
    model = tiny()
    model.generation_config.guidance_scale = 2.0  # a bundle's default travels with generation_config.json
    model.save_pretrained(tmp_path)
    loaded = DQTransformerForImageGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.use_null_class and loaded.generation_config.guidance_scale == 2.0
    gens = [torch.Generator().manual_seed(i) for i in (5, 6)]
    pair = loaded.generate(class_labels=[0, 2], generator=gens)
    alone = loaded.generate(class_labels=[2], generator=torch.Generator().manual_seed(6))
    assert torch.equal(pair[0][1:], alone[0]) and torch.equal(pair[1][1:], alone[1])


def test_training_spec_gives_a_pretrained_prior_its_null_class():
    from types import SimpleNamespace

    from hf_rq.training.priors import DQPriorSpec

    spec = DQPriorSpec()
    tokenizer = SimpleNamespace(config=SimpleNamespace(codebook_size=16, sample_size=64, num_grains=2),
                                coarse_grid_size=4)
    args = SimpleNamespace(resolution=64, class_dropout_prob=0.1)
    prior = tiny(use_null_class=False)
    spec.check_prior(prior, tokenizer, 3, args)  # fine-tuning with class dropout: the null class is added
    assert prior.config.use_null_class and prior.config.class_dropout_prob == 0.1
    kept = tiny(use_null_class=False)
    spec.check_prior(kept, tokenizer, 3, SimpleNamespace(resolution=64, class_dropout_prob=0.0))
    assert not kept.config.use_null_class and kept.content_embedding.weight.shape[0] == 16 + 2 + 3
    # --init_prior_weights from a prior without a null class copies every tensor, the grown ones included
    copied, fresh = spec.warm_start(tiny(seed=1), tiny(use_null_class=False))
    assert fresh == [] and "content_head.weight" in copied
