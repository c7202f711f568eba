"""RQ-Transformer: the autoregressive prior over residual codes of Lee et al. (CVPR 2022).

An image is a code grid `(N, h, w, D)` from :class:`~hf_rq.RQVAEModel`. The prior factorises it in raster
order over the ``T = h * w`` positions and, inside a position, coarse to fine over the ``D`` depths:

* the **spatial transformer** reads one vector per position (the sum of the position's ``D`` code
  embeddings) after a class (or start) token and produces the context ``h_t`` of every position;
* the **depth transformer** runs one short sequence of length ``D`` per position, starting from ``h_t``
  and continuing with the partial sums of the codes already chosen at lower depths, and predicts the
  ``D`` codes of that position.

The numerics follow the authors' code (ARCHITECTURE.md sections 2-3 describe it in words). Its quirks are
kept on purpose, because released checkpoints were trained with them; they are pointed out in comments.
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
# The sampler lives in .generation; RQTransformerGenerateOutput and draw_rq_code stay importable from here.
from .generation import RQGenerationMixin, RQTransformerGenerateOutput, draw_rq_code  # noqa: F401
from .text_prefix import RQTextPrefixMixin, validate_text_config


@strict
class RQTransformerConfig(PreTrainedConfig):
    r"""Configuration of :class:`RQTransformerForImageGeneration`.

    Args:
        codebook_size (`int`): number of codes ``K`` of the tokenizer (one size for all depths).
        grid_height / grid_width (`int`): code grid ``h x w`` (8 x 8 for the published 256x256 models).
        code_depth (`int`): codes per position ``D``.
        code_embed_dim (`int`): width ``C`` of the tokenizer's codewords (``embed_dim`` of the RQ-VAE).
        shared_codebook (`bool`): whether the tokenizer uses one codebook for every depth.
        hidden_size (`int`): transformer width ``E``.
        num_spatial_layers / num_depth_layers (`int`): depth of the spatial and of the depth transformer.
        num_attention_heads (`int`): heads of the spatial transformer.
        num_depth_attention_heads (`int`, *optional*): heads of the depth transformer (default: same).
        num_classes (`int`): number of classes; 0 makes the model unconditional (a learned start token).
        use_null_class (`bool`): add a learned "null class" row to the class embedding (id ``num_classes``),
            which classifier-free guidance needs. Not part of the authors' models.
        class_dropout_prob (`float`): in training, the probability of replacing a label by the null class
            (requires ``use_null_class``).
        text_length / text_vocab_size (`int`): a text-conditional model (``text_length > 0``, the authors'
            ``block_size_cond`` / ``vocab_size_cond``) reads this many text tokens instead of the class token;
            text_pad_token_id, use_null_text (caption dropout to the all-pad null text, for guidance; not in the
            authors' model), text_dropout_prob, text_loss_weight (the authors' ``txt_weight``, 0.1): see
            ``hf_rq.rq.text_prefix``.
        embd_pdrop / attn_pdrop / resid_pdrop (`float`): dropout on the spatial input sequence, on attention
            weights and on residual branches (the authors: 0.0 / 0.0 / 0.1).
        layer_norm_eps (`float`), initializer_range (`float`): as in other transformers models.
    """

    model_type = "hf_rq_rqtransformer"

    codebook_size: int = 16384
    grid_height: int = 8
    grid_width: int = 8
    code_depth: int = 4
    code_embed_dim: int = 256
    shared_codebook: bool = True
    hidden_size: int = 1024
    num_spatial_layers: int = 24
    num_depth_layers: int = 4
    num_attention_heads: int = 16
    num_depth_attention_heads: int | None = None
    num_classes: int = 0
    use_null_class: bool = False
    class_dropout_prob: float = 0.0
    text_length: int = 0
    text_vocab_size: int = 0
    text_pad_token_id: int | None = None
    use_null_text: bool = False
    text_dropout_prob: float = 0.0
    text_loss_weight: float = 0.1
    embd_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    resid_pdrop: float = 0.1
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        if self.num_depth_attention_heads is None:
            self.num_depth_attention_heads = self.num_attention_heads
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Run by ``@strict``: reject configs the model cannot be built from, naming the key."""
        positive = ("codebook_size", "grid_height", "grid_width", "code_depth", "code_embed_dim", "hidden_size",
                    "num_spatial_layers", "num_depth_layers", "num_attention_heads", "num_depth_attention_heads")
        for key in positive:
            if getattr(self, key) < 1:
                raise ValueError(f"RQTransformerConfig.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("num_attention_heads", "num_depth_attention_heads"):
            if self.hidden_size % getattr(self, key):
                raise ValueError(f"hidden_size {self.hidden_size} is not divisible by {key}={getattr(self, key)}")
        check_null_class_config(self)
        validate_text_config(self)

    @property
    def num_positions(self) -> int:
        return self.grid_height * self.grid_width

    @property
    def null_class_id(self) -> int | None:
        return self.num_classes if self.use_null_class else None

    @property
    def is_text_conditional(self) -> bool:
        return self.text_length > 0


@dataclass
class RQTransformerOutput(ModelOutput):
    """Output of :meth:`RQTransformerForImageGeneration.forward`.

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*): cross-entropy averaged over all ``N*h*w*D``
            tokens (hard or soft targets), when targets were given.
        logits (`torch.FloatTensor` of shape `(N, h, w, D, K)`): ``logits[:, i, j, d]`` predicts
            ``codes[:, i, j, d]``.
        loss_per_depth (`torch.FloatTensor` of shape `(D,)`, *optional*): the same loss per depth (logging).
        text_logits (`(N, text_length - 1, text_vocab_size)`, *optional*): a text-conditional model's prediction
            of text token ``i + 1`` from text position ``i``; text_loss: their cross-entropy, when targets were given.
        spatial_inputs (`(N, T, E)`), spatial_hidden_states (`(N, T, E)`), depth_inputs (`(N, T, D, E)`),
        depth_hidden_states (`(N, T, D, E)`), *optional*: inputs and outputs of the two transformers, with
            ``output_hidden_states=True``. Row ``t`` of ``spatial_hidden_states`` is the context of position ``t``.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    loss_per_depth: torch.FloatTensor | None = None
    text_logits: torch.FloatTensor | None = None
    text_loss: torch.FloatTensor | None = None
    spatial_inputs: torch.FloatTensor | None = None
    spatial_hidden_states: torch.FloatTensor | None = None
    depth_inputs: torch.FloatTensor | None = None
    depth_hidden_states: torch.FloatTensor | None = None


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token ``-sum_k q_k log softmax(logits)_k``; `(..., K), (..., K) -> (...)`.

    The authors compute the log-softmax as ``x - max - log(sum(exp(x - max)) + 1e-7)``; ``torch.log_softmax``
    omits the ``1e-7``, which changes each token's loss by less than ``1e-7`` (the sum is >= 1), i.e. far
    below float32 training noise. We use the exact log-softmax.
    """
    return -(targets * torch.log_softmax(logits.float(), dim=-1)).sum(dim=-1)


class RQTransformerPreTrainedModel(BundledModelsMixin, PreTrainedModel):
    config: RQTransformerConfig
    config_class = RQTransformerConfig
    base_model_prefix = "rq_transformer"
    main_input_name = "codes"
    _no_split_modules = ["GPTBlock"]
    supports_gradient_checkpointing = True

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)  # Linear / Embedding N(0, initializer_range), zero bias, LayerNorm 1 / 0
        if isinstance(module, RQTransformerForImageGeneration):
            # Custom parameters and buffers must be set here: transformers 5 builds models on the meta
            # device, so anything left to __init__ would be uninitialised memory after from_pretrained.
            start_position = (module.text_position_embedding if module.config.is_text_conditional
                              else module.class_position_embedding)
            for param in (start_position, module.spatial_position_embedding, module.depth_position_embedding):
                init.normal_(param, mean=0.0, std=0.02)  # the authors' N(0, 0.02) for positional embeddings
            # An unfilled codebook is all zeros; generate() refuses to run on it (see load_codebook_from).
            init.zeros_(module.code_embeddings)


class RQTransformerForImageGeneration(RQTextPrefixMixin, RQTransformerPreTrainedModel, RQGenerationMixin,
                                       GenerationMixin):
    r"""RQ-Transformer prior: class label, text (``config.text_length > 0``) or nothing -> residual codes `(N, h, w, D)`.

    **Why the prior owns a copy of the tokenizer's codebook.** The authors' transformer has no token
    embedding table: it reads the *frozen* RQ-VAE codewords of the codes it conditions on, through a
    learned ``Linear(C, E)`` for each stream. Its weights are therefore meaningless without the exact
    codebook of the tokenizer it was trained with. We store that codebook, `(K + 1, C)` including the
    tokenizer's padding row (`(D, K + 1, C)` for per-depth codebooks), as a persistent, gradient-free
    buffer ``code_embeddings``, so that the prior is a complete ``from_pretrained`` unit (training,
    ``forward`` and ``generate`` never need the tokenizer) and a mismatched tokenizer is detected
    (:meth:`check_codebook`, called by the pipeline) instead of silently producing garbage. Fill it with
    :meth:`load_codebook_from` or build the model with :meth:`from_tokenizer`; the converter does it.

    Quirks of the authors' model reproduced here (released weights depend on them):

    * the spatial input of a position is ``sum_d spatial_input_proj(e(code_d))``: the Linear is applied per
      depth and then summed, so its bias counts ``D`` times;
    * depth slot ``k > 0`` reads ``depth_input_proj(sum_{d<k} e(code_d))``: summed first, bias once; slot 0
      is the spatial context plus the depth position embedding only;
    * the spatial stream is ``[class token, x_0 + pos_0, ..., x_{T-2} + pos_{T-2}]``; position ``t``'s context
      is output ``t``. An unconditional model uses a one-row class embedding as its start token; a
      text-conditional one replaces the class token by ``text_length`` text tokens (``hf_rq.rq.text_prefix``).
    """

    def __init__(self, config: RQTransformerConfig):
        super().__init__(config)
        E, C, K, D, T = (config.hidden_size, config.code_embed_dim, config.codebook_size, config.code_depth,
                         config.num_positions)
        if config.is_text_conditional:
            self._build_text_prefix(config)
        else:
            num_class_rows = max(config.num_classes, 1) + int(config.use_null_class)
            self.class_embedding = nn.Embedding(num_class_rows, E)
            self.class_position_embedding = nn.Parameter(torch.zeros(1, 1, E))
        self.spatial_position_embedding = nn.Parameter(torch.zeros(1, T, E))
        self.depth_position_embedding = nn.Parameter(torch.zeros(1, D, E))
        self.spatial_input_proj = nn.Linear(C, E)
        self.depth_input_proj = nn.Linear(C, E)
        self.embed_dropout = nn.Dropout(config.embd_pdrop)
        self.spatial_transformer = GPTStack(config.num_spatial_layers, E, config.num_attention_heads,
                                            config.attn_pdrop, config.resid_pdrop, config.layer_norm_eps)
        self.depth_transformer = GPTStack(config.num_depth_layers, E, config.num_depth_attention_heads,
                                          config.attn_pdrop, config.resid_pdrop, config.layer_norm_eps)
        self.final_layer_norm = nn.LayerNorm(E, eps=config.layer_norm_eps)
        self.lm_head = nn.Linear(E, K)
        book_shape = (K + 1, C) if config.shared_codebook else (D, K + 1, C)
        self.register_buffer("code_embeddings", torch.zeros(book_shape), persistent=True)
        self.post_init()
        self.generation_config = GenerationConfig(do_sample=True, temperature=1.0)

    def get_input_embeddings(self) -> nn.Module:
        # Codes enter through the fixed codebook buffer and this projection (there is no token table); FSDP and
        # other transformers tooling ask for the input module by this name.
        return self.spatial_input_proj

    # ------------------------------------------------------------------------------ codebook
    @classmethod
    def from_tokenizer(cls, config: RQTransformerConfig, tokenizer) -> "RQTransformerForImageGeneration":
        """A freshly initialised prior whose codebook is copied from ``tokenizer`` (an ``RQVAEModel``)."""
        model = cls(config)
        model.load_codebook_from(tokenizer)
        return model

    def _tokenizer_codebook(self, tokenizer) -> torch.Tensor:
        tc, c = tokenizer.config, self.config
        expected = dict(codebook_size=c.codebook_size, embed_dim=c.code_embed_dim, code_depth=c.code_depth,
                        shared_codebook=c.shared_codebook)
        found = dict(codebook_size=tc.codebook_size, embed_dim=tc.embed_dim, code_depth=tc.code_depth,
                     shared_codebook=tc.shared_codebook)
        if found != expected:
            diff = {k: (found[k], expected[k]) for k in expected if found[k] != expected[k]}
            raise ValueError(f"tokenizer does not fit this prior: (tokenizer, prior) values differ for {diff}")
        books = tokenizer.quantizer.codebooks
        return books[0].weight if c.shared_codebook else torch.stack([b.weight for b in books])

    @torch.no_grad()
    def load_codebook_from(self, tokenizer) -> None:
        """Copy the codebook `(K + 1, C)` of an ``RQVAEModel`` into ``code_embeddings``."""
        self.code_embeddings.copy_(self._tokenizer_codebook(tokenizer).to(self.code_embeddings))

    @torch.no_grad()
    def check_codebook(self, tokenizer, atol: float = 0.0) -> None:
        """Raise ``ValueError`` unless ``tokenizer``'s codebook equals the prior's copy (within ``atol``)."""
        # rounded to the prior's dtype first: a prior cast to bf16 carries a bf16 copy of the same codebook
        theirs = self._tokenizer_codebook(tokenizer).to(self.code_embeddings.device, self.code_embeddings.dtype).float()
        ours = self.code_embeddings.float()
        diff = (theirs - ours).abs().max().item()
        if diff > atol:
            raise ValueError(
                "the tokenizer's codebook differs from the copy stored in the prior (max |diff| = "
                f"{diff:.3g}): the prior was trained/converted with another RQ-VAE. Use the matching pair, or "
                "call transformer.load_codebook_from(vqvae) if the prior is meant to be trained on this tokenizer"
            )

    def embed_codes(self, codes: torch.LongTensor) -> torch.Tensor:
        """Per-depth codewords of `codes` `(..., D)` -> `(..., D, C)` (not summed)."""
        if self.config.shared_codebook:
            return F.embedding(codes, self.code_embeddings)
        return torch.stack([F.embedding(codes[..., d], self.code_embeddings[d]) for d in range(codes.shape[-1])], -2)

    def _embed_depth(self, code: torch.LongTensor, d: int) -> torch.Tensor:
        table = self.code_embeddings if self.config.shared_codebook else self.code_embeddings[d]
        return F.embedding(code, table)

    # ------------------------------------------------------------------------------ checks
    def _check_codes(self, codes, name: str = "codes") -> None:
        c = self.config
        if not isinstance(codes, torch.Tensor) or codes.is_floating_point() or codes.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {getattr(codes, 'dtype', type(codes).__name__)}")
        shape = (c.grid_height, c.grid_width, c.code_depth)
        if codes.ndim != 4 or tuple(codes.shape[1:]) != shape:
            raise ValueError(f"{name} must have shape (N, {', '.join(map(str, shape))}), got {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= c.codebook_size):
            raise ValueError(f"{name} must lie in [0, {c.codebook_size}), got range [{codes.min()}, {codes.max()}]")

    def _class_rows(self, class_labels, batch: int, device, allow_null: bool = True) -> torch.LongTensor:
        """Validated class-embedding rows `(batch,)` for ``forward`` (ids only; the null id when allowed)."""
        c = self.config
        if class_labels is None:
            if c.num_classes > 0:
                raise ValueError(f"this model is class-conditional ({c.num_classes} classes): pass class_labels")
            return torch.zeros(batch, dtype=torch.long, device=device)
        if c.num_classes == 0:
            raise ValueError("this model is unconditional: it takes no class_labels")
        labels = torch.as_tensor(class_labels, device=device)
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise TypeError(f"class_labels must be integer ids, got dtype {labels.dtype}")
        labels = labels.reshape(-1).long()
        if labels.numel() != batch:
            raise ValueError(f"got {labels.numel()} class labels for a batch of {batch} code grids")
        top = c.num_classes + int(allow_null and c.use_null_class)
        if labels.numel() and (labels.min() < 0 or labels.max() >= top):
            raise ValueError(f"class ids must lie in [0, {top}), got range [{labels.min()}, {labels.max()}]")
        return labels

    # ------------------------------------------------------------------------------ forward
    def forward(
        self,
        codes: torch.LongTensor,
        class_labels: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        soft_labels: torch.FloatTensor | None = None,
        text_ids: torch.LongTensor | None = None,
        output_hidden_states: bool = False,
        return_dict: bool = True,
        **kwargs,
    ):
        r"""Teacher-forced logits for every code, and the training loss when targets are given.

        Args:
            codes (`torch.LongTensor` of shape `(N, h, w, D)`): input codes (stage-2 training feeds the
                tokenizer's codes, or its stochastically sampled codes).
            class_labels (`torch.LongTensor` of shape `(N,)`, *optional*): class ids (``num_classes`` is the
                null class when the model has one); must be None for an unconditional model. In training
                mode, ``class_dropout_prob`` replaces labels by the null class at random.
            labels (`torch.LongTensor` of shape `(N, h, w, D)`, *optional*): hard targets (usually ``codes``):
                cross-entropy averaged over all tokens.
            soft_labels (`torch.FloatTensor` of shape `(N, h, w, D, K)`, *optional*): soft targets (the
                paper's soft labeling, ``RQVAEModel.get_soft_codes``): soft-target cross-entropy.
            text_ids (`torch.LongTensor` of shape `(N, text_length)`, *optional*): the captions' token ids, for a
                text-conditional model (and only for one). In training mode, ``text_dropout_prob`` replaces
                captions by the null text at random. With targets, the loss is ``(1 - w) * image + w * text``
                (``w = text_loss_weight``, the authors' weighting) when ``text_length > 1``.
            output_hidden_states (`bool`): also return the inputs / outputs of both transformers.

        Returns:
            :class:`RQTransformerOutput` (or a tuple ``(loss, logits, loss_per_depth)`` without ``None``s).
        """
        if kwargs:
            raise TypeError(f"forward() got unexpected arguments: {sorted(kwargs)}")
        self._check_codes(codes)
        if labels is not None and soft_labels is not None:
            raise ValueError("pass either labels (hard targets) or soft_labels (soft targets), not both")
        c = self.config
        N, H, W, D = codes.shape
        T = H * W
        rows = self._condition_rows(class_labels, text_ids, N, codes.device)

        codewords = self.embed_codes(codes.reshape(N, T, D))  # (N, T, D, C)
        # Spatial stream: Linear per depth, then the sum over depths (the bias counts D times, as the authors').
        x = self.spatial_input_proj(codewords).sum(dim=-2) + self.spatial_position_embedding[:, :T]
        start = self._start_embeddings(rows)  # (N, S, E): class token, start token or text tokens
        S = start.shape[1]
        spatial_inputs = self.embed_dropout(torch.cat([start, x[:, :-1]], dim=1))  # (N, S - 1 + T, E)
        outputs = self.spatial_transformer(spatial_inputs)
        context = outputs[:, S - 1:]  # row t = context of position t
        text_logits = self.text_head(outputs[:, :S - 1]) if S > 1 else None

        # Depth stream: slot 0 = context, slot k = proj(sum of the codewords of depths < k) (bias once).
        partial = self.depth_input_proj(codewords[:, :, :-1].cumsum(dim=-2))  # (N, T, D-1, E)
        depth_inputs = torch.cat([context[:, :, None], partial], dim=2) + self.depth_position_embedding
        depth_out = self.depth_transformer(depth_inputs.reshape(N * T, D, -1)).reshape(N, T, D, -1)
        logits = self.lm_head(self.final_layer_norm(depth_out)).reshape(N, H, W, D, -1)

        loss = loss_per_depth = None
        if labels is not None:
            self._check_codes(labels, "labels")
            token_loss = F.cross_entropy(logits.reshape(-1, c.codebook_size).float(), labels.reshape(-1), reduction="none")
        elif soft_labels is not None:
            if tuple(soft_labels.shape) != tuple(logits.shape):
                raise ValueError(f"soft_labels must have shape {tuple(logits.shape)} (N, h, w, D, K), got {tuple(soft_labels.shape)}")
            token_loss = soft_target_cross_entropy(logits, soft_labels).reshape(-1)
        if labels is not None or soft_labels is not None:
            loss = token_loss.mean()
            with torch.no_grad():
                loss_per_depth = token_loss.detach().reshape(-1, D).mean(dim=0)
        text_loss = None
        if loss is not None and text_logits is not None:
            text_loss = self._text_loss(text_logits, rows)
            loss = (1 - c.text_loss_weight) * loss + c.text_loss_weight * text_loss

        hidden = (spatial_inputs, context, depth_inputs, depth_out) if output_hidden_states else (None,) * 4
        out = RQTransformerOutput(loss, logits, loss_per_depth, text_logits, text_loss, *hidden)
        return out if return_dict else out.to_tuple()


AutoConfig.register(RQTransformerConfig.model_type, RQTransformerConfig, exist_ok=True)
AutoModel.register(RQTransformerConfig, RQTransformerForImageGeneration, exist_ok=True)
