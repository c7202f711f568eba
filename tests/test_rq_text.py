"""Text-conditional RQ-Transformer: parity with the authors' CC-3M model layout (fixtures/rq_text, made by
make_rq_text_reference.py from their code), their text tokenizer, the converter, the prompt pipeline, bad input."""

import json
import logging
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_rq import RQTransformerConfig, RQTransformerForImageGeneration, RQTransformerPipeline
from hf_rq.checkpoint_utils import CheckpointError
from hf_rq.prompts import prepare_prompts, tokenize_prompts
from hf_rq.rq.conversion import convert_rqtransformer, convert_rqvae
from hf_rq.rq.text_tokenizer import rq_text_tokenizer_from_files, train_rq_text_tokenizer

# As tests/test_rq_prior.py: float32 vs float64 deviations of the authors' model are ~1e-6.
LOGIT_TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def d(fixtures_dir):
    return fixtures_dir / "rq_text"


@pytest.fixture(scope="module")
def ref(d):
    return load_file(d / "tensors.safetensors")


@pytest.fixture(scope="module")
def captions(d):
    return json.loads((d / "captions.json").read_text())


@pytest.fixture(scope="module")
def text_tokenizer(d):
    return rq_text_tokenizer_from_files(d / "small-vocab.json", d / "small-merges.txt", context_length=8)


@pytest.fixture(scope="module")
def vqvae(fixtures_dir):
    rq = fixtures_dir / "rq"
    return convert_rqvae(load_file(rq / "rqvae.safetensors"), json.loads((rq / "rqvae_config.json").read_text()))


@pytest.fixture(scope="module")
def official(d):
    return load_file(d / "rqtransformer_text.safetensors"), json.loads((d / "rqtransformer_text_config.json").read_text())


@pytest.fixture(scope="module")
def prior(official, vqvae, text_tokenizer):
    state, config = official
    return convert_rqtransformer(state, config["arch"], vqvae, text_tokenizer=text_tokenizer)


# ------------------------------------------------------------------------------------------------ tokenizer
def test_text_ids_match_authors(text_tokenizer, captions, ref, caplog):
    """Their CharBPE set-up (lower-case, [PAD], right padding and truncation): unicode, empty, too long."""
    with caplog.at_level(logging.WARNING, logger="hf_rq"):
        ids = tokenize_prompts(text_tokenizer, captions)
    assert torch.equal(ids, ref["text_ids.small"])
    assert any("truncated" in r.message and "a cat with a hat" in r.message for r in caplog.records)
    assert (ids[2] == text_tokenizer.pad_token_id).all()  # the empty caption is all pads: the null text


@pytest.mark.skipif(not os.environ.get("HF_RQ_RQ_REPO"), reason="the authors' 16k vocabulary is not shipped; set "
                    "HF_RQ_RQ_REPO to their checkout")
def test_text_ids_match_authors_bpe16k(captions, ref):
    root = os.path.join(os.environ["HF_RQ_RQ_REPO"], "rqvae/txtimg_datasets/tokenizers/pretrained")
    tok = rq_text_tokenizer_from_files(f"{root}/bpe-16k-vocab.json", f"{root}/bpe-16k-merges.txt", 32)
    assert torch.equal(tokenize_prompts(tok, captions), ref["text_ids.bpe16k"])


def test_tokenizer_round_trip_offline(text_tokenizer, captions, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    text_tokenizer.save_pretrained(tmp_path / "tok")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded.model_max_length == 8 and loaded.pad_token == "[PAD]"
    assert torch.equal(tokenize_prompts(loaded, captions), tokenize_prompts(text_tokenizer, captions))


def test_trained_tokenizer_layout():
    tok = train_rq_text_tokenizer(["grinning face", "red apple", "grinning cat"], vocab_size=60, context_length=5)
    assert (tok.pad_token_id, tok.unk_token_id) == (0, 1)  # as the authors' bpe-16k vocabulary
    assert tokenize_prompts(tok, ["GRINNING face"]).tolist()[0][2:] == [0, 0, 0]


# ------------------------------------------------------------------------------------------------ parity
def test_teacher_forced_logits_match_authors(prior, ref):
    with torch.no_grad():
        out = prior(ref["tf.codes"], text_ids=ref["tf.cond"], labels=ref["tf.codes"])
    torch.testing.assert_close(out.logits, ref["tf.logits"], **LOGIT_TOL)
    torch.testing.assert_close(out.text_logits, ref["tf.cond_logits"], **LOGIT_TOL)
    # the authors' weighting (txt_weight 0.1, img_weight 0.9)
    image = torch.nn.functional.cross_entropy(ref["tf.logits"].reshape(-1, 64), ref["tf.codes"].reshape(-1))
    text = torch.nn.functional.cross_entropy(ref["tf.cond_logits"].reshape(-1, ref["tf.cond_logits"].shape[-1]),
                                             ref["tf.cond"][:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, 0.9 * image + 0.1 * text, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_samples_match_authors(prior, ref, use_cache):
    codes = prior.generate(text_ids=ref["tf.cond"], do_sample=False, use_cache=use_cache)
    assert torch.equal(codes, ref["sample.codes"])


def test_greedy_samples_match_authors_with_compiled_step(prior, ref):
    """compile=...: the fixed-shape step takes one token, so the text prefix enters token by token; the codes stay
    the authors'. The 'eager' backend captures the whole step (fullgraph) without generating code."""
    codes = prior.generate(text_ids=ref["tf.cond"], do_sample=False, compile={"backend": "eager"})
    assert torch.equal(codes, ref["sample.codes"])


def test_converter_cli_writes_pipeline_with_tokenizer(official, d, fixtures_dir, captions, ref, tmp_path):
    from hf_rq.convert import main

    state, config = official
    save_file(state, tmp_path / "tf.safetensors")
    (tmp_path / "tf.json").write_text(json.dumps(config))
    rq = fixtures_dir / "rq"
    base = ["rqtransformer", "--checkpoint", str(tmp_path / "tf.safetensors"), "--config", str(tmp_path / "tf.json"),
            "--rqvae-checkpoint", str(rq / "rqvae.safetensors"), "--rqvae-config", str(rq / "rqvae_config.json")]
    assert main(base + ["--output", str(tmp_path / "none")]) == 2  # a text checkpoint needs its tokenizer files
    argv = base + ["--text-vocab", str(d / "small-vocab.json"), "--text-merges", str(d / "small-merges.txt"),
                   "--output", str(tmp_path / "pipe")]
    assert main(argv) == 0
    pipe = RQTransformerPipeline.from_pretrained(tmp_path / "pipe")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.config.text_length == 8 and not pipe.transformer.config.use_null_text
    rows = [captions[i] for i in (0, 1, 2, 4)]
    codes = pipe(prompt=rows, do_sample=False, output_type="latent").images
    assert torch.equal(codes, ref["sample.codes"])
    with pytest.raises(ValueError, match="null text"):  # the authors' model was trained without caption dropout
        pipe(prompt="grinning face", guidance_scale=2.0)


def test_converter_rejects_bad_text_configs(official, vqvae, text_tokenizer):
    state, config = official
    with pytest.raises(CheckpointError, match="text tokenizer"):
        convert_rqtransformer(state, config["arch"], vqvae)
    with pytest.raises(CheckpointError, match="vocab_size_cond"):
        convert_rqtransformer(state, {**config["arch"], "vocab_size_cond": 0}, vqvae, text_tokenizer=text_tokenizer)


# ------------------------------------------------------------------------------------------------ pipeline
@pytest.fixture
def tiny_text_pipe(vqvae, text_tokenizer):
    config = RQTransformerConfig(codebook_size=64, grid_height=8, grid_width=8, code_depth=4, code_embed_dim=16,
                                 hidden_size=32, num_spatial_layers=1, num_depth_layers=1, num_attention_heads=2,
                                 text_length=8, text_vocab_size=len(text_tokenizer),
                                 text_pad_token_id=text_tokenizer.pad_token_id, use_null_text=True,
                                 text_dropout_prob=0.1)
    torch.manual_seed(0)
    pipe = RQTransformerPipeline(vqvae=vqvae, transformer=RQTransformerForImageGeneration.from_tokenizer(config, vqvae).eval(),
                                 tokenizer=text_tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_prompt_pipeline_batches_guides_and_saves(tiny_text_pipe, tmp_path):
    pipe = tiny_text_pipe
    g = lambda: [torch.Generator().manual_seed(i) for i in range(4)]  # noqa: E731
    codes = pipe(prompt=["grinning face", "a cat"], num_images_per_prompt=2, generator=g(), output_type="latent").images
    assert codes.shape == (4, 8, 8, 4)
    one = pipe(prompt="a cat", generator=[torch.Generator().manual_seed(2)], output_type="latent").images
    assert torch.equal(one[0], codes[2])  # [a, a, b, b] order; image i depends on generator[i] only
    guided = pipe(prompt="a cat", guidance_scale=3.0, negative_prompt="a dog", generator=torch.Generator().manual_seed(0),
                  output_type="latent").images
    null = pipe(prompt="a cat", guidance_scale=3.0, generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert guided.shape == null.shape == (1, 8, 8, 4)
    ids = tokenize_prompts(pipe.tokenizer, ["a cat", "a dog", ""])
    logits = lambda **kw: pipe.transformer.generate(text_ids=ids[:1], guidance_scale=3.0, do_sample=False,  # noqa: E731
                                                    output_logits=True, return_dict_in_generate=True, **kw).logits
    assert not torch.allclose(logits(negative_text_ids=ids[1:2]), logits())  # the negative prompt is used
    torch.testing.assert_close(logits(negative_text_ids=ids[2:3]), logits(), atol=0, rtol=0)  # "" = the null text
    explicit_null = pipe(prompt="a cat", guidance_scale=3.0, negative_prompt="", output_type="latent",
                         generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(explicit_null, null)  # the empty negative prompt is the null text
    image = pipe(prompt="grinning face", generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)
    pipe.save_pretrained(tmp_path / "p")
    loaded = RQTransformerPipeline.from_pretrained(tmp_path / "p")
    loaded.set_progress_bar_config(disable=True)
    again = loaded(prompt="a cat", guidance_scale=3.0, generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert torch.equal(again, null)


def test_training_forward_drops_captions_to_null_text(tiny_text_pipe):
    prior = tiny_text_pipe.transformer
    ids = tokenize_prompts(tiny_text_pipe.tokenizer, ["grinning face"] * 64)
    codes = torch.randint(0, 64, (64, 8, 8, 4))
    seen = []
    hook = prior.text_embedding.register_forward_hook(lambda m, inp, out: seen.append(inp[0].clone()))
    prior.train()
    try:
        torch.manual_seed(0)
        prior(codes, text_ids=ids, labels=codes)
    finally:
        prior.eval()
        hook.remove()
    dropped = (seen[0] == prior.config.text_pad_token_id).all(dim=1)
    assert 0 < dropped.sum() < 64  # about 10 % of the captions became the null text


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt=[]), "empty list"),
    (dict(prompt=["ok", 3]), r"prompt\[1\]"),
    (dict(class_labels=1), "text-conditional: pass prompt"),
    (dict(), "text-conditional: pass prompt"),
    (dict(prompt="x", negative_prompt="y"), "guidance_scale > 1"),
    (dict(prompt=["a", "b"], guidance_scale=2.0, negative_prompt=["x", "y", "z"]), "3 entries for 2 prompts"),
    (dict(prompt="x", guidance_scale=0.5), "guidance_scale"),
    (dict(prompt="x", num_images_per_prompt=0), "num_images_per_prompt"),
])
def test_prompt_pipeline_bad_input(tiny_text_pipe, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        tiny_text_pipe(**kwargs)


def test_prompt_for_class_model_is_refused(prior, vqvae):
    from evaluation_utils import tiny_rq_pipeline

    pipe = tiny_rq_pipeline()
    with pytest.raises(ValueError, match="takes no prompt: it is class-conditional"):
        pipe(prompt="grinning face")
    with pytest.raises(ValueError, match="not text-conditional"):
        pipe.transformer.generate(text_ids=torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="text-conditional"):
        prior.generate(class_labels=[0])
    with pytest.raises(ValueError, match=r"shape \(N, 8\)"):
        prior.generate(text_ids=torch.zeros(1, 5, dtype=torch.long))


def test_text_config_validation():
    base = dict(codebook_size=8, grid_height=2, grid_width=2, code_depth=2, code_embed_dim=4, hidden_size=8,
                num_spatial_layers=1, num_depth_layers=1, num_attention_heads=2)
    with pytest.raises(Exception, match="either class-conditional or text-conditional"):
        RQTransformerConfig(**base, num_classes=3, text_length=4, text_vocab_size=10)
    with pytest.raises(Exception, match="text_pad_token_id"):
        RQTransformerConfig(**base, text_length=4, text_vocab_size=10, use_null_text=True)
    with pytest.raises(Exception, match="use_null_text"):
        RQTransformerConfig(**base, text_length=4, text_vocab_size=10, text_pad_token_id=0, text_dropout_prob=0.1)


def test_prepare_prompts_helper():
    assert prepare_prompts(["a", "b"], num_images_per_prompt=2) == (["a", "a", "b", "b"], None)
    assert prepare_prompts("a", "n", 2, guidance_scale=2.0) == (["a", "a"], ["n", "n"])
