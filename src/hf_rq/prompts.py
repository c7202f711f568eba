"""The ``prompt`` interface shared by every pipeline that takes text (and by those that do not, for their errors).

A pipeline ``__call__`` that accepts ``prompt`` / ``negative_prompt`` / ``num_images_per_prompt`` calls, in order:

1. :func:`check_conditioning_kind` -- a prompt for a class-conditional model, class labels for a text model,
   or neither for a model that needs one, are refused with one message for every family;
2. :func:`prepare_prompts` -- validates the prompt(s) and negative prompt(s) and repeats each
   ``num_images_per_prompt`` times in place (``[a, a, b, b]``, the order of diffusers pipelines);
3. :func:`tokenize_prompts` -- for a transformers tokenizer: padding to the tokenizer's context, truncation
   with a warning that names the prompt (text encoders may instead take the ids further).

Guidance rules (``guidance_scale``, finite and >= 1, 1 = off) are in ``hf_rq.sampling_args``; a
``negative_prompt`` without ``guidance_scale > 1`` is refused by :func:`prepare_prompts` (it would be ignored).
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

logger = logging.getLogger("hf_rq")

__all__ = ["check_conditioning_kind", "prepare_prompts", "tokenize_prompts"]


def check_conditioning_kind(prompt, class_labels, *, text_conditional: bool, num_classes: int = 0) -> None:
    """Refuse a conditioning the model cannot take, naming what to pass instead.

    Args:
        prompt: the caller's ``prompt`` (None when not given).
        class_labels: the caller's ``class_labels`` (None when not given).
        text_conditional: whether the model reads text.
        num_classes: the model's number of classes (0: unconditional or text-conditional).
    """
    if text_conditional:
        if class_labels is not None:
            raise ValueError("this model is text-conditional: pass prompt='...' (a string or a list of strings), "
                             "not class_labels")
        if prompt is None:
            raise ValueError("this model is text-conditional: pass prompt='...' (a string or a list of strings)")
        return
    if prompt is not None:
        kind = (f"class-conditional ({num_classes} classes): pass class_labels (ids or names)" if num_classes
                else "unconditional: call it without prompt")
        raise ValueError(f"this model takes no prompt: it is {kind}")


def _as_prompt_list(value, name: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, Sequence) or isinstance(value, (bytes, bytearray)):
        raise TypeError(f"{name} must be a string or a list of strings, got {type(value).__name__}")
    if len(value) == 0:
        raise ValueError(f"{name} is an empty list: give at least one string")
    bad = [i for i, v in enumerate(value) if not isinstance(v, str)]
    if bad:
        raise TypeError(f"{name}[{bad[0]}] is a {type(value[bad[0]]).__name__}, not a string")
    return list(value)


def prepare_prompts(prompt, negative_prompt=None, num_images_per_prompt: int = 1,
                    guidance_scale: float | None = None) -> tuple[list[str], list[str] | None]:
    """Validated prompts, repeated for ``num_images_per_prompt``: ``(prompts, negative_prompts or None)``.

    Args:
        prompt: a string or a non-empty list of strings (the empty string is a valid, empty caption).
        negative_prompt: None, a string (for every prompt) or a list with one string per prompt.
        num_images_per_prompt: a positive integer; each prompt (and its negative) is repeated in place.
        guidance_scale: the caller's value (already checked by ``hf_rq.sampling_args``); a negative prompt
            needs one above 1, since without guidance it would have no effect.
    """
    n = num_images_per_prompt
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")
    prompts = _as_prompt_list(prompt, "prompt")
    negatives = None
    if negative_prompt is not None:
        if guidance_scale is None or guidance_scale <= 1:
            raise ValueError("negative_prompt acts only through classifier-free guidance: pass guidance_scale > 1 "
                             "too (for a model trained with caption dropout)")
        negatives = _as_prompt_list(negative_prompt, "negative_prompt")
        if len(negatives) == 1 and len(prompts) > 1:
            negatives = negatives * len(prompts)
        if len(negatives) != len(prompts):
            raise ValueError(f"negative_prompt has {len(negatives)} entries for {len(prompts)} prompts: give one, "
                             "or one per prompt")
        negatives = [p for p in negatives for _ in range(n)]
    return [p for p in prompts for _ in range(n)], negatives


def tokenize_prompts(tokenizer, prompts: list[str], max_length: int | None = None, device=None) -> torch.LongTensor:
    """Token ids `(len(prompts), max_length)` from a transformers tokenizer: padded to ``max_length`` (default the
    tokenizer's ``model_max_length``) and truncated on the tokenizer's side, with a warning naming each
    truncated prompt (the authors truncate silently)."""
    length = max_length or tokenizer.model_max_length
    full = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    for text, ids in dict(zip(prompts, full)).items():
        if len(ids) > length:
            logger.warning(f"prompt {text[:60]!r} has {len(ids)} text tokens; the model reads {length}: truncated")
    ids = tokenizer(prompts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")["input_ids"]
    return ids.to(device) if device is not None else ids
