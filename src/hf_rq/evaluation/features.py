"""Pluggable feature extractors for the generation metrics, and batched feature extraction.

A feature extractor is any ``torch.nn.Module`` whose ``forward(images)`` takes a float tensor
`(N, 3, H, W)` in [0, 1] and returns a :class:`FeatureExtractorOutput`: ``features`` `(N, F)` (FID, KID,
precision/recall) and optionally class ``logits`` `(N, K)` (Inception Score, class-consistency).
Two are provided: :class:`ClassifierFeatureExtractor` (the bundled in-domain emoji classifier, or any
:class:`CNNImageClassifier`) and :class:`~hf_rq.evaluation.inception.InceptionV3FeatureExtractor`
(the standard FID network, when its weights are available locally). A plain callable that returns a
features tensor is accepted too (see :func:`as_feature_extractor`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import PIL.Image
import torch


@dataclass
class FeatureExtractorOutput:
    """Output of a feature extractor.

    Args:
        features (`torch.Tensor` of shape `(N, F)`): the embedding the distribution metrics compare.
        logits (`torch.Tensor` of shape `(N, K)`, *optional*): class logits, when the extractor classifies.
    """

    features: torch.Tensor
    logits: torch.Tensor | None = None


class ClassifierFeatureExtractor(torch.nn.Module):
    """Penultimate features and logits of a :class:`~hf_rq.evaluation.classifier.CNNImageClassifier`.

    Images of another size than the classifier's ``sample_size`` are resized (bilinear, antialiased).
    """

    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier.eval()

    @property
    def id2label(self) -> dict[int, str]:
        return {int(k): v for k, v in self.classifier.config.id2label.items()}

    @property
    def feature_dim(self) -> int:
        return self.classifier.feature_dim

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> FeatureExtractorOutput:
        size = self.classifier.config.sample_size
        if images.shape[-2:] != (size, size):
            images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear",
                                                     align_corners=False, antialias=True)
        out = self.classifier(images * 2 - 1)
        return FeatureExtractorOutput(features=out.features, logits=out.logits)


class _CallableExtractor(torch.nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.fn = fn

    def forward(self, images):
        out = self.fn(images)
        if isinstance(out, FeatureExtractorOutput):
            return out
        return FeatureExtractorOutput(features=out)


def as_feature_extractor(extractor) -> torch.nn.Module:
    """Accept a feature-extractor module, a :class:`CNNImageClassifier`, or a callable images -> features `(N, F)`."""
    from .classifier import CNNImageClassifier

    if isinstance(extractor, CNNImageClassifier):
        return ClassifierFeatureExtractor(extractor)
    if callable(extractor):
        return extractor if isinstance(extractor, torch.nn.Module) else _CallableExtractor(extractor)
    raise TypeError(f"a feature extractor must be callable (images -> features), got {type(extractor).__name__}")


def images_to_tensor(images) -> torch.Tensor:
    """PIL images, arrays `(N, H, W, 3)` or tensors `(N, 3, H, W)` (uint8, or float in [0, 1]) -> float `(N, 3, H, W)` in [0, 1]."""
    if isinstance(images, np.ndarray):
        array = images[None] if images.ndim == 3 else images
        if array.ndim != 4 or array.shape[-1] != 3:
            raise ValueError(f"numpy images must be (N, H, W, 3), got shape {images.shape}")
        images = torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2)
    if isinstance(images, torch.Tensor):
        t = images[None] if images.ndim == 3 else images
        if t.ndim != 4 or t.shape[1] != 3:
            raise ValueError(f"tensor images must be (N, 3, H, W), got {tuple(images.shape)}")
        t = t.float() / 255 if t.dtype == torch.uint8 else t.float()
        if t.numel() and (t.min() < 0 or t.max() > 1):
            raise ValueError(f"float images must lie in [0, 1], got range [{t.min():.3f}, {t.max():.3f}]")
        return t
    from ..image_processing import preprocess_images

    return (preprocess_images(images) + 1) / 2


def _batches(images, batch_size: int) -> Iterable[torch.Tensor]:
    if isinstance(images, PIL.Image.Image):
        images = [images]
    if isinstance(images, (torch.Tensor, np.ndarray)) or (
        isinstance(images, Sequence) and images and isinstance(images[0], PIL.Image.Image)
    ):
        for i in range(0, len(images), batch_size):
            yield images_to_tensor(images[i:i + batch_size])
    else:  # an iterable of batches
        for batch in images:
            yield images_to_tensor(batch)


@torch.no_grad()
def extract_features(
    extractor,
    images,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    progress_bar: Callable | None = None,
) -> FeatureExtractorOutput:
    """Run ``extractor`` over ``images`` in batches and concatenate the outputs (on the CPU).

    Args:
        extractor: see :func:`as_feature_extractor`.
        images: a list of PIL images, a tensor `(N, 3, H, W)` (uint8, or float in [0, 1]), a uint8/float
            numpy array `(N, H, W, 3)`, or an iterable of such batches.
        device: where to run the extractor (default: where its parameters are).
        progress_bar: optional callable wrapping the batch iterable (e.g. ``tqdm``).
    """
    extractor = as_feature_extractor(extractor)
    if device is None:
        params = list(extractor.parameters()) if isinstance(extractor, torch.nn.Module) else []
        device = params[0].device if params else torch.device("cpu")
    features, logits = [], []
    batches = _batches(images, batch_size)
    for batch in (progress_bar(batches) if progress_bar else batches):
        out = extractor(batch.to(device))
        if not isinstance(out, FeatureExtractorOutput):
            out = FeatureExtractorOutput(features=out)
        if out.features.ndim != 2:
            raise ValueError(f"the feature extractor returned features of shape {tuple(out.features.shape)}; expected (N, F)")
        features.append(out.features.float().cpu())
        if out.logits is not None:
            logits.append(out.logits.float().cpu())
    if not features:
        raise ValueError("no images to extract features from")
    return FeatureExtractorOutput(features=torch.cat(features), logits=torch.cat(logits) if logits else None)
