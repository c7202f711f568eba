"""DQ-Transformer: the coarse-to-fine autoregressive prior over DQ-VAE codes (Huang et al., CVPR 2023).

An image is a DQ token sequence (:mod:`hf_rq.dq.tokens`): first the coarse regions, then the fine ones, each
token a pair (position, content). The model ("StackGPT") stacks two causal transformers:

* the **position stack** reads, for every token ``t``, ``content_emb(content_t) + pos_table(position_t) +
  sequence_pos_emb[t] + segment_emb(coarse/fine)`` and predicts the *position* of token ``t + 1`` (one head of
  size ``fine_position_vocab_size`` serves both granularities: in the coarse part index ``j`` means coarse cell
  ``j``);
* the **content stack** reads the position stack's hidden state ``t`` plus the embedding of that next position
  and predicts the *content* of token ``t + 1``.

Content embeddings are shared by both granularities; coarse and fine positions have separate tables. A class
label is offset into all three vocabularies and used as the start token of both parts (no separate class
embedding); the unconditional variant has one start token per vocabulary.

``generate()`` samples the coarse part, then the fine part, position then content at every step, with a
key/value cache on each stack. It reproduces the authors' sampler (``Dualformer.sample_from_scratch``) token for
token, quirks included (each is named where it is implemented); ``use_cache=False`` re-runs both stacks on the
whole prefix at every step, as the authors do.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, AutoModel, GenerationConfig, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from ..pipeline_utils import resolve_generation_labels
from ..sampling import sample_tokens, top_k_logits
from ..sampling_args import check_generator, validate_generation_config
from ..kv_cache import StaticKVCache
from ..transformer_blocks import GPTStack
from .editing import DQKnownTokens
from .text_conditioning import check_text_features, text_projection_layer
from .tokens import FINE_POSITION_ORDERS, DQTokens, DQVocabulary, codes_to_tokens, tokens_to_codes, upsample_granularity
from ..hub import BundledModelsMixin

# generate() options beyond the standard GenerationConfig fields (saved with generation_config.json).
DQ_GENERATION_DEFAULTS = dict(position_top_k=None, position_top_p=1.0, fix_fine_position=False)


@strict
class DQTransformerConfig(PreTrainedConfig):
    r"""Configuration of :class:`DQTransformerForImageGeneration`.

    Args:
        codebook_size (`int`): ``K``, codes of the DQ-VAE.
        coarse_grid_size (`int`): ``hc``; the fine grid is ``2 * hc`` (16 for the published 256 px model).
        num_classes (`int`): number of classes ``C``; 0 makes the model unconditional.
        text_feature_size (`int`): width of the text encoder's features; > 0 makes the model text-conditional
            (the authors' t2i Dualformer: unconditional start tokens plus a text prefix, see
            :mod:`hf_rq.dq.text_conditioning`); requires ``num_classes = 0``.
        hidden_size (`int`): width ``E``.
        num_position_layers / num_content_layers (`int`): depth of the position and of the content stack.
        num_attention_heads (`int`): heads of both stacks.
        max_position_embeddings (`int`): length of the learned sequence-index embedding (the authors'
            ``block_size``); a sequence holds at most ``Nc + Nf + 4`` tokens.
        use_segment_embedding (`bool`): add a learned coarse/fine segment embedding (published: yes).
        fine_position_order (`str`): order of fine tokens, ``"row-first"`` (published) or ``"region-first"``.
        content_loss_weight / position_loss_weight (`float`): weights of the two losses.
        embd_pdrop / attn_pdrop / resid_pdrop (`float`): dropout (the authors: 0.1 each).
        layer_norm_eps (`float`), initializer_range (`float`): as in other transformers models.

    Derived sizes (properties): ``content_vocab_size = K + 2 + max(C, 1)``, ``coarse_position_vocab_size =
    Nc + 2 + max(C, 1)``, ``fine_position_vocab_size = Nf + 2 + max(C, 1)``.
    """

    model_type = "hf_rq_dqtransformer"

    codebook_size: int = 1024
    coarse_grid_size: int = 16
    num_classes: int = 1000
    text_feature_size: int = 0
    hidden_size: int = 1024
    num_position_layers: int = 6
    num_content_layers: int = 18
    num_attention_heads: int = 8
    max_position_embeddings: int = 2048
    use_segment_embedding: bool = True
    fine_position_order: str = "row-first"
    content_loss_weight: float = 1.0
    position_loss_weight: float = 1.0
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    resid_pdrop: float = 0.1
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02

    def validate_architecture(self):
        """Run by ``@strict``: reject configs the model cannot be built from, naming the key."""
        for key in ("codebook_size", "coarse_grid_size", "hidden_size", "num_position_layers", "num_content_layers",
                    "num_attention_heads", "max_position_embeddings"):
            if getattr(self, key) < 1:
                raise ValueError(f"DQTransformerConfig.{key} must be >= 1, got {getattr(self, key)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0 = unconditional), got {self.num_classes}")
        if self.text_feature_size < 0 or (self.text_feature_size and self.num_classes):
            raise ValueError(f"text_feature_size must be >= 0 and a text model has num_classes = 0, got "
                             f"text_feature_size={self.text_feature_size}, num_classes={self.num_classes}")
        if self.fine_position_order not in FINE_POSITION_ORDERS:
            raise ValueError(f"fine_position_order must be one of {FINE_POSITION_ORDERS}, got {self.fine_position_order!r}")

    @property
    def vocabulary(self) -> DQVocabulary:
        return DQVocabulary(self.codebook_size, self.coarse_grid_size, self.num_classes)

    @property
    def fine_grid_size(self) -> int:
        return 2 * self.coarse_grid_size

    @property
    def content_vocab_size(self) -> int:
        return self.vocabulary.content_vocab_size

    @property
    def coarse_position_vocab_size(self) -> int:
        return self.vocabulary.coarse_position_vocab_size

    @property
    def fine_position_vocab_size(self) -> int:
        return self.vocabulary.fine_position_vocab_size


@dataclass
class DQTransformerOutput(ModelOutput):
    """Output of :meth:`DQTransformerForImageGeneration.forward`.

    Args:
        loss (`torch.FloatTensor` of shape `()`): ``content_loss_weight * content_loss + position_loss_weight *
            position_loss``.
        content_loss (`()`): cross-entropy of the content targets (pads ignored).
        position_loss (`()`): ``(coarse_position_loss + fine_position_loss) / 2``.
        coarse_position_loss / fine_position_loss (`()`): the two position cross-entropies (pads ignored).
        position_logits (`(B, T, fine_position_vocab_size)`): row ``t`` predicts the position of token ``t + 1``.
        content_logits (`(B, T, content_vocab_size)`): row ``t`` predicts the content of token ``t + 1``.
        position_hidden_states / content_hidden_states (`(B, T, E)`, *optional*): outputs of the two stacks.
    """

    loss: torch.FloatTensor | None = None
    content_loss: torch.FloatTensor | None = None
    position_loss: torch.FloatTensor | None = None
    coarse_position_loss: torch.FloatTensor | None = None
    fine_position_loss: torch.FloatTensor | None = None
    position_logits: torch.FloatTensor | None = None
    content_logits: torch.FloatTensor | None = None
    position_hidden_states: torch.FloatTensor | None = None
    content_hidden_states: torch.FloatTensor | None = None


@dataclass
class DQTransformerGenerateOutput(ModelOutput):
    """Output of :meth:`DQTransformerForImageGeneration.generate` with ``return_dict_in_generate=True``.

    Args:
        codes (`torch.LongTensor` of shape `(B, hf, hf)`): the code map (fine cells never sampled are code 0).
        granularity (`torch.LongTensor` of shape `(B, hc, hc)`): 0 = coarse, 1 = fine.
        tokens (:class:`~hf_rq.dq.tokens.DQTokens`): the sampled sequences without start tokens, as the
            authors' sampler returns them (each part ends with its end position, paired with content ``K``).
        position_scores / content_scores (`tuple[torch.FloatTensor]`, *optional*): with ``output_scores=True``,
            the raw logits `(B, V)` of every step (before temperature and masks).
    """

    codes: torch.LongTensor | None = None
    granularity: torch.LongTensor | None = None
    tokens: DQTokens | None = None
    position_scores: tuple | None = None
    content_scores: tuple | None = None


def authors_top_p(probs: torch.Tensor, p: float | None) -> torch.Tensor:
    """Nucleus filter exactly as the DQ authors' ``top_p_logits`` (on probabilities, renormalised).

    A token is dropped when the *inclusive* cumulative mass of the tokens sorted before it reaches ``p`` (their
    shifted ``cumsum >= p``); the top token always stays. This differs from :func:`hf_rq.sampling.top_p_probs`
    (``cumsum - p_i``) only in float rounding, which decides whether a far tail survives at ``p = 1.0``; we keep
    their arithmetic so that sampled sequences match theirs.
    """
    if p is None:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    remove = sorted_probs.cumsum(dim=-1) >= p
    remove = torch.cat([torch.zeros_like(remove[..., :1]), remove[..., :-1]], dim=-1)
    probs = probs.masked_fill(remove.scatter(-1, order, remove), 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)


class DQTransformerPreTrainedModel(BundledModelsMixin, PreTrainedModel):
    config: DQTransformerConfig
    config_class = DQTransformerConfig
    base_model_prefix = "dq_transformer"
    main_input_name = "codes"
    _no_split_modules = ["GPTBlock"]
    supports_gradient_checkpointing = True

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, nn.Embedding):
            # The authors' init draws every row, padding rows included: those stay random (padding_idx blocks their
            # gradient) and are real inputs (pads sit mid-sequence and at end-of-part steps), so they are not zeroed.
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            return
        super()._init_weights(module)  # Linear N(0, 0.02) with zero bias, LayerNorm 1 / 0
        if isinstance(module, DQTransformerForImageGeneration):
            init.zeros_(module.sequence_position_embedding)  # custom Parameter (trap 1); the authors start at zero


class _Sequence:
    """The growing token sequence of one generate() call, shared by the cached and the uncached engine.

    ``content[t]``, ``position[t]`` are `(B,)` tensors; tokens ``< num_coarse`` are coarse (segment 0, coarse
    position table), the rest fine. ``next_position`` is the position sampled for the token being completed.
    """

    def __init__(self, content_start, coarse_start):
        self.content = [content_start]
        self.position = [coarse_start]
        self.num_coarse = None  # set when the fine part starts

    @property
    def length(self) -> int:
        return len(self.content)

    def is_fine(self, t: int) -> bool:
        return self.num_coarse is not None and t >= self.num_coarse


class DQTransformerForImageGeneration(DQTransformerPreTrainedModel, GenerationMixin):
    r"""DQ-Transformer prior: class label (or nothing) -> DQ codes `(B, hf, hf)` + granularity map `(B, hc, hc)`.

    Inputs for training are the DQ-VAE's codes and granularity map (``DQVAEModel.encode``), or
    :class:`~hf_rq.dq.tokens.DQTokens` directly; ``forward`` builds the authors' padded sequences and returns both
    losses. The sequence layout, the teacher-forcing alignment and the losses are those of ARCHITECTURE.md 2.2-2.4.
    """

    def __init__(self, config: DQTransformerConfig):
        super().__init__(config)
        E, v = config.hidden_size, config.vocabulary
        self.content_embedding = nn.Embedding(v.content_vocab_size, E, padding_idx=v.content_pad)
        self.coarse_position_embedding = nn.Embedding(v.coarse_position_vocab_size, E, padding_idx=v.coarse_pad)
        self.fine_position_embedding = nn.Embedding(v.fine_position_vocab_size, E, padding_idx=v.fine_pad)
        self.segment_embedding = nn.Embedding(2, E) if config.use_segment_embedding else None
        self.sequence_position_embedding = nn.Parameter(torch.zeros(1, config.max_position_embeddings, E))
        self.embed_dropout = nn.Dropout(config.embd_pdrop)
        self.text_projection = text_projection_layer(config)  # None unless text-conditional
        self.position_transformer = GPTStack(config.num_position_layers, E, config.num_attention_heads,
                                             config.attn_pdrop, config.resid_pdrop, config.layer_norm_eps)
        self.content_transformer = GPTStack(config.num_content_layers, E, config.num_attention_heads,
                                            config.attn_pdrop, config.resid_pdrop, config.layer_norm_eps)
        self.position_norm = nn.LayerNorm(E, eps=config.layer_norm_eps)
        self.position_head = nn.Linear(E, v.fine_position_vocab_size, bias=False)
        self.content_norm = nn.LayerNorm(E, eps=config.layer_norm_eps)
        self.content_head = nn.Linear(E, v.content_vocab_size, bias=False)
        self.post_init()
        self.generation_config = GenerationConfig(do_sample=True, temperature=1.0, top_k=300, top_p=1.0,
                                                  **DQ_GENERATION_DEFAULTS)

    def get_input_embeddings(self) -> nn.Module:
        return self.content_embedding

    # ----------------------------------------------------------------------------------- inputs
    def _class_ids(self, class_labels, batch_size: int, device) -> torch.LongTensor:
        c = self.config
        if c.num_classes == 0:
            if class_labels is not None:
                raise ValueError("this DQ-Transformer is unconditional: it takes no class_labels")
            return torch.zeros(batch_size, dtype=torch.long, device=device)
        if class_labels is None:
            raise ValueError(f"this DQ-Transformer is class-conditional ({c.num_classes} classes): pass class_labels")
        labels = torch.as_tensor(class_labels, device=device)
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise TypeError(f"class_labels must be integer ids, got dtype {labels.dtype}")
        labels = labels.reshape(-1).long()
        if labels.numel() != batch_size:
            raise ValueError(f"got {labels.numel()} class labels for a batch of {batch_size}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= c.num_classes):
            raise ValueError(f"class id out of range [0, {c.num_classes}): got values in [{labels.min()}, {labels.max()}]")
        return labels

    def prepare_sequences(self, tokens: DQTokens, class_labels=None) -> dict[str, torch.LongTensor]:
        """The authors' model inputs: each of the four sequences of ``tokens`` with its start token prepended.

        Returns ``coarse_content`` / ``coarse_position`` `(B, 1 + Lc)` and ``fine_content`` / ``fine_position``
        `(B, 1 + Lf)`: ``[K+2+c, codes.., K+1, K..]``, ``[Nc+2+c, cells.., Nc+1, Nc..]``, ``[K+2+c, ...]``,
        ``[Nf+2+c, ...]`` (``c = 0`` when unconditional).
        """
        B = tokens.coarse_content.shape[0]
        ids = self._class_ids(class_labels, B, tokens.coarse_content.device)
        sc, scp, sfp = (s[:, None] for s in self.config.vocabulary.start_tokens(ids))
        return dict(
            coarse_content=torch.cat([sc, tokens.coarse_content], 1),
            coarse_position=torch.cat([scp, tokens.coarse_position], 1),
            fine_content=torch.cat([sc, tokens.fine_content], 1),
            fine_position=torch.cat([sfp, tokens.fine_position], 1),
        )

    def _check_tokens(self, tokens: DQTokens) -> None:
        v = self.config.vocabulary
        checks = (("coarse_content", v.content_eos), ("coarse_position", v.coarse_eos),
                  ("fine_content", v.content_eos), ("fine_position", v.fine_eos))
        for name, top in checks:
            t = getattr(tokens, name)
            if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.ndim != 2:
                raise ValueError(f"tokens.{name} must be an integer tensor (B, L)")
            if t.numel() and (t.min() < 0 or t.max() > top):
                raise ValueError(f"tokens.{name} must hold values in [0, {top}] (codes/positions, pad, end), got "
                                 f"[{t.min()}, {t.max()}]: the tokens do not fit this model's vocabulary")

    def _pos_table(self, position: torch.LongTensor, fine: bool) -> torch.Tensor:
        return (self.fine_position_embedding if fine else self.coarse_position_embedding)(position)

    def _segment(self, ids: torch.LongTensor) -> torch.Tensor | int:
        return 0 if self.segment_embedding is None else self.segment_embedding(ids)

    # ----------------------------------------------------------------------------------- forward
    def forward(
        self,
        codes: torch.LongTensor | None = None,
        granularity: torch.LongTensor | None = None,
        class_labels: torch.LongTensor | None = None,
        tokens: DQTokens | None = None,
        text_features: torch.FloatTensor | None = None,
        output_hidden_states: bool = False,
        return_dict: bool = True,
        **kwargs,
    ):
        r"""Teacher-forced logits and the authors' two losses.

        Args:
            codes (`torch.LongTensor` of shape `(B, hf, hf)`), granularity (`(B, hc, hc)`): the DQ-VAE's output;
                converted with :func:`~hf_rq.dq.tokens.codes_to_tokens` (``config.fine_position_order``).
            class_labels (`torch.LongTensor` of shape `(B,)`): class ids (class-conditional models only).
            tokens (:class:`~hf_rq.dq.tokens.DQTokens`, *optional*): the token form instead of codes/granularity.
            text_features (`torch.FloatTensor` of shape `(B, D)` or `(B, P, D)`): text models only, the text
                encoder's features (a prefix of both stacks; logits and losses are those of the image rows).

        The alignment (ARCHITECTURE.md 2.4): with ``cc, cp`` (length ``Lc``) and ``fc, fp`` (``Lf``) the sequences
        with start tokens and ``T = Lc + Lf - 1``, the position stack reads ``cat(cc, fc)[:-1]`` with positions
        ``cat(cp, fp[:-1])``, the content stack adds ``cat(cp[1:], fp)`` (the *next* positions) to its output.
        Position targets: ``cp[1:]`` for rows ``< Lc - 1`` and ``fp`` (its start token included) for the rest;
        content targets ``cat(cc, fc)[1:]``. Each cross-entropy ignores its pad token and averages over the rest.
        """
        if kwargs:
            raise TypeError(f"forward() got unexpected arguments: {sorted(kwargs)}")
        c, v = self.config, self.config.vocabulary
        if tokens is None:
            if codes is None or granularity is None:
                raise ValueError("pass codes and granularity (from DQVAEModel.encode), or tokens")
            self._check_grids(codes, granularity)
            tokens = codes_to_tokens(codes, granularity, c.codebook_size, c.fine_position_order)
        elif codes is not None or granularity is not None:
            raise ValueError("pass either codes/granularity or tokens, not both")
        self._check_tokens(tokens)
        seq = self.prepare_sequences(tokens, class_labels)
        cc, cp, fc, fp = seq["coarse_content"], seq["coarse_position"], seq["fine_content"], seq["fine_position"]
        Lc, Lf = cc.shape[1], fc.shape[1]
        T = Lc + Lf - 1
        if T > c.max_position_embeddings:
            raise ValueError(f"the sequence has {T} tokens, more than max_position_embeddings={c.max_position_embeddings}")
        B = cc.shape[0]
        prefix = check_text_features(self, text_features, class_labels, B)
        P = 0 if prefix is None else prefix.length
        content_in = self.content_embedding(torch.cat([cc, fc], 1)[:, :-1])
        positions = torch.cat([self.coarse_position_embedding(cp), self.fine_position_embedding(fp[:, :-1])], 1)
        positions = positions + self.sequence_position_embedding[:, :T]
        x = content_in + positions
        if self.segment_embedding is not None:
            segments = torch.cat([cc.new_zeros(B, Lc), cc.new_ones(B, Lf)], 1)[:, :-1]
            x = x + self.segment_embedding(segments)
        if P:
            x = torch.cat([prefix.embeddings, x], 1)
        position_hidden = self.position_transformer(self.embed_dropout(x))
        next_positions = torch.cat([self.coarse_position_embedding(cp[:, 1:]), self.fine_position_embedding(fp)], 1)
        content_in = torch.cat([position_hidden[:, :P], position_hidden[:, P:] + next_positions], 1)
        position_hidden, content_hidden = position_hidden[:, P:], self.content_transformer(content_in)[:, P:]
        position_logits = self.position_head(self.position_norm(position_hidden))
        content_logits = self.content_head(self.content_norm(content_hidden))

        coarse_pos = F.cross_entropy(position_logits[:, : Lc - 1].reshape(-1, position_logits.shape[-1]).float(),
                                     cp[:, 1:].reshape(-1), ignore_index=v.coarse_pad)
        fine_pos = F.cross_entropy(position_logits[:, Lc - 1:].reshape(-1, position_logits.shape[-1]).float(),
                                   fp.reshape(-1), ignore_index=v.fine_pad)
        content = F.cross_entropy(content_logits.reshape(-1, content_logits.shape[-1]).float(),
                                  torch.cat([cc, fc], 1)[:, 1:].reshape(-1), ignore_index=v.content_pad)
        position = (coarse_pos + fine_pos) / 2
        loss = c.content_loss_weight * content + c.position_loss_weight * position
        hidden = (position_hidden, content_hidden) if output_hidden_states else (None, None)
        out = DQTransformerOutput(loss, content, position, coarse_pos, fine_pos, position_logits, content_logits, *hidden)
        return out if return_dict else out.to_tuple()

    def _check_grids(self, codes, granularity) -> None:
        c = self.config
        hc, hf = c.coarse_grid_size, c.fine_grid_size
        if not isinstance(codes, torch.Tensor) or codes.ndim != 3 or tuple(codes.shape[1:]) != (hf, hf):
            raise ValueError(f"codes must have shape (B, {hf}, {hf}), got {tuple(getattr(codes, 'shape', ()))}")
        if not isinstance(granularity, torch.Tensor) or granularity.ndim != 3 or tuple(granularity.shape[1:]) != (hc, hc):
            raise ValueError(f"granularity must have shape (B, {hc}, {hc}), got {tuple(getattr(granularity, 'shape', ()))}")

    # ----------------------------------------------------------------------------------- generate
    def _embed_token(self, seq: _Sequence, t: int) -> torch.Tensor:
        """Position-stack input of token ``t`` `(B, E)` (the training formula, one token)."""
        fine = seq.is_fine(t)
        x = self.content_embedding(seq.content[t]) + (self._pos_table(seq.position[t], fine)
                                                      + self.sequence_position_embedding[0, t])
        if self.segment_embedding is not None:
            x = x + self.segment_embedding.weight[int(fine)]
        return x

    def _content_input(self, seq: _Sequence, hidden: torch.Tensor, t: int, next_position: torch.Tensor | None):
        """Content-stack input of row ``t``: position hidden state + the embedding of a position.

        Coarse phase: the next position (as in training). **Authors' quirk** in the fine phase: for the coarse rows
        ``t < Lc`` their fine-content sampler adds the embedding of token ``t``'s *own* position (``coarse_pos_emb(
        x_cp)`` instead of ``x_cp[1:]``), one step off from training, and the content stack sees that re-embedded
        coarse part before every fine content. Fine rows get the next fine position, as in training.
        """
        if seq.num_coarse is None:
            return hidden + self.coarse_position_embedding(next_position)
        if t < seq.num_coarse:
            return hidden + self.coarse_position_embedding(seq.position[t])
        return hidden + self.fine_position_embedding(next_position)

    def _check_length(self, length: int) -> None:
        if length > self.config.max_position_embeddings:
            raise RuntimeError(
                f"the sampled sequence reached {length} tokens, more than max_position_embeddings="
                f"{self.config.max_position_embeddings}; a DQ sequence can need up to Nc + Nf + 4 = "
                f"{self.config.coarse_grid_size ** 2 + self.config.fine_grid_size ** 2 + 4}"
            )

    @torch.no_grad()
    def generate(
        self,
        class_labels=None,
        batch_size: int | None = None,
        generation_config: GenerationConfig | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        progress_bar: Callable | None = None,
        text_features: torch.FloatTensor | None = None,
        known_codes: torch.LongTensor | None = None,
        known_granularity: torch.LongTensor | None = None,
        known_regions: torch.BoolTensor | None = None,
        **kwargs,
    ):
        r"""Sample DQ codes: the coarse part, then the fine part, each token position first, then content.

        Args:
            class_labels: ids or names (``config.id2label``), one per image; None for an unconditional model.
            batch_size (`int`, *optional*): number of images of an unconditional model (default 1).
            generation_config (`GenerationConfig`, *optional*): defaults to ``self.generation_config``; keyword
                arguments override it: ``do_sample`` (False = arg-max), ``temperature`` (one value for positions and
                contents, as the authors), ``top_k`` / ``top_p`` (contents), ``position_top_k`` /
                ``position_top_p`` (positions), ``fix_fine_position`` (True: the fine positions are not sampled but
                every fine cell outside the coarse ones, in permuter order), ``use_cache`` (False re-runs both stacks
                on the whole prefix at every step, as the authors), ``output_scores``, ``return_dict_in_generate``.
                Filter order (the authors'): temperature, masks, top-k on logits, softmax, top-p on probabilities.
                The ranges are every family's (``hf_rq.sampling_args``): top-k None / 0 = off; ``guidance_scale``
                may only be None or 1 (the model has no null class).
            generator (`torch.Generator` or a list of them, *optional*): source of randomness for the draws. A list
                holds one generator per image; since a DQ batch is not row-independent (finished images keep
                feeding pad tokens that the others attend to), each image is then sampled in a batch of its own,
                so that image ``i`` depends only on ``generator[i]`` (slower; ``output_scores`` is refused).
            text_features (`torch.FloatTensor` `(B, D)` or `(B, P, D)`, *optional*): text models only, one row per
                image (the pipeline encodes prompts with its ``text_encoder``); ``batch_size`` defaults to ``B``.
            progress_bar (`Callable`, *optional*): wraps the iterable over sampler steps (pipelines pass
                ``self.progress_bar``); its total is the longest possible sequence, sampling stops at the end tokens.
            known_codes (`(B, hf, hf)`), known_granularity (`(B, hc, hc)`), known_regions (`(B, hc, hc)` bool),
                *optional*: editing. Regions where ``known_regions`` is True keep their granularity and codes (placed
                in training order, teacher-forced); the others are sampled with the authors' rules
                (:mod:`hf_rq.dq.editing`).

        Returns:
            ``(codes (B, hf, hf), granularity (B, hc, hc))``, or :class:`DQTransformerGenerateOutput` with
            ``return_dict_in_generate=True``.
        """
        gc = copy.deepcopy(generation_config if generation_config is not None else self.generation_config)
        for key, value in DQ_GENERATION_DEFAULTS.items():
            if not hasattr(gc, key):
                setattr(gc, key, value)
        unused = gc.update(**kwargs)
        if unused:
            raise TypeError(f"generate() got unexpected keyword arguments: {sorted(unused)}")
        args = validate_generation_config(gc, ("do_sample", "temperature", "top_k", "top_p", "position_top_k",
                                               "position_top_p", "guidance_scale", "fix_fine_position", "use_cache",
                                               "output_scores", "return_dict_in_generate"))
        if args["guidance_scale"] != 1.0:
            raise ValueError(f"guidance_scale={gc.guidance_scale!r}: the DQ-Transformer has no classifier-free guidance "
                             "(the authors' model has no null class / null text); leave it at None or 1")
        c, v = self.config, self.config.vocabulary
        do_sample, temperature, top_k, top_p, pos_top_k, pos_top_p = (args[k] for k in (
            "do_sample", "temperature", "top_k", "top_p", "position_top_k", "position_top_p"))
        device = self.content_embedding.weight.device
        if text_features is not None and batch_size is None and isinstance(text_features, torch.Tensor):
            batch_size = text_features.shape[0]
        prefix = check_text_features(self, text_features, class_labels, batch_size)
        ids = resolve_generation_labels(class_labels, batch_size, self.config, device)
        B = ids.numel()
        generator = check_generator(generator, B)
        if isinstance(generator, list):
            return self._generate_per_image(ids, gc, generator, progress_bar, text_features,
                                            (known_codes, known_granularity, known_regions))

        def choose(logits, allowed, k, p):
            # The authors' order: temperature, masks (applied by the caller), top-k, softmax, top-p, draw.
            logits = top_k_logits(logits.masked_fill(~allowed, float("-inf")), k)
            probs = authors_top_p(torch.softmax(logits, dim=-1), p)
            return sample_tokens(probs, generator, do_sample)

        known = None
        if known_codes is not None or known_granularity is not None or known_regions is not None:
            if known_codes is None or known_granularity is None or known_regions is None:
                raise ValueError("editing needs known_codes, known_granularity and known_regions together")
            if known_codes.shape[0] != B:
                raise ValueError(f"known_codes holds {known_codes.shape[0]} images for a batch of {B}")
            known = DQKnownTokens(known_codes.to(device), known_granularity.to(device), known_regions, v,
                                  c.fine_position_order)
        engine = _CachedEngine(self, B, prefix) if gc.use_cache is not False else _FullEngine(self, prefix)
        scores = ([], []) if gc.output_scores else None
        content_start, coarse_start, fine_start = v.start_tokens(ids)
        seq = _Sequence(content_start, coarse_start)
        index = torch.arange(v.fine_position_vocab_size, device=device)
        content_index = torch.arange(v.content_vocab_size, device=device)
        content_open = content_index < c.codebook_size  # never the pad K, the end K+1 or a class token
        content_pad_only = content_index == v.content_pad
        steps = range(v.num_coarse_positions + v.num_fine_positions + 2)
        steps = iter(steps if progress_bar is None else progress_bar(steps))

        def content_step(hidden_rows, next_position, finished):
            g = engine.content_hidden(seq, hidden_rows, next_position)
            logits = self.content_head(self.content_norm(g)).float()
            if scores is not None:
                scores[1].append(logits)
            # Quirk: the end flag is updated before the content draw, so the content paired with an end position
            # is the pad K (training used the end code K+1 there).
            allowed = torch.where(finished[:, None], content_pad_only, content_open)
            return choose(logits / temperature, allowed, top_k, top_p)

        # ---- coarse phase: until every image has sampled the coarse end position
        sampled_coarse = torch.zeros(B, v.fine_position_vocab_size, dtype=torch.bool, device=device)
        sampled_coarse[torch.arange(B, device=device), coarse_start] = True  # the start token counts as sampled
        # Quirk (off-by-one in the authors' mask): every index >= Nc - 1 is masked, so the last coarse cell can
        # never be sampled as coarse (it is always fine); the end token Nc + 1 is restored.
        coarse_open = (index < v.num_coarse_positions - 1) | (index == v.coarse_eos)
        coarse_pad_only = index == v.coarse_pad
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        while not finished.all():
            next(steps, None)
            self._check_length(seq.length)
            h = engine.position_hidden(seq)
            logits = self.position_head(self.position_norm(h[:, -1])).float()
            if scores is not None:
                scores[0].append(logits)
            allowed = torch.where(finished[:, None], coarse_pad_only, coarse_open & ~sampled_coarse)
            if known is not None:
                allowed = known.restrict(allowed, finished, fine=False)
            position = choose(logits / temperature, allowed, pos_top_k, pos_top_p)
            sampled_coarse[torch.arange(B, device=device), position] = True
            finished = finished | (position == v.coarse_eos)
            code = content_step(h, position, finished)
            if known is not None:
                code = known.keep(position, code, fine=False)
            seq.content.append(code)
            seq.position.append(position)

        # ---- fine phase
        num_coarse = seq.length
        coarse_cells = torch.stack(seq.position[1:], 1)
        is_coarse = torch.zeros(B, v.num_coarse_positions + 2, dtype=torch.bool, device=device)
        is_coarse.scatter_(1, coarse_cells.clamp(max=v.num_coarse_positions + 1), coarse_cells < v.num_coarse_positions)
        coarse_up = upsample_granularity(is_coarse[:, : v.num_coarse_positions].reshape(B, c.coarse_grid_size, -1))
        coarse_up = coarse_up.reshape(B, -1)  # (B, Nf): fine cells inside sampled coarse cells
        seq.num_coarse = num_coarse
        seq.content.append(content_start)
        seq.position.append(fine_start)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        if gc.fix_fine_position:
            fixed = self._remaining_fine_positions(coarse_up)
        else:
            forbidden = torch.zeros(B, v.fine_position_vocab_size, dtype=torch.bool, device=device)
            forbidden[:, : v.num_fine_positions] = coarse_up
            if c.num_classes > 0:
                # Quirk: the class model seeds its "already used" fine positions with the *coarse*-position start
                # token Nc + 2 + c read as a fine index, which forbids one legitimate fine cell per class when
                # Nc + 2 + c < Nf. (The unconditional model seeds it with its own fine start token: no effect.)
                forbidden[torch.arange(B, device=device), coarse_start] = True
            fine_open = (index != v.fine_pad) & (index <= v.fine_eos)
            fine_pad_only = index == v.fine_pad
        j = 0
        while not finished.all():
            next(steps, None)
            self._check_length(seq.length)
            h = engine.position_hidden(seq)
            if gc.fix_fine_position:
                # Fixed positions: the position stack still runs (its hidden state feeds the content stack).
                position = fixed[:, j]
            else:
                logits = self.position_head(self.position_norm(h[:, -1])).float()
                if scores is not None:
                    scores[0].append(logits)
                allowed = fine_open & ~forbidden
                allowed[:, v.fine_eos] = True  # the end position stays allowed
                allowed = torch.where(finished[:, None], fine_pad_only, allowed)
                if known is not None:
                    allowed = known.restrict(allowed, finished, fine=True)
                position = choose(logits / temperature, allowed, pos_top_k, pos_top_p)
                forbidden[torch.arange(B, device=device), position] = True
            finished = finished | (position == v.fine_eos)
            code = content_step(h, position, finished)
            if known is not None:
                code = known.keep(position, code, fine=True)
            seq.content.append(code)
            seq.position.append(position)
            j += 1

        tokens = DQTokens(
            coarse_content=torch.stack(seq.content[1:num_coarse], 1),
            coarse_position=torch.stack(seq.position[1:num_coarse], 1),
            fine_content=torch.stack(seq.content[num_coarse + 1:], 1),
            fine_position=torch.stack(seq.position[num_coarse + 1:], 1),
        )
        codes, granularity = tokens_to_codes(tokens, c.codebook_size, c.coarse_grid_size)
        if not gc.return_dict_in_generate:
            return codes, granularity
        return DQTransformerGenerateOutput(
            codes=codes, granularity=granularity, tokens=tokens,
            position_scores=tuple(scores[0]) if scores is not None else None,
            content_scores=tuple(scores[1]) if scores is not None else None,
        )

    def _generate_per_image(self, ids: torch.LongTensor, gc: GenerationConfig, generators: list, progress_bar,
                            text_features=None, known=(None, None, None)):
        """``generate`` with one generator per image: each image alone, the results stacked (tokens right-padded).
        ``text_features`` and the editing tensors ``known`` (codes, granularity, regions) are split per image."""
        if gc.output_scores:
            raise ValueError("output_scores=True is not supported with a list of generators (each image is sampled "
                             "alone, so the per-step scores of the batch do not exist); pass a single generator")
        as_dict = gc.return_dict_in_generate
        gc = copy.deepcopy(gc)
        gc.return_dict_in_generate = True
        ids = ids if self.config.num_classes > 0 else [None] * len(generators)
        n = len(generators)
        text = [None] * n if text_features is None else text_features.split(1)
        known = [[None] * n if k is None else k.split(1) for k in known]
        outs = [self.generate(None if i is None else i.view(1), batch_size=1, generation_config=gc, generator=g,
                              progress_bar=progress_bar, text_features=f, known_codes=kc, known_granularity=kg,
                              known_regions=kr)
                for i, g, f, kc, kg, kr in zip(ids, generators, text, *known)]
        codes, granularity = torch.cat([o.codes for o in outs]), torch.cat([o.granularity for o in outs])
        if not as_dict:
            return codes, granularity
        v = self.config.vocabulary

        def stack(name, pad):
            rows = [getattr(o.tokens, name)[0] for o in outs]
            return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=pad)

        tokens = DQTokens(stack("coarse_content", v.content_pad), stack("coarse_position", v.coarse_pad),
                          stack("fine_content", v.content_pad), stack("fine_position", v.fine_pad))
        return DQTransformerGenerateOutput(codes=codes, granularity=granularity, tokens=tokens)

    def _remaining_fine_positions(self, coarse_up: torch.Tensor) -> torch.LongTensor:
        """``fix_fine_position``: per image every fine cell outside the sampled coarse cells in permuter order, then
        the end position, right-padded with the pad position `(B, S)`."""
        c, v = self.config, self.config.vocabulary
        B = coarse_up.shape[0]
        hc = c.coarse_grid_size
        cells = torch.arange(v.num_fine_positions, device=coarse_up.device)
        keep = ~coarse_up
        if c.fine_position_order == "region-first":
            cells = cells.reshape(hc, 2, hc, 2).permute(0, 2, 1, 3).reshape(-1)
            keep = keep.reshape(B, hc, 2, hc, 2).permute(0, 1, 3, 2, 4).reshape(B, -1)
        rows = [torch.cat([cells[keep[b]], cells.new_tensor([v.fine_eos])]) for b in range(B)]
        return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=v.fine_pad)


class _CachedEngine:
    """Hidden states with key/value caches: every token runs through each stack once.

    The position stack keeps one preallocated cache (:class:`~hf_rq.kv_cache.StaticKVCache`, sized for the longest
    sequence) for the whole sequence. The content stack's cache serves the coarse phase and is rewound for the fine
    phase, because the authors' fine-phase content input re-embeds the coarse rows differently (see
    ``_content_input``); it is prefilled once, at the first fine step.
    """

    def __init__(self, model: DQTransformerForImageGeneration, batch_size: int, prefix=None):
        self.model, self.prefix = model, prefix
        weight = model.content_embedding.weight
        # The text prefix (text models) sits in front of the image rows in both stacks.
        length = model.config.max_position_embeddings + (0 if prefix is None else prefix.length)
        self.position_cache = StaticKVCache.for_stack(model.position_transformer.blocks, batch_size, length,
                                                      weight.dtype, weight.device)
        self.content_cache = StaticKVCache.for_stack(model.content_transformer.blocks, batch_size, length,
                                                     weight.dtype, weight.device)
        self.fed = 0
        self.hidden = []  # position-stack outputs, one (B, E) per token
        self.fine_prefilled = False

    def position_hidden(self, seq: _Sequence) -> torch.Tensor:
        m = self.model
        new = torch.stack([m._embed_token(seq, t) for t in range(self.fed, seq.length)], 1)
        first = self.fed == 0 and self.prefix is not None  # the text prefix enters with the first step
        if first:
            new = torch.cat([self.prefix.embeddings, new], 1)
        out = m.position_transformer(m.embed_dropout(new), past_key_values=self.position_cache)
        if first:
            self.prefix.hidden, out = out[:, : self.prefix.length], out[:, self.prefix.length:]
        self.hidden.extend(out.unbind(1))
        self.fed = seq.length
        return out

    def content_hidden(self, seq: _Sequence, position_out: torch.Tensor, next_position) -> torch.Tensor:
        m = self.model
        t = seq.length - 1  # the row being predicted from
        if seq.num_coarse is None:
            rows = m._content_input(seq, position_out[:, -1:], t, next_position[:, None])
            if t == 0 and self.prefix is not None:
                rows = torch.cat([self.prefix.hidden, rows], 1)
        elif not self.fine_prefilled:
            self.content_cache.rewind()
            self.fine_prefilled = True
            rows = torch.stack([m._content_input(seq, self.hidden[r], r, next_position) for r in range(t + 1)], 1)
            if self.prefix is not None:
                rows = torch.cat([self.prefix.hidden, rows], 1)
        else:
            rows = m._content_input(seq, position_out[:, -1:], t, next_position[:, None])
        return m.content_transformer(rows, past_key_values=self.content_cache)[:, -1]


class _FullEngine:
    """The authors' way: both stacks re-run on the whole prefix at every step (no cache). Reference path."""

    def __init__(self, model: DQTransformerForImageGeneration, prefix=None):
        self.model, self.prefix = model, prefix
        self.hidden = None

    def position_hidden(self, seq: _Sequence) -> torch.Tensor:
        m = self.model
        x = torch.stack([m._embed_token(seq, t) for t in range(seq.length)], 1)
        P = 0 if self.prefix is None else self.prefix.length
        if P:
            x = torch.cat([self.prefix.embeddings, x], 1)
        self.hidden = m.position_transformer(m.embed_dropout(x))
        if P:
            self.prefix.hidden, self.hidden = self.hidden[:, :P], self.hidden[:, P:]
        return self.hidden

    def content_hidden(self, seq: _Sequence, position_out: torch.Tensor, next_position) -> torch.Tensor:
        m = self.model
        rows = []
        for t in range(seq.length):
            nxt = next_position if t == seq.length - 1 else seq.position[t + 1]
            rows.append(m._content_input(seq, self.hidden[:, t], t, nxt))
        rows = torch.stack(rows, 1)
        if self.prefix is not None:
            rows = torch.cat([self.prefix.hidden, rows], 1)
        return m.content_transformer(rows)[:, -1]


AutoConfig.register(DQTransformerConfig.model_type, DQTransformerConfig, exist_ok=True)
AutoModel.register(DQTransformerConfig, DQTransformerForImageGeneration, exist_ok=True)
