"""Stage-1 (tokenizer) training losses: reconstruction, perceptual, PatchGAN hinge loss with adaptive weight.

The recipe is the VQGAN one that RQ-VAE, DQ-VAE and LlamaGen's tokenizer all train with (RQ
ARCHITECTURE.md 1.6; DQ 1.5; LLAMAGEN.md 1)::

    L_G = L_rec + w_commit * L_commit + L_codebook + L_extra + w_p * LPIPS + lambda * w_d * (-mean D(x_hat))
    L_D = w_d * 0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))
    lambda = |grad_W L_nll| / (|grad_W L_gan| + 1e-4), clamped to [0, max], W = the decoder's last conv,
             L_nll = L_rec + w_p * LPIPS  (the commitment term is not part of it, as in the authors' code)

The GAN terms are off before ``disc_start`` (optimizer steps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix; as used by taming-transformers and the RQ/DQ/LlamaGen authors).

    4x4 convolutions: one stride-2 conv + LeakyReLU(0.2), ``n_layers - 1`` more stride-2 conv + BatchNorm +
    LeakyReLU with widths doubling up to ``8 * ndf``, one stride-1 conv + BatchNorm + LeakyReLU, and a
    stride-1 conv to one logit per patch. Input `(N, C, H, W)` in [-1, 1] -> logits `(N, 1, h, w)`.
    Convolutions are initialised N(0, 0.02), BatchNorm weights N(1, 0.02) (the authors' ``weights_init``).
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"discriminator needs n_layers >= 1, got {n_layers}")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False), nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.normal_(0.0, 0.02, generator=generator)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.normal_(1.0, 0.02, generator=generator)
                m.bias.zero_()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.main(images)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


class DiscriminatorLoss(nn.Module):
    """The discriminator and its hinge loss in one module, so that DDP sees one forward per backward.

    (Calling a DDP-wrapped discriminator twice, on real then fake images, before one backward is not
    supported by DDP; the two calls stay separate here so BatchNorm statistics match the authors'.)
    """

    def __init__(self, discriminator: nn.Module, weight: float = 1.0):
        super().__init__()
        self.discriminator = discriminator
        self.weight = weight

    def forward(self, real: torch.Tensor, fake: torch.Tensor) -> dict[str, torch.Tensor]:
        logits_real = self.discriminator(real.detach())
        logits_fake = self.discriminator(fake.detach())
        loss = self.weight * hinge_d_loss(logits_real, logits_fake)
        return {"disc_loss": loss, "logits_real": logits_real.detach().mean(), "logits_fake": logits_fake.detach().mean()}


def adaptive_gan_weight(nll_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor,
                        max_weight: float = 1e4) -> torch.Tensor:
    """``|grad nll| / (|grad gan| + 1e-4)`` at ``last_layer``, clamped to ``[0, max_weight]`` and detached."""
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    weight = nll_grad.norm() / (gan_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    if kind == "mse":
        return F.mse_loss(recon.float(), target.float())
    if kind == "l1":
        return F.l1_loss(recon.float(), target.float())
    raise ValueError(f"reconstruction loss must be 'mse' or 'l1', got {kind!r}")


@dataclass
class TokenizerLossConfig:
    reconstruction_loss: str = "mse"
    commitment_weight: float = 0.25
    codebook_weight: float = 1.0
    perceptual_weight: float = 1.0
    disc_weight: float = 0.75
    disc_start: int = 0
    adaptive_disc_weight: bool = True
    disc_weight_max: float = 1e4


class TokenizerLoss(nn.Module):
    """The generator side of the VQGAN objective, term by term (returned by name for logging and the NaN guard).

    ``discriminator`` is called here *unwrapped* (not through DDP) with its parameters frozen for the call:
    the generator loss must not leave gradients in the discriminator, and only the discriminator step may
    synchronise them.
    """

    def __init__(self, config: TokenizerLossConfig, perceptual: nn.Module | None = None,
                 discriminator: nn.Module | None = None):
        super().__init__()
        if config.perceptual_weight > 0 and perceptual is None:
            raise ValueError("perceptual_weight > 0 needs a perceptual network (see hf_rq.training.lpips.load_lpips)")
        if config.disc_weight > 0 and discriminator is None:
            raise ValueError("disc_weight > 0 needs a discriminator")
        self.config = config
        self.perceptual = perceptual
        self.discriminator = discriminator

    def gan_active(self, step: int) -> bool:
        return self.config.disc_weight > 0 and step >= self.config.disc_start

    def forward(self, output, images: torch.Tensor, step: int, last_layer: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``output``: a `TokenizerOutput`; ``images``: the target batch. Returns named terms and ``"loss"``."""
        cfg = self.config
        recon = output.sample
        terms: dict[str, torch.Tensor] = {"reconstruction": reconstruction_loss(recon, images, cfg.reconstruction_loss)}
        nll = terms["reconstruction"]
        total = nll
        if cfg.perceptual_weight > 0:
            terms["perceptual"] = self.perceptual(recon.float(), images.float()).mean()
            nll = nll + cfg.perceptual_weight * terms["perceptual"]
            total = nll
        if output.commitment_loss is not None:
            terms["commitment"] = output.commitment_loss.float()
            total = total + cfg.commitment_weight * terms["commitment"]
        if getattr(output, "codebook_loss", None) is not None:
            terms["codebook"] = output.codebook_loss.float()
            total = total + cfg.codebook_weight * terms["codebook"]
        if getattr(output, "extra_loss", None) is not None:
            terms["extra"] = output.extra_loss.float()
            total = total + terms["extra"]
        if self.gan_active(step):
            disc = self.discriminator
            flags = [p.requires_grad for p in disc.parameters()]
            disc.requires_grad_(False)
            try:
                terms["generator_adv"] = -disc(recon).float().mean()
            finally:
                for p, f in zip(disc.parameters(), flags):
                    p.requires_grad_(f)
            if cfg.adaptive_disc_weight and torch.is_grad_enabled():
                if last_layer is None:
                    raise ValueError("the adaptive GAN weight needs the decoder's last layer weight")
                weight = adaptive_gan_weight(nll, terms["generator_adv"], last_layer, cfg.disc_weight_max)
            else:
                weight = torch.ones((), device=recon.device)
            terms["adaptive_weight"] = weight
            total = total + weight * cfg.disc_weight * terms["generator_adv"]
        terms["loss"] = total
        return terms


def last_decoder_layer(model: nn.Module) -> torch.Tensor:
    """The weight the adaptive GAN weight is measured at: ``model.get_last_layer()`` or ``decoder.conv_out.weight``."""
    if hasattr(model, "get_last_layer"):
        return model.get_last_layer()
    decoder = getattr(model, "decoder", None)
    conv_out = getattr(decoder, "conv_out", None)
    if conv_out is None:
        raise ValueError(f"{type(model).__name__} has neither get_last_layer() nor decoder.conv_out")
    return conv_out.weight


# ------------------------------------------------------------------------------------------- NaN guard
@dataclass
class NonFiniteGuard:
    """Stops training at the first NaN/inf loss term, naming the step and the term.

    ``max_skips > 0`` tolerates that many bad optimizer steps in total (the step is skipped on every rank);
    one more raises. The decision is all-reduced, so every rank skips or stops together.
    """

    max_skips: int = 0
    skipped: list[int] = field(default_factory=list)

    def bad_terms(self, terms: dict[str, torch.Tensor], accelerator=None) -> list[str]:
        names = [k for k, v in terms.items() if torch.is_tensor(v) and v.is_floating_point()]
        if not names:
            return []
        flags = torch.stack([(~torch.isfinite(terms[k].detach().float())).any() for k in names]).float()
        if accelerator is not None and accelerator.num_processes > 1:
            flags = accelerator.reduce(flags, "sum")
        return [k for k, f in zip(names, flags.tolist()) if f > 0]

    def check(self, terms: dict[str, torch.Tensor], step: int, accelerator=None) -> bool:
        """True when the terms are finite; False to skip this step; raises `FloatingPointError` to stop."""
        bad = self.bad_terms(terms, accelerator)
        if not bad:
            return True
        values = ", ".join(f"{k}={terms[k].detach().float().flatten()[:1].item():.4g}" for k in bad)
        if len(self.skipped) >= self.max_skips:
            raise FloatingPointError(
                f"non-finite loss at step {step}: term(s) {', '.join(repr(b) for b in bad)} ({values}); "
                f"stopping before the weights are updated"
                + (f" (already skipped steps {self.skipped}, --max_nan_skips {self.max_skips})" if self.max_skips else
                   "; --max_nan_skips N tolerates N bad steps")
            )
        self.skipped.append(step)
        return False

    def state_dict(self) -> dict:
        return {"skipped": list(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = list(state.get("skipped", []))


def codebook_statistics(counts: torch.Tensor) -> dict[str, float]:
    """Usage (share of codes used at least once) and perplexity ``exp(H)`` of a code histogram."""
    counts = counts.double()
    total = counts.sum()
    if total == 0:
        return {"codebook_usage": 0.0, "codebook_perplexity": 0.0}
    probs = counts[counts > 0] / total
    return {"codebook_usage": (counts > 0).double().mean().item(),
            "codebook_perplexity": math.exp(-(probs * probs.log()).sum().item())}
