"""DQ-VAE: the dynamic-granularity image tokenizer of Huang et al. (CVPR 2023, "Towards Accurate Image Coding").

An image `(B, 3, H, H)` in [-1, 1] is encoded by a VQGAN-style trunk with one head per granularity. With two
granularities (the published model) the coarse head reads the last trunk level (stride ``s_c``, grid
``hc = H / s_c``) and the fine head the level before it, *before* its downsampling (stride ``s_c / 2``, grid
``hf = 2 hc``). A router decides per coarse region whether it is coded coarse (1 code) or fine (4 codes):

* the **entropy router** (``router_type="entropy"``, released checkpoint): fine iff the gray-level entropy of the
  region's pixels exceeds a threshold chosen on a dataset for a target fine ratio (:mod:`hf_rq.dq.entropy`);
* the **feature router** (``router_type="feature"``, the paper's): an MLP on the normalised coarse feature and the
  2x2-pooled fine feature; Gumbel-softmax (hard, straight-through) while training, arg-max in eval, with a
  budget loss pulling the batch's fine ratio towards ``fine_grain_ratio``.

The selected features are mixed **at the fine grid** (a coarse region = 4 copies of its vector) and quantized with
one EMA codebook, so the codes are `(B, hf, hf)` with coarse regions as 2x2 blocks of one code, plus the
granularity map `(B, hc, hc)` (0 = coarse, 1 = fine). The decoder never sees the map: learned + Fourier position
embeddings added to its input let it render a block of identical vectors non-uniformly.

Three granularities (``num_grains=3``, the authors' triple-grain tokenizer; feature router only) work the same
with coarse / median / fine heads at the last three trunk levels and a map with values 0 / 1 / 2.

Numerics follow the authors' code (ARCHITECTURE.md section 1), so converted checkpoints give the same codes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D, get_down_block
from diffusers.utils.accelerate_utils import apply_forward_hook

from ..autoencoder_blocks import level_has_attention, make_decoder
from ..outputs import QuantizerOutput, TokenizerDecoderOutput, TokenizerEncoderOutput, TokenizerOutput
from ..quantizers import EMACodebook
from .entropy import patch_entropy
from .tokens import DQTokens, check_grid_form, codes_to_tokens, tokens_to_codes, upsample_granularity
from ..hub import BundledModelsMixin
from ..image_processing import check_model_images

ROUTER_TYPES = ("entropy", "feature")
GATE_ACTIVATIONS = {"silu": nn.SiLU, "relu": nn.ReLU}
# The ImageNet-train 16 px patch threshold for a fine ratio of 0.5 (key "50" of the authors' JSON), the value the
# released entropy DQ-VAE and both published DQ-Transformer configs use.
IMAGENET_ENTROPY_THRESHOLD_R05 = 1.6777750253677368


@dataclass
class DQVAEEncoderOutput(TokenizerEncoderOutput):
    """Output of :meth:`DQVAEModel.encode`.

    Args:
        latents (`torch.Tensor` of shape `(B, embed_dim, hf, hf)`): the mixed latent before quantization
            (``quant_conv`` output; coarse regions hold 4 equal vectors).
        codes (`torch.LongTensor` of shape `(B, hf, hf)`): codes at the fine grid.
        granularity (`torch.LongTensor` of shape `(B, hc, hc)`): 0 = coarse, 1 = fine (triple: 0 / 1 / 2).
        quantized (`torch.Tensor` of shape `(B, embed_dim, hf, hf)`): codebook vectors (straight-through).
        commitment_loss (`torch.Tensor`): masked commitment loss (see :meth:`DQVAEModel.quantize`).
        features (`tuple[torch.Tensor]`): per-granularity head outputs, coarse first, `(B, z, hc * 2**g, ...)`.
        entropy (`torch.Tensor` of shape `(B, hc, hc)`, *optional*): patch entropies (entropy router).
        router_logits (`torch.Tensor` of shape `(B, hc, hc, G)`, *optional*): gate logits (feature router).
        gate (`torch.Tensor` of shape `(B, hc, hc, G)`): the routing decision as the authors' gate: one-hot int64
            (entropy router), straight-through one-hot (feature router while training) or the raw logits (eval).
    """

    quantized: torch.Tensor | None = None
    commitment_loss: torch.Tensor | None = None
    features: tuple | None = None
    entropy: torch.Tensor | None = None
    router_logits: torch.Tensor | None = None
    gate: torch.Tensor | None = None


class GrainHead(nn.Module):
    """The head of one granularity: VQGAN middle (ResNet, attention, ResNet), GroupNorm, SiLU, 3x3 conv to ``z``."""

    def __init__(self, channels: int, out_channels: int, norm_num_groups: int):
        super().__init__()
        self.mid_block = UNetMidBlock2D(
            in_channels=channels, resnet_eps=1e-6, resnet_act_fn="silu", output_scale_factor=1,
            resnet_time_scale_shift="default", attention_head_dim=channels, resnet_groups=norm_num_groups,
            temb_channels=None, add_attention=True,
        )
        self.conv_norm_out = nn.GroupNorm(num_channels=channels, num_groups=norm_num_groups, eps=1e-6)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(channels, out_channels, 3, padding=1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.conv_act(self.conv_norm_out(self.mid_block(h))))


GRAIN_NAMES = {2: ("coarse", "fine"), 3: ("coarse", "median", "fine")}


class MultiGrainEncoder(nn.Module):
    """The taming encoder trunk (``conv_in`` + down blocks, no middle) with one :class:`GrainHead` per granularity.

    Granularity ``g`` (0 = coarsest) taps the output of the last block of trunk level ``L - 1 - g``, *before* that
    level's downsampling, so consecutive granularities differ by a factor 2 in resolution. The heads are built
    from diffusers' ``get_down_block`` / ``UNetMidBlock2D``, which compute the taming blocks exactly.
    """

    def __init__(self, in_channels: int, latent_channels: int, block_out_channels, layers_per_block: int,
                 attn_resolutions, sample_size: int, num_grains: int, norm_num_groups: int):
        super().__init__()
        self.num_grains = num_grains
        self.gradient_checkpointing = False  # set by DQVAEModel.enable_gradient_checkpointing() (diffusers)
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        out = block_out_channels[0]
        levels = len(block_out_channels)
        for i in range(levels):
            inp, out = out, block_out_channels[i]
            kind = "AttnDownEncoderBlock2D" if level_has_attention(sample_size, i, attn_resolutions) else "DownEncoderBlock2D"
            self.down_blocks.append(get_down_block(
                kind, num_layers=layers_per_block, in_channels=inp, out_channels=out, add_downsample=i < levels - 1,
                resnet_eps=1e-6, downsample_padding=0, resnet_act_fn="silu", resnet_groups=norm_num_groups,
                attention_head_dim=out, temb_channels=None,
            ))
        for g, name in enumerate(GRAIN_NAMES[num_grains]):
            setattr(self, f"{name}_head", GrainHead(block_out_channels[levels - 1 - g], latent_channels, norm_num_groups))

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """`(B, 3, H, W)` -> per-granularity features, coarse first: `(B, z, H / s_c * 2**g, ...)`."""
        levels = len(self.down_blocks)
        taps = {}
        h = self.conv_in(images)
        for i, block in enumerate(self.down_blocks):
            attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
            checkpointed = torch.is_grad_enabled() and self.gradient_checkpointing
            for resnet, attn in zip(block.resnets, attentions):
                h = self._gradient_checkpointing_func(resnet, h, None) if checkpointed else resnet(h, temb=None)
                if attn is not None:
                    h = self._gradient_checkpointing_func(attn, h) if checkpointed else attn(h)
            taps[i] = h  # tapped before the level's downsampling
            if block.downsamplers is not None:
                h = block.downsamplers[0](h)
        names = GRAIN_NAMES[self.num_grains]
        return [getattr(self, f"{name}_head")(taps[levels - 1 - g]) for g, name in enumerate(names)]


class FeatureRouter(nn.Module):
    """The learned router: GroupNorm per granularity, average-pool to the coarse grid, concatenate (coarse first),
    then a gate MLP to one logit per granularity. Output `(B, hc, hc, G)`."""

    def __init__(self, channels: int, num_grains: int, norm_num_groups: int | None, gate_layers: int, gate_act: str):
        super().__init__()
        self.num_grains = num_grains
        for name in GRAIN_NAMES[num_grains]:
            norm = nn.GroupNorm(norm_num_groups, channels, eps=1e-6) if norm_num_groups else nn.Identity()
            setattr(self, f"{name}_norm", norm)
        width = channels * num_grains
        if gate_layers == 1:
            self.gate = nn.Linear(width, num_grains)
        else:
            self.gate = nn.Sequential(nn.Linear(width, width), GATE_ACTIVATIONS[gate_act](), nn.Linear(width, num_grains))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        pooled = []
        for g, (name, h) in enumerate(zip(GRAIN_NAMES[self.num_grains], features)):
            h = getattr(self, f"{name}_norm")(h)
            pooled.append(F.avg_pool2d(h, 2**g) if g else h)
        return self.gate(torch.cat(pooled, dim=1).permute(0, 2, 3, 1))


class FourierLearnedPositionEmbedding(nn.Module):
    """What DQ-VAE's decoder adds to its input: ``sin(conv1x1(x, y))`` on a fixed [-1, 1] coordinate grid plus a
    learned ``row_embed[i] + col_embed[j]``. The coordinate grid is rebuilt at every call (it is not state and
    thereby always has the input's dtype and device)."""

    def __init__(self, grid_size: int, channels: int):
        super().__init__()
        self.grid_size = grid_size
        self.fourier = nn.Conv2d(2, channels, 1)
        self.row_embed = nn.Embedding(grid_size, channels)
        self.col_embed = nn.Embedding(grid_size, channels)
        bound = math.sqrt(9 / 2)  # the authors' SIREN-style "first layer" init
        nn.init.uniform_(self.fourier.weight, -bound, bound)
        nn.init.trunc_normal_(self.row_embed.weight, std=1.0, a=-2.0, b=2.0)
        nn.init.trunc_normal_(self.col_embed.weight, std=1.0, a=-2.0, b=2.0)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        n = self.grid_size
        if h.shape[-2:] != (n, n):
            raise ValueError(f"the decoder's position embeddings are for a {n}x{n} latent, got {tuple(h.shape[-2:])}")
        line = torch.linspace(-1, 1, n, device=h.device)
        coords = torch.stack([line[None, :].expand(n, n), line[:, None].expand(n, n)])[None]  # (x, y) channels
        h = h + torch.sin(self.fourier(coords.to(h.dtype)))
        index = torch.arange(n, device=h.device)
        learned = self.col_embed(index)[None, :, :] + self.row_embed(index)[:, None, :]  # (n_rows, n_cols, C)
        return h + learned.permute(2, 0, 1)[None]


class DQVAEModel(BundledModelsMixin, ModelMixin, ConfigMixin):
    r"""Dynamic-granularity VQ-VAE (DQ-VAE) with a VQModel-style API.

    Parameters:
        in_channels / out_channels (`int`): image channels.
        sample_size (`int`): the (square) image size the model works at. The entropy router and the decoder's
            learned position embeddings are built for it, so other sizes are rejected.
        block_out_channels (`tuple[int]`): encoder trunk width per level (``ch * ch_mult``); the coarse grid is
            ``sample_size / 2**(levels - 1)``.
        layers_per_block (`int`), attn_resolutions (`tuple[int]`): encoder ResNet blocks per level, resolutions
            with self-attention.
        decoder_block_out_channels (`tuple[int]`), decoder_layers_per_block (`int`), decoder_attn_resolutions
            (`tuple[int]`): the decoder (``num_res_blocks + 1`` blocks a level); it must upsample the fine grid to
            ``sample_size``, i.e. have ``levels - num_grains + 1`` levels.
        latent_channels (`int`): ``z_channels`` (head outputs and decoder input).
        embed_dim (`int`): codebook vector width ``D`` (``quant_conv`` output).
        codebook_size (`int`): ``K``; the table has ``K + 1`` rows (the authors' padding row).
        ema_decay (`float`), restart_unused_codes (`bool`): EMA codebook settings.
        commitment_weight (`float`): beta of the commitment loss in the training recipe.
        num_grains (`int`): 2 (coarse / fine, published) or 3 (coarse / median / fine, feature router only).
        router_type (`str`): ``"entropy"`` or ``"feature"``.
        entropy_threshold (`float`, *optional*): entropy router: a region is fine iff its entropy is ``>`` this
            (pick it with :func:`hf_rq.dq.entropy.threshold_for_ratio`).
        entropy_bin_range (`tuple[float, float]`): histogram bin range of the patch entropy (module docstring of
            :mod:`hf_rq.dq.entropy`).
        router_norm_num_groups (`int`): feature router: GroupNorm groups on each feature (0 = no normalisation).
        router_gate_layers (`int`), router_gate_act (`str`): feature router gate: 1 Linear, or Linear-act-Linear.
        update_router (`bool`): feature router: sample the gate with hard Gumbel-softmax while training (else
            arg-max of the logits, also while training). The triple-grain router always samples while training.
        fine_grain_ratio (`float`): target share of fine regions: the budget loss target (feature router) or the
            ratio the entropy threshold was chosen for (informational).
        median_grain_ratio (`float`, *optional*): triple-grain budget target for the median granularity.
        budget_gamma (`float`): weight of the budget loss (published: 10 dual, 1 triple).
        norm_num_groups (`int`): GroupNorm groups of encoder and decoder.
    """

    _supports_gradient_checkpointing = True
    _skip_layerwise_casting_patterns = ["quantizer"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        sample_size: int = 256,
        block_out_channels: tuple[int, ...] = (128, 128, 256, 256, 512),
        layers_per_block: int = 2,
        attn_resolutions: tuple[int, ...] = (16, 32),
        decoder_block_out_channels: tuple[int, ...] = (128, 128, 256, 256),
        decoder_layers_per_block: int = 2,
        decoder_attn_resolutions: tuple[int, ...] = (32,),
        latent_channels: int = 256,
        embed_dim: int = 256,
        codebook_size: int = 1024,
        ema_decay: float = 0.99,
        restart_unused_codes: bool = True,
        commitment_weight: float = 0.25,
        num_grains: int = 2,
        router_type: str = "entropy",
        entropy_threshold: float | None = IMAGENET_ENTROPY_THRESHOLD_R05,
        entropy_bin_range: tuple[float, float] = (-1.0, 1.0),
        router_norm_num_groups: int = 32,
        router_gate_layers: int = 2,
        router_gate_act: str = "silu",
        update_router: bool = True,
        fine_grain_ratio: float = 0.5,
        median_grain_ratio: float | None = None,
        budget_gamma: float = 10.0,
        norm_num_groups: int = 32,
    ):
        super().__init__()
        self._validate_config()
        self.encoder = MultiGrainEncoder(in_channels, latent_channels, block_out_channels, layers_per_block,
                                         attn_resolutions, sample_size, num_grains, norm_num_groups)
        if router_type == "feature":
            self.router = FeatureRouter(latent_channels, num_grains, router_norm_num_groups or None,
                                        router_gate_layers, router_gate_act)
        self.quant_conv = nn.Conv2d(latent_channels, embed_dim, 1)
        self.quantizer = EMACodebook(codebook_size, embed_dim, ema_decay, restart_unused_codes, init="uniform")
        self.post_quant_conv = nn.Conv2d(embed_dim, latent_channels, 1)
        self.position_embedding = FourierLearnedPositionEmbedding(self.fine_grid_size, latent_channels)
        self.decoder = make_decoder(latent_channels, out_channels, decoder_block_out_channels, decoder_layers_per_block,
                                    decoder_attn_resolutions, sample_size, norm_num_groups)

    def _validate_config(self) -> None:
        c = self.config
        if c.num_grains not in GRAIN_NAMES:
            raise ValueError(f"num_grains must be 2 or 3, got {c.num_grains}")
        if c.router_type not in ROUTER_TYPES:
            raise ValueError(f"router_type must be one of {ROUTER_TYPES}, got {c.router_type!r}")
        if c.router_type == "entropy":
            if c.num_grains != 2:
                raise ValueError("the entropy router has two granularities only (num_grains=2); use router_type='feature'")
            if c.entropy_threshold is None:
                raise ValueError("router_type='entropy' needs entropy_threshold (see hf_rq.dq.entropy.threshold_for_ratio)")
        if c.router_gate_layers not in (1, 2):
            raise ValueError(f"router_gate_layers must be 1 or 2, got {c.router_gate_layers}")
        if c.router_gate_act not in GATE_ACTIVATIONS:
            raise ValueError(f"router_gate_act must be one of {sorted(GATE_ACTIVATIONS)}, got {c.router_gate_act!r}")
        levels = len(c.block_out_channels)
        if levels < c.num_grains:
            raise ValueError(f"block_out_channels needs at least num_grains={c.num_grains} levels, got {levels}")
        stride = 2 ** (levels - 1)
        if c.sample_size % stride:
            raise ValueError(f"sample_size {c.sample_size} is not divisible by the coarse stride {stride}")
        if len(c.decoder_block_out_channels) != levels - c.num_grains + 1:
            raise ValueError(
                f"decoder_block_out_channels must have {levels - c.num_grains + 1} levels so that the decoder upsamples "
                f"the fine grid ({self.fine_grid_size}) to sample_size {c.sample_size}; got {len(c.decoder_block_out_channels)}"
            )
        groups = [c.norm_num_groups] * 2 + ([c.router_norm_num_groups] if c.router_type == "feature" and c.router_norm_num_groups else [])
        for channels in (*c.block_out_channels, *c.decoder_block_out_channels, c.latent_channels):
            for g in groups:
                if channels % g:
                    raise ValueError(f"channel count {channels} is not a multiple of the GroupNorm groups {g}")
        lo, hi = c.entropy_bin_range
        if not lo < hi:
            raise ValueError(f"entropy_bin_range must be (low, high) with low < high, got {c.entropy_bin_range}")
        if not 0.0 < c.fine_grain_ratio < 1.0:
            raise ValueError(f"fine_grain_ratio must be in (0, 1), got {c.fine_grain_ratio}")
        if c.num_grains == 3 and c.median_grain_ratio is None:
            raise ValueError("a triple-grain model needs median_grain_ratio (the budget target of the median granularity)")

    # ------------------------------------------------------------------------------------ geometry
    @property
    def coarse_stride(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    @property
    def downsample_factor(self) -> int:
        """Stride of the code grid (the finest granularity)."""
        return self.coarse_stride // 2 ** (self.config.num_grains - 1)

    @property
    def coarse_grid_size(self) -> int:
        return self.config.sample_size // self.coarse_stride

    @property
    def fine_grid_size(self) -> int:
        return self.config.sample_size // self.downsample_factor

    # --------------------------------------------------------------------------------------- checks
    def _check_images(self, images: torch.Tensor) -> None:
        c = self.config
        check_model_images(images, c.in_channels, owner=self, batch="B")  # type, shape, finite, range warning
        H, W = images.shape[-2:]
        if H != W:
            raise ValueError(
                f"DQ-VAE takes square images only (its routing grid and decoder position embeddings are square); got {H}x{W}"
            )
        if H != c.sample_size:
            raise ValueError(
                f"this DQ-VAE works at {c.sample_size}x{c.sample_size} (config.sample_size), got {H}x{W}: resize the "
                "images first (the granularity grid and the decoder's position embeddings have a fixed size)"
            )

    def check_codes(self, codes: torch.Tensor, granularity: torch.Tensor | None = None) -> None:
        """Raise a clear error unless `codes` `(B, hf, hf)` (and `granularity` `(B, hc, hc)`) are valid and consistent."""
        hf = self.fine_grid_size
        if not isinstance(codes, torch.Tensor) or codes.is_floating_point() or codes.dtype == torch.bool:
            raise TypeError(f"codes must be an integer tensor, got {getattr(codes, 'dtype', type(codes).__name__)}")
        if codes.ndim != 3 or tuple(codes.shape[1:]) != (hf, hf):
            raise ValueError(f"codes must have shape (B, {hf}, {hf}) (the fine grid), got {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.config.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.config.codebook_size}), got range [{codes.min()}, {codes.max()}]")
        if granularity is not None:
            hc = self.coarse_grid_size
            if not isinstance(granularity, torch.Tensor) or granularity.ndim != 3 or tuple(granularity.shape[1:]) != (hc, hc):
                raise ValueError(f"granularity must have shape (B, {hc}, {hc}), got {tuple(getattr(granularity, 'shape', ()))}")
            if self.config.num_grains == 2:
                check_grid_form(codes, granularity, self.config.codebook_size)
            else:
                self._check_triple_consistency(codes, granularity)

    def _check_triple_consistency(self, codes, granularity) -> None:
        if granularity.is_floating_point() or granularity.min() < 0 or granularity.max() > 2:
            raise ValueError("a triple-grain granularity map holds integers 0 (coarse), 1 (median) or 2 (fine)")
        B, hc = granularity.shape[:2]
        # A coarse region is a 4x4 block of one code; each 2x2 quarter of a median region is one code.
        for level, name, size, block in ((0, "coarse", hc, 4), (1, "median", 2 * hc, 2)):
            tiles = codes.reshape(B, size, block, size, block).permute(0, 1, 3, 2, 4).reshape(B, size, size, -1)
            marked = upsample_granularity(granularity, size // hc) == level
            uneven = (tiles != tiles[..., :1]).any(-1) & marked
            if uneven.any():
                b, i, j = uneven.nonzero()[0].tolist()
                raise ValueError(f"granularity map inconsistent with the codes: the {block}x{block} block ({i}, {j}) "
                                 f"of image {b} belongs to a {name} region but holds different codes")

    # ------------------------------------------------------------------------------------- routing
    def route(self, images: torch.Tensor, features: list[torch.Tensor]):
        """Routing decision for each coarse region.

        Returns ``(granularity (B, hc, hc), gate (B, hc, hc, G), entropy or None, router_logits or None)``.
        """
        c = self.config
        if c.router_type == "entropy":
            entropy = patch_entropy(images, self.coarse_stride, tuple(c.entropy_bin_range))
            fine = entropy > c.entropy_threshold  # strict, as the authors
            gate = torch.stack([~fine, fine], dim=-1).long()
            return fine.long(), gate, entropy, None
        logits = self.router(features)
        # Straight-through one-hot while training (tau 1, no annealing), raw logits otherwise.
        gate = F.gumbel_softmax(logits, tau=1.0, hard=True, dim=-1) if self._samples_gate() else logits
        return gate.argmax(dim=-1), gate, None, logits

    def _samples_gate(self) -> bool:
        """Whether routing draws a hard Gumbel-softmax gate (feature router while training)."""
        c = self.config
        return self.training and c.router_type == "feature" and (c.update_router or c.num_grains == 3)

    def _mix(self, features: list[torch.Tensor], granularity: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """Select each region's feature at the fine grid (coarser features repeated) -> `(B, z, hf, hf)`."""
        G = len(features)
        grain = upsample_granularity(granularity, 2 ** (G - 1))[:, None]
        mixed = features[-1]
        for g in range(G - 1):
            mixed = torch.where(grain == g, upsample_granularity(features[g], 2 ** (G - 1 - g)), mixed)
        if self._samples_gate():
            # The straight-through gate is 1.0 in value; multiplying by it only carries gradient to the router.
            mixed = mixed * upsample_granularity(gate.max(dim=-1).values, 2 ** (G - 1))[:, None]
        return mixed

    def codebook_mask(self, granularity: torch.Tensor) -> torch.Tensor:
        """Per-vector weight of the VQ loss at the fine grid `(B, hf, hf, 1)`: ``4**-(G - 1 - g)`` (0.25 for coarse)."""
        G = self.config.num_grains
        weight = torch.pow(0.25, (G - 1 - granularity).float())
        return upsample_granularity(weight, 2 ** (G - 1))[..., None]

    def budget_loss(self, gate: torch.Tensor) -> torch.Tensor:
        r"""The authors' budget loss on a (one-hot) gate `(B, hc, hc, G)`.

        Two granularities (``BudgetConstraint_RatioMSE_DualGrain`` with ``calculate_all``): with the batch-mean
        fine share ``rho = (sum(g_0 + 4 g_1) / B - hc^2) / (hf^2 - hc^2)`` the loss is ``2 gamma (rho - r)^2``
        (their code adds the "coarse" term ``gamma ((1 - rho) - (1 - r))^2`` twice). Three granularities:
        ``gamma (rho_fine - r_f)^2 + (rho_median - r_m)^2`` with the authors' normalisations.
        """
        c = self.config
        B = gate.shape[0]
        hc = self.coarse_grid_size
        g = gate.float()
        if c.num_grains == 2:
            ratio = ((g[..., 0] + 4.0 * g[..., 1]).sum() / B - hc * hc) / ((2 * hc) ** 2 - hc * hc)
            target = torch.full_like(ratio, c.fine_grain_ratio)
            term = c.budget_gamma * F.mse_loss(1 - ratio, 1 - target)
            return term + term
        low, mid, high = hc * hc, (2 * hc) ** 2, (4 * hc) ** 2
        ratio_median = ((g[..., 0] + 4.0 * g[..., 1] + g[..., 2]).sum() / B - low) / (mid - low)
        ratio_fine = ((g[..., 0] + 16.0 * g[..., 2] + g[..., 1]).sum() / B - low) / (high - low)
        return (c.budget_gamma * F.mse_loss(ratio_fine, torch.full_like(ratio_fine, c.fine_grain_ratio))
                + F.mse_loss(ratio_median, torch.full_like(ratio_median, c.median_grain_ratio)))

    # ------------------------------------------------------------------------------------------ API
    @apply_forward_hook
    def encode(self, images: torch.Tensor, return_codes: bool = True, return_dict: bool = True):
        """Encode images `(B, 3, S, S)` in [-1, 1] (``S = sample_size``) to codes and a granularity map.

        Returns :class:`DQVAEEncoderOutput` with ``codes`` `(B, hf, hf)`, ``granularity`` `(B, hc, hc)`,
        ``latents`` / ``quantized`` `(B, D, hf, hf)` and the routing details. ``return_codes`` is accepted for
        API symmetry with the other tokenizers; DQ always quantizes (the codes are the point of encoding).
        With ``return_dict=False``: ``(latents, codes, granularity)``.
        Input contract (``hf_rq.image_processing.check_model_images``): NaN / inf raise ``ValueError``, values
        outside [-1, 1] are warned about once; PIL / numpy images go through ``preprocess_images`` first.
        """
        self._check_images(images)
        features = self.encoder(images)
        granularity, gate, entropy, logits = self.route(images, features)
        latents = self.quant_conv(self._mix(features, granularity, gate))
        q = self.quantize(latents, granularity)
        if not return_dict:
            return latents, q.codes, granularity
        return DQVAEEncoderOutput(latents=latents, codes=q.codes, granularity=granularity, quantized=q.quantized,
                                  commitment_loss=q.commitment_loss, features=tuple(features), entropy=entropy,
                                  router_logits=logits, gate=gate)

    def quantize(self, latents: torch.Tensor, granularity: torch.Tensor | None = None, return_dict: bool = True):
        """Quantize `latents` `(B, D, hf, hf)` with the shared codebook.

        Returns :class:`~hf_rq.QuantizerOutput`: ``quantized`` `(B, D, hf, hf)` (straight-through), ``codes``
        `(B, hf, hf)` and ``commitment_loss = mean(m * (sg[q] - z)^2)`` over all ``B*hf*hf*D`` entries, with
        ``m`` the :meth:`codebook_mask` of ``granularity`` (all ones when None). The authors' VQ loss is
        ``beta * commitment_loss + mean(m * (q - sg[z])^2)``; its second term has the same value as the first
        and no effect on training with an EMA codebook, so it is not returned. In training mode this also
        advances the EMA (every fine-grid vector counts, so a coarse vector counts four times, as the authors').
        """
        D, hf = self.config.embed_dim, self.fine_grid_size
        if latents.ndim != 4 or latents.shape[1] != D or tuple(latents.shape[-2:]) != (hf, hf):
            raise ValueError(f"latents must have shape (B, {D}, {hf}, {hf}), got {tuple(latents.shape)}")
        z = latents.permute(0, 2, 3, 1)
        codewords, codes = self.quantizer(z)
        codewords = codewords.to(z.dtype)
        mask = self.codebook_mask(granularity) if granularity is not None else torch.ones_like(z[..., :1])
        commitment = ((codewords.detach() - z).pow(2) * mask).mean()
        quantized = (z + (codewords - z).detach()).permute(0, 3, 1, 2)
        out = QuantizerOutput(quantized=quantized, codes=codes, commitment_loss=commitment)
        return out if return_dict else out.to_tuple()

    @apply_forward_hook
    def decode(self, latents: torch.Tensor, force_not_quantize: bool = False, granularity: torch.Tensor | None = None,
               return_dict: bool = True):
        """Decode a latent `(B, D, hf, hf)` to images `(B, 3, S, S)` (not clamped).

        Unless ``force_not_quantize`` the latent is quantized first (``granularity`` only weights the returned
        commitment loss). The decoder never sees the granularity map.
        """
        commit_loss = None
        if not force_not_quantize:
            q = self.quantize(latents, granularity)
            latents, commit_loss = q.quantized, q.commitment_loss
        sample = self.decoder(self.position_embedding(self.post_quant_conv(latents)))
        if not return_dict:
            return (sample, commit_loss)
        return TokenizerDecoderOutput(sample=sample, commit_loss=commit_loss)

    def codes_to_latents(self, codes: torch.LongTensor, granularity: torch.LongTensor | None = None) -> torch.Tensor:
        """Codebook vectors `(B, D, hf, hf)` of `codes` `(B, hf, hf)` (``granularity``, if given, is checked)."""
        self.check_codes(codes, granularity)
        return self.quantizer.embed(codes).permute(0, 3, 1, 2)

    @apply_forward_hook
    def decode_codes(self, codes: torch.LongTensor, granularity: torch.LongTensor | None = None, return_dict: bool = True):
        """Decode codes `(B, hf, hf)` to images. ``granularity`` `(B, hc, hc)` is optional (the decoder does not use
        it); when given it must be consistent with the codes (coarse regions = blocks of one code) or a
        ``ValueError`` is raised."""
        return self.decode(self.codes_to_latents(codes, granularity), force_not_quantize=True, return_dict=return_dict)

    # token form (shared with the DQ-Transformer; see hf_rq.dq.tokens)
    def codes_to_tokens(self, codes: torch.LongTensor, granularity: torch.LongTensor,
                        fine_position_order: str = "row-first") -> DQTokens:
        """Grid form -> token form (:func:`hf_rq.dq.tokens.codes_to_tokens`)."""
        if self.config.num_grains != 2:
            raise ValueError("the token form is defined for two granularities (the authors ship no triple-grain prior)")
        self.check_codes(codes, granularity)
        return codes_to_tokens(codes, granularity, self.config.codebook_size, fine_position_order)

    def tokens_to_codes(self, tokens: DQTokens) -> tuple[torch.LongTensor, torch.LongTensor]:
        """Token form -> ``(codes, granularity)`` (:func:`hf_rq.dq.tokens.tokens_to_codes`)."""
        return tokens_to_codes(tokens, self.config.codebook_size, self.coarse_grid_size)

    def get_last_layer(self) -> torch.Tensor:
        """The decoder's output conv weight (where the adaptive GAN weight is measured)."""
        return self.decoder.conv_out.weight

    def forward(self, sample: torch.Tensor, return_dict: bool = True):
        """Encode, quantize and decode.

        Returns :class:`~hf_rq.TokenizerOutput`: reconstruction, codes `(B, hf, hf)`, commitment loss, the
        granularity map, and as ``extra_loss`` the budget loss of a feature router (on the straight-through gate
        while training, on the hard decisions in eval; None for the entropy router).
        """
        enc = self.encode(sample)
        recon = self.decode(enc.quantized, force_not_quantize=True).sample
        extra = None
        if self.config.router_type == "feature":
            gate = enc.gate if self._samples_gate() else F.one_hot(
                enc.granularity, self.config.num_grains).float()
            extra = self.budget_loss(gate)
        out = TokenizerOutput(sample=recon, codes=enc.codes, commitment_loss=enc.commitment_loss, extra_loss=extra,
                              granularity=enc.granularity)
        return out if return_dict else out.to_tuple()
