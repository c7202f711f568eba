"""Output dataclasses shared by every tokenizer in hf_rq.

They follow diffusers' ``BaseOutput`` contract (attribute, key and index access). They are defined
here rather than imported from ``diffusers.models.autoencoders.vae`` because that module pulls in
every UNet block at import time (about 2.5 s on a small CPU).
"""

from dataclasses import dataclass

import torch
from diffusers.utils import BaseOutput


@dataclass
class TokenizerEncoderOutput(BaseOutput):
    """Output of a tokenizer's ``encode``.

    Args:
        latents (`torch.Tensor` of shape `(batch, embed_dim, h, w)`): the continuous latent, before
            quantization.
        codes (`torch.LongTensor`, *optional*): the discrete codes when requested. RQ-VAE: `(batch, h, w,
            depth)`; single-level tokenizers: `(batch, h, w)`.
        granularity (`torch.LongTensor`, *optional*): per-region granularity map of dynamic tokenizers
            (DQ-VAE): `(batch, h_coarse, w_coarse)`, 0 = coarse, 1 = fine.
    """

    latents: torch.Tensor
    codes: torch.LongTensor | None = None
    granularity: torch.LongTensor | None = None


@dataclass
class QuantizerOutput(BaseOutput):
    """Output of a tokenizer's ``quantize``.

    Args:
        quantized (`torch.Tensor` of shape `(batch, embed_dim, h, w)`): the quantized latent (its value is
            the codebook sum, its gradient flows straight through to the continuous latent).
        codes (`torch.LongTensor`): the chosen codes, `(batch, h, w, depth)` or `(batch, h, w)`.
        commitment_loss (`torch.Tensor`): scalar commitment loss (already averaged, not yet weighted).
        codebook_loss (`torch.Tensor`, *optional*): scalar codebook loss for gradient-trained codebooks.
    """

    quantized: torch.Tensor
    codes: torch.LongTensor
    commitment_loss: torch.Tensor
    codebook_loss: torch.Tensor | None = None


@dataclass
class TokenizerDecoderOutput(BaseOutput):
    """Output of a tokenizer's ``decode`` / ``decode_codes`` (same fields as diffusers' ``DecoderOutput``).

    Args:
        sample (`torch.Tensor` of shape `(batch, channels, height, width)`): the decoded images, in about
            [-1, 1] and not clamped.
        commit_loss (`torch.Tensor`, *optional*): the commitment loss when ``decode`` quantized its input.
    """

    sample: torch.Tensor
    commit_loss: torch.Tensor | None = None


@dataclass
class TokenizerOutput(BaseOutput):
    """Output of a tokenizer's ``forward`` (encode, quantize, decode).

    Args:
        sample (`torch.Tensor` of shape `(batch, channels, height, width)`): the reconstruction.
        codes (`torch.LongTensor`): the codes used for the reconstruction.
        commitment_loss (`torch.Tensor`): scalar commitment loss (unweighted).
        codebook_loss (`torch.Tensor`, *optional*): scalar codebook loss (gradient-trained codebooks only).
        extra_loss (`torch.Tensor`, *optional*): any other model-specific loss (e.g. DQ's budget loss).
        granularity (`torch.LongTensor`, *optional*): granularity map of dynamic tokenizers.
    """

    sample: torch.Tensor
    # Defaults let Accelerate rebuild the output from a dict (it does under mixed precision); always set.
    codes: torch.LongTensor = None
    commitment_loss: torch.Tensor = None
    codebook_loss: torch.Tensor | None = None
    extra_loss: torch.Tensor | None = None
    granularity: torch.LongTensor | None = None
