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


# --- nucleus draw ---------------------------------------------------------------------------------------------
# The RQ draw orders the probabilities (descending; equal ones by token id), takes their running sum ``c`` (the CPU
# ``cumsum`` of float32 accumulates in float64 and rounds each entry to float32), keeps a token while the mass
# before it is ``< p`` and finds ``u * mass`` in ``c``. A full sort of `(B, K)` probabilities at every one of the
# ``h*w*D`` steps costs more than the transformers at K = 16384 (the values are near-uniform for an untrained or
# high-temperature model, so no short prefix holds the nucleus). :func:`nucleus_draw` gets the same token by
# sorting only two small windows of the row, exactly:
#
# * probabilities >= 2**-29 are bucketed by their float32 bits (monotone in the value); summing any set of such
#   float32 numbers in float64 is exact (all are multiples of 2**-52 and the sums stay below 2), so each bucket's
#   sum, and the running sum at every bucket edge, equal the float64 accumulator of the sorted cumsum bit for bit,
#   whatever the order of summation. Smaller probabilities share one last bucket, only ever sorted, never summed
#   out of order.
# * The nucleus ends, and ``u * mass`` lands, inside buckets found from those edge sums; only those buckets are
#   sorted (one 1-D sort of int64 keys: row, probability bits, token id) and their running sum continued from the
#   exact edge value, as the cumsum does. The test suite checks the token against the full sort on many row shapes.
_BUCKET_SHIFT = 16  # a bucket spans 2**16 float32 bit patterns: a factor 2**(1/128), 0.5% of the value
_NUM_BUCKETS = 2048  # 16 octaves below the row's largest probability; the rest go to the last bucket
_EXACT_MIN_BITS = (127 - 29) << 23  # float32 bits of 2**-29
_BUCKETED_MIN_VOCAB = 4096  # below this one sort of the row is as cheap as the bucketing's extra passes
_P_MARGIN = 1e-6  # > 8 float32 ulps of 1: edge sums this far from p decide the "mass before < p" test exactly


def _nucleus_sorted(probs: torch.Tensor, top_p: float, u: torch.Tensor) -> torch.LongTensor:
    """The reference: full sort (stable, so equal probabilities are ordered by token id), cumsum, search."""
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    cumulative = sorted_probs.cumsum(dim=-1)
    kept = ((cumulative - sorted_probs) < top_p).sum(dim=-1, keepdim=True)  # >= 1: the top token always stays
    mass = cumulative.gather(-1, kept - 1)
    index = torch.searchsorted(cumulative, u * mass, right=True).clamp_(max=kept - 1)
    return order.gather(-1, index).squeeze(-1)


def _sorted_window(probs, bits, inside, start_sum):
    """The tokens where ``inside`` `(B, K)` is True, per row in sorted order `(B, W)`; their cumsum continued from
    ``start_sum`` (float64: the exact running sum before them); and which of the ``W`` slots hold a token."""
    B, K = probs.shape
    flat = inside.view(-1).nonzero().squeeze(1)  # row-major: grouped by row
    rows = flat // K
    index_bits = K.bit_length()
    keys = (rows << (31 + index_bits)) | ((0x7FFFFFFF - bits.view(-1)[flat]).long() << index_bits) | (flat - rows * K)
    keys = keys.sort().values  # by row, then descending probability, then token id
    cols = keys & ((1 << index_bits) - 1)
    per_row = torch.bincount(rows, minlength=B)
    width = max(int(per_row.max()), 1)
    slot = torch.arange(rows.shape[0], device=probs.device) - (per_row.cumsum(0) - per_row)[rows]
    tokens = torch.zeros(B, width, dtype=torch.long, device=probs.device).index_put_((rows, slot), cols)
    valid = torch.arange(width, device=probs.device) < per_row[:, None]
    values = probs.gather(-1, tokens).masked_fill_(~valid, 0.0)
    # The cumsum continues the float64 accumulator: start_sum first, then each value, rounded to float32 per entry.
    running = torch.cat([start_sum[:, None], values.double()], dim=-1).cumsum(dim=-1)[:, 1:].float()
    return tokens, values, running, valid


def _nucleus_bucketed(probs: torch.Tensor, top_p: float, u: torch.Tensor) -> torch.LongTensor:
    B, K = probs.shape
    last = _NUM_BUCKETS - 1
    bits = probs.view(torch.int32)
    bucket = ((bits.amax(dim=-1, keepdim=True) - bits) >> _BUCKET_SHIFT).clamp_(max=last)
    bucket = bucket.masked_fill_(bits < _EXACT_MIN_BITS, last)
    sums = probs.new_zeros(B, _NUM_BUCKETS, dtype=torch.float64).scatter_add_(1, bucket.long(), probs.double())
    ends = sums.cumsum(dim=-1)  # exact running sums at bucket ends (the last bucket's is not used: maybe inexact)
    starts = ends - sums
    if bool((ends[:, last - 1] >= 1.5).any()):  # not probabilities: sums near 2 would no longer be exact
        return _nucleus_sorted(probs, top_p, u)

    # 1. The nucleus: tokens whose mass before is < p. Before bucket ``lo`` every token is kept (running sums
    # <= p - margin), from bucket ``hi + 1`` on none is (mass before >= p + margin); sort the buckets between.
    p32 = float(torch.tensor(top_p, dtype=torch.float32))
    lo = (ends[:, :last] <= p32 - _P_MARGIN).sum(dim=-1)
    hi = (starts < p32 + _P_MARGIN).sum(dim=-1) - 1
    before = bucket < lo[:, None].int()
    inside = ~before & (bucket <= hi[:, None].int())
    tokens, values, running, valid = _sorted_window(probs, bits, inside, starts.gather(1, lo[:, None]).squeeze(1))
    count_before = before.sum(dim=-1)
    kept = count_before + (((running - values) < top_p) & valid).sum(dim=-1)
    pos = kept - 1 - count_before  # the last kept token, in the window unless the window keeps none
    in_window = pos >= 0
    at = pos.clamp(min=0)[:, None]
    mass = torch.where(in_window, running.gather(1, at).squeeze(1), starts.gather(1, lo[:, None]).squeeze(1).float())
    last_kept = tokens.gather(1, at).squeeze(1)
    if not bool(in_window.all()):  # the last token before the window: the smallest probability, largest id
        tail = probs.masked_fill(~before, 2.0).amin(dim=-1, keepdim=True)
        ids = torch.arange(K, device=probs.device).expand(B, K)
        before_id = ids.masked_fill(~(before & (probs == tail)), -1).amax(dim=-1)
        last_kept = torch.where(in_window, last_kept, before_id)

    # 2. The draw: searchsorted(c, u * mass, right=True) counts the entries <= target. Whole buckets count while
    # their end sum (float32) is <= target; the first one that is not is sorted.
    target = (u * mass[:, None]).squeeze(1)
    b = (ends[:, :last].float() <= target[:, None]).sum(dim=-1)
    b_col = b[:, None].int()
    tokens, _, running, valid = _sorted_window(probs, bits, bucket == b_col, starts.gather(1, b[:, None]).squeeze(1))
    inside = ((running <= target[:, None]) & valid).sum(dim=-1)
    index = (bucket < b_col).sum(dim=-1) + inside
    drawn = tokens.gather(1, inside.clamp(max=tokens.shape[1] - 1)[:, None]).squeeze(1)
    return torch.where(index >= kept - 1, last_kept, drawn)


def nucleus_draw(probs: torch.Tensor, top_p: float, u: torch.Tensor) -> torch.LongTensor:
    """One token per row of `probs` `(B, K)` (float32, non-negative) under the RQ authors' top-p rule.

    Tokens are ordered by descending probability (equal ones by token id); a token is kept while the sorted
    mass before it is ``< top_p`` (the top token always is); ``u`` `(B, 1)` uniform in [0, 1) picks the first
    sorted token whose cumulative probability exceeds ``u`` times the kept mass. Large vocabularies take the
    bucketed path on CPU (same token, bit for bit; see the comment above), small ones and other devices one
    stable sort.
    """
    probs = probs.float().contiguous()
    B, K = probs.shape
    # CPU only: the exactness argument is about the CPU cumsum (float64 accumulator); CUDA accumulates float32
    # in a parallel scan, and sorts fast. The window keys pack row, probability bits (31) and token id in an int64.
    if probs.device.type != "cpu" or K < _BUCKETED_MIN_VOCAB or B.bit_length() + K.bit_length() > 32:
        return _nucleus_sorted(probs, top_p, u)
    return _nucleus_bucketed(probs, top_p, u)


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
