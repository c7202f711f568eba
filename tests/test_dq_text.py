"""Text-to-image DQ-Transformer: parity with the authors' t2i Dualformer, the CLIP components, pipeline, CLI."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPTokenizer

from hf_rq import DQTransformerPipeline, DQVAEModel
from hf_rq.checkpoint_utils import CheckpointError
from hf_rq.dq.conversion import convert_dqtransformer
from hf_rq.dq.text_conditioning import clip_tokenizer_from_bpe, load_clip_text_encoder
from hf_rq.dq.tokens import DQTokens
from hf_rq.prompts import prepare_prompts

SEQUENCES = ("coarse_content", "coarse_position", "fine_content", "fine_position")
GREEDY = dict(do_sample=False, top_k=None, top_p=None, position_top_k=None, position_top_p=None)


@pytest.fixture(scope="module")
def ref_dir(fixtures_dir):
    return fixtures_dir / "dq_t2i"


@pytest.fixture(scope="module")
def ref(ref_dir):
    return load_file(ref_dir / "t2i_reference.safetensors")


@pytest.fixture(scope="module")
def meta(ref_dir):
    return json.loads((ref_dir / "config.json").read_text())


@pytest.fixture(scope="module")
def weights(ref_dir):
    return load_file(ref_dir / "dualformer_t2i_weights.safetensors")


@pytest.fixture(scope="module")
def tokenizer(ref_dir, meta):
    return CLIPTokenizer(vocab=str(ref_dir / "vocab.json"), merges=str(ref_dir / "merges.txt"), pad_token="!",
                         model_max_length=meta["context_length"])


@pytest.fixture(scope="module")
def text_encoder(weights):
    return load_clip_text_encoder(weights)


@pytest.fixture(scope="module")
def prior(weights, meta):
    return convert_dqtransformer(weights, meta["model"], prefix="transformer.")


@pytest.fixture(scope="module")
def pipe(prior, tokenizer, text_encoder):
    torch.manual_seed(0)
    vqvae = DQVAEModel(sample_size=32, block_out_channels=(32, 32, 32, 64), layers_per_block=1, attn_resolutions=(),
                       decoder_block_out_channels=(32, 32, 32), decoder_layers_per_block=1,
                       decoder_attn_resolutions=(), latent_channels=32, embed_dim=32, codebook_size=32).eval()
    pipe = DQTransformerPipeline(vqvae=vqvae, transformer=prior, tokenizer=tokenizer, text_encoder=text_encoder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_tokenizer_ids_match_clip_tokenize(tokenizer, ref, meta, ref_dir):
    """Unicode, empty and over-long captions: ids padded with 0, truncated keeping end-of-text, as clip.tokenize."""
    ctx = meta["context_length"]
    ids = tokenizer(meta["captions"], padding="max_length", max_length=ctx, truncation=True)["input_ids"]
    assert torch.equal(torch.tensor(ids), ref["token_ids"])
    assert ref["token_ids"][3, -1] == len(tokenizer) - 1  # the long caption was cut, its end-of-text kept
    built = clip_tokenizer_from_bpe(ref_dir / "bpe_tiny.txt.gz", ctx)  # the converter's route, from their file
    again = built(meta["captions"], padding="max_length", max_length=ctx, truncation=True)["input_ids"]
    assert torch.equal(torch.tensor(again), ref["token_ids"])


@torch.no_grad()
def test_text_encoder_matches_encode_text(text_encoder, ref):
    out = text_encoder(input_ids=ref["token_ids"]).text_embeds
    torch.testing.assert_close(out, ref["text_features"], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_teacher_forced_parity(prior, ref):
    assert prior.config.text_feature_size == 24 and prior.config.num_classes == 0
    tokens = DQTokens(*(ref["tokens_" + n].clone() for n in SEQUENCES))
    out = prior(tokens=tokens, text_features=ref["text_features"])
    torch.testing.assert_close(out.position_logits, ref["position_logits"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.content_logits, ref["content_logits"], atol=1e-4, rtol=1e-4)
    for name in ("content_loss", "position_loss", "coarse_position_loss", "fine_position_loss"):
        torch.testing.assert_close(getattr(out, name), ref["loss_" + name], atol=1e-5, rtol=1e-5)
    # The same through codes + granularity.
    again = prior(codes=ref["codes"], granularity=ref["granularity"], text_features=ref["text_features"])
    torch.testing.assert_close(again.content_logits, out.content_logits, atol=1e-6, rtol=1e-6)
    # The text matters: other captions, other logits.
    other = prior(tokens=tokens, text_features=ref["text_features"].flip(0))
    assert not torch.allclose(other.content_logits, out.content_logits, atol=1e-3)


@pytest.mark.parametrize("fixed", [False, True], ids=["sampled-fine-positions", "fixed-fine-positions"])
@pytest.mark.parametrize("use_cache", [True, False], ids=["cached", "uncached"])
def test_greedy_samples_match_reference(prior, ref, fixed, use_cache):
    out = prior.generate(text_features=ref["text_features"], fix_fine_position=fixed, use_cache=use_cache,
                         return_dict_in_generate=True, **GREEDY)
    prefix = "greedy_fixed_" if fixed else "greedy_"
    for name in SEQUENCES:
        assert torch.equal(getattr(out.tokens, name), ref[prefix + name]), name


def test_cached_and_uncached_agree_when_sampling(prior, ref):
    kwargs = dict(text_features=ref["text_features"], temperature=1.3, top_k=20, output_scores=True,
                  return_dict_in_generate=True)
    a = prior.generate(generator=torch.Generator().manual_seed(1), **kwargs)
    b = prior.generate(generator=torch.Generator().manual_seed(1), use_cache=False, **kwargs)
    for x, y in zip(a.position_scores + a.content_scores, b.position_scores + b.content_scores):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    per_image = prior.generate(generator=[torch.Generator().manual_seed(i) for i in range(4)],
                               text_features=ref["text_features"])
    alone = prior.generate(generator=torch.Generator().manual_seed(2), text_features=ref["text_features"][2:3])
    assert per_image[0].shape == (4, 8, 8) and torch.equal(per_image[0][2:3], alone[0])


def test_prior_bad_inputs(prior, ref):
    with pytest.raises(ValueError, match="text-conditional: pass text_features"):
        prior.generate(batch_size=2)
    with pytest.raises(ValueError, match="not class_labels"):
        prior.generate(class_labels=[0], text_features=ref["text_features"][:1])
    with pytest.raises(ValueError, match=r"shape \(B, 24\)"):
        prior.generate(text_features=torch.zeros(2, 7))
    with pytest.raises(ValueError, match="batch_size=3"):
        prior.generate(text_features=ref["text_features"], batch_size=3)
    with pytest.raises(ValueError, match="null text"):
        prior.generate(text_features=ref["text_features"], guidance_scale=3.0)
    with pytest.raises(Exception, match="text_feature_size"):  # strict config validation error
        type(prior.config)(num_classes=10, text_feature_size=8)


def test_pipeline_prompts_outputs_and_progress(pipe, ref, meta):
    with pytest.warns(UserWarning, match="2 prompt"):  # the unicode and the long caption exceed the context
        out = pipe(prompt=meta["captions"], output_type="latent", **GREEDY)
    # the prompts' ids and features are the reference ones, so the greedy codes are the prior's on those features
    assert torch.equal(out.images, pipe.transformer.generate(text_features=ref["text_features"], **GREEDY)[0])
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    a = pipe(prompt="a red apple", num_images_per_prompt=2, generator=gen(), output_type="pt", return_granularity=True)
    b = pipe(prompt=["a red apple"], num_images_per_prompt=2, generator=gen(), output_type="pt")
    assert a.images.shape == (2, 3, 32, 32) and a.granularity.shape == (2, 4, 4) and torch.equal(a.images, b.images)
    pil = pipe(prompt=["a red apple", "face"], generator=[gen(), gen()]).images
    assert len(pil) == 2 and pil[0].size == (32, 32)
    assert pipe(prompt="a", output_type="np", generator=gen()).images.shape == (1, 32, 32, 3)
    steps = []
    pipe.progress_bar = lambda it: (steps.append(1), it)[1]
    try:
        pipe(prompt="a", output_type="latent")
    finally:
        del pipe.progress_bar
    assert len(steps) == 1  # one wrapped iterable over the sampler steps


def test_pipeline_bad_inputs(pipe, prior):
    with pytest.raises(ValueError, match="empty list"):
        pipe(prompt=[])
    with pytest.raises(TypeError, match=r"prompt\[0\] is a int, not a string"):
        pipe(prompt=[1, 2])
    with pytest.raises(ValueError, match="pass prompt"):
        pipe()
    with pytest.raises(ValueError, match="not class_labels"):
        pipe(class_labels=[1])
    with pytest.raises(ValueError, match="null text"):
        pipe(prompt="a", guidance_scale=4.0)
    with pytest.raises(ValueError, match="guidance_scale"):
        pipe(prompt="a", guidance_scale=0.5)  # the shared contract: >= 1
    with pytest.raises(ValueError, match="negative_prompt needs classifier-free guidance"):
        pipe(prompt="a", negative_prompt="blurry")
    with pytest.warns(UserWarning, match="longer than the text encoder's context of 16 tokens were truncated"):
        pipe(prompt="grinning face " * 20, output_type="latent", **GREEDY)
    no_text = DQTransformerPipeline(vqvae=pipe.vqvae, transformer=prior)
    with pytest.raises(ValueError, match="needs its tokenizer and text_encoder"):
        no_text(prompt="a")
    unprojected = DQTransformerPipeline(vqvae=pipe.vqvae, transformer=prior, tokenizer=pipe.tokenizer,
                                        text_encoder=pipe.text_encoder.text_model)
    with pytest.raises(ValueError, match="CLIPTextModelWithProjection"):
        unprojected(prompt="a")


def test_prompt_to_a_class_model(fixtures_dir):
    from hf_rq import DQTransformerConfig, DQTransformerForImageGeneration

    prior = DQTransformerForImageGeneration(DQTransformerConfig(codebook_size=32, coarse_grid_size=4, num_classes=3,
                                                                hidden_size=32, num_position_layers=1,
                                                                num_content_layers=1, num_attention_heads=2,
                                                                max_position_embeddings=90)).eval()
    vqvae = DQVAEModel(sample_size=32, block_out_channels=(32, 32, 32, 64), layers_per_block=1, attn_resolutions=(),
                       decoder_block_out_channels=(32, 32, 32), decoder_layers_per_block=1,
                       decoder_attn_resolutions=(), latent_channels=32, embed_dim=32, codebook_size=32)
    pipe = DQTransformerPipeline(vqvae=vqvae, transformer=prior)
    with pytest.raises(ValueError, match="takes no prompt"):
        pipe(prompt="a red apple")
    with pytest.raises(ValueError, match="not text-conditional"):
        prior.generate(text_features=torch.zeros(1, 24))


def test_prepare_prompts():
    assert prepare_prompts("a", None, 2) == (["a", "a"], None)
    assert prepare_prompts(["a", "b"], "n", 2, 2.0) == (["a", "a", "b", "b"], ["n", "n", "n", "n"])
    assert prepare_prompts(["a", "b"], ["x", "y"], 1, 2.0) == (["a", "b"], ["x", "y"])
    with pytest.raises(ValueError, match="2 prompts"):
        prepare_prompts(["a", "b"], ["x", "y", "z"], 1, 2.0)
    with pytest.raises(ValueError, match="num_images_per_prompt"):
        prepare_prompts("a", None, 0)
    with pytest.raises(ValueError, match="negative_prompt is an empty list"):
        prepare_prompts("a", [], 1, 2.0)


def test_save_load_folder_and_offline_hub_cache(pipe, ref, tmp_path, monkeypatch):
    from hub_utils import put_in_hub_cache

    pipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModelWithProjection"]
    put_in_hub_cache(tmp_path / "pipe", "some-org/dq-t2i-tiny")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for source in (tmp_path / "pipe", "some-org/dq-t2i-tiny"):
        loaded = DQTransformerPipeline.from_pretrained(source)
        loaded.set_progress_bar_config(disable=True)
        assert loaded.tokenizer("a red apple")["input_ids"] == pipe.tokenizer("a red apple")["input_ids"]
        a = loaded(prompt=["a red apple", "face"], generator=torch.Generator().manual_seed(2), output_type="latent")
        b = pipe(prompt=["a red apple", "face"], generator=torch.Generator().manual_seed(2), output_type="latent")
        assert torch.equal(a.images, b.images)


def test_converter_cli_writes_a_text_pipeline(weights, meta, ref, ref_dir, pipe, tmp_path):
    """Their checkpoint layout: transformer.* (StackGPT + text prefix), text_encoder.* (OpenAI CLIP text weights)."""
    from hf_rq.convert import main as convert_main

    save_file(weights, tmp_path / "t2i.safetensors")
    pipe.vqvae.save_pretrained(tmp_path / "vqvae")
    (tmp_path / "t2i.json").write_text(json.dumps({"model": meta["model"]}))
    base = ["dqtransformer", "--checkpoint", str(tmp_path / "t2i.safetensors"), "--config", str(tmp_path / "t2i.json"),
            "--output", str(tmp_path / "out"), "--pipeline", "--dqvae", str(tmp_path / "vqvae")]
    assert convert_main(base) == 2  # no tokenizer given
    assert convert_main(base + ["--bpe-vocab", str(ref_dir / "bpe_tiny.txt.gz")]) == 0
    loaded = DQTransformerPipeline.from_pretrained(tmp_path / "out")
    loaded.set_progress_bar_config(disable=True)
    ids = loaded.tokenizer(meta["captions"], padding="max_length", truncation=True)["input_ids"]
    assert torch.equal(torch.tensor(ids), ref["token_ids"])
    with pytest.warns(UserWarning, match="truncated"):
        out = loaded(prompt=meta["captions"], output_type="latent", **GREEDY)
        assert torch.equal(out.images, pipe(prompt=meta["captions"], output_type="latent", **GREEDY).images)
    # A checkpoint of the published StackGPT (no layer reads the text) is refused with the reason.
    plain = {k: v for k, v in weights.items() if not k.startswith("transformer.text_projection")}
    with pytest.raises(CheckpointError, match="drops `cond`"):
        convert_dqtransformer(plain, meta["model"], prefix="transformer.")
