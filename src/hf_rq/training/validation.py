"""Validation during training: reconstruction metrics and image grids for tokenizers."""

from __future__ import annotations

import torch

from ..image_processing import postprocess_images
from .losses import codebook_statistics


def psnr(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (both clamped and mapped to [0, 1] first): `(N,)`."""
    a = (recon.float().clamp(-1, 1) + 1) / 2
    b = (target.float().clamp(-1, 1) + 1) / 2
    mse = (a - b).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(1.0 / mse)


@torch.no_grad()
def reconstruction_metrics(model, dataset, codebook_size: int, batch_size: int = 32, max_samples: int | None = None,
                           device=None) -> dict[str, float]:
    """Mean PSNR, MSE, codebook usage and perplexity of ``model`` (eval mode) over ``dataset`` (an `ImageDataset`)."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    n = len(dataset) if max_samples is None else min(len(dataset), max_samples)
    psnrs, mses = [], []
    counts = torch.zeros(codebook_size, dtype=torch.long)
    for start in range(0, n, batch_size):
        images = torch.stack([dataset[i]["pixel_values"] for i in range(start, min(n, start + batch_size))]).to(device)
        out = model(images)
        psnrs.append(psnr(out.sample, images).cpu())
        mses.append((out.sample.float() - images).pow(2).flatten(1).mean(1).cpu())
        counts += torch.bincount(out.codes.reshape(-1).cpu(), minlength=codebook_size)[:codebook_size]
    model.train(was_training)
    if n == 0:
        return {}
    return {"psnr": torch.cat(psnrs).mean().item(), "mse": torch.cat(mses).mean().item(), "num_images": n,
            **codebook_statistics(counts)}


@torch.no_grad()
def reconstruction_grid_images(model, dataset, num_images: int, device=None) -> list:
    """First ``num_images`` of ``dataset`` and their reconstructions, as PIL images: originals then reconstructions."""
    n = min(num_images, len(dataset))
    if n <= 0:  # --num_validation_images 0
        return []
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    images = torch.stack([dataset[i]["pixel_values"] for i in range(n)]).to(device)
    recon = model(images).sample
    model.train(was_training)
    return postprocess_images(images, "pil") + postprocess_images(recon, "pil")

