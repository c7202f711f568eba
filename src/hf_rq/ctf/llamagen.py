"""LlamaGen's class-conditional GPT (Sun et al., 2024) as a transformers model, and its sampler.

A class token (with a null class for classifier-free guidance) is followed by the image tokens in raster
order; Llama-style blocks (``hf_rq.llama_blocks``) and an untied output head. ``generate()`` reproduces
LlamaGen's sampler token for token (KV cache, CFG formula and ``cfg_interval``, temperature / top-k / top-p in
LlamaGen's order, one ``torch.multinomial`` draw per token).

It is the CTF family's baseline and CTF's stage 1 (``hf_rq.ctf.prior`` builds the coarse-to-fine prior on it),
so it lives in the CTF folder; ``hf_rq.ctf.prior`` keeps import aliases for every name here because saved
pipelines record the module path ``hf_rq.ctf.prior``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, GenerationConfig, GenerationMixin, PreTrainedConfig
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import ModelOutput

from ..editing import check_known_tokens
from ..hub import BundledModelsMixin
from ..kv_cache import StaticKVCache, compile_decoding_step, stack_attention_mask
from ..llama_blocks import LlamaGenBlock, LlamaRMSNorm, llamagen_ffn_hidden_size, precompute_2d_rotary
from ..sampling import sample_tokens, top_k_logits, uniform_rows
from ..sampling_args import check_compile, check_generator, prepare_generation_config, validate_generation_config

__all__ = [
    "LlamaGenConfig",
    "LlamaGenForImageGeneration",
    "LlamaGenGenerationOutput",
    "LlamaGenModel",
    "LlamaGenPreTrainedModel",
    "llamagen_logits_to_probs",
    "llamagen_top_p_logits",
    "sample_by_inverse_cdf",
]

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


def sample_by_inverse_cdf(probs: torch.Tensor, generator=None) -> torch.LongTensor:
    """One draw per row of `probs` `(R, V)` from a single uniform number per row (inverse CDF); returns `(R,)`.

    Same distribution as ``torch.multinomial(probs, 1)``, which on CPU draws one exponential number per
    *entry*: for CTF's stage 2 (every position of every image over the whole codebook at once) that is
    most of the sampling time. ``right=True`` never lands on a zero-probability entry. ``generator``: one
    ``torch.Generator``, or a list of ``G`` whose ``i``-th draws the ``i``-th of ``G`` equal blocks of rows (one image's).
    """
    cdf = probs.float().cumsum(dim=-1)
    u = uniform_rows(cdf.shape[0], generator, cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


def _cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    # LlamaGen's formula, with its operation order (bit-level parity of the seeded draws depends on it).
    return uncond + (cond - uncond) * scale


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
        table = self.rotary_table(inputs_embeds.device)
        mask = stack_attention_mask(past_key_values, None)
        if mask is not None:
            # a fixed-shape cache (compiled decoding): one token at a position held on the device
            rotary = table.index_select(0, past_key_values.position)
        else:
            start = past_key_values.get_seq_length() if past_key_values is not None else 0
            length = inputs_embeds.shape[1]
            if start + length > table.shape[0]:
                raise ValueError(f"sequence of {start + length} positions exceeds the model's 1 + grid_size**2 = "
                                 f"{table.shape[0]} positions")
            rotary = table[start:start + length]
        hidden = self.token_dropout(inputs_embeds)
        all_hidden = [hidden] if output_hidden_states else None
        for layer in self.layers:
            hidden = layer(hidden, rotary, past_key_values=past_key_values, attention_mask=mask)
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
                       guidance_scale: float, cfg_interval: int, generator, progress_bar, output_logits: bool,
                       known: tuple[torch.LongTensor, torch.BoolTensor] | None = None, compile_step=False):
        """LlamaGen's sampler: `(B,)` labels -> tokens `(B, grid**2)` (+ step logits `(B, N, V)` or None).

        ``known = (tokens, mask)`` `(B, N)` (editing): a known token replaces the draw and is fed on, so it is
        teacher-forced through the same cache; the draws themselves are unchanged. Keys and values live in a
        :class:`~hf_rq.kv_cache.StaticKVCache` sized for the whole sequence; ``compile_step`` (see
        ``generate(compile=...)``) compiles the one-token decoding step over a fixed-shape cache.
        """
        batch = class_labels.shape[0]
        null_id = self.config.null_class_id
        if guidance_scale > 1.0 and null_id is None:
            raise ValueError("guidance_scale > 1 needs a null class, but this model was built without one "
                             "(class_dropout_prob = 0)")
        # All-null (unconditional) batches gain nothing from guidance: cond and uncond rows would be equal.
        use_cfg = guidance_scale > 1.0 and bool((class_labels != null_id).any())
        labels = torch.cat([class_labels, torch.full_like(class_labels, null_id)]) if use_cfg else class_labels
        doubled = use_cfg
        # sequence = class token + the first N - 1 image tokens
        cache = StaticKVCache.for_stack(self.model.layers, labels.shape[0], self.config.num_image_tokens,
                                        self.dtype, labels.device, fixed_shape=bool(compile_step))
        decode_step = compile_decoding_step(lambda embeds: self._decode_step(embeds, cache), compile_step)
        tokens = torch.empty(batch, self.config.num_image_tokens, dtype=torch.long, device=class_labels.device)
        step_logits = [] if output_logits else None
        steps = range(self.config.num_image_tokens)
        if progress_bar is not None:
            steps = progress_bar(steps)
        next_token = None
        for t in steps:
            if t == 0:
                logits = decode_step(self.model.embed_classes(labels))[:, -1]
            else:
                inputs = next_token[:, None]
                if doubled:
                    inputs = torch.cat([inputs, inputs])
                logits = decode_step(self.model.embed_tokens(inputs))[:, -1]
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
            if known is not None:
                next_token = torch.where(known[1][:, t], known[0][:, t], next_token)
            tokens[:, t] = next_token
        return tokens, (torch.stack(step_logits, dim=1) if output_logits else None)

    @torch.no_grad()
    def generate(self, class_labels=None, batch_size: int | None = None,
                 generation_config: GenerationConfig | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 progress_bar=None, known_codes: torch.LongTensor | None = None,
                 known_mask: torch.BoolTensor | None = None, **kwargs):
        """Sample image tokens.

        Args:
            class_labels: class ids `(B,)` (list or tensor). ``None`` samples unconditionally from the null
                class (give ``batch_size``).
            generation_config: defaults (``self.generation_config`` if None); ``kwargs`` override a copy:
                ``do_sample`` (False = greedy; unset = sample), ``temperature``, ``top_k`` (None or 0 = off),
                ``top_p`` (None or 1.0 = off), ``guidance_scale`` (None or >= 1: LlamaGen's CFG
                ``uncond + s (cond - uncond)``, applied when ``> 1``; below 1 is an error, as in every family),
                ``cfg_interval`` (-1 = always; ``c`` keeps CFG for tokens ``0 .. c + 1``), ``return_dict_in_generate``,
                ``output_logits``. Ranges: ``hf_rq.sampling_args``. ``compile`` (default False): ``True`` or a dict of
                ``torch.compile`` arguments (e.g. ``{"mode": "reduce-overhead"}``) compiles the decoding step over a
                fixed-shape cache (the first call pays the compilation).
            generator: a ``torch.Generator`` (the draws happen on its device); the only random draws are one
                ``torch.multinomial`` per token on the `(B, vocab)` probabilities, so a generator seeded like
                ``torch.manual_seed(s)`` reproduces LlamaGen's samples. A list of ``B`` generators gives each image
                its own (image ``i`` draws its row from ``generator[i]``: the same image whatever the batch).
            progress_bar: optional callable wrapping the loop over token positions.
            known_codes, known_mask: `(B, grid, grid)` codes and bool mask (editing): known codes are kept and
                teacher-forced; the others are sampled in raster order, seeing only the tokens before them. Every
                step still makes its draw, so an all-False mask samples exactly as without it.

        Returns codes `(B, grid, grid)` int64, or a :class:`LlamaGenGenerationOutput`.
        """
        compile_step = check_compile(kwargs.pop("compile", False))
        gc = prepare_generation_config(self, generation_config, kwargs, allowed=self._GENERATE_ARGS)
        a = validate_generation_config(gc, self._GENERATE_ARGS)  # the contract of every family (hf_rq.sampling_args)
        labels = _class_label_tensor(class_labels, batch_size, self.config.num_classes, self.config.null_class_id,
                                     self.device)
        generator = check_generator(generator, labels.numel())
        grid = self.config.grid_size
        known = None
        if known_codes is not None or known_mask is not None:
            codes, mask = check_known_tokens(known_codes, known_mask, (labels.numel(), grid, grid),
                                             self.config.vocab_size, labels.device)
            known = (codes.flatten(1), mask.flatten(1))
        tokens, logits = self._sample_tokens(labels, a["do_sample"], a["temperature"], a["top_k"], a["top_p"],
                                             a["guidance_scale"], a["cfg_interval"], generator, progress_bar,
                                             a["output_logits"], known, compile_step)
        codes = tokens.view(-1, grid, grid)
        if gc.return_dict_in_generate:
            return LlamaGenGenerationOutput(sequences=codes, logits=logits)
        return codes


AutoConfig.register(LlamaGenConfig.model_type, LlamaGenConfig, exist_ok=True)
AutoModel.register(LlamaGenConfig, LlamaGenForImageGeneration, exist_ok=True)
