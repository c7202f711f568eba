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

``generate()`` (:mod:`hf_rq.dq.generation`) samples the coarse part, then the fine part, position then content at
every step, with a
key/value cache on each stack. It reproduces the authors' sampler (``Dualformer.sample_from_scratch``) token for
token, quirks included (each is named where it is implemented); ``use_cache=False`` re-runs both stacks on the
whole prefix at every step, as the authors do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, AutoModel, GenerationConfig, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from ..hub import BundledModelsMixin
from ..sampling_args import check_null_class_config
from ..transformer_blocks import GPTStack
# The sampler lives in .generation; DQTransformerGenerateOutput and authors_top_p stay importable from here.
from .generation import DQ_GENERATION_DEFAULTS, DQGenerationMixin, DQTransformerGenerateOutput, authors_top_p  # noqa: F401
from .text_conditioning import check_text_features, text_projection_layer
from .tokens import FINE_POSITION_ORDERS, DQTokens, DQVocabulary, codes_to_tokens


@strict
class DQTransformerConfig(PreTrainedConfig):
    r"""Configuration of :class:`DQTransformerForImageGeneration`.

    Args:
        codebook_size (`int`): ``K``, codes of the DQ-VAE.
        coarse_grid_size (`int`): ``hc``; the fine grid is ``2 * hc`` (16 for the published 256 px model).
        num_classes (`int`): number of classes ``C``; 0 makes the model unconditional.
        use_null_class (`bool`): add a "null class" start token (id ``C``, after the class tokens in every
            vocabulary), which classifier-free guidance needs. Not part of the authors' models; off keeps their
            vocabulary layout exactly.
        class_dropout_prob (`float`): in training, the probability of replacing a label by the null class
            (requires ``use_null_class``).
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

    Derived sizes (properties), with ``S = max(C, 1) + use_null_class`` start tokens: ``content_vocab_size =
    K + 2 + S``, ``coarse_position_vocab_size = Nc + 2 + S``, ``fine_position_vocab_size = Nf + 2 + S``.
    """

    model_type = "hf_rq_dqtransformer"

    codebook_size: int = 1024
    coarse_grid_size: int = 16
    num_classes: int = 1000
    use_null_class: bool = False
    class_dropout_prob: float = 0.0
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
        if self.text_feature_size < 0 or (self.text_feature_size and self.num_classes):
            raise ValueError(f"text_feature_size must be >= 0 and a text model has num_classes = 0, got "
                             f"text_feature_size={self.text_feature_size}, num_classes={self.num_classes}")
        if self.fine_position_order not in FINE_POSITION_ORDERS:
            raise ValueError(f"fine_position_order must be one of {FINE_POSITION_ORDERS}, got {self.fine_position_order!r}")
        check_null_class_config(self)

    @property
    def vocabulary(self) -> DQVocabulary:
        return DQVocabulary(self.codebook_size, self.coarse_grid_size, self.num_classes, self.use_null_class)

    @property
    def null_class_id(self) -> int | None:
        return self.vocabulary.null_class_id

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


class DQTransformerForImageGeneration(DQTransformerPreTrainedModel, DQGenerationMixin, GenerationMixin):
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

    @torch.no_grad()
    def add_null_class(self) -> None:
        """Give a class-conditional model without a null class one, in place, keeping every weight.

        For fine-tuning a model trained without class dropout (the authors', or an old default) into one that
        classifier-free guidance can use. Each vocabulary grows by one start token at its end, so no index moves;
        the new rows of the three embeddings and the two heads start at the mean of the class rows (a neutral
        start that fine-tuning with ``class_dropout_prob > 0`` turns into the null class).
        """
        c = self.config
        if c.num_classes == 0:
            raise ValueError("add_null_class needs a class-conditional model (num_classes > 0)")
        if c.use_null_class:
            raise ValueError("this model already has a null class (config.use_null_class)")
        v = c.vocabulary
        firsts = {"content_embedding": v.content_eos + 1, "coarse_position_embedding": v.coarse_eos + 1,
                  "fine_position_embedding": v.fine_eos + 1, "position_head": v.fine_eos + 1,
                  "content_head": v.content_eos + 1}
        for name, first in firsts.items():
            old = getattr(self, name)
            weight = old.weight
            rows = torch.cat([weight, weight[first:first + c.num_classes].mean(0, keepdim=True)])
            if isinstance(old, nn.Embedding):
                new = nn.Embedding(rows.shape[0], rows.shape[1], padding_idx=old.padding_idx)
            else:
                new = nn.Linear(rows.shape[1], rows.shape[0], bias=False)
            new.to(device=weight.device, dtype=weight.dtype).weight.copy_(rows)
            new.weight.requires_grad_(weight.requires_grad)
            setattr(self, name, new)
        c.use_null_class = True

    # ----------------------------------------------------------------------------------- inputs
    def _class_ids(self, class_labels, batch_size: int, device, allow_null: bool = True) -> torch.LongTensor:
        """Validated class ids `(B,)`; the null id ``num_classes`` is accepted when the model has one."""
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
        top = c.num_classes + int(allow_null and c.use_null_class)
        if labels.numel() and (labels.min() < 0 or labels.max() >= top):
            raise ValueError(f"class id out of range [0, {top}): got values in [{labels.min()}, {labels.max()}]")
        return labels

    def prepare_sequences(self, tokens: DQTokens, class_labels=None) -> dict[str, torch.LongTensor]:
        """The authors' model inputs: each of the four sequences of ``tokens`` with its start token prepended.

        Returns ``coarse_content`` / ``coarse_position`` `(B, 1 + Lc)` and ``fine_content`` / ``fine_position``
        `(B, 1 + Lf)`: ``[K+2+c, codes.., K+1, K..]``, ``[Nc+2+c, cells.., Nc+1, Nc..]``, ``[K+2+c, ...]``,
        ``[Nf+2+c, ...]`` (``c = 0`` when unconditional). In training mode, ``class_dropout_prob`` replaces the
        class of a whole sequence by the null class at random.
        """
        B = tokens.coarse_content.shape[0]
        device = tokens.coarse_content.device
        ids = self._class_ids(class_labels, B, device)
        if self.training and self.config.class_dropout_prob > 0:
            # Classifier-free guidance: the null class replaces the label of the whole sequence (every start token).
            drop = torch.rand(B, device=device) < self.config.class_dropout_prob
            ids = torch.where(drop, torch.full_like(ids, self.config.null_class_id), ids)
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
            class_labels (`torch.LongTensor` of shape `(B,)`): class ids (class-conditional models only; the null
                class ``num_classes`` when the model has one). In training mode, ``class_dropout_prob`` replaces
                labels by the null class at random.
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


AutoConfig.register(DQTransformerConfig.model_type, DQTransformerConfig, exist_ok=True)
AutoModel.register(DQTransformerConfig, DQTransformerForImageGeneration, exist_ok=True)
