"""A small CNN image classifier: the in-domain evaluator of class-conditional generators.

Its penultimate features (global average of the last conv stage) are the feature space of the
in-domain FID/KID/precision/recall, and its predictions give class-consistency. The bundled
``hf-rq/emoji-classifier-64`` is this model trained on the emoji train split by
``python -m hf_rq.evaluation.train_classifier`` (its README records the command).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput


@dataclass
class ImageClassifierOutput(BaseOutput):
    """Output of :class:`CNNImageClassifier`.

    Args:
        logits (`torch.Tensor` of shape `(N, num_classes)`): class logits.
        features (`torch.Tensor` of shape `(N, feature_dim)`): penultimate features (before the linear head).
    """

    logits: torch.Tensor
    features: torch.Tensor


class ConvBlock(nn.Sequential):
    """3x3 conv, BatchNorm, ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class CNNImageClassifier(ModelMixin, ConfigMixin):
    r"""VGG-style CNN: per stage ``layers_per_block`` conv blocks then 2x2 max-pooling; global average pool; linear.

    Parameters:
        in_channels (`int`): image channels.
        sample_size (`int`): image size it was trained on (feature extractors resize other sizes to it).
        block_out_channels (`tuple[int]`): width of each stage; the last one is the feature width.
        layers_per_block (`int`): conv blocks per stage.
        num_classes (`int`): number of classes.
        id2label (`dict`, *optional*): class names by id (keys may be strings, as read from JSON).
        dropout (`float`): dropout on the features before the head (training only).
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        sample_size: int = 64,
        block_out_channels: tuple[int, ...] = (32, 64, 128, 128),
        layers_per_block: int = 1,
        num_classes: int = 9,
        id2label: dict | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if id2label is not None and len(id2label) != num_classes:
            raise ValueError(f"id2label has {len(id2label)} entries but num_classes={num_classes}")
        if sample_size % 2 ** len(block_out_channels):
            raise ValueError(f"sample_size {sample_size} is not divisible by 2**{len(block_out_channels)} (one pooling per stage)")
        layers, channels = [], in_channels
        for width in block_out_channels:
            for _ in range(layers_per_block):
                layers.append(ConvBlock(channels, width))
                channels = width
            layers.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*layers)
        self.head_dropout = nn.Dropout(dropout)
        self.head = nn.Linear(channels, num_classes)

    @property
    def feature_dim(self) -> int:
        return self.config.block_out_channels[-1]

    @property
    def id2label(self) -> dict[int, str]:
        names = self.config.id2label or {i: str(i) for i in range(self.config.num_classes)}
        return {int(k): str(v) for k, v in names.items()}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """As ``ModelMixin.from_pretrained``; bundled short names (``hf-rq/emoji-classifier-64``) load offline."""
        from ..hub import resolve_pretrained

        return super().from_pretrained(resolve_pretrained(pretrained_model_name_or_path), **kwargs)

    def forward(self, images: torch.Tensor, return_dict: bool = True):
        """Classify images `(N, C, sample_size, sample_size)` in [-1, 1]: logits `(N, K)` and features `(N, F)`."""
        if not isinstance(images, torch.Tensor) or not images.is_floating_point():
            raise TypeError(f"images must be a float tensor in [-1, 1], got {getattr(images, 'dtype', type(images))}")
        size = self.config.sample_size
        if images.ndim != 4 or images.shape[1:] != (self.config.in_channels, size, size):
            raise ValueError(f"images must have shape (N, {self.config.in_channels}, {size}, {size}), got {tuple(images.shape)}")
        features = self.body(images).mean(dim=(2, 3))
        logits = self.head(self.head_dropout(features))
        if not return_dict:
            return (logits, features)
        return ImageClassifierOutput(logits=logits, features=features)
