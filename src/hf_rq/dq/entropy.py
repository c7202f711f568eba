"""Patch entropy for DQ-VAE's entropy router, and the dataset thresholds it is used with.

The entropy router codes a region finely when the Shannon entropy of its gray-level histogram exceeds a
threshold ``T``. ``T`` is chosen for a target fine ratio ``r`` as the ``(100 - 100 r)``-th percentile of patch
entropies over a dataset, so that about a fraction ``r`` of a dataset's regions are fine (per image the ratio
varies with content). :func:`compute_entropy_thresholds` computes the 1st..99th percentiles the way the authors'
``calculate_entropy_thresholds.py`` does and :func:`threshold_for_ratio` picks one.

**Bin range.** The authors' model code builds the histogram with 32 Gaussian bins on ``[-1, 1]`` (the range of
its inputs), but their threshold script (and so the JSON shipped in their repository, whose ImageNet value for
``r = 0.5`` is 1.6777750253677368) still uses bins on ``[0, 1]``. Under the ``[0, 1]`` definition every dark
patch (all pixels below about -0.14) has no kernel mass and an entropy of ~2.9e-37: the shipped file's 1st..19th
percentiles are that value. We default to ``(-1, 1)`` everywhere, as the current model code and the reference
tensors do, and make the range an argument so that either definition can be reproduced.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F

NUM_BINS = 32
KERNEL_SIGMA = 0.01
_EPS = 1e-40  # the authors' epsilon; it is a float32 subnormal and kept as such
LUMA_WEIGHTS = (0.2989, 0.5870, 0.1140)


def patch_entropy(images: torch.Tensor, patch_size: int, bin_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    r"""Entropy (nats) of the gray-level distribution of every non-overlapping ``patch_size`` patch.

    ``gray = 0.2989 R + 0.5870 G + 0.1140 B`` on the [-1, 1] images; each pixel ``v`` spreads over 32 bins
    ``b_j`` (``linspace(*bin_range, 32)``) with Gaussian weights ``exp(-(v - b_j)^2 / (2 * 0.01^2))``; the bin mass
    is the mean over the patch's pixels, normalised with the authors' epsilons, and
    ``H = -sum_j p_j ln p_j``. The operations follow the authors' order so that thresholds compare exactly.

    Args:
        images (`torch.Tensor` of shape `(B, 3, H, W)`): images in [-1, 1]; ``H`` and ``W`` multiples of ``patch_size``.
        patch_size: side of the square patches.
        bin_range: centres of the first and last bin (see the module docstring).

    Returns:
        `torch.Tensor` of shape `(B, H / patch_size, W / patch_size)`, float32.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
    B, _, H, W = images.shape
    if H % patch_size or W % patch_size:
        raise ValueError(f"image size {H}x{W} is not a multiple of the entropy patch size {patch_size}")
    x = images.float()
    r, g, b = LUMA_WEIGHTS
    gray = r * x[:, 0:1] + g * x[:, 1:2] + b * x[:, 2:]
    patches = F.unfold(gray, kernel_size=patch_size, stride=patch_size).transpose(1, 2)  # (B, N, p*p)
    values = patches.reshape(-1, patch_size * patch_size, 1)
    bins = torch.linspace(bin_range[0], bin_range[1], NUM_BINS, device=x.device)
    kernel = torch.exp(-0.5 * ((values - bins[None, None]) / torch.tensor(KERNEL_SIGMA)).pow(2))
    pdf = kernel.mean(dim=1)
    pdf = pdf / (pdf.sum(dim=1, keepdim=True) + _EPS) + _EPS
    entropy = -(pdf * torch.log(pdf)).sum(dim=1)
    return entropy.reshape(B, H // patch_size, W // patch_size)


def ratio_key(fine_ratio: float) -> str:
    """The thresholds-JSON key the authors read for a fine ratio ``r``: ``str(int(100 - 100 r))``.

    The float truncation is theirs and is kept, so that a given ``r`` selects the same threshold as in their
    code: ``r = 0.5 -> "50"``, but ``r = 0.55 -> "44"`` and ``r = 0.56 -> "43"``.
    """
    if not isinstance(fine_ratio, (int, float)) or isinstance(fine_ratio, bool) or not 0.0 < fine_ratio < 1.0:
        raise ValueError(f"the fine-grain ratio must be a number in (0, 1), got {fine_ratio!r}")
    return str(int(100 - fine_ratio * 100))


def threshold_for_ratio(thresholds: Mapping[str, float] | str | os.PathLike, fine_ratio: float) -> float:
    """The entropy threshold for a target fine ratio from a thresholds JSON (path) or dict ``{"1": .., "99": ..}``.

    Raises ``ValueError`` naming the file and the key when the thresholds have no entry for that ratio.
    """
    source = "thresholds"
    if isinstance(thresholds, (str, os.PathLike)):
        source = str(thresholds)
        path = Path(thresholds)
        if not path.is_file():
            raise FileNotFoundError(f"entropy thresholds file not found: {path}")
        thresholds = json.loads(path.read_text())
    if not isinstance(thresholds, Mapping):
        raise ValueError(f"{source} must map percentile keys ('1' .. '99') to thresholds")
    key = ratio_key(fine_ratio)
    if key not in thresholds:
        raise ValueError(
            f"{source} has no threshold for fine ratio {fine_ratio} (key {key!r} = the {key}th percentile); "
            f"it has keys {sorted(thresholds, key=lambda k: (len(k), k))[:5]}..."
        )
    return float(thresholds[key])


@torch.no_grad()
def compute_entropy_thresholds(
    dataset,
    patch_size: int = 16,
    image_size: int = 256,
    image_column: str | None = None,
    batch_size: int = 32,
    bin_range: tuple[float, float] = (-1.0, 1.0),
    output_path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict[str, float]:
    """Percentiles of patch entropies over a dataset, as the authors' ``calculate_entropy_thresholds.py``.

    Every image is resized (shorter side, bicubic) and center-cropped to ``image_size``, scaled to [-1, 1], cut
    into ``patch_size`` patches; all patch entropies are sorted and key ``"p"`` (p = 1..99) holds
    ``sorted[(N * p) // 100]``.

    Args:
        dataset: a `datasets.Dataset` (e.g. ``load_dataset("imagefolder", ..., split="train")``) with an image
            column, or any sequence of PIL images / of dicts holding one.
        patch_size: the coarse stride of the DQ-VAE the thresholds are for (16 for 256 px / F16 coarse).
        image_size: resolution the images are brought to.
        image_column: name of the image column (default: the dataset's only ``Image`` feature, else ``"image"``).
        batch_size: images per entropy batch.
        bin_range: histogram bin range (see the module docstring; the authors' shipped file used ``(0, 1)``).
        output_path: if given, the JSON is written there.

    Returns:
        ``{"1": T_1, ..., "99": T_99}``; use :func:`threshold_for_ratio` to pick one for a fine ratio.
    """
    from ..training.data import ImageTransform

    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    column = image_column
    if column is None:
        features = getattr(dataset, "features", None) or {}
        image_features = [k for k, f in features.items() if type(f).__name__ == "Image"]
        column = image_features[0] if len(image_features) == 1 else "image"
    if len(dataset) == 0:
        raise ValueError("the dataset is empty: no entropy thresholds can be computed")
    transform = ImageTransform(image_size)
    values, batch = [], []
    indices = range(len(dataset))
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc="patch entropies")
    for i in indices:
        item = dataset[i]
        image = item[column] if isinstance(item, Mapping) else item
        if isinstance(item, Mapping) and column not in item:
            raise ValueError(f"dataset rows have no image column {column!r}; columns: {sorted(item)}")
        batch.append(transform(image))
        if len(batch) == batch_size or i == len(dataset) - 1:
            values.append(patch_entropy(torch.stack(batch).to(device), patch_size, bin_range).reshape(-1).cpu())
            batch = []
    ordered = torch.cat(values).sort().values
    n = ordered.numel()
    thresholds = {str(p): float(ordered[(n * p) // 100]) for p in range(1, 100)}
    if output_path is not None:
        Path(output_path).write_text(json.dumps(thresholds))
    return thresholds
