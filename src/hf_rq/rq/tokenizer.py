"""RQ-VAE: the residual-quantized image tokenizer of Lee et al. (CVPR 2022).

An image `(N, 3, H, W)` in [-1, 1] is encoded to a latent `(N, C, h, w)` (`h = H / 2**(levels - 1)`),
and each of the ``h * w`` latent vectors is quantized to a stack of ``code_depth`` codes from one
shared codebook: codes `(N, h, w, D)`, coarse to fine along the last axis.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils.accelerate_utils import apply_forward_hook

from ..autoencoder_blocks import make_decoder, make_encoder
from ..outputs import QuantizerOutput, TokenizerDecoderOutput, TokenizerEncoderOutput, TokenizerOutput
from ..quantizers import ResidualQuantizer
from ..hub import BundledModelsMixin
from ..image_processing import check_model_images


class RQVAEModel(BundledModelsMixin, ModelMixin, ConfigMixin):
    r"""Residual-quantized VAE (VQModel-style API, codes with a depth axis).

    Parameters:
        in_channels / out_channels (`int`): image channels.
        sample_size (`int`): training image size; only used to place attention (the authors' ``resolution``).
        block_out_channels (`tuple[int]`): width of each encoder level (``ch * ch_mult``); the downsampling
            factor is ``2 ** (len(block_out_channels) - 1)``.
        layers_per_block (`int`): ResNet blocks per encoder level (decoder levels get one more).
        attn_resolutions (`tuple[int]`): feature resolutions that get self-attention after each block.
        latent_channels (`int`): encoder output channels (``z_channels``).
        embed_dim (`int`): channels of the quantized latent (codeword width ``C``).
        codebook_size (`int`): number of codewords ``K``.
        code_depth (`int`): codes per position ``D``.
        shared_codebook (`bool`): one codebook for all depths (stored once).
        ema_decay (`float`), restart_unused_codes (`bool`): codebook EMA settings.
        commitment_weight (`float`): weight of the commitment loss in the training loss (beta).
        norm_num_groups (`int`): GroupNorm groups.
    """

    _supports_gradient_checkpointing = True
    _skip_layerwise_casting_patterns = ["quantizer"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        sample_size: int = 256,
        block_out_channels: tuple[int, ...] = (128, 128, 256, 256, 512, 512),
        layers_per_block: int = 2,
        attn_resolutions: tuple[int, ...] = (8,),
        latent_channels: int = 256,
        embed_dim: int = 256,
        codebook_size: int = 16384,
        code_depth: int = 4,
        shared_codebook: bool = True,
        ema_decay: float = 0.99,
        restart_unused_codes: bool = True,
        commitment_weight: float = 0.25,
        norm_num_groups: int = 32,
    ):
        super().__init__()
        bad = [c for c in block_out_channels if c % norm_num_groups]
        if bad:
            raise ValueError(f"block_out_channels {list(block_out_channels)} must be multiples of norm_num_groups={norm_num_groups}")
        arch = dict(
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            attn_resolutions=attn_resolutions,
            sample_size=sample_size,
            norm_num_groups=norm_num_groups,
        )
        self.encoder = make_encoder(in_channels, latent_channels, **arch)
        self.quant_conv = nn.Conv2d(latent_channels, embed_dim, 1)
        self.quantizer = ResidualQuantizer(
            codebook_size, embed_dim, code_depth, shared_codebook, ema_decay, restart_unused_codes
        )
        self.post_quant_conv = nn.Conv2d(embed_dim, latent_channels, 1)
        self.decoder = make_decoder(latent_channels, out_channels, **arch)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    # ----------------------------------------------------------------------------------- checks
    def _check_images(self, images: torch.Tensor) -> None:
        check_model_images(images, self.config.in_channels, owner=self)  # type, shape, finite, range warning
        f = self.downsample_factor
        if images.shape[-2] % f or images.shape[-1] % f:
            raise ValueError(
                f"image size {tuple(images.shape[-2:])} is not divisible by the downsampling factor {f}"
            )

    def check_codes(self, codes: torch.Tensor, depth: int | None = None) -> None:
        """Raise a clear error unless `codes` is an integer tensor `(N, h, w, D)` with values in [0, K)."""
        if not isinstance(codes, torch.Tensor) or codes.is_floating_point() or codes.dtype == torch.bool:
            raise TypeError(f"codes must be an integer tensor, got {getattr(codes, 'dtype', type(codes))}")
        if codes.ndim != 4 or codes.shape[-1] != (depth or self.config.code_depth):
            raise ValueError(
                f"codes must have shape (N, h, w, {depth or self.config.code_depth}), got {tuple(codes.shape)}"
            )
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.config.codebook_size):
            raise ValueError(
                f"codes must lie in [0, {self.config.codebook_size}), got range [{codes.min()}, {codes.max()}]"
            )

    def _check_latents(self, latents: torch.Tensor) -> None:
        if latents.ndim != 4 or latents.shape[1] != self.config.embed_dim:
            raise ValueError(f"latents must have shape (N, {self.config.embed_dim}, h, w), got {tuple(latents.shape)}")

    # ------------------------------------------------------------------------------------- API
    @apply_forward_hook
    def encode(self, images: torch.Tensor, return_codes: bool = False, return_dict: bool = True):
        """Encode images `(N, 3, H, W)` in [-1, 1] to the continuous latent `(N, embed_dim, h, w)`.

        With ``return_codes=True`` the output also carries the codes `(N, h, w, D)`.
        Input contract (``hf_rq.image_processing.check_model_images``): NaN / inf raise ``ValueError``, values
        outside [-1, 1] are warned about once; PIL / numpy images go through ``preprocess_images`` first.
        """
        self._check_images(images)
        latents = self.quant_conv(self.encoder(images))
        codes = self.quantize(latents).codes if return_codes else None
        if not return_dict:
            return (latents,) if codes is None else (latents, codes)
        return TokenizerEncoderOutput(latents=latents, codes=codes)

    def quantize(self, latents: torch.Tensor, return_dict: bool = True):
        """Residual-quantize `latents` `(N, C, h, w)` -> quantized `(N, C, h, w)`, codes `(N, h, w, D)`, loss.

        In training mode this also advances the codebook EMA (once per depth, in depth order).
        """
        self._check_latents(latents)
        quantized, codes, loss, _ = self.quantizer(latents.permute(0, 2, 3, 1))
        out = QuantizerOutput(quantized=quantized.permute(0, 3, 1, 2), codes=codes, commitment_loss=loss)
        return out if return_dict else out.to_tuple()

    @apply_forward_hook
    def decode(self, latents: torch.Tensor, force_not_quantize: bool = False, return_dict: bool = True):
        """Decode a latent `(N, C, h, w)` to images `(N, 3, H, W)` (not clamped).

        Unless ``force_not_quantize`` the latent is quantized first and the commitment loss returned.
        """
        self._check_latents(latents)
        commit_loss = None
        if not force_not_quantize:
            q = self.quantize(latents)
            latents, commit_loss = q.quantized, q.commitment_loss
        sample = self.decoder(self.post_quant_conv(latents))
        if not return_dict:
            return (sample, commit_loss)
        return TokenizerDecoderOutput(sample=sample, commit_loss=commit_loss)

    def codes_to_latents(self, codes: torch.LongTensor, depth: int | None = None) -> torch.Tensor:
        """The quantized latent `(N, C, h, w)` made from the first ``depth`` code levels (all by default)."""
        self.check_codes(codes)
        if depth is not None:
            if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= self.config.code_depth:
                raise ValueError(f"depth must be an integer in 1..{self.config.code_depth}, got {depth!r}")
            codes = codes[..., :depth]
        return self.quantizer.embed_codes(codes).permute(0, 3, 1, 2)

    @apply_forward_hook
    def decode_codes(self, codes: torch.LongTensor, depth: int | None = None, return_dict: bool = True):
        """Decode codes `(N, h, w, D)` to images; ``depth=d`` uses only the first ``d`` levels (coarse preview)."""
        return self.decode(self.codes_to_latents(codes, depth), force_not_quantize=True, return_dict=return_dict)

    def get_code_embeddings(self, codes: torch.LongTensor) -> torch.Tensor:
        """Per-depth codewords `(N, h, w, D, C)` of `codes` (not summed)."""
        self.check_codes(codes)
        return self.quantizer.embed_codes_with_depth(codes)

    @torch.no_grad()
    def get_soft_codes(
        self,
        images: torch.Tensor,
        temperature: float = 0.5,
        stochastic: bool = False,
        generator: torch.Generator | None = None,
    ):
        """Soft targets and codes for RQ-Transformer training (RQ paper 3.3; ARCHITECTURE.md 1.5 / 3.2).

        Returns ``(soft_codes (N, h, w, D, K), codes (N, h, w, D))``. With ``stochastic=True`` each code
        is drawn from its soft distribution (with ``generator``) and later residuals follow that draw.
        """
        latents = self.encode(images).latents
        return self.quantizer.soft_codes(latents.permute(0, 2, 3, 1), temperature, stochastic, generator)

    def forward(self, sample: torch.Tensor, return_dict: bool = True):
        """Encode, quantize and decode: reconstruction `(N, 3, H, W)`, codes `(N, h, w, D)`, commitment loss."""
        latents = self.encode(sample).latents
        q = self.quantize(latents)
        recon = self.decoder(self.post_quant_conv(q.quantized))
        out = TokenizerOutput(sample=recon, codes=q.codes, commitment_loss=q.commitment_loss)
        return out if return_dict else out.to_tuple()
