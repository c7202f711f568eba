"""Token sampling utilities shared by the priors.

Every sampler takes a ``torch.Generator`` so the same seed gives the same images. The filters follow
the authors' order, which differs between families, so each is a separate small function:

* RQ-Transformer (``rq_filter_probs``): temperature, top-k on logits (ties at the k-th value kept),
  softmax, then top-p on probabilities dropping a token once the mass *before* it reaches ``p``.
* LlamaGen / CTF: see ``hf_rq.ctf``; they reuse :func:`top_k_logits` and :func:`sample_tokens`.
"""

from __future__ import annotations

import torch


def top_k_logits(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    """Keep logits ``>=`` the k-th largest along the last axis (ties kept); others become -inf."""
    if k is None or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_probs(probs: torch.Tensor, p: float | None) -> torch.Tensor:
    """Nucleus filter on probabilities: drop a token once the sorted mass before it reaches ``p``.

    The top-1 token always survives. Runs even for ``p = 1.0`` (as the RQ authors do), where float
    rounding may drop a tail of near-zero tokens. Returns renormalised probabilities.
    """
    if p is None:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= p, 0.0)
    filtered = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return filtered / filtered.sum(dim=-1, keepdim=True)


def rq_filter_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                    top_p: float | None = None) -> torch.Tensor:
    """The RQ-Transformer's per-step filter: logits `(B, K)` -> sampling probabilities `(B, K)`."""
    logits = logits.float() / temperature
    probs = torch.softmax(top_k_logits(logits, top_k), dim=-1)
    return top_p_probs(probs, top_p)


def sample_tokens(probs: torch.Tensor, generator: torch.Generator | None = None, do_sample: bool = True) -> torch.LongTensor:
    """Draw one token per row of `probs` `(B, K)` (arg-max when ``do_sample=False``); returns `(B,)`."""
    if not do_sample:
        return probs.argmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def per_depth(value, depth: int, name: str, check=None) -> list:
    """Expand a scalar or per-depth list to a list of length ``depth``, validating each entry.

    ``check(v)`` returns an error message for a bad entry, or None.
    """
    values = list(value) if isinstance(value, (list, tuple)) else [value] * depth
    if len(values) != depth:
        raise ValueError(f"{name} was given as a list of length {len(values)}; it must have one entry per code depth ({depth})")
    if check is not None:
        for v in values:
            message = check(v)
            if message:
                raise ValueError(f"{name}={v!r}: {message}")
    return values


def check_temperature(v) -> str | None:
    if v is None:
        return None
    if not isinstance(v, (int, float)) or v <= 0:
        return "temperature must be a positive number"
    return None


def check_top_k(v) -> str | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        return "top_k must be a positive integer (or None for no top-k)"
    return None


def check_top_p(v) -> str | None:
    if v is None:
        return None
    if not isinstance(v, (int, float)) or not 0 < v <= 1:
        return "top_p must be in (0, 1] (or None for no top-p)"
    return None


def validate_sampling_args(temperature, top_k, top_p, depth: int = 1) -> tuple[list, list, list]:
    """Validate and expand temperature / top_k / top_p (numbers or per-depth lists) to per-depth lists."""
    return (
        per_depth(temperature, depth, "temperature", check_temperature),
        per_depth(top_k, depth, "top_k", check_top_k),
        per_depth(top_p, depth, "top_p", check_top_p),
    )

