"""Text conditioning of the DQ-Transformer: the authors' text-to-image Dualformer (``dqtransformer_t2i.py``).

Their t2i Dualformer starts both parts with the *unconditional* start tokens (``PositionAwareSOSProvider``) and
conditions on ``text_encoder.encode_text(caption_ids)``: OpenAI CLIP's text transformer, the hidden state at the
end-of-text token (the highest id of each row) times ``text_projection``, not normalised (their
``CLIPTextEmbedding`` normalises only in ``forward``, which the Dualformer does not call). That is exactly
``transformers.CLIPTextModelWithProjection(...).text_embeds`` when the end-of-text token is the largest id of the
vocabulary, as in CLIP; the pipeline holds that model and a ``CLIPTokenizer`` (padding with 0 to the context
length, as ``clip.tokenize``).

How the text enters the transformer is not defined by the published code: the Dualformer passes ``cond`` and
``cross_mask`` to ``StackGPT``, whose ``forward`` swallows them (``**ignorekwargs``) and whose ``sample_*`` methods
do not accept them. We make the text a *prefix* of both stacks: the projected text features (``text_projection``:
``Linear(text_feature_size, hidden_size)``) are prepended to the position stack's input, where a class model has
its class token; the content stack reads the position stack's hidden states of the prefix rows as they are (there
is no "next position" for them). Prefix rows have no sequence-index embedding (CLIP's features already carry the
caption's positions) and produce no logits, so image rows keep the indices, layout and losses of the
unconditional model. See ``tests/fixtures/dq_t2i/README.md`` for what the parity tensors cover.
"""

from __future__ import annotations

import warnings
from typing import Mapping

import torch
import torch.nn as nn

__all__ = [
    "DQTextPrefix",
    "check_text_features",
    "clip_text_config_from_official",
    "convert_clip_text_state_dict",
    "encode_prompt",
]


class DQTextPrefix:
    """The text prefix of one forward or ``generate`` call: embedded rows `(B, P, E)` and, once the position stack
    has run over them, their hidden states (what the content stack reads for the prefix rows)."""

    def __init__(self, embeddings: torch.Tensor):
        self.embeddings = embeddings
        self.hidden = None

    @property
    def length(self) -> int:
        return self.embeddings.shape[1]


def check_text_features(model, text_features, class_labels, batch_size: int | None = None):
    """Validate ``text_features`` against ``model.config`` at the API boundary; return the prefix or None.

    ``text_features`` are `(B, D)` (pooled, as the authors' ``encode_text``) or `(B, P, D)` with
    ``D = config.text_feature_size``. A text model takes no class labels; a class/unconditional model no text.
    """
    c = model.config
    if not c.text_feature_size:
        if text_features is not None:
            raise ValueError("this DQ-Transformer is not text-conditional (config.text_feature_size = 0): it takes "
                             "no text_features / prompt")
        return None
    if class_labels is not None:
        raise ValueError("this DQ-Transformer is text-conditional: pass text_features (a prompt), not class_labels")
    if text_features is None:
        raise ValueError("this DQ-Transformer is text-conditional: pass text_features (B, D) or (B, P, D), the "
                         "text encoder's output for the prompts")
    if not isinstance(text_features, torch.Tensor) or not text_features.is_floating_point():
        raise TypeError(f"text_features must be a floating-point tensor, got {type(text_features).__name__}"
                        f"{'' if not isinstance(text_features, torch.Tensor) else ' of dtype ' + str(text_features.dtype)}")
    if text_features.ndim == 2:
        text_features = text_features[:, None]
    if text_features.ndim != 3 or text_features.shape[-1] != c.text_feature_size or text_features.shape[1] < 1:
        raise ValueError(f"text_features must have shape (B, {c.text_feature_size}) or (B, P, {c.text_feature_size}), "
                         f"got {tuple(text_features.shape)}")
    if batch_size is not None and text_features.shape[0] != batch_size:
        raise ValueError(f"got text_features for {text_features.shape[0]} images, batch_size={batch_size}")
    if not torch.isfinite(text_features).all():
        raise ValueError("text_features hold NaN or inf")
    weight = model.text_projection.weight
    return DQTextPrefix(model.text_projection(text_features.to(device=weight.device, dtype=weight.dtype)))


def encode_prompt(tokenizer, text_encoder, prompts: list[str], device=None) -> torch.Tensor:
    """Captions -> the authors' text features `(B, D)`: CLIP ids padded with 0 to the context length (their
    ``clip.tokenize``; longer captions are truncated to it, end-of-text kept, with a warning), then the projected
    end-of-text hidden state."""
    n_ctx = tokenizer.model_max_length
    ids = tokenizer(prompts, padding="max_length", max_length=n_ctx, truncation=False)["input_ids"]
    too_long = [p for p, row in zip(prompts, ids) if len(row) > n_ctx]
    if too_long:
        warnings.warn(
            f"{len(too_long)} prompt(s) longer than the text encoder's context of {n_ctx} tokens were truncated "
            f"(end-of-text kept), e.g. {too_long[0][:60]!r}")
        ids = tokenizer(prompts, padding="max_length", max_length=n_ctx, truncation=True)["input_ids"]
    input_ids = torch.tensor(ids, dtype=torch.long, device=device)
    return text_encoder(input_ids=input_ids).text_embeds


# --------------------------------------------------------------------------------------------- conversion
def clip_text_config_from_official(state_dict: Mapping[str, torch.Tensor], prefix: str = "text_encoder.",
                                   num_heads: int | None = None, **overrides) -> dict:
    """``CLIPTextConfig`` kwargs from the authors' ``CLIPTextEmbedding`` weights (OpenAI CLIP layout).

    The number of heads is not in the weights; OpenAI derives it as ``width // 64`` (``clip.model.build_model``).
    """
    sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if "token_embedding.weight" not in sd:
        raise KeyError(f"no '{prefix}token_embedding.weight' in the checkpoint: not a text-to-image Dualformer")
    vocab, width = sd["token_embedding.weight"].shape
    layers = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    kwargs = dict(vocab_size=vocab, hidden_size=width, intermediate_size=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                  num_hidden_layers=layers, num_attention_heads=num_heads or max(width // 64, 1),
                  max_position_embeddings=sd["positional_embedding"].shape[0],
                  projection_dim=sd["text_projection"].shape[1], hidden_act="quick_gelu", layer_norm_eps=1e-5,
                  # the pooled row is the arg-max id (end-of-text is CLIP's largest id): transformers' legacy path
                  eos_token_id=2, bos_token_id=vocab - 2, pad_token_id=0)
    kwargs.update(overrides)
    return kwargs


def convert_clip_text_state_dict(state_dict: Mapping[str, torch.Tensor], prefix: str = "text_encoder.") -> dict:
    """Rename the authors' OpenAI-CLIP text weights to ``CLIPTextModelWithProjection`` keys (split ``in_proj``)."""
    sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    out = {
        "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
        "text_model.final_layer_norm.weight": sd["ln_final.weight"],
        "text_model.final_layer_norm.bias": sd["ln_final.bias"],
        "text_projection.weight": sd["text_projection"].t().contiguous(),  # theirs: x @ P, ours: Linear
    }
    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("transformer.resblocks.")})
    for i in layers:
        src, dst = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        for name in ("weight", "bias"):
            for proj, chunk in zip(("q_proj", "k_proj", "v_proj"), sd[src + f"attn.in_proj_{name}"].chunk(3, dim=0)):
                out[dst + f"self_attn.{proj}.{name}"] = chunk.contiguous()
            out[dst + f"self_attn.out_proj.{name}"] = sd[src + f"attn.out_proj.{name}"]
            out[dst + f"layer_norm1.{name}"] = sd[src + f"ln_1.{name}"]
            out[dst + f"layer_norm2.{name}"] = sd[src + f"ln_2.{name}"]
            out[dst + f"mlp.fc1.{name}"] = sd[src + f"mlp.c_fc.{name}"]
            out[dst + f"mlp.fc2.{name}"] = sd[src + f"mlp.c_proj.{name}"]
    return out


def load_clip_text_encoder(state_dict: Mapping[str, torch.Tensor], prefix: str = "text_encoder.", **config_overrides):
    """The authors' text encoder as a ``CLIPTextModelWithProjection`` (strict load: every weight is used)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(**clip_text_config_from_official(state_dict, prefix, **config_overrides))
    model = CLIPTextModelWithProjection(config)
    model.load_state_dict(convert_clip_text_state_dict(state_dict, prefix), strict=True)
    return model.eval()


def text_projection_layer(config) -> nn.Linear | None:
    """``Linear(text_feature_size, hidden_size)`` of a text model, None otherwise."""
    return nn.Linear(config.text_feature_size, config.hidden_size) if config.text_feature_size else None


def clip_tokenizer_from_bpe(bpe_path: str, context_length: int = 77):
    """A ``CLIPTokenizer`` with the vocabulary of the authors' ``SimpleTokenizer`` built from the same merges file
    (``bpe_simple_vocab_16e6.txt.gz`` or a plain text one; first line a header): 256 byte symbols, the same with
    ``</w>``, one token per merge, then ``<|startoftext|>`` / ``<|endoftext|>``. Pads with id 0 (``"!"``), as
    ``clip.tokenize``; ``model_max_length`` is the context length."""
    import gzip

    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # the GPT-2 / CLIP byte alphabet

    opener = gzip.open if str(bpe_path).endswith(".gz") else open
    with opener(bpe_path, "rb") as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1] if line.strip()]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    encoder = {token: i for i, token in enumerate(vocab)}
    if len(encoder) != len(vocab):
        raise ValueError(f"{bpe_path}: merges that produce an existing token; not a CLIP merges file")
    return CLIPTokenizer(vocab=encoder, merges=merges, pad_token="!", model_max_length=context_length)
