"""The DQ-Transformer's sampler: coarse then fine, position then content at every step (Huang et al., CVPR 2023).

:class:`DQGenerationMixin` gives :class:`~hf_rq.dq.prior.DQTransformerForImageGeneration` its ``generate()``. It
reproduces the authors' sampler (``Dualformer.sample_from_scratch``) token for token, quirks included (each is
named where it is implemented), with a preallocated key/value cache on each stack (:class:`_CachedEngine`);
``use_cache=False`` re-runs both stacks on the whole prefix at every step, as the authors do (:class:`_FullEngine`).
It lives apart from the model so that ``prior.py`` reads as the paper's architecture and training objective, and
this file as its sampling procedure.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from transformers import GenerationConfig
from transformers.utils import ModelOutput

from ..kv_cache import StaticKVCache
from ..pipeline_utils import resolve_generation_labels
from ..sampling import sample_tokens, top_k_logits
from ..sampling_args import check_generator, prepare_generation_config, validate_generation_config
from ..transformer_blocks import fused_qkv_projections
from .editing import DQKnownTokens
from .text_conditioning import check_text_features
from .tokens import DQTokens, tokens_to_codes, upsample_granularity

if TYPE_CHECKING:
    from .prior import DQTransformerForImageGeneration

__all__ = ["DQ_GENERATION_DEFAULTS", "DQGenerationMixin", "DQTransformerGenerateOutput", "authors_top_p"]

# generate() options beyond the standard GenerationConfig fields (saved with generation_config.json).
DQ_GENERATION_DEFAULTS = dict(position_top_k=None, position_top_p=1.0, fix_fine_position=False)


@dataclass
class DQTransformerGenerateOutput(ModelOutput):
    """Output of :meth:`DQTransformerForImageGeneration.generate` with ``return_dict_in_generate=True``.

    Args:
        codes (`torch.LongTensor` of shape `(B, hf, hf)`): the code map (fine cells never sampled are code 0).
        granularity (`torch.LongTensor` of shape `(B, hc, hc)`): 0 = coarse, 1 = fine.
        tokens (:class:`~hf_rq.dq.tokens.DQTokens`): the sampled sequences without start tokens, as the
            authors' sampler returns them (each part ends with its end position, paired with content ``K``).
        position_scores / content_scores (`tuple[torch.FloatTensor]`, *optional*): with ``output_scores=True``,
            the logits `(B, V)` of every step (after classifier-free guidance, before temperature and masks).
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


class DQGenerationMixin:
    """``generate()`` and its helpers, mixed into :class:`~hf_rq.dq.prior.DQTransformerForImageGeneration`."""

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
                The ranges are every family's (``hf_rq.sampling_args``): top-k None / 0 = off. ``guidance_scale``
                (None or a number >= 1; 1 = off): ``s > 1`` is classifier-free guidance ``u + s * (c - u)`` on the
                position and the content logits alike, before temperature and filters; it needs a model with a
                null class (``config.use_null_class``; the authors' models have none).
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
        gc = prepare_generation_config(self, generation_config, kwargs, defaults=DQ_GENERATION_DEFAULTS)
        args = validate_generation_config(gc, ("do_sample", "temperature", "top_k", "top_p", "position_top_k",
                                               "position_top_p", "guidance_scale", "fix_fine_position", "use_cache",
                                               "output_scores", "return_dict_in_generate"))
        c, v = self.config, self.config.vocabulary
        scale = args["guidance_scale"]
        use_cfg = scale > 1.0  # checked by hf_rq.sampling_args: a finite number >= 1
        if use_cfg and not c.use_null_class:
            kind = ("text-conditional (no null text)" if c.text_feature_size else "unconditional" if not c.num_classes
                    else "class-conditional without a null class (as the authors' models)")
            raise ValueError(f"guidance_scale={gc.guidance_scale!r}: classifier-free guidance needs a DQ-Transformer "
                             f"trained with a null class (config.use_null_class, class dropout); this one is {kind}: "
                             "leave guidance_scale at None or 1")
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

        # Guidance: rows B.. of the decoding batch are the same images under the null class. They are fed the
        # tokens drawn for rows ..B, so the sampling state (masks, end flags, editing) is kept for the B images only.
        rows = torch.cat([ids, torch.full_like(ids, c.null_class_id)]) if use_cfg else ids

        def guided(logits):
            if not use_cfg:
                return logits
            cond, uncond = logits.chunk(2)
            return uncond + scale * (cond - uncond)

        def both(token):
            return torch.cat([token, token]) if use_cfg else token

        def choose(logits, allowed, k, p):
            # The authors' order: temperature, masks (applied by the caller), top-k, softmax, top-p, draw.
            logits = top_k_logits(logits.masked_fill(~allowed, float("-inf")), k)
            probs = authors_top_p(torch.softmax(logits, dim=-1), p)
            return sample_tokens(probs, generator, do_sample)

        # One q/k/v matmul per attention while decoding with the caches (hf_rq.transformer_blocks:
        # fused_qkv_projections, bit-identical); the uncached engine stays the authors' three matmuls.
        cached = gc.use_cache is not False
        with fused_qkv_projections(self.position_transformer, self.content_transformer) if cached else nullcontext():
            known = None
            if known_codes is not None or known_granularity is not None or known_regions is not None:
                if known_codes is None or known_granularity is None or known_regions is None:
                    raise ValueError("editing needs known_codes, known_granularity and known_regions together")
                if known_codes.shape[0] != B:
                    raise ValueError(f"known_codes holds {known_codes.shape[0]} images for a batch of {B}")
                known = DQKnownTokens(known_codes.to(device), known_granularity.to(device), known_regions, v,
                                      c.fine_position_order)
            engine = _CachedEngine(self, rows.numel(), prefix) if cached else _FullEngine(self, prefix)
            scores = ([], []) if gc.output_scores else None
            content_start, coarse_start, fine_start = v.start_tokens(rows)
            seq = _Sequence(content_start, coarse_start)
            coarse_start = coarse_start[:B]
            index = torch.arange(v.fine_position_vocab_size, device=device)
            content_index = torch.arange(v.content_vocab_size, device=device)
            content_open = content_index < c.codebook_size  # never the pad K, the end K+1 or a class token
            content_pad_only = content_index == v.content_pad
            steps = range(v.num_coarse_positions + v.num_fine_positions + 2)
            steps = iter(steps if progress_bar is None else progress_bar(steps))

            def content_step(hidden_rows, next_position, finished):
                g = engine.content_hidden(seq, hidden_rows, both(next_position))
                logits = guided(self.content_head(self.content_norm(g)).float())
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
                logits = guided(self.position_head(self.position_norm(h[:, -1])).float())
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
                seq.content.append(both(code))
                seq.position.append(both(position))

            # ---- fine phase
            num_coarse = seq.length
            coarse_cells = torch.stack(seq.position[1:], 1)[:B]
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
                    logits = guided(self.position_head(self.position_norm(h[:, -1])).float())
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
                seq.content.append(both(code))
                seq.position.append(both(position))
                j += 1

            tokens = DQTokens(
                coarse_content=torch.stack(seq.content[1:num_coarse], 1)[:B],
                coarse_position=torch.stack(seq.position[1:num_coarse], 1)[:B],
                fine_content=torch.stack(seq.content[num_coarse + 1:], 1)[:B],
                fine_position=torch.stack(seq.position[num_coarse + 1:], 1)[:B],
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
