"""The VQGAN-style convolutional encoder and decoder shared by every tokenizer.

RQ-VAE, DQ-VAE and LlamaGen's VQ all use the taming-transformers encoder/decoder (GroupNorm(32,
eps 1e-6), SiLU, ResNet blocks with a 1x1 shortcut, single-head spatial attention, right/bottom-padded
stride-2 downsampling, nearest upsampling, ``num_res_blocks + 1`` blocks per decoder level). diffusers'
``Encoder`` / ``Decoder`` compute exactly that function, so we build them from diffusers and only
translate the authors' key names (:func:`taming_to_diffusers`).
"""

from __future__ import annotations

import re

import torch
from diffusers.models.autoencoders.vae import Decoder, Encoder


def level_has_attention(sample_size: int, level: int, attn_resolutions) -> bool:
    """Taming puts attention after every res block of a level whose input resolution is listed."""
    return sample_size // (2**level) in set(attn_resolutions)


def make_encoder(
    in_channels: int,
    out_channels: int,
    block_out_channels,
    layers_per_block: int,
    attn_resolutions,
    sample_size: int,
    norm_num_groups: int = 32,
) -> Encoder:
    """A diffusers ``Encoder`` laid out like the taming encoder (``len(block_out_channels) - 1`` downsamples)."""
    types = [
        "AttnDownEncoderBlock2D" if level_has_attention(sample_size, i, attn_resolutions) else "DownEncoderBlock2D"
        for i in range(len(block_out_channels))
    ]
    return Encoder(
        in_channels=in_channels,
        out_channels=out_channels,
        down_block_types=tuple(types),
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        norm_num_groups=norm_num_groups,
        act_fn="silu",
        double_z=False,
    )


def make_decoder(
    in_channels: int,
    out_channels: int,
    block_out_channels,
    layers_per_block: int,
    attn_resolutions,
    sample_size: int,
    norm_num_groups: int = 32,
) -> Decoder:
    """A diffusers ``Decoder`` laid out like the taming decoder (``layers_per_block + 1`` blocks a level)."""
    levels = len(block_out_channels)
    # diffusers lists up blocks from the coarsest level; taming indexes them by level (``up.0`` = finest).
    types = [
        "AttnUpDecoderBlock2D"
        if level_has_attention(sample_size, levels - 1 - i, attn_resolutions)
        else "UpDecoderBlock2D"
        for i in range(levels)
    ]
    return Decoder(
        in_channels=in_channels,
        out_channels=out_channels,
        up_block_types=tuple(types),
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        norm_num_groups=norm_num_groups,
        act_fn="silu",
    )


_LEAF_RENAMES = {
    "nin_shortcut": "conv_shortcut",
    "norm": "group_norm",
    "q": "to_q",
    "k": "to_k",
    "v": "to_v",
    "proj_out": "to_out.0",
}


def _rename_leaf(parts: list[str], tensor: torch.Tensor, is_attention: bool) -> tuple[str, torch.Tensor]:
    module, param = parts[-2], parts[-1]
    if is_attention:
        module = _LEAF_RENAMES.get(module, module)
        if module.startswith("to_") and tensor.ndim == 4:  # 1x1 conv -> linear
            tensor = tensor[:, :, 0, 0]
    else:
        module = "conv_shortcut" if module == "nin_shortcut" else module
    return ".".join(parts[:-2] + [module, param]), tensor


def taming_to_diffusers(
    state_dict: dict[str, torch.Tensor], num_levels: int, prefix: str, kind: str
) -> dict[str, torch.Tensor]:
    """Rename the taming-layout keys under ``prefix`` (``"encoder."`` or ``"decoder."``) to diffusers'.

    ``kind`` is ``"encoder"`` or ``"decoder"``; ``num_levels`` is ``len(ch_mult)``. Keys outside
    ``prefix`` are dropped; an unrecognised key under it raises ``KeyError`` so that a converter never
    silently loses weights.
    """
    out = {}
    for key, tensor in state_dict.items():
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        m = re.fullmatch(r"(down|up)\.(\d+)\.(block|attn)\.(\d+)\.(.+)", rest)
        if m:
            side, level, sub, j, leaf = m.groups()
            level = int(level)
            block = level if kind == "encoder" else num_levels - 1 - level
            group = "down_blocks" if kind == "encoder" else "up_blocks"
            container = "resnets" if sub == "block" else "attentions"
            name, tensor = _rename_leaf(
                f"{group}.{block}.{container}.{j}.{leaf}".split("."), tensor, is_attention=sub == "attn"
            )
            out[prefix + name] = tensor
            continue
        m = re.fullmatch(r"(down|up)\.(\d+)\.(downsample|upsample)\.conv\.(weight|bias)", rest)
        if m:
            _, level, which, param = m.groups()
            level = int(level)
            if kind == "encoder":
                out[f"{prefix}down_blocks.{level}.downsamplers.0.conv.{param}"] = tensor
            else:
                out[f"{prefix}up_blocks.{num_levels - 1 - level}.upsamplers.0.conv.{param}"] = tensor
            continue
        m = re.fullmatch(r"mid\.(block_1|block_2|attn_1)\.(.+)", rest)
        if m:
            which, leaf = m.groups()
            container = {"block_1": "resnets.0", "block_2": "resnets.1", "attn_1": "attentions.0"}[which]
            name, tensor = _rename_leaf(f"mid_block.{container}.{leaf}".split("."), tensor, which == "attn_1")
            out[prefix + name] = tensor
            continue
        m = re.fullmatch(r"(conv_in|conv_out|norm_out)\.(weight|bias)", rest)
        if m:
            module, param = m.groups()
            out[f"{prefix}{'conv_norm_out' if module == 'norm_out' else module}.{param}"] = tensor
            continue
        raise KeyError(f"unrecognised {kind} key in checkpoint: {key!r}")
    return out
