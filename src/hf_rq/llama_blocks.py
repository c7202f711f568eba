"""LlamaGen's Llama-style transformer blocks, shared by the LlamaGen GPT and both CTF stages.

What LlamaGen (FoundationVision/LlamaGen, ``autoregressive/models/gpt.py``) does, and what is kept here:

* pre-norm blocks ``h = x + attn(rms(x))``, ``out = h + ffn(rms(h))``; RMSNorm with eps 1e-5 computed in
  float32 and cast back before the weight multiplies (transformers' ``LlamaRMSNorm`` computes exactly this
  function, so it is reused);
* one fused ``qkv_proj`` linear (no bias) whose output rows are ``[q | k | v]``, each head-major;
* SwiGLU ``down(silu(gate(x)) * up(x))`` with hidden size ``round_up(int(2 * 4 * d / 3), multiple_of)``;
* **2D rotary embedding in the adjacent-pair layout**: channels ``(2i, 2i+1)`` of a head form a pair (the
  complex-multiply convention of the original Llama, *not* the rotate-half layout of transformers' Llama,
  so ``apply_rotary_pos_emb`` cannot be reused); the first half of the pairs rotates with the token's grid
  row, the second half with its column; frequency ``k`` is ``base ** (-2k / (head_dim / 2))``;
* the prefix (class) token gets an all-zero cos/sin row, which zeroes its query and key: attention to
  the class token has logit 0 while its value still flows. Released checkpoints were trained with it.

Attention runs through ``F.scaled_dot_product_attention``; incremental decoding keeps keys/values in a
transformers ``Cache`` (``DynamicCache``) or a :class:`~hf_rq.kv_cache.StaticKVCache` (the sampler's), one
``layer_idx`` per block.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from .transformer_blocks import causal_mask

__all__ = [
    "LlamaGenAttention",
    "LlamaGenBlock",
    "LlamaGenMLP",
    "LlamaRMSNorm",
    "apply_2d_rotary",
    "llamagen_ffn_hidden_size",
    "precompute_2d_rotary",
]


def llamagen_ffn_hidden_size(hidden_size: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """LlamaGen's SwiGLU width: ``int(2 * 4d / 3)``, optionally scaled, rounded up to ``multiple_of``.

    GPT-B/L/XL/XXL/3B: 768 -> 2048, 1024 -> 2816, 1280 -> 3584, 1536 -> 4096, 3200 -> 8704.
    """
    hidden = int(2 * (4 * hidden_size) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    if hidden % multiple_of:
        hidden += multiple_of - hidden % multiple_of
    return hidden


def precompute_2d_rotary(grid_size: int, head_dim: int, base: float = 10000.0, num_prefix_tokens: int = 1,
                         device=None) -> torch.Tensor:
    """Rotary table `(num_prefix_tokens + grid_size**2, head_dim // 2, 2)` float32; ``[..., 0]`` cos, ``[..., 1]`` sin.

    Row ``p`` belongs to sequence position ``p``: the prefix rows are all zero (see the module docstring),
    row ``num_prefix_tokens + r * grid_size + c`` holds the angles of grid cell ``(r, c)``: pairs
    ``0 .. head_dim/4 - 1`` use ``r``, the remaining pairs use ``c``.
    """
    if head_dim % 4:
        raise ValueError(f"2D rotary embedding needs head_dim divisible by 4, got {head_dim}")
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2, device=device)[: half // 2].float() / half))
    angles = torch.outer(torch.arange(grid_size, device=device, dtype=torch.float32), freqs)  # (grid, head_dim/4)
    grid = torch.cat(
        [angles[:, None, :].expand(-1, grid_size, -1), angles[None, :, :].expand(grid_size, -1, -1)], dim=-1
    )  # (row, col, head_dim/2): row angles first, then column angles
    table = torch.stack([grid.cos(), grid.sin()], dim=-1).flatten(0, 1)
    prefix = torch.zeros(num_prefix_tokens, half, 2, device=device)
    return torch.cat([prefix, table])


def apply_2d_rotary(x: torch.Tensor, rotary: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of `x` `(B, L, heads, head_dim)` by `rotary` `(L, head_dim/2, 2)`.

    Computed in float32 and cast back, as LlamaGen does.
    """
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    cos = rotary[None, :, None, :, 0]
    sin = rotary[None, :, None, :, 1]
    out = torch.stack(
        [pairs[..., 0] * cos - pairs[..., 1] * sin, pairs[..., 1] * cos + pairs[..., 0] * sin], dim=-1
    )
    return out.flatten(3).type_as(x)


class LlamaGenAttention(nn.Module):
    """Multi-head self-attention with a fused ``[q | k | v]`` projection and 2D rotary embedding.

    ``is_causal=False`` gives the bidirectional attention of CTF's stage-2 model. Grouped key/value heads
    (``num_key_value_heads < num_heads``) are supported; LlamaGen's class-conditional models do not use them.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_key_value_heads: int | None = None,
                 attention_dropout: float = 0.0, resid_dropout: float = 0.0, is_causal: bool = True,
                 layer_idx: int = 0):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_attention_heads {num_heads}")
        self.num_heads = num_heads
        self.num_key_value_heads = num_key_value_heads or num_heads
        if num_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {num_heads} is not a multiple of num_key_value_heads "
                             f"{self.num_key_value_heads}")
        self.head_dim = hidden_size // num_heads
        self.is_causal = is_causal
        self.layer_idx = layer_idx
        self.attention_dropout = attention_dropout
        kv_dim = self.num_key_value_heads * self.head_dim
        self.qkv_proj = nn.Linear(hidden_size, hidden_size + 2 * kv_dim, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.resid_dropout = nn.Dropout(resid_dropout)

    def forward(self, hidden_states: torch.Tensor, rotary: torch.Tensor, past_key_values=None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`(B, L, E) -> (B, L, E)`; ``rotary`` `(L, head_dim/2, 2)` holds the rows of these L positions.

        With a cache, keys/values of earlier calls are prepended. ``attention_mask`` (bool, True = attend,
        broadcastable to `(B, heads, L, L_total)`) overrides the default (causal or bidirectional) mask.
        """
        B, L, E = hidden_states.shape
        kv_dim = self.num_key_value_heads * self.head_dim
        q, k, v = self.qkv_proj(hidden_states).split([E, kv_dim, kv_dim], dim=-1)
        q = apply_2d_rotary(q.view(B, L, self.num_heads, self.head_dim), rotary).transpose(1, 2)
        k = apply_2d_rotary(k.view(B, L, self.num_key_value_heads, self.head_dim), rotary).transpose(1, 2)
        v = v.view(B, L, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        if self.num_key_value_heads != self.num_heads:
            repeats = self.num_heads // self.num_key_value_heads
            k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
        mask, is_causal = attention_mask, False
        if mask is None and self.is_causal and L > 1:
            if k.shape[-2] == L:
                is_causal = True  # SDPA's fused causal path: the plain teacher-forced forward
            else:
                mask = causal_mask(L, k.shape[-2], hidden_states.device)  # a chunk on top of a cache
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal,
            dropout_p=self.attention_dropout if self.training else 0.0,
        )
        return self.resid_dropout(self.o_proj(out.transpose(1, 2).reshape(B, L, E)))


class LlamaGenMLP(nn.Module):
    """SwiGLU feed-forward ``down(silu(gate(x)) * up(x))`` with dropout (LlamaGen's ``w1``/``w3``/``w2``)."""

    def __init__(self, hidden_size: int, intermediate_size: int, dropout: float = 0.0):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero a whole sample's residual branch with probability ``rate`` (rescaled)."""
    if rate == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - rate)
    return x * keep / (1.0 - rate)


class LlamaGenBlock(GradientCheckpointingLayer):
    """Pre-norm block: ``h = x + attn(input_layernorm(x))``, ``out = h + mlp(post_attention_layernorm(h))``."""

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int, num_key_value_heads: int | None = None,
                 rms_norm_eps: float = 1e-5, attention_dropout: float = 0.0, resid_dropout: float = 0.0,
                 ffn_dropout: float = 0.0, drop_path_rate: float = 0.0, is_causal: bool = True, layer_idx: int = 0):
        super().__init__()
        self.input_layernorm = LlamaRMSNorm(hidden_size, eps=rms_norm_eps)
        self.self_attn = LlamaGenAttention(hidden_size, num_heads, num_key_value_heads, attention_dropout,
                                           resid_dropout, is_causal, layer_idx)
        self.post_attention_layernorm = LlamaRMSNorm(hidden_size, eps=rms_norm_eps)
        self.mlp = LlamaGenMLP(hidden_size, intermediate_size, ffn_dropout)
        self.drop_path_rate = drop_path_rate

    def forward(self, hidden_states: torch.Tensor, rotary: torch.Tensor, past_key_values=None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(hidden_states), rotary, past_key_values, attention_mask)
        hidden_states = hidden_states + drop_path(attn, self.drop_path_rate, self.training)
        ffn = self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states + drop_path(ffn, self.drop_path_rate, self.training)
