"""LlamaGen's VQ image tokenizer (Sun et al., 2024), the tokenizer CTF builds on.

An image `(N, 3, H, W)` in [-1, 1] is encoded to a latent `(N, embed_dim, h, w)` with
``h = H / 2**(levels - 1)`` (16 for VQ-16), and each latent vector is quantized to one code of a single
codebook: codes `(N, h, w)`. Codes and codebook rows are l2-normalised before the search (cosine
nearest neighbour), and decoding always uses the normalised rows.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils.accelerate_utils import apply_forward_hook

from ..autoencoder_blocks import make_decoder, make_encoder
from ..outputs import QuantizerOutput, TokenizerDecoderOutput, TokenizerEncoderOutput, TokenizerOutput
from ..quantizers import VectorQuantizer
from ..hub import BundledModelsMixin
from ..image_processing import check_model_images


class LlamaGenVQModel(BundledModelsMixin, ModelMixin, ConfigMixin):
    r"""LlamaGen's VQ tokenizer (VQModel-style API, one code per latent position).

    The encoder and decoder are the taming/VQGAN ones, built from diffusers' ``Encoder`` / ``Decoder``
    (``hf_rq.autoencoder_blocks``): LlamaGen's compute the same function (GroupNorm(32, eps 1e-6), swish,
    ResNet blocks with a 1x1 shortcut, single-head attention scaled by ``C**-0.5``, right/bottom-padded
    stride-2 downsampling, nearest x2 upsampling + 3x3 conv, a res/attn/res middle block, ``layers_per_block
    + 1`` blocks per decoder level), given that ``block_out_channels[0]`` is LlamaGen's ``ch`` (its ch_mult
    starts with 1, as in every released model; the converter checks it).

    Parameters:
        in_channels / out_channels (`int`): image channels.
        block_out_channels (`tuple[int]`): width of each encoder level (``ch * ch_mult``); the downsampling
            factor is ``2 ** (len(block_out_channels) - 1)``.
        decoder_block_out_channels (`tuple[int]`, *optional*): width of each decoder level, listed from the
            finest level like the encoder's (LlamaGen's ``decoder_ch_mult``); defaults to the encoder's.
        layers_per_block (`int`): ResNet blocks per encoder level (decoder levels get one more).
        latent_channels (`int`): encoder output channels (``z_channels``).
        embed_dim (`int`): code width ``C`` (``codebook_embed_dim``).
        codebook_size (`int`): number of codes ``K``.
        codebook_l2_norm (`bool`): l2-normalise latent vectors and codebook rows (LlamaGen: always true).
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
        block_out_channels: tuple[int, ...] = (128, 128, 256, 256, 512),
        decoder_block_out_channels: tuple[int, ...] | None = None,
        layers_per_block: int = 2,
        latent_channels: int = 256,
        embed_dim: int = 8,
        codebook_size: int = 16384,
        codebook_l2_norm: bool = True,
        commitment_weight: float = 0.25,
        norm_num_groups: int = 32,
    ):
        super().__init__()
        decoder_channels = tuple(decoder_block_out_channels or block_out_channels)
        for name, channels in (("block_out_channels", block_out_channels),
                               ("decoder_block_out_channels", decoder_channels)):
            if not channels or any(c % norm_num_groups for c in channels):
                raise ValueError(
                    f"{name} {list(channels)} must be non-empty multiples of norm_num_groups={norm_num_groups}"
                )

        # LlamaGen puts attention at the coarsest level whatever the image size; the shared builders place it
        # by resolution, so give them a nominal input size whose coarsest level has resolution 1.
        def attention_at_coarsest(channels) -> dict:
            return dict(
                block_out_channels=tuple(channels),
                layers_per_block=layers_per_block,
                attn_resolutions=(1,),
                sample_size=2 ** (len(channels) - 1),
                norm_num_groups=norm_num_groups,
            )

        self.encoder = make_encoder(in_channels, latent_channels, **attention_at_coarsest(block_out_channels))
        self.quant_conv = nn.Conv2d(latent_channels, embed_dim, 1)
        self.quantizer = VectorQuantizer(codebook_size, embed_dim, l2_normalize=codebook_l2_norm)
        self.post_quant_conv = nn.Conv2d(embed_dim, latent_channels, 1)
        self.decoder = make_decoder(latent_channels, out_channels, **attention_at_coarsest(decoder_channels))

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent position along each side (16 for VQ-16, 8 for VQ-8)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    @property
    def codebook(self) -> torch.Tensor:
        """The `(K, C)` codebook as used for search and decoding (l2-normalised rows when ``codebook_l2_norm``).

        Differentiable with respect to the stored rows; call ``.detach()`` for clustering or analysis.
        """
        return self.quantizer.codewords

    # ----------------------------------------------------------------------------------- checks
    def _check_images(self, images: torch.Tensor) -> None:
        check_model_images(images, self.config.in_channels, owner=self)  # type, shape, finite, range warning
        f = self.downsample_factor
        if images.shape[-2] % f or images.shape[-1] % f:
            raise ValueError(
                f"image size {tuple(images.shape[-2:])} is not divisible by the downsampling factor {f}"
            )

    def check_codes(self, codes: torch.Tensor) -> None:
        """Raise a clear error unless `codes` is an integer tensor `(N, h, w)` with values in [0, K)."""
        if (not isinstance(codes, torch.Tensor) or codes.is_floating_point() or codes.is_complex()
                or codes.dtype == torch.bool):
            raise TypeError(f"codes must be an integer tensor, got {getattr(codes, 'dtype', type(codes))}")
        if codes.ndim != 3:
            raise ValueError(f"codes must have shape (N, h, w), got {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.config.codebook_size):
            raise ValueError(
                f"codes must lie in [0, {self.config.codebook_size}), got range [{codes.min()}, {codes.max()}]"
            )

    def _check_latents(self, latents: torch.Tensor) -> None:
        if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
            raise TypeError(f"latents must be a float tensor, got {getattr(latents, 'dtype', type(latents))}")
        if latents.ndim != 4 or latents.shape[1] != self.config.embed_dim:
            raise ValueError(f"latents must have shape (N, {self.config.embed_dim}, h, w), got {tuple(latents.shape)}")

    # ------------------------------------------------------------------------------------- API
    @apply_forward_hook
    def encode(self, images: torch.Tensor, return_codes: bool = False, return_dict: bool = True):
        """Encode images `(N, 3, H, W)` in [-1, 1] to the continuous latent `(N, embed_dim, h, w)`.

        The latent is not normalised (the quantizer does that). With ``return_codes=True`` the output also
        carries the codes `(N, h, w)`.
        Input contract (``hf_rq.image_processing.check_model_images``): NaN / inf raise ``ValueError``, values
        outside [-1, 1] are warned about once; PIL / numpy images go through ``preprocess_images`` first.
        """
        self._check_images(images)
        latents = self.quant_conv(self.encoder(images))
        codes = self.quantizer.nearest(latents.permute(0, 2, 3, 1)) if return_codes else None
        if not return_dict:
            return (latents,) if codes is None else (latents, codes)
        return TokenizerEncoderOutput(latents=latents, codes=codes)

    def quantize(self, latents: torch.Tensor, return_dict: bool = True):
        """Quantize `latents` `(N, C, h, w)` -> quantized `(N, C, h, w)`, codes `(N, h, w)`, losses.

        The quantized latent is the straight-through value ``z + sg[e - z]`` with ``z`` the normalised
        latent and ``e`` the normalised codeword. ``commitment_loss`` = ``mean((sg[e] - z)^2)`` (weight it by
        ``config.commitment_weight``) and ``codebook_loss`` = ``mean((e - sg[z])^2)`` (weight 1).
        """
        self._check_latents(latents)
        quantized, codes, commitment_loss, codebook_loss = self.quantizer(latents.permute(0, 2, 3, 1))
        out = QuantizerOutput(
            quantized=quantized.permute(0, 3, 1, 2),
            codes=codes,
            commitment_loss=commitment_loss,
            codebook_loss=codebook_loss,
        )
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

    def get_code_embeddings(self, codes: torch.LongTensor) -> torch.Tensor:
        """Codewords `(N, h, w, C)` of `codes` `(N, h, w)` (normalised rows when ``codebook_l2_norm``)."""
        self.check_codes(codes)
        return self.quantizer.embed(codes)

    def codes_to_latents(self, codes: torch.LongTensor) -> torch.Tensor:
        """The quantized latent `(N, C, h, w)` of `codes` `(N, h, w)` (what ``decode`` expects)."""
        return self.get_code_embeddings(codes).permute(0, 3, 1, 2)

    @apply_forward_hook
    def decode_codes(self, codes: torch.LongTensor, return_dict: bool = True):
        """Decode codes `(N, h, w)` to images `(N, 3, h * f, w * f)` (not clamped)."""
        return self.decode(self.codes_to_latents(codes), force_not_quantize=True, return_dict=return_dict)

    def forward(self, sample: torch.Tensor, return_dict: bool = True):
        """Encode, quantize and decode: reconstruction `(N, 3, H, W)`, codes `(N, h, w)` and both VQ losses.

        Training loss of the authors (without the perceptual/GAN terms): ``recon + codebook_loss +
        config.commitment_weight * commitment_loss``.
        """
        latents = self.encode(sample).latents
        q = self.quantize(latents)
        recon = self.decoder(self.post_quant_conv(q.quantized))
        out = TokenizerOutput(
            sample=recon, codes=q.codes, commitment_loss=q.commitment_loss, codebook_loss=q.codebook_loss
        )
        return out if return_dict else out.to_tuple()
