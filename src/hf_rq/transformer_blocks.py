"""The minGPT-style transformer block used by the RQ-Transformer and the DQ-Transformer.

Both authors' priors use the same pre-LayerNorm GPT block: separate ``query``/``key``/``value``/
``proj`` linears with bias, ``E / n_head`` contiguous head chunks, exact (erf) GELU, a 4x MLP,
LayerNorm eps 1e-5, dropout on the residual branches. Attention runs through
``torch.nn.functional.scaled_dot_product_attention``; incremental decoding keeps keys/values in a
transformers ``Cache`` (e.g. ``DynamicCache``) or a :class:`~hf_rq.kv_cache.StaticKVCache`, one ``layer_idx``
per block.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.modeling_layers import GradientCheckpointingLayer

from .kv_cache import stack_attention_mask


def causal_mask(q_len: int, k_len: int, device) -> torch.Tensor | None:
    """Boolean mask `(q_len, k_len)` letting query i see keys up to ``k_len - q_len + i``; None if trivial."""
    if q_len == 1:
        return None
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)


class CausalSelfAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, attn_dropout: float = 0.0, resid_dropout: float = 0.0,
                 bias: bool = True, layer_idx: int = 0):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.layer_idx = layer_idx
        self.attn_dropout = attn_dropout
        self.query = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.key = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.value = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.proj = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.resid_dropout = nn.Dropout(resid_dropout)
        self.fused_qkv = None  # (weight (3E, E), bias) while decoding under :func:`fused_qkv_projections`

    def forward(self, hidden_states: torch.Tensor, past_key_values=None, attention_mask: torch.Tensor | None = None,
                causal: bool = True) -> torch.Tensor:
        """`(B, L, E) -> (B, L, E)`. With a cache, keys/values of earlier calls are prepended.

        ``attention_mask`` (bool, True = attend, broadcastable to `(B, heads, L, L_total)`) overrides the
        causal mask; ``causal=False`` gives bidirectional attention.
        """
        B, L, E = hidden_states.shape
        shape = (B, L, self.num_heads, self.head_dim)
        if self.fused_qkv is not None:
            q, k, v = (t.view(shape).transpose(1, 2) for t in F.linear(hidden_states, *self.fused_qkv).chunk(3, -1))
        else:
            q = self.query(hidden_states).view(shape).transpose(1, 2)
            k = self.key(hidden_states).view(shape).transpose(1, 2)
            v = self.value(hidden_states).view(shape).transpose(1, 2)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        mask = attention_mask
        if mask is None and causal:
            mask = causal_mask(L, k.shape[-2], hidden_states.device)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.attn_dropout if self.training else 0.0
        )
        return self.resid_dropout(self.proj(out.transpose(1, 2).reshape(B, L, E)))


class GPTMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        self.fc_in = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.act = nn.GELU()  # exact erf GELU, as both authors use ('v1')
        self.fc_out = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc_out(self.act(self.fc_in(x))))


class GPTBlock(GradientCheckpointingLayer):
    """Pre-LN block: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: int = 4, attn_dropout: float = 0.0,
                 resid_dropout: float = 0.0, layer_norm_eps: float = 1e-5, bias: bool = True, layer_idx: int = 0):
        super().__init__()
        self.ln1 = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.attn = CausalSelfAttention(hidden_size, num_heads, attn_dropout, resid_dropout, bias, layer_idx)
        self.ln2 = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.mlp = GPTMLP(hidden_size, mlp_ratio * hidden_size, resid_dropout, bias)

    def forward(self, hidden_states: torch.Tensor, past_key_values=None, attention_mask=None, causal: bool = True):
        hidden_states = hidden_states + self.attn(self.ln1(hidden_states), past_key_values, attention_mask, causal)
        return hidden_states + self.mlp(self.ln2(hidden_states))


class GPTStack(nn.Module):
    """A list of :class:`GPTBlock` sharing one cache (``layer_idx`` = offset + position in the stack)."""

    def __init__(self, num_layers: int, hidden_size: int, num_heads: int, attn_dropout: float = 0.0,
                 resid_dropout: float = 0.0, layer_norm_eps: float = 1e-5, layer_idx_offset: int = 0):
        super().__init__()
        self.blocks = nn.ModuleList(
            GPTBlock(hidden_size, num_heads, attn_dropout=attn_dropout, resid_dropout=resid_dropout,
                     layer_norm_eps=layer_norm_eps, layer_idx=layer_idx_offset + i)
            for i in range(num_layers)
        )

    def forward(self, hidden_states: torch.Tensor, past_key_values=None, attention_mask=None, causal: bool = True):
        attention_mask = stack_attention_mask(past_key_values, attention_mask)
        for block in self.blocks:
            hidden_states = block(hidden_states, past_key_values, attention_mask, causal)
        return hidden_states


@contextlib.contextmanager
def fused_qkv_projections(*stacks: GPTStack):
    """Within the block, every attention of ``stacks`` computes query, key and value with one matmul.

    The checkpoints keep three ``Linear``s (the authors' layout); a decoding step reads each weight once per
    token, so at small batch three matmuls cost three weight-streaming passes plus call overhead. The
    concatenated weight gives the same dot products (bit for bit on CPU BLAS: each output column is its own
    reduction). It is a temporary copy made at entry, so it can never go stale after training or loading.
    """
    attns = [block.attn for stack in stacks for block in stack.blocks]
    try:
        for a in attns:
            bias = None if a.query.bias is None else torch.cat([a.query.bias, a.key.bias, a.value.bias])
            a.fused_qkv = (torch.cat([a.query.weight, a.key.weight, a.value.weight]), bias)
        yield
    finally:
        for a in attns:
            a.fused_qkv = None


def convert_mingpt_block_keys(key: str) -> str:
    """Rename a minGPT block key of the authors' checkpoints (``mlp.0`` / ``mlp.2``) to ours."""
    return key.replace(".mlp.0.", ".mlp.fc_in.").replace(".mlp.2.", ".mlp.fc_out.")
