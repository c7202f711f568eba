"""The RQ-Transformer's sampler: raster order over positions, coarse to fine over the depths of each position.

:class:`RQGenerationMixin` gives :class:`~hf_rq.rq.prior.RQTransformerForImageGeneration` its ``generate()``: the
spatial transformer runs once per position on one new token, the depth transformer once per depth, each with a
preallocated key/value cache (:class:`~hf_rq.kv_cache.StaticKVCache`); classifier-free guidance, per-depth
temperature / top-k / top-p in the authors' order (:func:`draw_rq_code`), teacher-forced known codes (the
authors' ``partial_sample`` and editing) and the ``compile`` switch. It lives apart from the model so that
``prior.py`` reads as the paper's architecture and training objective, and this file as its sampling procedure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from transformers import GenerationConfig
from transformers.utils import ModelOutput

from ..editing import KnownTokens, check_known_tokens
from ..kv_cache import StaticKVCache, compile_decoding_step
from ..pipeline_utils import resolve_generation_labels
from ..sampling import multinomial_rows, nucleus_draw, top_k_logits, uniform_rows
from ..sampling_args import check_compile, check_generator, prepare_generation_config, validate_generation_config
from ..transformer_blocks import fused_qkv_projections

__all__ = ["RQGenerationMixin", "RQTransformerGenerateOutput", "draw_rq_code"]


@dataclass
class RQTransformerGenerateOutput(ModelOutput):
    """Output of :meth:`RQTransformerForImageGeneration.generate` with ``return_dict_in_generate=True``.

    Args:
        codes (`torch.LongTensor` of shape `(N, h, w, D)`): the generated codes.
        logits (`torch.FloatTensor` of shape `(N, h, w, D, K)`, *optional*): with ``output_logits=True``, the
            logits each code was drawn from (after classifier-free guidance, before temperature/top-k/top-p).
    """

    codes: torch.LongTensor | None = None
    logits: torch.FloatTensor | None = None


class RQGenerationMixin:
    """``generate()`` and its helpers, mixed into :class:`~hf_rq.rq.prior.RQTransformerForImageGeneration`."""

    def _prepare_generation(self, class_labels, batch_size, guidance_scale, text_ids=None, negative_text_ids=None):
        """Class rows `(B,)` (or text ids `(B, L)`) for the decoding batch (conditional rows, then null rows under guidance)."""
        c = self.config
        if c.is_text_conditional:
            return self._prepare_text_generation(class_labels, text_ids, negative_text_ids, batch_size, guidance_scale)
        if text_ids is not None or negative_text_ids is not None:
            raise ValueError("this model is not text-conditional (config.text_length = 0): it takes no prompt / text_ids"
                             + ("; it is class-conditional: pass class_labels" if c.num_classes else ""))
        labels = resolve_generation_labels(class_labels, batch_size, c, self.code_embeddings.device)
        use_cfg = guidance_scale > 1.0  # checked by hf_rq.sampling_args: a finite number >= 1
        if use_cfg:
            if c.num_classes == 0:
                raise ValueError("classifier-free guidance needs a class-conditional model; this one is unconditional")
            if not c.use_null_class:
                raise ValueError(
                    f"guidance_scale={guidance_scale} needs a model trained with a null class (config.use_null_class); "
                    "this model has none (the authors' models do not): leave guidance_scale at None or 1.0"
                )
            labels = torch.cat([labels, torch.full_like(labels, c.null_class_id)])
        return labels, use_cfg

    @torch.no_grad()
    def generate(
        self,
        class_labels=None,
        batch_size: int | None = None,
        generation_config: GenerationConfig | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        progress_bar: Callable | None = None,
        prefix_codes: torch.LongTensor | None = None,
        known_codes: torch.LongTensor | None = None,
        known_mask: torch.BoolTensor | None = None,
        text_ids: torch.LongTensor | None = None,
        negative_text_ids: torch.LongTensor | None = None,
        **kwargs,
    ):
        r"""Sample code grids `(N, h, w, D)`: raster order over positions, coarse to fine inside a position.

        The spatial transformer runs once per position on one new token, with a preallocated
        (:class:`~hf_rq.kv_cache.StaticKVCache`) cache of keys and values (the prefix is never re-embedded nor
        re-run); the depth transformer runs one token per depth with a short cache that is rewound at every
        position.

        Args:
            class_labels: ids or names (``config.id2label``), one per image; None for an unconditional model.
            batch_size (`int`, *optional*): number of images of an unconditional model (default 1).
            generation_config (`GenerationConfig`, *optional*): defaults to ``self.generation_config``; keyword
                arguments override it: ``do_sample`` (False = arg-max; unset = sample), ``temperature``, ``top_k``, ``top_p``
                (each a number or a per-depth list; the authors' order: temperature, top-k on logits, softmax,
                top-p; None / 0 switch top-k off), ``guidance_scale`` (None or a number >= 1; 1 = off, ``s > 1``
                classifier-free guidance ``u + s * (c - u)``, which needs ``config.use_null_class``; below 1 is an
                error in every family, see ``hf_rq.sampling_args``), ``use_cache`` (False re-runs both transformers on the whole prefix
                at every step; for testing and benchmarks), ``output_logits`` and ``return_dict_in_generate``.
                ``compile`` (default False): ``True`` (or a dict of ``torch.compile`` arguments, e.g.
                ``{"mode": "reduce-overhead"}`` for CUDA graphs) compiles the two decoding steps over fixed-shape
                caches; the first call pays the compilation. Eager is the default.
            generator (`torch.Generator` or a list of them, *optional*): source of randomness for the draws; a list
                holds one generator per image, and image ``i`` draws only from ``generator[i]`` (the same image
                whatever else is in the batch).
            progress_bar (`Callable`, *optional*): wraps the iterable over spatial positions (pipelines pass
                ``self.progress_bar``).
            prefix_codes (`torch.LongTensor` of shape `(N, P, D)` in raster order, or `(N, h, w, D)`, *optional*):
                codes of the first ``P`` positions to keep (teacher-forced through the same cached path);
                sampling continues after them (the authors' ``partial_sample`` / ``start_loc``).
            known_codes (`torch.LongTensor` of shape `(N, h, w, D)`), known_mask (`torch.BoolTensor`, same shape),
                *optional*: editing. Codes where ``known_mask`` is True are kept and teacher-forced through the same
                cached path; the others are sampled in the usual order, each seeing only what precedes it. A draw
                is skipped where every image of the batch knows the code, so an all-False mask draws exactly as
                unconditional sampling and an all-True mask returns ``known_codes`` without drawing.
            text_ids (`torch.LongTensor` of shape `(N, text_length)`, *optional*): a text-conditional model's
                captions (the pipeline's ``tokenizer`` makes them from ``prompt``).
            negative_text_ids (`torch.LongTensor` of shape `(N, text_length)`, *optional*): the unconditional branch
                of guidance instead of the null text (``negative_prompt``); needs ``guidance_scale > 1``.

        Returns:
            `torch.LongTensor` `(N, h, w, D)`, or :class:`RQTransformerGenerateOutput` with
            ``return_dict_in_generate=True``.
        """
        compile_step = check_compile(kwargs.pop("compile", False))
        gc = prepare_generation_config(self, generation_config, kwargs)
        c = self.config
        D, T, K = c.code_depth, c.num_positions, c.codebook_size
        # One contract for every family (hf_rq.sampling_args); do_sample unset (None) samples.
        args = validate_generation_config(gc, ("do_sample", "temperature", "top_k", "top_p", "guidance_scale", "use_cache",
                                               "output_logits", "return_dict_in_generate"), D)
        do_sample, temperatures, top_ks, top_ps = (args[k] for k in ("do_sample", "temperature", "top_k", "top_p"))
        if not self.code_embeddings.any():
            raise ValueError("the prior's codebook copy is empty: fill it with load_codebook_from(vqvae) first")
        rows, use_cfg = self._prepare_generation(class_labels, batch_size, args["guidance_scale"], text_ids,
                                                 negative_text_ids)
        N = rows.shape[0] // (2 if use_cfg else 1)
        generator = check_generator(generator, N)
        device = rows.device

        codes = torch.zeros(N, T, D, dtype=torch.long, device=device)
        known = torch.zeros(N, T, D, dtype=torch.bool, device=device)
        if known_codes is not None or known_mask is not None:
            shape = (N, c.grid_height, c.grid_width, D)
            codes, known = check_known_tokens(known_codes, known_mask, shape, K, device)
            codes, known = codes.reshape(N, T, D), known.reshape(N, T, D)
        if prefix_codes is not None:
            if prefix_codes.ndim == 4:
                prefix_codes = prefix_codes.reshape(prefix_codes.shape[0], -1, prefix_codes.shape[-1])
            if (prefix_codes.ndim != 3 or prefix_codes.shape[0] != N or prefix_codes.shape[-1] != D
                    or prefix_codes.shape[1] > T):
                raise ValueError(f"prefix_codes must have shape ({N}, P <= {T}, {D}) or ({N}, {c.grid_height}, "
                                 f"{c.grid_width}, {D}), got {tuple(prefix_codes.shape)}")
            if prefix_codes.is_floating_point() or (prefix_codes.numel() and (prefix_codes.min() < 0 or prefix_codes.max() >= K)):
                raise ValueError(f"prefix_codes must be integer codes in [0, {K})")
            num_prefix = prefix_codes.shape[1]
            codes[:, :num_prefix] = prefix_codes.to(device)
            known[:, :num_prefix] = True
        logits_out = (torch.empty(N, T, D, K, device=device, dtype=torch.float32)
                      if gc.output_logits else None)

        filters = [(temperatures[d], top_ks[d], top_ps[d]) for d in range(D)]
        decode_args = (rows, codes, KnownTokens(known), logits_out, filters, do_sample,
                       args["guidance_scale"] if use_cfg else None, generator, progress_bar)
        if gc.use_cache is not False:
            with fused_qkv_projections(self.spatial_transformer, self.depth_transformer):
                self._decode_cached(*decode_args, compile_step=compile_step)
        elif compile_step:
            raise ValueError("compile=True needs the cached decoding path (use_cache=False re-runs whole prefixes)")
        else:
            self._decode_uncached(*decode_args)

        codes = codes.reshape(N, c.grid_height, c.grid_width, D)
        if not gc.return_dict_in_generate:
            return codes
        if logits_out is not None:
            logits_out = logits_out.reshape(N, c.grid_height, c.grid_width, D, K)
        return RQTransformerGenerateOutput(codes=codes, logits=logits_out)

    def _choose(self, logits, codes, logits_out, t, d, known, filters, do_sample, guidance_scale, generator):
        """Guidance, filtering and the draw for position ``t``, depth ``d``; returns the code `(N,)`."""
        if guidance_scale is not None:
            cond, uncond = logits.float().chunk(2)
            logits = uncond + guidance_scale * (cond - uncond)
        if logits_out is not None:
            logits_out[:, t, d] = logits
        if known.all[t][d]:
            return codes[:, t, d]
        code = draw_rq_code(logits, *filters[d], generator=generator, do_sample=do_sample)
        if known.any[t][d]:
            code = torch.where(known.mask[:, t, d], codes[:, t, d], code)
        codes[:, t, d] = code
        return code

    def _decode_cached(self, rows, codes, known, logits_out, filters, do_sample, guidance_scale, generator,
                       progress_bar, compile_step=False):
        N, T, D = codes.shape
        B = rows.shape[0]
        dup = 2 if guidance_scale is not None else 1
        # Hoisted out of the loop: per-step slicing of parameters costs Python time on every one of T*D steps.
        spatial_pos = self.spatial_position_embedding[0, :, None]  # (T, 1, E)
        depth_pos = self.depth_position_embedding[0, :, None]  # (D, 1, E)
        proj_in, proj_depth = self.spatial_input_proj, self.depth_input_proj
        head_norm, head = self.final_layer_norm, self.lm_head
        depth_stack, spatial_stack = self.depth_transformer, self.spatial_transformer

        # Both caches are allocated once per call and written in place; the spatial one also holds the S start
        # tokens (class / start token, or the text prefix). The depth cache lives for one position: it is rewound,
        # not reallocated, at the next one.
        x = self._start_embeddings(rows)  # (B, S, E)
        dtype, device = spatial_pos.dtype, rows.device
        fixed = bool(compile_step)
        cache = StaticKVCache.for_stack(spatial_stack.blocks, B, x.shape[1] + T - 1, dtype, device, fixed)
        depth_cache = StaticKVCache.for_stack(depth_stack.blocks, B, D, dtype, device, fixed)

        def spatial_step(x):
            return spatial_stack(x, past_key_values=cache)

        def depth_step(y):
            return head(head_norm(depth_stack(y, past_key_values=depth_cache)[:, 0]))

        spatial_step = compile_decoding_step(spatial_step, compile_step)
        depth_step = compile_decoding_step(depth_step, compile_step)

        if fixed and x.shape[1] > 1:
            # A fixed-shape step takes one token: the text prefix enters token by token (the same causal attention).
            for j in range(x.shape[1] - 1):
                spatial_step(x[:, j:j + 1])
            x = x[:, -1:]
        # Written in place at every step instead of fresh tensors, list appends, stack and cat: the position's
        # codewords (guidance rows duplicated), the running sum of the chosen ones (the next depth slot reads its
        # projection) and the next input of each stack. Same additions in the same order as the formulas.
        codewords = torch.empty(B, D, self.code_embeddings.shape[-1], dtype=dtype, device=device)
        running = torch.empty_like(codewords[:, 0])
        depth_in = torch.empty(B, spatial_pos.shape[-1], dtype=dtype, device=device)
        spatial_in = torch.empty_like(depth_in)
        positions = range(T) if progress_bar is None else progress_bar(range(T))
        for t in positions:
            context = spatial_step(x)[:, -1:]  # (B, 1, E): only the new tokens run
            need_depth = not known.step_all[t] or logits_out is not None
            if need_depth:
                depth_cache.rewind()
                y = context + depth_pos[0]
                for d in range(D):
                    logits = depth_step(y)
                    code = self._choose(logits, codes, logits_out, t, d, known, filters, do_sample,
                                        guidance_scale, generator)
                    codewords[:N, d] = self._embed_depth(code, d)
                    if dup == 2:
                        codewords[N:, d] = codewords[:N, d]
                    if d < D - 1:
                        if d == 0:
                            running.copy_(codewords[:, 0])
                        else:
                            running.add_(codewords[:, d])
                        y = torch.add(proj_depth(running), depth_pos[d + 1], out=depth_in)[:, None]
            else:
                codewords[:N] = self.embed_codes(codes[:, t])
                if dup == 2:
                    codewords[N:] = codewords[:N]
            if t < T - 1:
                x = torch.add(proj_in(codewords).sum(dim=1), spatial_pos[t], out=spatial_in)[:, None]

    def _decode_uncached(self, rows, codes, known, logits_out, filters, do_sample, guidance_scale, generator,
                         progress_bar):
        """Reference path without caches: both transformers re-run the whole prefix at every step."""
        N, T, D = codes.shape
        start = self._start_embeddings(rows)
        positions = range(T) if progress_bar is None else progress_bar(range(T))
        for t in positions:
            prefix = codes[:, :t]
            if guidance_scale is not None:
                prefix = torch.cat([prefix, prefix])
            x = self.spatial_input_proj(self.embed_codes(prefix)).sum(dim=-2) + self.spatial_position_embedding[:, :t]
            context = self.spatial_transformer(torch.cat([start, x], dim=1))[:, -1]
            for d in range(D):
                own = codes[:, t, :d]
                if guidance_scale is not None:
                    own = torch.cat([own, own])
                slots = [context[:, None]]
                if d:
                    cw = torch.stack([self._embed_depth(own[:, j], j) for j in range(d)], dim=1)
                    slots.append(self.depth_input_proj(cw.cumsum(dim=1)))
                y = torch.cat(slots, dim=1) + self.depth_position_embedding[:, : d + 1]
                logits = self.lm_head(self.final_layer_norm(self.depth_transformer(y)[:, -1]))
                self._choose(logits, codes, logits_out, t, d, known, filters, do_sample, guidance_scale,
                             generator)


def draw_rq_code(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 generator=None, do_sample: bool = True) -> torch.LongTensor:
    """One code per row of `logits` `(B, K)` with the RQ authors' filters; returns `(B,)`.

    Draws from exactly the distribution of ``sampling.rq_filter_probs`` (temperature, top-k on logits,
    softmax, top-p dropping a token once the sorted mass before it reaches ``p``), but in one pass: the
    nucleus is a prefix of the sorted probabilities, so a single uniform number is located in their
    cumulative sum (already needed for the nucleus), instead of masking, scattering back, renormalising
    and letting ``torch.multinomial`` sort out a second cumulative sum (:func:`hf_rq.sampling.nucleus_draw`,
    which at large K sorts only the two small stretches of the row where the nucleus ends and the number lands).
    ``do_sample=False`` is the arg-max (the filters keep the maximum).
    ``generator``: one ``torch.Generator`` or a list with one per row (``hf_rq.sampling.uniform_rows``).
    """
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    probs = torch.softmax(top_k_logits(logits, top_k), dim=-1)
    if top_p is None:
        return multinomial_rows(probs, generator)  # drawn where the generator lives
    return nucleus_draw(probs, top_p, uniform_rows(probs.shape[0], generator, probs.device))
