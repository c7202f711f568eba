"""Token sampling utilities shared by the priors.

Every sampler takes a ``torch.Generator`` so the same seed gives the same images. The filters follow
the authors' order, which differs between families, so each is a separate small function:

* RQ-Transformer (``rq_filter_probs``): temperature, top-k on logits (ties at the k-th value kept),
  softmax, then top-p on probabilities dropping a token once the mass *before* it reaches ``p``.
* LlamaGen / CTF: see ``hf_rq.ctf``; they reuse :func:`top_k_logits` and :func:`sample_tokens`.

The draws go through :func:`multinomial_rows` / :func:`uniform_rows`, which take one generator or a list with one
generator per image (the contract of ``hf_rq.sampling_args.check_generator``). Which values the arguments may
take is checked once, for every family, in ``hf_rq.sampling_args``.
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


def multinomial_rows(probs: torch.Tensor, generator=None) -> torch.LongTensor:
    """One ``torch.multinomial`` draw per row of `probs` `(B, K)`; returns `(B,)`.

    ``generator``: None, one ``torch.Generator``, or a list of ``B`` of them (row ``i`` draws from
    ``generator[i]``, so an image's draws do not depend on the rest of the batch). The draw happens where the
    generator lives, so a CPU generator can drive a model on another device (as diffusers' ``randn_tensor``).
    """
    if isinstance(generator, list):
        if len(generator) != probs.shape[0]:
            raise ValueError(f"got {len(generator)} generators for {probs.shape[0]} rows")
        return torch.cat([multinomial_rows(probs[i:i + 1], g) for i, g in enumerate(generator)])
    device = probs.device if generator is None else generator.device
    return torch.multinomial(probs.to(device), 1, generator=generator).squeeze(-1).to(probs.device)


def uniform_rows(num_rows: int, generator=None, device=None) -> torch.Tensor:
    """`(num_rows, 1)` uniform numbers in [0, 1) on ``device``, drawn where the generator lives.

    With a list of ``G`` generators the rows are ``G`` consecutive equal blocks (one image's rows each), block
    ``i`` drawn from ``generator[i]``.
    """
    if isinstance(generator, list):
        if not generator or num_rows % len(generator):
            raise ValueError(f"{num_rows} rows cannot be split evenly over {len(generator)} generators")
        per = num_rows // len(generator)
        return torch.cat([uniform_rows(per, g, device) for g in generator])
    draw_device = device if generator is None else generator.device
    u = torch.rand(num_rows, 1, generator=generator, device=draw_device)
    return u if device is None else u.to(device)


def sample_tokens(probs: torch.Tensor, generator=None, do_sample: bool = True) -> torch.LongTensor:
    """Draw one token per row of `probs` `(B, K)` (arg-max when ``do_sample=False``); returns `(B,)`.

    ``generator``: as in :func:`multinomial_rows` (a list gives row ``i`` its own generator).
    """
    if not do_sample:
        return probs.argmax(dim=-1)
    return multinomial_rows(probs, generator)
