"""The text prefix of the text-conditional RQ-Transformer (the authors' CC-3M model; RQ ARCHITECTURE.md 2).

The authors' stage-2 model has one conditioning stream: ``block_size_cond`` tokens from a vocabulary of
``vocab_size_cond`` with their own embedding and positional embedding, in front of the image positions. A
class-conditional model is the case of one token from ``num_classes`` ids; a text-conditional one reads a
caption padded/truncated to ``block_size_cond`` text tokens. The context of image position 0 is then the
output at the *last* text token, and the outputs at text positions ``0 .. L-2`` predict the next text token
through a separate head (the authors train it with weight ``txt_weight``).

This module holds what only the text-conditional configuration needs, as a mixin of
:class:`~hf_rq.rq.prior.RQTransformerForImageGeneration`, so that the class-conditional model (and its
converted checkpoints) stay exactly as they were.

Classifier-free guidance is not part of the authors' model. Ours reuses the text vocabulary: the *null text*
is the empty caption (``text_length`` pad tokens), which caption dropout (``text_dropout_prob``) trains, and a
``negative_prompt`` simply replaces it as the unconditional branch.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def validate_text_config(config) -> None:
    """The text keys of ``RQTransformerConfig`` (run by its ``@strict`` validation); names the key."""
    c = config
    if c.text_length < 0:
        raise ValueError(f"RQTransformerConfig.text_length must be >= 0 (0 = no text prefix), got {c.text_length}")
    if c.text_length == 0:
        if c.use_null_text or c.text_dropout_prob:
            raise ValueError("use_null_text / text_dropout_prob need a text-conditional model (text_length > 0)")
        return
    if c.num_classes:
        raise ValueError(f"a model is either class-conditional or text-conditional: got num_classes={c.num_classes} "
                         f"and text_length={c.text_length}")
    if c.text_vocab_size < 1:
        raise ValueError(f"text_length={c.text_length} needs text_vocab_size >= 1, got {c.text_vocab_size}")
    if c.text_pad_token_id is not None and not 0 <= c.text_pad_token_id < c.text_vocab_size:
        raise ValueError(f"text_pad_token_id {c.text_pad_token_id} is outside the text vocabulary [0, {c.text_vocab_size})")
    if c.use_null_text and c.text_pad_token_id is None:
        raise ValueError("use_null_text needs text_pad_token_id (the null text is the empty caption: all pads)")
    if not 0.0 <= c.text_dropout_prob < 1.0:
        raise ValueError(f"text_dropout_prob must be in [0, 1), got {c.text_dropout_prob}")
    if c.text_dropout_prob > 0 and not c.use_null_text:
        raise ValueError("text_dropout_prob > 0 needs use_null_text=True (dropped captions become the null text)")
    if not 0.0 <= c.text_loss_weight < 1.0:
        raise ValueError(f"text_loss_weight must be in [0, 1), got {c.text_loss_weight}")


class RQTextPrefixMixin:
    """Text embeddings, the text head, the text checks and guidance rows of a text-conditional RQ prior."""

    def _build_text_prefix(self, config) -> None:
        E = config.hidden_size
        self.text_embedding = nn.Embedding(config.text_vocab_size, E)
        self.text_position_embedding = nn.Parameter(torch.zeros(1, config.text_length, E))
        if config.text_length > 1:
            # Predicts text token i+1 from the output at text position i (the authors' cond_classifier).
            self.text_head = nn.Sequential()
            self.text_head.add_module("layer_norm", nn.LayerNorm(E, eps=config.layer_norm_eps))
            self.text_head.add_module("linear", nn.Linear(E, config.text_vocab_size))

    def _start_embeddings(self, rows: torch.LongTensor) -> torch.Tensor:
        """The spatial stream before image position 0: `(B, S, E)` (``S = text_length``, or 1 class/start token).

        ``rows``: class rows `(B,)` or text ids `(B, text_length)`.
        """
        if self.config.is_text_conditional:
            return self.text_embedding(rows) + self.text_position_embedding
        return (self.class_embedding(rows) + self.class_position_embedding[0])[:, None]

    def _check_text_ids(self, text_ids, batch: int | None = None, name: str = "text_ids") -> torch.LongTensor:
        c = self.config
        if not isinstance(text_ids, torch.Tensor) or text_ids.is_floating_point() or text_ids.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor of text token ids, got "
                            f"{getattr(text_ids, 'dtype', type(text_ids).__name__)}")
        if text_ids.ndim != 2 or text_ids.shape[1] != c.text_length:
            raise ValueError(f"{name} must have shape (N, {c.text_length}) (text_length; pad/truncate with the "
                             f"pipeline's tokenizer), got {tuple(text_ids.shape)}")
        if batch is not None and text_ids.shape[0] != batch:
            raise ValueError(f"got {text_ids.shape[0]} rows of {name} for a batch of {batch}")
        if text_ids.numel() and (text_ids.min() < 0 or text_ids.max() >= c.text_vocab_size):
            raise ValueError(f"{name} must lie in [0, {c.text_vocab_size}), got range [{text_ids.min()}, {text_ids.max()}]")
        return text_ids.long()

    def null_text_ids(self, batch: int, device=None) -> torch.LongTensor:
        """The null text `(batch, text_length)`: the empty caption, all ``text_pad_token_id``."""
        c = self.config
        return torch.full((batch, c.text_length), c.text_pad_token_id, dtype=torch.long, device=device)

    def _condition_rows(self, class_labels, text_ids, batch: int, device) -> torch.LongTensor:
        """``forward``'s conditioning: class rows `(N,)` or text ids `(N, L)`, with dropout in training."""
        c = self.config
        if not c.is_text_conditional:
            if text_ids is not None:
                raise ValueError("this model is not text-conditional (config.text_length = 0): it takes no text_ids")
            rows = self._class_rows(class_labels, batch, device)
            if self.training and c.class_dropout_prob > 0:
                drop = torch.rand(batch, device=device) < c.class_dropout_prob
                rows = torch.where(drop, torch.full_like(rows, c.null_class_id), rows)
            return rows
        if class_labels is not None:
            raise ValueError("this model is text-conditional: pass text_ids (token ids of the captions), not class_labels")
        if text_ids is None:
            raise ValueError(f"this model is text-conditional: pass text_ids of shape (N, {c.text_length})")
        rows = self._check_text_ids(text_ids, batch).to(device)
        if self.training and c.text_dropout_prob > 0:
            drop = torch.rand(batch, device=device) < c.text_dropout_prob
            rows = torch.where(drop[:, None], self.null_text_ids(batch, device), rows)
        return rows

    def _text_loss(self, text_logits, text_ids) -> torch.Tensor:
        return F.cross_entropy(text_logits.reshape(-1, text_logits.shape[-1]).float(), text_ids[:, 1:].reshape(-1))

    def _prepare_text_generation(self, class_labels, text_ids, negative_text_ids, batch_size, guidance_scale):
        """Text rows `(B, L)` for the decoding batch: the captions, then (guidance) the null/negative texts."""
        c = self.config
        if class_labels is not None:
            raise ValueError("this model is text-conditional: pass a prompt (text_ids), not class labels")
        if text_ids is None:
            raise ValueError(f"this model is text-conditional: pass text_ids (N, {c.text_length}) or use the "
                             "pipeline with prompt=...")
        text_ids = self._check_text_ids(text_ids).to(self.text_embedding.weight.device)
        n = text_ids.shape[0]
        if batch_size is not None and batch_size != n:
            raise ValueError(f"batch_size={batch_size} disagrees with the {n} rows of text_ids")
        use_cfg = guidance_scale > 1.0  # checked by hf_rq.sampling_args: a finite number >= 1
        if negative_text_ids is not None and not use_cfg:
            raise ValueError("negative_prompt / negative_text_ids only act through classifier-free guidance: pass "
                             "guidance_scale > 1 as well")
        if not use_cfg:
            return text_ids, False
        if not c.use_null_text:
            raise ValueError(
                f"guidance_scale={guidance_scale} needs a model trained with caption dropout to a null text "
                "(config.use_null_text); this model has none (the authors' text-to-image model does not): leave "
                "guidance_scale at None or 1.0 (and pass no negative_prompt)"
            )
        if negative_text_ids is None:
            negative_text_ids = self.null_text_ids(n, text_ids.device)
        negative_text_ids = self._check_text_ids(negative_text_ids, n, "negative_text_ids").to(text_ids.device)
        return torch.cat([text_ids, negative_text_ids]), True
