"""Conversions between PIL images, numpy arrays and model tensors in [-1, 1].

Every tokenizer in hf_rq takes NCHW float tensors in [-1, 1] (the authors' ``Normalize(0.5, 0.5)``
convention) and decodes back to that range without clamping. Pipelines and training scripts go
through the two functions here so that the convention lives in one place.
"""

from __future__ import annotations

import warnings
from typing import Iterable, Sequence

import numpy as np
import PIL.Image
import torch


# How far outside [-1, 1] a model input may stray before a warning: resampling and augmentation overshoot a little.
IMAGE_RANGE_TOLERANCE = 1e-2


def check_model_images(images, in_channels: int, owner=None, name: str = "images", batch: str = "N") -> None:
    """The input contract of every tokenizer's ``encode``: a float tensor `(N, in_channels, H, W)` in [-1, 1]
    (``batch`` names the first axis in messages, as the family's docs do).

    Raises ``TypeError`` for anything else than a float tensor (PIL images and numpy arrays are pointed to
    :func:`preprocess_images`), ``ValueError`` for a wrong shape or any NaN / inf value (they would silently give
    codes). Values outside [-1, 1] by more than ``IMAGE_RANGE_TOLERANCE`` (e.g. [0, 255] images) are warned about,
    once per ``owner`` (the model), since a tokenizer can encode them but was not trained on them.
    """
    if isinstance(images, (PIL.Image.Image, np.ndarray)) or (
            isinstance(images, (list, tuple)) and images and isinstance(images[0], PIL.Image.Image)):
        raise TypeError(f"{name} must be a float tensor ({batch}, {in_channels}, H, W) in [-1, 1], got "
                        f"{type(images).__name__}: convert PIL images / numpy arrays with "
                        "hf_rq.image_processing.preprocess_images first")
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
    if not images.is_floating_point():
        raise TypeError(f"{name} must be a float tensor in [-1, 1], got dtype {images.dtype}")
    if images.ndim != 4 or images.shape[1] != in_channels:
        raise ValueError(f"{name} must have shape ({batch}, {in_channels}, H, W), got {tuple(images.shape)}")
    if images.numel() == 0:
        raise ValueError(f"{name} is empty: shape {tuple(images.shape)}")
    # One reduction and one host sync: NaN propagates through amax and inf is infinite.
    peak = float(images.detach().abs().amax())
    if not np.isfinite(peak):
        raise ValueError(f"{name} contains NaN or inf values; tokenizers take finite values in [-1, 1]")
    if peak > 1.0 + IMAGE_RANGE_TOLERANCE and not getattr(owner, "_warned_image_range", False):
        warnings.warn(f"{name} reach |value| = {peak:.3g}, outside the [-1, 1] range tokenizers are trained on (images "
                      "in [0, 1] or [0, 255] must be mapped with x * 2 - 1 or preprocess_images); this is warned once",
                      UserWarning, stacklevel=4)
        if owner is not None:
            owner._warned_image_range = True


def _pil_to_array(image: PIL.Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def preprocess_images(
    images: torch.Tensor | np.ndarray | PIL.Image.Image | Sequence[PIL.Image.Image],
    size: int | tuple[int, int] | None = None,
    name: str = "images",
) -> torch.Tensor:
    """Turn images into a float32 tensor `(batch, 3, H, W)` in [-1, 1] (the input of every tokenizer).

    Pipelines that take images (e.g. an image to edit and its mask) pass them through here, so PIL images, numpy
    arrays and tensors are accepted the same way everywhere; errors name the argument (``name``).

    Args:
        images: a PIL image or list of them; a numpy array `(H, W, 3)` / `(batch, H, W, 3)` in [0, 1]
            (float) or [0, 255] (uint8); or a tensor `(3, H, W)` / `(batch, 3, H, W)`, float in [0, 1]
            or uint8. Tensors already in [-1, 1] are not accepted here (ambiguous); pass them to the
            model directly.
        size: if given, PIL inputs are resized (bicubic) to this size first.
        name: the argument's name in error messages.

    Raises ``TypeError`` for other types, ``ValueError`` for a wrong shape, NaN / inf, or values outside the range.
    """
    if isinstance(images, PIL.Image.Image):
        images = [images]
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError(f"{name}: preprocess_images got an empty list of images")
        if not all(isinstance(im, PIL.Image.Image) for im in images):
            raise TypeError(f"{name}: a list passed to preprocess_images must contain only PIL images")
        if size is not None:
            hw = (size, size) if isinstance(size, int) else tuple(size)
            images = [im.convert("RGB").resize((hw[1], hw[0]), PIL.Image.BICUBIC) for im in images]
        shapes = {im.size for im in images}
        if len(shapes) != 1:
            raise ValueError(f"{name}: all images must have the same size to be batched, got sizes {sorted(shapes)}")
        images = np.stack([_pil_to_array(im) for im in images])
    if isinstance(images, np.ndarray):
        array = images
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4 or array.shape[-1] != 3:
            raise ValueError(f"{name}: numpy images must be (H, W, 3) or (batch, H, W, 3), got shape {images.shape}")
        if array.dtype == np.uint8:
            array = array.astype(np.float32) / 255.0
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).permute(0, 3, 1, 2)
    elif isinstance(images, torch.Tensor):
        tensor = images[None] if images.ndim == 3 else images
        if tensor.ndim != 4 or tensor.shape[1] != 3:
            raise ValueError(f"{name}: tensor images must be (3, H, W) or (batch, 3, H, W), got shape "
                             f"{tuple(images.shape)}")
        tensor = tensor.float() / 255.0 if tensor.dtype == torch.uint8 else tensor.float()
    else:
        raise TypeError(f"{name}: unsupported image type {type(images).__name__} (PIL images, numpy arrays or tensors)")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contain NaN or inf values")
    if tensor.min() < 0 or tensor.max() > 1:
        raise ValueError(
            f"{name}: values must lie in [0, 1] (or be uint8), got range [{tensor.min():.3f}, {tensor.max():.3f}]"
        )
    return tensor * 2.0 - 1.0


def postprocess_images(images: torch.Tensor, output_type: str = "pil"):
    """Turn model output `(batch, 3, H, W)` in about [-1, 1] into the requested type.

    ``output_type``: ``"pt"`` gives a tensor in [0, 1]; ``"np"`` a float array `(batch, H, W, 3)` in
    [0, 1]; ``"pil"`` a list of PIL images. Values are clamped, as the authors do for viewing and FID.
    """
    if output_type not in ("pil", "np", "pt"):
        raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
    images = (images.detach().float() * 0.5 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return images
    array = images.cpu().permute(0, 2, 3, 1).numpy()
    if output_type == "np":
        return array
    return numpy_to_pil(array)


def numpy_to_pil(array: np.ndarray) -> list[PIL.Image.Image]:
    """`(batch, H, W, 3)` float in [0, 1] -> list of RGB PIL images."""
    array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    return [PIL.Image.fromarray(a) for a in array]


def make_image_grid(images: Iterable[PIL.Image.Image], rows: int, cols: int, pad: int = 2) -> PIL.Image.Image:
    """Paste ``rows * cols`` equally sized images into one grid with a white gap of ``pad`` pixels."""
    images = list(images)
    if len(images) != rows * cols:
        raise ValueError(f"make_image_grid needs rows*cols = {rows * cols} images, got {len(images)}")
    w, h = images[0].size
    grid = PIL.Image.new("RGB", (cols * w + (cols - 1) * pad, rows * h + (rows - 1) * pad), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % cols) * (w + pad), (i // cols) * (h + pad)))
    return grid
