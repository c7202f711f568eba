"""Priors of the CTF family: LlamaGen's class-conditional GPT and the coarse-to-fine (CTF) two-stage prior.

* :class:`LlamaGenForImageGeneration` is LlamaGen's c2i GPT (Sun et al., 2024) as a transformers model:
  a class token (with a null class for classifier-free guidance) followed by the image tokens in raster
  order, Llama-style blocks (``hf_rq.llama_blocks``), an untied output head. Its ``generate()`` reproduces
  LlamaGen's sampler token for token (KV cache, CFG formula and ``cfg_interval``, temperature / top-k /
  top-p in LlamaGen's order, one ``torch.multinomial`` draw per token).
* :class:`CTFForImageGeneration` is the coarse-to-fine prior (Guo et al., 2025): stage 1 is the same GPT
  over the ``K`` coarse labels (k-means clusters of the codebook, see ``hf_rq.ctf.clustering``); stage 2
  (:class:`CTFAuxiliaryModel`) is a bidirectional stack of the same blocks that reads the class token and
  all coarse labels and predicts every fine code in one forward pass.

Design choice: the two CTF stages live in **one** ``PreTrainedModel`` together with the ``fine_to_coarse``
table. The table ties the stages to each other and to one tokenizer codebook; keeping them in one
``from_pretrained`` unit means a saved prior cannot be paired with a stage-2 model trained for a different
clustering, the pipeline keeps the two-component contract (``vqvae`` + ``transformer``) of every family,
and one ``GenerationConfig`` holds the knobs of both stages. Each stage is still a complete model of its
own (``model.coarse_model`` is a :class:`LlamaGenForImageGeneration`, ``model.fine_model`` a
:class:`CTFAuxiliaryModel`), so the stages can be trained separately, as the paper does, and assembled
with :meth:`CTFForImageGeneration.from_stages`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, DynamicCache, GenerationConfig, GenerationMixin, PreTrainedConfig
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast, MaskedLMOutput
from transformers.utils import ModelOutput

from ..llama_blocks import LlamaGenBlock, LlamaRMSNorm, llamagen_ffn_hidden_size, precompute_2d_rotary
from ..sampling import check_temperature, check_top_k, check_top_p, sample_tokens, top_k_logits
from ..hub import BundledModelsMixin

__all__ = [
    "CTFAuxiliaryModel",
    "CTFConfig",
    "CTFForImageGeneration",
    "CTFGenerationOutput",
    "CTFOutput",
    "LlamaGenConfig",
    "LlamaGenForImageGeneration",
    "LlamaGenGenerationOutput",
    "LlamaGenModel",
    "check_fine_to_coarse",
    "llamagen_logits_to_probs",
    "llamagen_top_p_logits",
    "sample_by_inverse_cdf",
]


# ----------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------


class LlamaGenConfig(PreTrainedConfig):
    r"""Configuration of LlamaGen's class-conditional GPT (and of CTF's two stages, which reuse it).

    Args:
        vocab_size: output vocabulary: the codebook size (LlamaGen, CTF stage 2) or the number of coarse
            labels (CTF stage 1).
        input_vocab_size: rows of the token embedding; ``None`` means ``vocab_size``. CTF's stage 2 reads
            coarse labels and predicts fine codes, so the two differ there.
        num_classes: number of real classes. The class table has one more row, the null class
            ``num_classes`` used for classifier-free guidance, whenever ``class_dropout_prob > 0`` (LlamaGen's
            rule: released checkpoints have 1001 rows).
        class_dropout_prob: probability that training replaces a label by the null class.
        hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads: transformer size
            (GPT-B: 768 / 12 / 12; GPT-L: 1024 / 24 / 16; GPT-XL: 1280 / 36 / 20).
        intermediate_size: SwiGLU width; ``None`` gives LlamaGen's ``round_up(int(8 d / 3), multiple_of)``
            (optionally scaled by ``ffn_dim_multiplier`` first).
        grid_size: the token grid is ``grid_size x grid_size`` (16 for 256 px with a downsample-16 tokenizer);
            only the 2D rotary table depends on it.
        rope_theta: rotary base. rms_norm_eps: RMSNorm epsilon (1e-5, not transformers' Llama 1e-6).
        token_dropout, attention_dropout, resid_dropout, ffn_dropout, drop_path_rate: LlamaGen's dropouts
            (token dropout acts on the whole input sequence, class token included).
        is_causal: ``True`` for the autoregressive GPT, ``False`` for CTF's bidirectional stage 2.
    """

    model_type = "hf_rq_llamagen"

    vocab_size: int = 16384
    input_vocab_size: int | None = None
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_key_value_heads: int | None = None
    intermediate_size: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    grid_size: int = 16
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    token_dropout: float = 0.1
    attention_dropout: float = 0.0
    resid_dropout: float = 0.1
    ffn_dropout: float = 0.1
    drop_path_rate: float = 0.0
    is_causal: bool = True
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if self.input_vocab_size is None:
            self.input_vocab_size = self.vocab_size
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.intermediate_size is None:
            self.intermediate_size = llamagen_ffn_hidden_size(self.hidden_size, self.multiple_of, self.ffn_dim_multiplier)
        super().__post_init__(**kwargs)
        for name in ("vocab_size", "input_vocab_size", "num_classes", "hidden_size", "num_hidden_layers",
                     "num_attention_heads", "grid_size", "intermediate_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LlamaGenConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"LlamaGenConfig: hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if (self.hidden_size // self.num_attention_heads) % 4:
            raise ValueError(f"LlamaGenConfig: the 2D rotary embedding needs head_dim (hidden_size / "
                             f"num_attention_heads = {self.hidden_size // self.num_attention_heads}) divisible by 4")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"LlamaGenConfig: num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ValueError(f"LlamaGenConfig.class_dropout_prob must be in [0, 1), got {self.class_dropout_prob}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_image_tokens(self) -> int:
        return self.grid_size * self.grid_size

    @property
    def has_null_class(self) -> bool:
        return self.class_dropout_prob > 0

    @property
    def null_class_id(self) -> int | None:
        """Class id of the unconditional (CFG) embedding, or None when the model has none."""
        return self.num_classes if self.has_null_class else None

    @property
    def num_class_embeddings(self) -> int:
        return self.num_classes + int(self.has_null_class)


# Fields of a stage config that CTFConfig owns (filled in from the top level, checked for consistency).
_SHARED_STAGE_FIELDS = ("num_classes", "grid_size", "class_dropout_prob")


class CTFConfig(PreTrainedConfig):
    r"""Configuration of the coarse-to-fine prior: two :class:`LlamaGenConfig` stages plus the clustering.

    Args:
        coarse_config: stage 1, the autoregressive GPT over coarse labels (a dict or a
            :class:`LlamaGenConfig`; its size fields: ``hidden_size``, ``num_hidden_layers``, ...).
        fine_config: stage 2, the bidirectional fine-code predictor (same fields). METHOD.md's proposal is
            GPT-L size (343M) for every stage-1 size.
        num_clusters: ``K``, the number of coarse labels (stage-1 vocabulary, stage-2 input vocabulary).
        codebook_size: ``V``, the tokenizer's codebook size (stage-2 output vocabulary).
        codebook_dim: the codebook vector size (8 for LlamaGen's VQ), i.e. the centroid size.
        num_classes, grid_size, class_dropout_prob: shared by both stages; written into the stage configs.
        kmeans_normalized, kmeans_seed, has_centroids: how the stored ``fine_to_coarse`` table was made
            (set by :meth:`CTFForImageGeneration.set_coarse_labels`); ``has_centroids`` enables the
            nearest-centroid consistency check against a tokenizer's codebook.

    Vocabulary sizes, ``is_causal`` and the shared fields of the stage configs are derived from the top level;
    a stage config that states a different value raises ``ValueError``.
    """

    model_type = "hf_rq_ctf"
    sub_configs_defaults = {"coarse_config": LlamaGenConfig, "fine_config": LlamaGenConfig}

    coarse_config: dict | LlamaGenConfig | None = None
    fine_config: dict | LlamaGenConfig | None = None
    num_clusters: int = 512
    codebook_size: int = 16384
    codebook_dim: int = 8
    num_classes: int = 1000
    grid_size: int = 16
    class_dropout_prob: float = 0.1
    kmeans_normalized: bool = True
    kmeans_seed: int | None = None
    has_centroids: bool = False
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        for name in ("num_clusters", "codebook_size", "codebook_dim", "num_classes", "grid_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CTFConfig.{name} must be a positive integer, got {value!r}")
        if self.num_clusters > self.codebook_size:
            raise ValueError(f"CTFConfig: num_clusters ({self.num_clusters}) cannot exceed codebook_size "
                             f"({self.codebook_size})")
        required = {
            "coarse_config": dict(vocab_size=self.num_clusters, input_vocab_size=self.num_clusters, is_causal=True),
            "fine_config": dict(vocab_size=self.codebook_size, input_vocab_size=self.num_clusters, is_causal=False),
        }
        for key, values in required.items():
            values.update({f: getattr(self, f) for f in _SHARED_STAGE_FIELDS})
            stage = getattr(self, key)
            if stage is None:
                stage = {}
            if isinstance(stage, dict):
                stage = {k: v for k, v in stage.items() if k != "model_type"}
                for field, value in values.items():
                    if field in stage and stage[field] is not None and stage[field] != value:
                        raise ValueError(f"CTFConfig.{key}.{field}={stage[field]!r} contradicts the CTF config "
                                         f"(expected {value!r})")
                    stage[field] = value
                setattr(self, key, stage)
            elif isinstance(stage, LlamaGenConfig):
                for field, value in values.items():
                    if getattr(stage, field) != value:
                        raise ValueError(f"CTFConfig.{key}.{field}={getattr(stage, field)!r} contradicts the CTF "
                                         f"config (expected {value!r})")
            else:
                raise TypeError(f"CTFConfig.{key} must be a dict or a LlamaGenConfig, got {type(stage).__name__}")
        super().__post_init__(**kwargs)

    @property
    def null_class_id(self) -> int | None:
        return self.coarse_config.null_class_id

    @property
    def num_image_tokens(self) -> int:
        return self.grid_size * self.grid_size


# ----------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------


@dataclass
class LlamaGenGenerationOutput(ModelOutput):
    """``generate(..., return_dict_in_generate=True)`` of :class:`LlamaGenForImageGeneration`.

    Args:
        sequences: `(batch, grid, grid)` int64 codes.
        logits: `(batch, grid**2, vocab)` float32, the logits each token was drawn from (after the CFG
            combination, before temperature / top-k / top-p); only with ``output_logits=True``.
    """

    sequences: torch.LongTensor | None = None
    logits: torch.Tensor | None = None


@dataclass
class CTFGenerationOutput(ModelOutput):
    """``generate(..., return_dict_in_generate=True)`` of :class:`CTFForImageGeneration`.

    Args:
        sequences: `(batch, grid, grid)` int64 fine codes (what the tokenizer decodes).
        coarse_labels: `(batch, grid, grid)` int64 coarse labels sampled by stage 1.
        coarse_logits: `(batch, grid**2, num_clusters)` stage-1 step logits (``output_logits=True``).
        fine_logits: `(batch, grid**2, codebook_size)` stage-2 logits after CFG, before temperature and
            masking (``output_logits=True``).
    """

    sequences: torch.LongTensor | None = None
    coarse_labels: torch.LongTensor | None = None
    coarse_logits: torch.Tensor | None = None
    fine_logits: torch.Tensor | None = None


@dataclass
class CTFOutput(ModelOutput):
    """Teacher-forced output of :class:`CTFForImageGeneration`.

    Args:
        loss: ``coarse_loss + fine_loss`` (only the computed stage's loss when ``stage`` selects one).
        coarse_loss: stage-1 next-token cross-entropy over the coarse labels.
        fine_loss: stage-2 cross-entropy over the fine codes.
        coarse_logits: `(batch, N, num_clusters)`; ``coarse_logits[:, t]`` predicts coarse label ``t``.
        fine_logits: `(batch, N, codebook_size)`; ``fine_logits[:, t]`` predicts fine code ``t``.
        coarse_labels: `(batch, N)` the coarse labels of the input codes.
    """

    loss: torch.Tensor | None = None
    coarse_loss: torch.Tensor | None = None
    fine_loss: torch.Tensor | None = None
    coarse_logits: torch.Tensor | None = None
    fine_logits: torch.Tensor | None = None
    coarse_labels: torch.LongTensor | None = None


# ----------------------------------------------------------------------------------------------------------
# Sampling helpers (LlamaGen's order: temperature, top-k, top-p, softmax)
# ----------------------------------------------------------------------------------------------------------


def llamagen_top_p_logits(logits: torch.Tensor, top_p: float | None) -> torch.Tensor:
    """LlamaGen's nucleus filter on logits `(..., V)`: sorted descending, drop a token once the cumulative
    probability *before* it exceeds ``top_p`` (strictly); the top token always survives.

    transformers' ``TopPLogitsWarper`` sums ascending and drops at ``<= 1 - top_p``: the same rule up to float
    rounding and ties at the boundary, which is enough to change a seeded draw, hence this function.
    """
    if top_p is None or top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative > top_p
    remove[..., 1:] = remove[..., :-1].clone()
    remove[..., 0] = False
    remove = remove.scatter(-1, order, remove)
    return logits.masked_fill(remove, float("-inf"))


def llamagen_logits_to_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                             top_p: float | None = None) -> torch.Tensor:
    """Sampling probabilities `(..., V)` from logits, in LlamaGen's order: divide by ``max(temperature, 1e-5)``,
    top-k on logits (ties at the k-th value kept), top-p, softmax.

    The temperature division is written out rather than taken from transformers' ``TemperatureLogitsWarper``
    because LlamaGen clamps the temperature at 1e-5 where that warper refuses non-positive values.
    """
    logits = logits.float() / max(float(temperature), 1e-5)
    if top_k:
        logits = top_k_logits(logits, top_k)
    logits = llamagen_top_p_logits(logits, top_p)
    return logits.softmax(dim=-1)


def sample_by_inverse_cdf(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.LongTensor:
    """One draw per row of `probs` `(R, V)` from a single uniform number per row (inverse CDF); returns `(R,)`.

    Same distribution as ``torch.multinomial(probs, 1)``, which on CPU draws one exponential number per
    *entry*: for CTF's stage 2 (every position of every image over the whole codebook at once) that is
    most of the sampling time. ``right=True`` never lands on a zero-probability entry.
    """
    cdf = probs.float().cumsum(dim=-1)
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


def _cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    # LlamaGen's formula, with its operation order (bit-level parity of the seeded draws depends on it).
    return uncond + (cond - uncond) * scale


def _check_sampling(temperature, top_k, top_p, guidance_scale, prefix: str = "") -> None:
    for check, name, value in ((check_temperature, "temperature", temperature), (check_top_k, "top_k", top_k),
                               (check_top_p, "top_p", top_p)):
        message = check(value)
        if message:
            raise ValueError(f"{prefix}{name}={value!r}: {message}")
    if guidance_scale is not None and (isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float))
                                       or guidance_scale < 1.0):
        raise ValueError(f"{prefix}guidance_scale={guidance_scale!r}: must be a number >= 1 (1 = no guidance; "
                         "LlamaGen applies classifier-free guidance only above 1)")


def _top_k_or_none(value):
    # LlamaGen spells "no top-k" as 0.
    return None if value in (None, 0) else value


def _prepare_generation_config(model, generation_config, kwargs: dict, allowed: tuple) -> GenerationConfig:
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise TypeError(f"{type(model).__name__}.generate() got unexpected keyword argument(s) {unknown}; "
                        f"accepted sampling arguments: {sorted(allowed)}")
    config = copy.deepcopy(generation_config if generation_config is not None else model.generation_config)
    for key, value in kwargs.items():
        setattr(config, key, value)
    return config


def _class_label_tensor(class_labels, batch_size, num_classes: int, null_class_id, device) -> torch.LongTensor:
    """Validate generate()'s class labels; ``None`` gives the null class (unconditional samples)."""
    if class_labels is None:
        if null_class_id is None:
            raise ValueError("class_labels is required: this model has no null class for unconditional samples")
        if batch_size is None or isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"without class_labels, pass a positive integer batch_size (got {batch_size!r})")
        return torch.full((batch_size,), null_class_id, dtype=torch.long, device=device)
    labels = torch.as_tensor(class_labels, device=device)
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(f"class_labels must be integer class ids, got dtype {labels.dtype}")
    labels = labels.reshape(-1).long()
    if labels.numel() == 0:
        raise ValueError("class_labels is empty")
    if batch_size is not None and batch_size != labels.numel():
        raise ValueError(f"batch_size={batch_size} does not match the {labels.numel()} class labels given")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.numel():
        raise ValueError(f"class id {int(bad[0])} is out of range [0, {num_classes})")
    return labels


def _check_tokens(tokens: torch.Tensor, vocab: int, name: str) -> torch.LongTensor:
    if not isinstance(tokens, torch.Tensor) or tokens.is_floating_point() or tokens.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got "
                        f"{tokens.dtype if isinstance(tokens, torch.Tensor) else type(tokens).__name__}")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab):
        raise ValueError(f"{name} must lie in [0, {vocab}), got values in [{int(tokens.min())}, {int(tokens.max())}]")
    return tokens.long()


# ----------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------


class LlamaGenOutputHead(nn.Linear):
    """The untied output projection (no bias). A class of its own so that ``_init_weights`` can find it: for
    models outside transformers, a parent module without parameters of its own is never visited."""

    def __init__(self, hidden_size: int, vocab_size: int):
        super().__init__(hidden_size, vocab_size, bias=False)


class LlamaGenPreTrainedModel(BundledModelsMixin, PreTrainedModel):
    config_class = LlamaGenConfig
    base_model_prefix = "model"
    main_input_name = "codes"
    _no_split_modules = ["LlamaGenBlock"]
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module):
        # LlamaGen: normal(0, 0.02) for every Linear / Embedding, norms at 1 (the default rule does both),
        # then the output head is zero-initialised, so the initial loss is ln(vocab).
        super()._init_weights(module)
        if isinstance(module, LlamaGenOutputHead):
            init.zeros_(module.weight)
        if isinstance(module, CTFForImageGeneration):
            # Persistent buffers: a fresh model has no clustering yet (-1 = unset; generate() refuses it).
            init.constant_(module.fine_to_coarse, -1)
            init.zeros_(module.coarse_centroids)


class LlamaGenModel(LlamaGenPreTrainedModel):
    """The transformer body: class token + token embeddings, LlamaGen blocks, final RMSNorm.

    Sequence position 0 is the class token, position ``p >= 1`` holds the token of grid cell ``p - 1``
    (its 2D rotary angles); ``is_causal`` selects autoregressive or bidirectional attention.
    """

    def __init__(self, config: LlamaGenConfig):
        super().__init__(config)
        self.class_embedding = nn.Embedding(config.num_class_embeddings, config.hidden_size)
        self.embed_tokens = nn.Embedding(config.input_vocab_size, config.hidden_size)
        self.token_dropout = nn.Dropout(config.token_dropout)
        # Plain Python so that building on the meta device (for checkpoint layout checks) works.
        n = config.num_hidden_layers
        rates = [config.drop_path_rate * i / (n - 1) if n > 1 else 0.0 for i in range(n)]
        self.layers = nn.ModuleList(
            LlamaGenBlock(
                config.hidden_size, config.num_attention_heads, config.intermediate_size, config.num_key_value_heads,
                config.rms_norm_eps, config.attention_dropout, config.resid_dropout, config.ffn_dropout,
                rates[i], config.is_causal, layer_idx=i,
            )
            for i in range(config.num_hidden_layers)
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        # The rotary table is a plain attribute (not a buffer): it is rebuilt in float32 on first use on a
        # device, so meta-device construction and dtype casts of the model never touch it (trap 1).
        self._rotary = None
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def rotary_table(self, device) -> torch.Tensor:
        """`(1 + grid**2, head_dim/2, 2)` float32 cos/sin rows for every sequence position."""
        if self._rotary is None or self._rotary.device != torch.device(device):
            c = self.config
            self._rotary = precompute_2d_rotary(c.grid_size, c.head_dim, c.rope_theta, 1, device=device)
        return self._rotary

    def embed_classes(self, class_labels: torch.LongTensor) -> torch.Tensor:
        """`(B,)` class ids (the null id allowed) -> `(B, 1, hidden)`; training drops labels to the null class."""
        c = self.config
        labels = _check_tokens(class_labels, c.num_class_embeddings, "class_labels")
        if self.training and c.class_dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < c.class_dropout_prob
            labels = torch.where(drop, torch.full_like(labels, c.num_classes), labels)
        return self.class_embedding(labels).unsqueeze(1)

    def forward(self, inputs_embeds: torch.Tensor, past_key_values=None, output_hidden_states: bool = False,
                return_dict: bool = True):
        """Run the blocks on `(B, L, hidden)` input embeddings; with a cache they continue its sequence.

        Returns ``BaseModelOutputWithPast(last_hidden_state (B, L, hidden) after the final norm,
        past_key_values, hidden_states)``; ``hidden_states`` (with ``output_hidden_states``) holds the block
        input and every block's output.
        """
        start = past_key_values.get_seq_length() if past_key_values is not None else 0
        length = inputs_embeds.shape[1]
        table = self.rotary_table(inputs_embeds.device)
        if start + length > table.shape[0]:
            raise ValueError(f"sequence of {start + length} positions exceeds the model's 1 + grid_size**2 = "
                             f"{table.shape[0]} positions")
        rotary = table[start:start + length]
        hidden = self.token_dropout(inputs_embeds)
        all_hidden = [hidden] if output_hidden_states else None
        for layer in self.layers:
            hidden = layer(hidden, rotary, past_key_values=past_key_values)
            if output_hidden_states:
                all_hidden.append(hidden)
        hidden = self.norm(hidden)
        out = BaseModelOutputWithPast(last_hidden_state=hidden, past_key_values=past_key_values,
                                      hidden_states=tuple(all_hidden) if output_hidden_states else None)
        return out if return_dict else out.to_tuple()


class LlamaGenForImageGeneration(LlamaGenPreTrainedModel, GenerationMixin):
    """LlamaGen's class-conditional GPT: ``logits[:, t]`` predicts image token ``t`` from the class and tokens ``< t``.

    ``generate(class_labels)`` returns codes `(batch, grid, grid)` for the tokenizer's ``decode_codes``.
    """

    _GENERATE_ARGS = ("do_sample", "temperature", "top_k", "top_p", "guidance_scale", "cfg_interval",
                      "return_dict_in_generate", "output_logits")

    def __init__(self, config: LlamaGenConfig):
        super().__init__(config)
        self.model = LlamaGenModel(config)
        self.lm_head = LlamaGenOutputHead(config.hidden_size, config.vocab_size)
        self.post_init()
        self.generation_config = GenerationConfig(do_sample=True, temperature=1.0, top_k=None, top_p=None,
                                                  guidance_scale=2.0, cfg_interval=-1)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, codes: torch.LongTensor, class_labels: torch.LongTensor, labels: torch.LongTensor | None = None,
                output_hidden_states: bool = False, return_dict: bool = True):
        """Teacher-forced forward.

        Args:
            codes: `(B, N)` or `(B, h, w)` image tokens, ``1 <= N <= grid**2``; the model reads the class token
                and ``codes[:, :-1]``.
            class_labels: `(B,)` class ids in ``[0, num_classes]`` (``num_classes`` = null class).
            labels: optional targets, same shape as ``codes`` (usually ``codes``; -100 is ignored).

        Returns ``CausalLMOutputWithPast(loss, logits (B, N, vocab) float32, hidden_states)``.
        """
        c = self.config
        flat = _check_tokens(codes, c.input_vocab_size, "codes").reshape(codes.shape[0], -1)
        if not 1 <= flat.shape[1] <= c.num_image_tokens:
            raise ValueError(f"codes hold {flat.shape[1]} tokens per sample; expected 1..{c.num_image_tokens}")
        if class_labels is None or class_labels.shape != (flat.shape[0],):
            raise ValueError(f"class_labels must have shape ({flat.shape[0]},), got "
                             f"{None if class_labels is None else tuple(class_labels.shape)}")
        embeds = torch.cat([self.model.embed_classes(class_labels), self.model.embed_tokens(flat[:, :-1])], dim=1)
        out = self.model(embeds, output_hidden_states=output_hidden_states)
        logits = self.lm_head(out.last_hidden_state).float()
        loss = None
        if labels is not None:
            if labels.numel() != flat.numel():
                raise ValueError(f"labels must have the shape of codes {tuple(codes.shape)}, got {tuple(labels.shape)}")
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).long().to(logits.device))
        result = CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=out.hidden_states)
        return result if return_dict else result.to_tuple()

    def forward_incremental(self, input_codes: torch.LongTensor | None = None, class_labels: torch.LongTensor | None = None,
                            past_key_values=None) -> torch.Tensor:
        """Extend a KV cache: with an empty cache the class token comes first (``class_labels`` required),
        followed by ``input_codes`` `(B, L)` if given; afterwards only ``input_codes``. Returns float32 logits
        `(B, L_new, vocab)` of the new positions.
        """
        if past_key_values is None:
            raise ValueError("forward_incremental needs a cache (e.g. transformers.DynamicCache())")
        parts = []
        if past_key_values.get_seq_length() == 0:
            if class_labels is None:
                raise ValueError("the first incremental call must pass class_labels (the class token opens the sequence)")
            parts.append(self.model.embed_classes(class_labels))
        elif class_labels is not None:
            raise ValueError("class_labels can only be given with an empty cache")
        if input_codes is not None:
            parts.append(self.model.embed_tokens(_check_tokens(input_codes, self.config.input_vocab_size, "input_codes")))
        if not parts:
            raise ValueError("nothing to run: pass input_codes")
        return self._decode_step(torch.cat(parts, dim=1), past_key_values)

    def _decode_step(self, embeds: torch.Tensor, cache) -> torch.Tensor:
        # The sampler's inner step: inputs are its own draws, so no value checks (each would sync a GPU).
        return self.lm_head(self.model(embeds, past_key_values=cache).last_hidden_state).float()

    def _sample_tokens(self, class_labels: torch.LongTensor, do_sample: bool, temperature, top_k, top_p,
                       guidance_scale: float, cfg_interval: int, generator, progress_bar, output_logits: bool):
        """LlamaGen's sampler: `(B,)` labels -> tokens `(B, grid**2)` (+ step logits `(B, N, V)` or None)."""
        batch = class_labels.shape[0]
        null_id = self.config.null_class_id
        if guidance_scale > 1.0 and null_id is None:
            raise ValueError("guidance_scale > 1 needs a null class, but this model was built without one "
                             "(class_dropout_prob = 0)")
        # All-null (unconditional) batches gain nothing from guidance: cond and uncond rows would be equal.
        use_cfg = guidance_scale > 1.0 and bool((class_labels != null_id).any())
        labels = torch.cat([class_labels, torch.full_like(class_labels, null_id)]) if use_cfg else class_labels
        doubled = use_cfg
        cache = DynamicCache()
        tokens = torch.empty(batch, self.config.num_image_tokens, dtype=torch.long, device=class_labels.device)
        step_logits = [] if output_logits else None
        steps = range(self.config.num_image_tokens)
        if progress_bar is not None:
            steps = progress_bar(steps)
        next_token = None
        for t in steps:
            if t == 0:
                logits = self.forward_incremental(class_labels=labels, past_key_values=cache)[:, -1]
            else:
                inputs = next_token[:, None]
                if doubled:
                    inputs = torch.cat([inputs, inputs])
                logits = self._decode_step(self.model.embed_tokens(inputs), cache)[:, -1]
            if doubled:
                cond, uncond = logits.chunk(2)
                # cfg_interval = c keeps guidance for tokens 0 .. c + 1 (LlamaGen's decode step i makes token i + 1
                # and drops CFG once i > c).
                if cfg_interval < 0 or t <= cfg_interval + 1:
                    logits = _cfg_combine(cond, uncond, guidance_scale)
                else:
                    # LlamaGen keeps feeding the unconditional half; the conditional rows never attend to it,
                    # so dropping it from the cache gives the same tokens for half the work.
                    logits = cond
                    doubled = False
                    cache.batch_select_indices(torch.arange(batch, device=logits.device))
            if output_logits:
                step_logits.append(logits)
            probs = llamagen_logits_to_probs(logits, temperature, top_k, top_p)
            next_token = sample_tokens(probs, generator, do_sample)
            tokens[:, t] = next_token
        return tokens, (torch.stack(step_logits, dim=1) if output_logits else None)

    @torch.no_grad()
    def generate(self, class_labels=None, batch_size: int | None = None,
                 generation_config: GenerationConfig | None = None, generator: torch.Generator | None = None,
                 progress_bar=None, **kwargs):
        """Sample image tokens.

        Args:
            class_labels: class ids `(B,)` (list or tensor). ``None`` samples unconditionally from the null
                class (give ``batch_size``).
            generation_config: defaults (``self.generation_config`` if None); ``kwargs`` override a copy:
                ``do_sample`` (False = greedy), ``temperature``, ``top_k`` (None or 0 = off), ``top_p`` (None or
                1.0 = off), ``guidance_scale`` (LlamaGen's CFG ``uncond + s (cond - uncond)``, applied when
                ``> 1``), ``cfg_interval`` (-1 = always; ``c`` keeps CFG for tokens ``0 .. c + 1``),
                ``return_dict_in_generate``, ``output_logits``.
            generator: a ``torch.Generator`` on the model's device; the only random draws are one
                ``torch.multinomial`` per token on the `(B, vocab)` probabilities, so a generator seeded like
                ``torch.manual_seed(s)`` reproduces LlamaGen's samples.
            progress_bar: optional callable wrapping the loop over token positions.

        Returns codes `(B, grid, grid)` int64, or a :class:`LlamaGenGenerationOutput`.
        """
        gc = _prepare_generation_config(self, generation_config, kwargs, self._GENERATE_ARGS)
        temperature = 1.0 if gc.temperature is None else gc.temperature
        top_k, top_p = _top_k_or_none(gc.top_k), gc.top_p
        guidance = 1.0 if gc.guidance_scale is None else gc.guidance_scale
        cfg_interval = getattr(gc, "cfg_interval", -1)
        cfg_interval = -1 if cfg_interval is None else cfg_interval
        _check_sampling(temperature, top_k, top_p, guidance)
        if isinstance(cfg_interval, bool) or not isinstance(cfg_interval, int) or cfg_interval < -1:
            raise ValueError(f"cfg_interval={cfg_interval!r}: must be an integer >= -1 (-1 = guidance at every token)")
        labels = _class_label_tensor(class_labels, batch_size, self.config.num_classes, self.config.null_class_id,
                                     self.device)
        tokens, logits = self._sample_tokens(labels, bool(gc.do_sample), temperature, top_k, top_p, float(guidance),
                                             cfg_interval, generator, progress_bar, bool(gc.output_logits))
        grid = self.config.grid_size
        codes = tokens.view(-1, grid, grid)
        if gc.return_dict_in_generate:
            return LlamaGenGenerationOutput(sequences=codes, logits=logits)
        return codes


class CTFAuxiliaryModel(LlamaGenPreTrainedModel):
    """CTF stage 2: a bidirectional LlamaGen transformer reading ``[class, coarse_1 .. coarse_N]`` and
    predicting every fine code in one pass (``logits[:, t]`` is the distribution of fine code ``t``).

    Input vocabulary = the ``K`` coarse labels (``config.input_vocab_size``), output = the codebook
    (``config.vocab_size``). Same rotary layout as the GPT: position ``t + 1`` carries grid cell ``t``.
    """

    def __init__(self, config: LlamaGenConfig):
        super().__init__(config)
        if config.is_causal:
            raise ValueError("CTFAuxiliaryModel needs a bidirectional config (is_causal=False)")
        self.model = LlamaGenModel(config)
        self.lm_head = LlamaGenOutputHead(config.hidden_size, config.vocab_size)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def hidden_states(self, coarse_labels: torch.LongTensor, class_labels: torch.LongTensor) -> torch.Tensor:
        """`(B, N)` coarse labels + `(B,)` classes -> `(B, N, hidden)` final-norm states of the label positions."""
        coarse = _check_tokens(coarse_labels, self.config.input_vocab_size, "coarse_labels")
        coarse = coarse.reshape(coarse.shape[0], -1)
        if coarse.shape[1] != self.config.num_image_tokens:
            raise ValueError(f"stage 2 reads all {self.config.num_image_tokens} coarse labels of an image, got "
                             f"{coarse.shape[1]} per sample")
        if class_labels is None or class_labels.shape != (coarse.shape[0],):
            raise ValueError(f"class_labels must have shape ({coarse.shape[0]},)")
        embeds = torch.cat([self.model.embed_classes(class_labels), self.model.embed_tokens(coarse)], dim=1)
        return self.model(embeds).last_hidden_state[:, 1:]

    def forward(self, coarse_labels: torch.LongTensor, class_labels: torch.LongTensor,
                labels: torch.LongTensor | None = None, return_dict: bool = True):
        """`(B, N)` or `(B, h, w)` coarse labels -> ``MaskedLMOutput(loss, logits (B, N, codebook_size))``;
        ``labels`` are the fine codes (same shape)."""
        hidden = self.hidden_states(coarse_labels, class_labels)
        logits = self.lm_head(hidden).float()
        loss = None
        if labels is not None:
            if labels.numel() != logits.shape[0] * logits.shape[1]:
                raise ValueError(f"labels must hold one fine code per coarse label, got shape {tuple(labels.shape)}")
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).long().to(logits.device))
        out = MaskedLMOutput(loss=loss, logits=logits)
        return out if return_dict else out.to_tuple()


def check_fine_to_coarse(fine_to_coarse: torch.Tensor, num_clusters: int, codebook_size: int) -> torch.LongTensor:
    """Validate a ``fine_to_coarse`` table: `(codebook_size,)` integers in ``[0, num_clusters)``, every
    cluster non-empty. Returns it as int64; raises ``ValueError`` naming the problem."""
    table = torch.as_tensor(fine_to_coarse)
    if table.is_floating_point() or table.dtype == torch.bool:
        raise TypeError(f"fine_to_coarse must be an integer tensor, got dtype {table.dtype}")
    if table.shape != (codebook_size,):
        raise ValueError(f"fine_to_coarse has shape {tuple(table.shape)}; the codebook has {codebook_size} codes, "
                         f"so it must be ({codebook_size},)")
    if int(table.min()) < 0 or int(table.max()) >= num_clusters:
        raise ValueError(f"fine_to_coarse values must lie in [0, {num_clusters}), got "
                         f"[{int(table.min())}, {int(table.max())}]")
    sizes = torch.bincount(table.long().cpu(), minlength=num_clusters)
    empty = (sizes == 0).nonzero().flatten()
    if empty.numel():
        raise ValueError(f"fine_to_coarse leaves {empty.numel()} of {num_clusters} coarse labels without any fine code "
                         f"(e.g. label {int(empty[0])}); every cluster must be non-empty")
    return table.long()


class CTFPreTrainedModel(LlamaGenPreTrainedModel):
    config_class = CTFConfig
    base_model_prefix = "ctf"


class CTFForImageGeneration(CTFPreTrainedModel, GenerationMixin):
    """The coarse-to-fine prior: stage 1 samples coarse labels autoregressively, stage 2 fills in the fine codes.

    Holds ``coarse_model`` (a :class:`LlamaGenForImageGeneration` over ``num_clusters`` labels),
    ``fine_model`` (a :class:`CTFAuxiliaryModel`), and the persistent buffers ``fine_to_coarse``
    `(codebook_size,)` int64 and ``coarse_centroids`` `(num_clusters, codebook_dim)` of the clustering
    (see :func:`hf_rq.ctf.clustering.build_coarse_labels` and :meth:`set_coarse_labels`).
    """

    _GENERATE_ARGS = ("do_sample", "temperature", "top_k", "top_p", "guidance_scale", "cfg_interval",
                      "fine_temperature", "fine_top_k", "fine_top_p", "fine_guidance_scale", "in_cluster_mask",
                      "return_dict_in_generate", "output_logits")
    # Stage-2 logits for this many (position x codebook) entries at most are materialised at once.
    _FINE_CHUNK_ELEMENTS = 1 << 26

    def __init__(self, config: CTFConfig):
        super().__init__(config)
        self.coarse_model = LlamaGenForImageGeneration(config.coarse_config)
        self.fine_model = CTFAuxiliaryModel(config.fine_config)
        self.register_buffer("fine_to_coarse", torch.full((config.codebook_size,), -1, dtype=torch.long))
        self.register_buffer("coarse_centroids", torch.zeros(config.num_clusters, config.codebook_dim))
        self.post_init()
        # METHOD.md defaults (CTF-B, Table 3): CFG 2.0, tau1 = tau2 = 1.1, no stage-2 top-k; stage-2 CFG and the
        # in-cluster mask are our additions, off by default.
        self.generation_config = GenerationConfig(
            do_sample=True, temperature=1.1, top_k=None, top_p=None, guidance_scale=2.0, cfg_interval=-1,
            fine_temperature=1.1, fine_top_k=None, fine_top_p=None, fine_guidance_scale=1.0, in_cluster_mask=False,
        )

    # -- clustering --------------------------------------------------------------------------------------

    @property
    def has_coarse_labels(self) -> bool:
        return bool((self.fine_to_coarse >= 0).all())

    @torch.no_grad()
    def set_coarse_labels(self, coarse_labels, centroids: torch.Tensor | None = None) -> None:
        """Store a clustering: a :class:`~hf_rq.ctf.clustering.CoarseLabels` (table, centroids and k-means
        settings) or a plain ``fine_to_coarse`` tensor (+ optional ``centroids`` `(num_clusters, codebook_dim)`)."""
        c = self.config
        meta = {}
        if hasattr(coarse_labels, "fine_to_coarse"):
            table = coarse_labels.fine_to_coarse
            centroids = coarse_labels.centroids if centroids is None else centroids
            meta = dict(kmeans_normalized=bool(coarse_labels.normalize), kmeans_seed=coarse_labels.seed)
        else:
            table = coarse_labels
        table = check_fine_to_coarse(table, c.num_clusters, c.codebook_size)
        self.fine_to_coarse.copy_(table.to(self.fine_to_coarse.device))
        if centroids is not None:
            centroids = torch.as_tensor(centroids)
            if centroids.shape != (c.num_clusters, c.codebook_dim):
                raise ValueError(f"centroids must have shape ({c.num_clusters}, {c.codebook_dim}), got "
                                 f"{tuple(centroids.shape)}")
            self.coarse_centroids.copy_(centroids.to(self.coarse_centroids))
        else:
            self.coarse_centroids.zero_()
        c.has_centroids = centroids is not None
        for key, value in meta.items():
            setattr(c, key, value)

    def _require_coarse_labels(self) -> torch.LongTensor:
        if not self.has_coarse_labels:
            raise ValueError("this CTF prior has no fine_to_coarse table yet: call "
                             "set_coarse_labels(build_coarse_labels(tokenizer, num_clusters=...))")
        return self.fine_to_coarse

    @torch.no_grad()
    def check_tokenizer(self, tokenizer_or_codebook, atol: float = 1e-4) -> None:
        """Raise ``ValueError`` unless this prior fits the tokenizer: the stage-2 vocabulary equals the
        codebook size, the codebook vectors have ``codebook_dim`` entries, and (when centroids are stored)
        every fine code's coarse label is its nearest centroid, as after k-means (within ``atol``)."""
        codebook = tokenizer_or_codebook
        if not isinstance(codebook, torch.Tensor):
            codebook = getattr(tokenizer_or_codebook, "codebook", None)
            if not isinstance(codebook, torch.Tensor):
                raise TypeError("check_tokenizer needs a tokenizer with a `.codebook` (K, C) tensor, or that tensor")
        c = self.config
        if codebook.ndim != 2:
            raise ValueError(f"codebook must be (K, C), got shape {tuple(codebook.shape)}")
        if codebook.shape[0] != c.codebook_size or self.fine_model.config.vocab_size != codebook.shape[0]:
            raise ValueError(f"the stage-2 model predicts {self.fine_model.config.vocab_size} fine codes but the "
                             f"tokenizer's codebook has {codebook.shape[0]} entries")
        if codebook.shape[1] != c.codebook_dim:
            raise ValueError(f"the prior was clustered on {c.codebook_dim}-d code vectors but the tokenizer's "
                             f"codebook vectors have {codebook.shape[1]} entries")
        table = self._require_coarse_labels()
        if not c.has_centroids:
            return
        vectors = codebook.detach().double().cpu()
        if c.kmeans_normalized:
            vectors = F.normalize(vectors, dim=-1)
        dist = torch.cdist(vectors, self.coarse_centroids.double().cpu()).pow(2)
        assigned = dist.gather(1, table.cpu()[:, None]).squeeze(1)
        bad = (assigned > dist.min(dim=1).values + atol).nonzero().flatten()
        if bad.numel():
            raise ValueError(f"fine_to_coarse is inconsistent with this tokenizer's codebook: {bad.numel()} of "
                             f"{c.codebook_size} codes (e.g. code {int(bad[0])}) are not in the cluster of their "
                             "nearest centroid; the prior was clustered on a different codebook")

    # -- training forward --------------------------------------------------------------------------------

    def forward(self, codes: torch.LongTensor, class_labels: torch.LongTensor, labels: torch.LongTensor | None = None,
                stage: str = "both", return_dict: bool = True):
        """Teacher-forced forward of both stages on fine codes `(B, N)` or `(B, h, w)`.

        The coarse labels are ``fine_to_coarse[codes]``. Stage 1 predicts them autoregressively (targets =
        the coarse labels of ``labels``), stage 2 predicts ``labels`` from all of them. ``stage`` =
        ``"coarse"`` / ``"fine"`` runs one stage only (the paper trains them separately).
        """
        if stage not in ("both", "coarse", "fine"):
            raise ValueError(f"stage must be 'both', 'coarse' or 'fine', got {stage!r}")
        table = self._require_coarse_labels()
        flat = _check_tokens(codes, self.config.codebook_size, "codes").reshape(codes.shape[0], -1)
        coarse = table[flat]
        coarse_targets = None
        if labels is not None:
            labels = labels.reshape(flat.shape).long()
            coarse_targets = torch.where(labels >= 0, table[labels.clamp(min=0)], labels)
        out = CTFOutput(coarse_labels=coarse)
        losses = []
        if stage in ("both", "coarse"):
            first = self.coarse_model(coarse, class_labels, labels=coarse_targets)
            out.coarse_logits, out.coarse_loss = first.logits, first.loss
            losses.append(first.loss)
        if stage in ("both", "fine"):
            second = self.fine_model(coarse, class_labels, labels=labels)
            out.fine_logits, out.fine_loss = second.logits, second.loss
            losses.append(second.loss)
        if labels is not None:
            out.loss = sum(losses)
        return out if return_dict else out.to_tuple()

    # -- sampling ----------------------------------------------------------------------------------------

    def _cluster_members(self):
        """`(K, M)` fine codes of each cluster (padded) and the `(K, M)` validity mask; M = largest cluster."""
        table = self.fine_to_coarse
        k = self.config.num_clusters
        sizes = torch.bincount(table, minlength=k)
        order = torch.argsort(table, stable=True)
        valid = torch.arange(int(sizes.max()), device=table.device)[None, :] < sizes[:, None]
        members = torch.zeros(valid.shape, dtype=torch.long, device=table.device)
        members[valid] = order  # row-major fill of the valid slots follows the cluster-sorted order
        return members, valid

    def _sample_fine(self, coarse: torch.LongTensor, class_labels: torch.LongTensor, do_sample: bool, temperature,
                     top_k, top_p, guidance_scale: float, in_cluster_mask: bool, generator, output_logits: bool):
        """One stage-2 pass: coarse `(B, N)` -> fine codes `(B, N)` (+ logits `(B, N, V)` if requested)."""
        batch, length = coarse.shape
        null_id = self.config.null_class_id
        if guidance_scale > 1.0 and null_id is None:
            raise ValueError("fine_guidance_scale > 1 needs a null class (class_dropout_prob > 0)")
        use_cfg = guidance_scale > 1.0 and bool((class_labels != null_id).any())
        if use_cfg:
            hidden = self.fine_model.hidden_states(torch.cat([coarse, coarse]),
                                                   torch.cat([class_labels, torch.full_like(class_labels, null_id)]))
        else:
            hidden = self.fine_model.hidden_states(coarse, class_labels)
        members = valid = None
        if in_cluster_mask:
            members, valid = self._cluster_members()
        head = self.fine_model.lm_head
        vocab = self.config.codebook_size
        chunk = max(1, self._FINE_CHUNK_ELEMENTS // (length * vocab * (2 if use_cfg else 1)))
        fine = torch.empty_like(coarse)
        all_logits = [] if output_logits else None
        # The head and the sampling run over image chunks, so that (B, N, V) float32 logits never exist at once.
        for lo in range(0, batch, chunk):
            hi = min(batch, lo + chunk)
            logits = head(hidden[lo:hi]).float()
            if use_cfg:
                logits = _cfg_combine(logits, head(hidden[batch + lo:batch + hi]).float(), guidance_scale)
            if output_logits:
                all_logits.append(logits)
            if in_cluster_mask:
                # Only the members of each position's coarse label can be drawn: gather their logits, mask the
                # padding, sample among them and map back to codebook indices.
                idx = members[coarse[lo:hi]]
                sub = logits.gather(-1, idx).masked_fill(~valid[coarse[lo:hi]], float("-inf"))
                probs = llamagen_logits_to_probs(sub, temperature, top_k, top_p).reshape(-1, sub.shape[-1])
                pick = (sample_by_inverse_cdf(probs, generator) if do_sample else probs.argmax(-1)).view(hi - lo, length)
                fine[lo:hi] = idx.gather(-1, pick[..., None]).squeeze(-1)
            else:
                probs = llamagen_logits_to_probs(logits, temperature, top_k, top_p).reshape(-1, vocab)
                pick = sample_by_inverse_cdf(probs, generator) if do_sample else probs.argmax(-1)
                fine[lo:hi] = pick.view(hi - lo, length)
        return fine, (torch.cat(all_logits) if output_logits else None)

    @torch.no_grad()
    def generate(self, class_labels=None, batch_size: int | None = None,
                 generation_config: GenerationConfig | None = None, generator: torch.Generator | None = None,
                 progress_bar=None, **kwargs):
        """Two-stage sampling: stage 1 draws the coarse labels token by token (KV cache, CFG, temperature tau1),
        then one stage-2 pass draws every fine code (temperature tau2, optional top-k / top-p / CFG / in-cluster mask).

        Args:
            class_labels, batch_size, generator, progress_bar: as in :meth:`LlamaGenForImageGeneration.generate`
                (the progress bar wraps the stage-1 loop).
            generation_config / kwargs: stage 1: ``temperature`` (tau1), ``top_k``, ``top_p``, ``guidance_scale``,
                ``cfg_interval``; stage 2: ``fine_temperature`` (tau2), ``fine_top_k``, ``fine_top_p``,
                ``fine_guidance_scale`` (1 = off), ``in_cluster_mask`` (restrict each position to the fine codes
                of its coarse label); ``do_sample=False`` makes both stages greedy; ``return_dict_in_generate``,
                ``output_logits``.

        Random draws: stage 1 makes LlamaGen's one ``torch.multinomial`` per token; stage 2 one uniform number per
        position (:func:`sample_by_inverse_cdf`), after stage 1, from the same ``generator``.

        Returns fine codes `(B, grid, grid)` int64, or a :class:`CTFGenerationOutput` with the coarse-label map.
        """
        gc = _prepare_generation_config(self, generation_config, kwargs, self._GENERATE_ARGS)

        def get(name, default):
            value = getattr(gc, name, None)
            return default if value is None else value

        temperature, top_k, top_p = get("temperature", 1.0), _top_k_or_none(gc.top_k), gc.top_p
        guidance, cfg_interval = get("guidance_scale", 1.0), get("cfg_interval", -1)
        fine_temperature = get("fine_temperature", 1.0)
        fine_top_k, fine_top_p = _top_k_or_none(getattr(gc, "fine_top_k", None)), getattr(gc, "fine_top_p", None)
        fine_guidance = get("fine_guidance_scale", 1.0)
        in_cluster = get("in_cluster_mask", False)
        _check_sampling(temperature, top_k, top_p, guidance)
        _check_sampling(fine_temperature, fine_top_k, fine_top_p, fine_guidance, prefix="fine_")
        if isinstance(cfg_interval, bool) or not isinstance(cfg_interval, int) or cfg_interval < -1:
            raise ValueError(f"cfg_interval={cfg_interval!r}: must be an integer >= -1 (-1 = guidance at every token)")
        if not isinstance(in_cluster, bool):
            raise TypeError(f"in_cluster_mask must be a bool, got {in_cluster!r}")
        self._require_coarse_labels()
        labels = _class_label_tensor(class_labels, batch_size, self.config.num_classes, self.config.null_class_id,
                                     self.device)
        do_sample, output_logits = bool(gc.do_sample), bool(gc.output_logits)
        coarse, coarse_logits = self.coarse_model._sample_tokens(
            labels, do_sample, temperature, top_k, top_p, float(guidance), cfg_interval, generator, progress_bar,
            output_logits)
        fine, fine_logits = self._sample_fine(coarse, labels, do_sample, fine_temperature, fine_top_k, fine_top_p,
                                              float(fine_guidance), in_cluster, generator, output_logits)
        grid = self.config.grid_size
        codes = fine.view(-1, grid, grid)
        if gc.return_dict_in_generate:
            return CTFGenerationOutput(sequences=codes, coarse_labels=coarse.view(-1, grid, grid),
                                       coarse_logits=coarse_logits, fine_logits=fine_logits)
        return codes

    @classmethod
    def from_stages(cls, coarse_model: LlamaGenForImageGeneration, fine_model: CTFAuxiliaryModel, coarse_labels,
                    centroids: torch.Tensor | None = None, codebook_dim: int | None = None,
                    **config_kwargs) -> "CTFForImageGeneration":
        """Assemble a CTF prior from separately built/trained stages and a clustering (weights are copied)."""
        c1, c2 = coarse_model.config, fine_model.config
        table = coarse_labels.fine_to_coarse if hasattr(coarse_labels, "fine_to_coarse") else torch.as_tensor(coarse_labels)
        if centroids is None and hasattr(coarse_labels, "centroids"):
            centroids = coarse_labels.centroids
        if codebook_dim is None:
            codebook_dim = centroids.shape[1] if centroids is not None else 8
        if c2.input_vocab_size != c1.vocab_size:
            raise ValueError(f"stage 2 reads {c2.input_vocab_size} coarse labels but stage 1 predicts {c1.vocab_size}")
        if table.numel() != c2.vocab_size:
            raise ValueError(f"the stage-2 model predicts {c2.vocab_size} fine codes but fine_to_coarse covers "
                             f"{table.numel()} codes")
        size_fields = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                       "intermediate_size", "rope_theta", "rms_norm_eps", "token_dropout", "attention_dropout",
                       "resid_dropout", "ffn_dropout", "drop_path_rate", "initializer_range")
        config = CTFConfig(
            coarse_config={k: getattr(c1, k) for k in size_fields},
            fine_config={k: getattr(c2, k) for k in size_fields},
            num_clusters=c1.vocab_size, codebook_size=c2.vocab_size, codebook_dim=codebook_dim,
            num_classes=c1.num_classes, grid_size=c1.grid_size, class_dropout_prob=c1.class_dropout_prob,
            **config_kwargs,
        )
        for field in _SHARED_STAGE_FIELDS:
            if getattr(c2, field) != getattr(c1, field):
                raise ValueError(f"the two stages disagree on {field}: {getattr(c1, field)} vs {getattr(c2, field)}")
        model = cls(config)
        model.coarse_model.load_state_dict(coarse_model.state_dict())
        model.fine_model.load_state_dict(fine_model.state_dict())
        model.set_coarse_labels(coarse_labels if hasattr(coarse_labels, "fine_to_coarse") else table, centroids)
        return model.to(coarse_model.dtype).eval()


AutoConfig.register(LlamaGenConfig.model_type, LlamaGenConfig, exist_ok=True)
AutoConfig.register(CTFConfig.model_type, CTFConfig, exist_ok=True)
AutoModel.register(LlamaGenConfig, LlamaGenForImageGeneration, exist_ok=True)
AutoModel.register(CTFConfig, CTFForImageGeneration, exist_ok=True)
