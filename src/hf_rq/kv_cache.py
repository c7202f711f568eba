"""Preallocated (static) key/value caches for the priors' incremental decoding, and the compile switch.

A ``DynamicCache`` concatenates every layer's keys and values with the new token at every step; in the RQ
sampler that concatenation was ~30% of ``generate()``. :class:`StaticKVCache` allocates the buffers once per
``generate()`` call (batch x heads x longest sequence) and writes each new token in place.

Why our own class rather than transformers' ``StaticCache``:

* **Exact eager decoding.** ``StaticCache.update`` always returns the whole buffer, so every step attends over
  the maximum length under a mask. In the default (eager) mode :meth:`StaticKVCache.update` returns a view of
  the *filled* prefix instead: attention sees exactly the keys/values a ``DynamicCache`` would hold (same
  values, same length, no mask), so static-cache sampling is the same computation as before, just without
  the copies.
* **One write position per stack, rewindable.** The RQ depth transformer's cache lives for one spatial
  position: :meth:`rewind` reuses the same buffers for the next position (stale entries are overwritten
  before they can be read). ``StaticCache`` keeps a forward-only position per layer.

With ``fixed_shape=True`` (what ``generate(..., compile=True)`` uses) the class computes what ``StaticCache``
computes: the write position is a tensor, ``update`` returns the whole buffer, and the stack attends under
:meth:`key_mask`. Every step then has the same shapes and no Python branch depends on data, so
``torch.compile`` captures it as one graph (and CUDA graphs can replay it).
"""

from __future__ import annotations

import torch

__all__ = ["StaticKVCache", "compile_decoding_step", "stack_attention_mask"]


class StaticKVCache:
    """Key/value buffers `(num_layers, batch, kv_heads, max_length, head_dim)`, written in place.

    Drop-in for ``DynamicCache`` in our blocks (``update(k, v, layer_idx)``, ``get_seq_length()``,
    ``batch_select_indices``). ``layer_idx`` counts from ``layer_offset`` (a stack's first block).
    """

    def __init__(self, num_layers: int, batch_size: int, num_heads: int, max_length: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device=None, fixed_shape: bool = False, layer_offset: int = 0):
        shape = (num_layers, batch_size, num_heads, max_length, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.num_layers = num_layers
        self.max_length = max_length
        self.fixed_shape = fixed_shape
        self.layer_offset = layer_offset
        self.lengths = [0] * num_layers  # eager mode: filled positions per layer (Python ints, no syncs)
        # fixed-shape mode: the position the current step writes, shared by all layers of the stack
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self._slots = torch.arange(max_length, device=device)
        if fixed_shape and not torch.compiler.is_compiling():
            for buffer in (self.keys, self.values, self.position):
                torch._dynamo.mark_static_address(buffer)  # updated in place: keeps CUDA-graph replays valid

    @classmethod
    def for_stack(cls, blocks, batch_size: int, max_length: int, dtype, device, fixed_shape: bool = False):
        """A cache sized for ``blocks`` (an iterable of blocks whose attention has ``num_*heads``/``head_dim``)."""
        blocks = list(blocks)
        attn = getattr(blocks[0], "attn", None) or blocks[0].self_attn
        heads = getattr(attn, "num_key_value_heads", attn.num_heads)
        return cls(len(blocks), batch_size, heads, max_length, attn.head_dim, dtype, device, fixed_shape,
                   attn.layer_idx)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, cache_kwargs=None):
        i = layer_idx - self.layer_offset
        if self.fixed_shape:
            if key_states.shape[-2] != 1:
                raise ValueError("a fixed-shape cache takes one new token per step")
            self.keys[i].index_copy_(2, self.position, key_states)
            self.values[i].index_copy_(2, self.position, value_states)
            if i == self.num_layers - 1:
                self.position.add_(1)  # the stack's last layer closes the step
            return self.keys[i], self.values[i]
        start = self.lengths[i]
        end = start + key_states.shape[-2]
        if end > self.max_length:
            raise ValueError(f"the static cache holds {self.max_length} positions; step {end} does not fit")
        self.keys[i, :, :, start:end] = key_states
        self.values[i, :, :, start:end] = value_states
        self.lengths[i] = end
        return self.keys[i, :, :, :end], self.values[i, :, :, :end]

    def key_mask(self) -> torch.Tensor:
        """Fixed-shape mode: `(1, 1, 1, max_length)` bool, True up to and including the position being written."""
        return (self._slots <= self.position)[None, None, None, :]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if self.fixed_shape:
            raise RuntimeError("a fixed-shape cache keeps its length on the device; use .position")
        return self.lengths[max(layer_idx - self.layer_offset, 0)]

    def rewind(self) -> None:
        """Start over at position 0 with the same buffers (old entries are overwritten before being read)."""
        self.lengths = [0] * self.num_layers
        self.position.zero_()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        # Allocates new (smaller) buffers once; a compiled step recompiles for the new batch size.
        self.keys = self.keys[:, indices].contiguous()
        self.values = self.values[:, indices].contiguous()


def stack_attention_mask(cache, attention_mask):
    """The mask a stack passes to its blocks: the caller's, else a fixed-shape cache's key mask, else None."""
    if attention_mask is None and isinstance(cache, StaticKVCache) and cache.fixed_shape:
        return cache.key_mask()
    return attention_mask


def compile_decoding_step(fn, option):
    """``fn`` itself for ``option`` False/None, else ``torch.compile(fn)``.

    ``option`` is True (``fullgraph=True``, default mode: no graph breaks allowed inside a step) or a dict of
    ``torch.compile`` keyword arguments (e.g. ``{"mode": "reduce-overhead"}`` for CUDA graphs on a GPU).
    """
    if not option:
        return fn
    kwargs = dict(fullgraph=True, dynamic=False)
    if isinstance(option, dict):  # generate() checked the option (hf_rq.sampling_args.check_compile)
        kwargs.update(option)
    return torch.compile(fn, **kwargs)
