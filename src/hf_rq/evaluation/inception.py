"""The Inception-v3 network of the standard FID (TensorFlow's 2015-12-05 graph), as a feature extractor.

FID, KID and IS numbers are only comparable with published ones when computed with this exact network:
the TF graph differs from torchvision's Inception-v3 in its weights, in 1008 output classes, in
average pools that ignore padding, and in a max pool in the last block. The layer names here are
torchvision's, which both ported weight files use, so either loads as is:

* torch-fidelity (also used by torchmetrics): ``weights-inception-2015-12-05-6726825d.pth``;
* pytorch-fid: ``pt_inception-2015-12-05-6726825d.pth``.

Nothing is downloaded: pass the file (``weights_path``), set ``HF_RQ_INCEPTION_WEIGHTS``, or put it where
those libraries cache it (``torch.hub.get_dir()/checkpoints/``). ``.pth`` files are pickles, read only with
``allow_pickle=True`` and then with ``torch.load(weights_only=True)``; a ``.safetensors`` copy with the same
keys needs no opt-in.

Input handling follows the two reference implementations (``preset``):

* ``"torch-fidelity"`` (default): images quantised to uint8, resized to 299x299 with TensorFlow 1.x's
  bilinear rule (no half-pixel offset), scaled by ``(x - 128) / 128``; IS uses the logits without the
  fc bias ("logits_unbiased"), as torch-fidelity does.
* ``"pytorch-fid"``: float images resized with ``F.interpolate(bilinear, align_corners=False)``, scaled by
  ``2x - 1``; logits with the bias.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .features import FeatureExtractorOutput

WEIGHT_FILES = ("weights-inception-2015-12-05-6726825d", "pt_inception-2015-12-05-6726825d")
PRESETS = ("torch-fidelity", "pytorch-fid")
INPUT_SIZE = 299


class InceptionWeightsNotFoundError(FileNotFoundError):
    """The FID Inception weights are not on this machine."""


class BasicConv2d(nn.Module):
    """Conv (no bias), BatchNorm (eps 1e-3, TF's), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x):
    # TensorFlow's 3x3 'SAME' average pool divides by the number of real (unpadded) inputs.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_tf_avg_pool(x)),
        ], 1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], 1)


class InceptionC(nn.Module):
    """Factorised 7x7 convolutions (1x7 and 7x1)."""

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        row, col = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, **row)
        self.branch7x7_3 = BasicConv2d(c7, 192, **col)
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, **row)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, **row)
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d7 = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d7 = layer(d7)
        return torch.cat([self.branch1x1(x), b7, d7, self.branch_pool(_tf_avg_pool(x))], 1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """Expanded filter bank; ``max_pool=True`` for the last block, where the FID graph max-pools the pool branch."""

    def __init__(self, in_channels: int, max_pool: bool = False):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        d3 = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(d3), self.branch3x3dbl_3b(d3),
            self.branch_pool(pooled),
        ], 1)


def resize_bilinear_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """TensorFlow 1.x ``resize_bilinear(align_corners=False)``: source coordinate ``dst * in / out`` (no half-pixel shift)."""

    def along(t: torch.Tensor, dim: int) -> torch.Tensor:
        n_in = t.shape[dim]
        src = torch.arange(size, dtype=torch.float64, device=t.device) * (n_in / size)
        i0 = src.floor().long().clamp(max=n_in - 1)
        i1 = (i0 + 1).clamp(max=n_in - 1)
        frac = (src - i0).to(t.dtype)
        shape = [1] * t.ndim
        shape[dim] = size
        frac = frac.view(shape)
        return t.index_select(dim, i0) * (1 - frac) + t.index_select(dim, i1) * frac

    return along(along(x, 2), 3)


class InceptionV3FeatureExtractor(nn.Module):
    """FID Inception-v3: images `(N, 3, H, W)` in [0, 1] -> pool features `(N, 2048)` and logits `(N, 1008)`.

    Build it with :meth:`from_pretrained`; a bare instance has random weights (only useful for tests).
    """

    def __init__(self, preset: str = "torch-fidelity"):
        super().__init__()
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
        self.preset = preset
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)
        self.eval()
        self.requires_grad_(False)

    feature_dim = 2048

    # ------------------------------------------------------------------------------------ weights
    @staticmethod
    def default_weight_paths() -> list[Path]:
        """Where the weights are looked for when no path is given, in order."""
        paths = []
        env = os.environ.get("HF_RQ_INCEPTION_WEIGHTS")
        if env:
            paths.append(Path(env))
        hub = Path(torch.hub.get_dir()) / "checkpoints"
        for stem in WEIGHT_FILES:
            paths += [hub / f"{stem}.safetensors", hub / f"{stem}.pth"]
        return paths

    @classmethod
    def find_weights(cls, weights_path: str | os.PathLike | None = None) -> Path:
        if weights_path is not None:
            path = Path(weights_path)
            if not path.is_file():
                raise InceptionWeightsNotFoundError(f"Inception weights file not found: {path}")
            return path
        searched = cls.default_weight_paths()
        for path in searched:
            if path.is_file():
                return path
        raise InceptionWeightsNotFoundError(
            "the FID Inception-v3 weights are not on this machine (searched: "
            + ", ".join(str(p) for p in searched)
            + "). hf_rq downloads nothing: copy torch-fidelity's weights-inception-2015-12-05-6726825d.pth or "
            "pytorch-fid's pt_inception-2015-12-05-6726825d.pth there (or pass weights_path / set "
            "HF_RQ_INCEPTION_WEIGHTS), or use the in-domain classifier features instead."
        )

    @classmethod
    def from_pretrained(cls, weights_path: str | os.PathLike | None = None, preset: str = "torch-fidelity",
                        allow_pickle: bool = False) -> "InceptionV3FeatureExtractor":
        """Build the network and load the FID weights (see the module docstring for where they are looked for)."""
        from ..checkpoint_utils import check_state_dict, load_state_dict

        path = cls.find_weights(weights_path)
        state = load_state_dict(path, allow_pickle=allow_pickle)
        model = cls(preset=preset)
        own = model.state_dict()
        state = {k.removeprefix("module."): v for k, v in state.items()}
        for key in own:  # older torch versions saved no BatchNorm step counters
            if key.endswith("num_batches_tracked") and key not in state:
                state[key] = own[key]
        check_state_dict(state, model, source=str(path))
        model.load_state_dict(state)
        return model

    # ------------------------------------------------------------------------------------ forward
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        if self.preset == "torch-fidelity":
            x = (images.clamp(0, 1) * 255).round()  # torch-fidelity takes uint8 images
            return (resize_bilinear_tf1(x, INPUT_SIZE) - 128) / 128
        x = F.interpolate(images, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return 2 * x - 1

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> FeatureExtractorOutput:
        if not isinstance(images, torch.Tensor) or not images.is_floating_point() or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be a float tensor (N, 3, H, W) in [0, 1], got {getattr(images, 'shape', type(images))}")
        x = self.preprocess(images.to(self.fc.weight.dtype))
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        features = x.mean(dim=(2, 3))
        if self.preset == "torch-fidelity":
            logits = features @ self.fc.weight.T
        else:
            logits = self.fc(features)
        return FeatureExtractorOutput(features=features.float(), logits=logits.float())
