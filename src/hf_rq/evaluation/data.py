"""Loading an ``imagefolder`` split into memory for evaluation (small datasets: emoji, digits)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch


@dataclass
class ImageFolderSplit:
    """One split of an ``imagefolder`` as tensors.

    Args:
        images (`torch.Tensor` uint8 of shape `(N, 3, H, W)`): the images (RGB).
        labels (`torch.LongTensor` of shape `(N,)`, *optional*): class ids (sorted folder names), None without labels.
        id2label (`dict[int, str]`, *optional*): class names.
    """

    images: torch.Tensor
    labels: torch.Tensor | None
    id2label: dict[int, str] | None

    def fingerprint(self) -> str:
        """sha256 of the decoded pixels and labels: identifies the data a reference was computed on."""
        h = hashlib.sha256(self.images.numpy().tobytes())
        if self.labels is not None:
            h.update(self.labels.numpy().astype(np.int64).tobytes())
        return h.hexdigest()


def load_imagefolder(data_dir: str | os.PathLike, split: str | None = "test", size: int | None = None,
                     max_images: int | None = None) -> ImageFolderSplit:
    """Load ``split`` of a local ``imagefolder`` (``<dir>/<split>/<class>/*.png``) with ``datasets``.

    A folder without split sub-folders is a single ``train`` split. Images are converted to RGB and, when
    ``size`` is given and differs, resized (bicubic) to ``size x size``. All images must end up the same size.
    """
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"image folder not found: {data_dir}")
    from datasets import load_dataset

    dataset = load_dataset("imagefolder", data_dir=data_dir)
    if split is None:
        split = "test" if "test" in dataset else next(iter(dataset))
    if split not in dataset:
        raise ValueError(f"{data_dir} has no split {split!r} (splits: {', '.join(dataset)})")
    ds = dataset[split]
    if max_images is not None:
        ds = ds.select(range(min(max_images, len(ds))))
    if len(ds) == 0:
        raise ValueError(f"split {split!r} of {data_dir} has no images")
    has_labels = "label" in ds.features and hasattr(ds.features["label"], "names")
    arrays = []
    for image in ds["image"]:
        image = image.convert("RGB")
        if size is not None and image.size != (size, size):
            image = image.resize((size, size), PIL.Image.BICUBIC)
        arrays.append(np.asarray(image))
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"images in {data_dir}/{split} differ in size {sorted(shapes)}; pass a size to resize them")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor(ds["label"], dtype=torch.long) if has_labels else None
    id2label = dict(enumerate(ds.features["label"].names)) if has_labels else None
    return ImageFolderSplit(images=images, labels=labels, id2label=id2label)
