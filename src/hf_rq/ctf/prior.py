"""The coarse-to-fine (CTF) two-stage prior, and import aliases for LlamaGen's GPT (``hf_rq.ctf.llamagen``).

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

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, GenerationConfig, GenerationMixin, PreTrainedConfig
# diffusers finds a component's load method by looking the base classes up *in the module recorded in
# model_index.json* (getattr(module, "PreTrainedModel")), so the name must be importable from here.
from transformers import PreTrainedModel  # noqa: F401
from transformers import initialization as init
from transformers.modeling_outputs import MaskedLMOutput
from transformers.utils import ModelOutput

from ..editing import check_known_tokens
from ..sampling_args import check_compile, check_generator, prepare_generation_config, validate_generation_config

# LlamaGen's GPT moved to .llamagen; these names stay importable from here because saved pipeline folders
# (model_index.json) and older scripts record ``hf_rq.ctf.prior``.
from .llamagen import (  # noqa: F401
    LlamaGenConfig,
    LlamaGenForImageGeneration,
    LlamaGenGenerationOutput,
    LlamaGenModel,
    LlamaGenOutputHead,
    LlamaGenPreTrainedModel,
    _cfg_combine,
    _check_tokens,
    _class_label_tensor,
    llamagen_logits_to_probs,
    llamagen_top_p_logits,
    sample_by_inverse_cdf,
)

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


    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, CTFForImageGeneration):
            # Persistent buffers: a fresh model has no clustering yet (-1 = unset; generate() refuses it).
            init.constant_(module.fine_to_coarse, -1)
            init.zeros_(module.coarse_centroids)


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

    def get_input_embeddings(self) -> nn.Module:
        # Stage 1's token table: the module FSDP and other transformers tooling ask for by this name.
        return self.coarse_model.get_input_embeddings()

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
            gens = generator[lo:hi] if isinstance(generator, list) else generator  # one per image of the chunk
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
                pick = (sample_by_inverse_cdf(probs, gens) if do_sample else probs.argmax(-1)).view(hi - lo, length)
                fine[lo:hi] = idx.gather(-1, pick[..., None]).squeeze(-1)
            else:
                probs = llamagen_logits_to_probs(logits, temperature, top_k, top_p).reshape(-1, vocab)
                pick = sample_by_inverse_cdf(probs, gens) if do_sample else probs.argmax(-1)
                fine[lo:hi] = pick.view(hi - lo, length)
        return fine, (torch.cat(all_logits) if output_logits else None)

    @torch.no_grad()
    def generate(self, class_labels=None, batch_size: int | None = None,
                 generation_config: GenerationConfig | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 progress_bar=None, known_codes: torch.LongTensor | None = None,
                 known_mask: torch.BoolTensor | None = None, known_coarse_labels: torch.LongTensor | None = None,
                 known_coarse_mask: torch.BoolTensor | None = None, **kwargs):
        """Two-stage sampling: stage 1 draws the coarse labels token by token (KV cache, CFG, temperature tau1),
        then one stage-2 pass draws every fine code (temperature tau2, optional top-k / top-p / CFG / in-cluster mask).

        Args:
            class_labels, batch_size, generator, progress_bar: as in :meth:`LlamaGenForImageGeneration.generate`
                (the progress bar wraps the stage-1 loop).
            generation_config / kwargs: stage 1: ``temperature`` (tau1), ``top_k``, ``top_p``, ``guidance_scale``,
                ``cfg_interval``; stage 2: ``fine_temperature`` (tau2), ``fine_top_k``, ``fine_top_p``,
                ``fine_guidance_scale`` (1 = off), ``in_cluster_mask`` (restrict each position to the fine codes
                of its coarse label); ``do_sample=False`` makes both stages greedy; ``return_dict_in_generate``,
                ``output_logits``; ``compile`` (stage 1's decoding step, as in LlamaGen's ``generate``).
            known_codes, known_mask (`(B, grid, grid)`, *optional*): editing, stage 2: fine codes to keep (the pass
                still draws every position; known ones are replaced after it).
            known_coarse_labels, known_coarse_mask (`(B, grid, grid)`, *optional*): editing, stage 1: coarse labels
                teacher-forced in raster order while the others are sampled. When every label of the batch is known,
                stage 1 is skipped (``keep_coarse_labels``: the fine codes are redrawn in one pass).

        Random draws: stage 1 makes LlamaGen's one ``torch.multinomial`` per token; stage 2 one uniform number per
        position (:func:`sample_by_inverse_cdf`), after stage 1, from the same ``generator``. A list of generators
        (one per image) gives image ``i`` all its draws from ``generator[i]``. Argument ranges (the same in every
        family): ``hf_rq.sampling_args``; ``fine_guidance_scale`` below 1 is an error, 1 = off.

        Returns fine codes `(B, grid, grid)` int64, or a :class:`CTFGenerationOutput` with the coarse-label map.
        """
        compile_step = check_compile(kwargs.pop("compile", False))
        gc = prepare_generation_config(self, generation_config, kwargs, allowed=self._GENERATE_ARGS)
        a = validate_generation_config(gc, self._GENERATE_ARGS)  # the contract of every family (hf_rq.sampling_args)
        self._require_coarse_labels()
        labels = _class_label_tensor(class_labels, batch_size, self.config.num_classes, self.config.null_class_id,
                                     self.device)
        generator = check_generator(generator, labels.numel())
        do_sample, output_logits = a["do_sample"], a["output_logits"]
        grid = self.config.grid_size
        shape, device = (labels.numel(), grid, grid), labels.device
        known_coarse = known_fine = None
        if known_coarse_labels is not None or known_coarse_mask is not None:
            known_coarse = tuple(x.flatten(1) for x in check_known_tokens(
                known_coarse_labels, known_coarse_mask, shape, self.config.num_clusters, device))
        if known_codes is not None or known_mask is not None:
            known_fine = tuple(x.flatten(1) for x in check_known_tokens(
                known_codes, known_mask, shape, self.config.codebook_size, device))
        if known_coarse is not None and bool(known_coarse[1].all()) and not output_logits:
            coarse, coarse_logits = known_coarse[0], None
        else:
            coarse, coarse_logits = self.coarse_model._sample_tokens(
                labels, do_sample, a["temperature"], a["top_k"], a["top_p"], a["guidance_scale"], a["cfg_interval"],
                generator, progress_bar, output_logits, known_coarse, compile_step)
        fine, fine_logits = self._sample_fine(coarse, labels, do_sample, a["fine_temperature"], a["fine_top_k"],
                                              a["fine_top_p"], a["fine_guidance_scale"], a["in_cluster_mask"],
                                              generator, output_logits)
        if known_fine is not None:
            fine = torch.where(known_fine[1], known_fine[0], fine)
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


AutoConfig.register(CTFConfig.model_type, CTFConfig, exist_ok=True)
AutoModel.register(CTFConfig, CTFForImageGeneration, exist_ok=True)
