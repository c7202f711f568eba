"""LPIPS perceptual distance (Zhang et al. 2018) over VGG16 features, as the VQGAN-family authors train with.

torchvision is not a dependency: its PyPI wheels for Linux are CUDA builds that fail to import next to the
CPU wheel of torch, and no CPU wheel is served from PyPI. VGG16's feature extractor is a plain stack of
3x3 convolutions, ReLUs and max-pools, so it is defined here with torchvision's layer indices, which makes
torchvision's ``vgg16`` weight file (``features.<i>.weight``) load unchanged.

Pretrained weights are never downloaded and never silently replaced by random ones: `load_lpips` looks in
the places listed below and otherwise raises `LPIPSWeightsNotFoundError` explaining how to provide them.

* VGG16: ``--vgg_weights PATH`` or torchvision's cache file ``$TORCH_HOME/hub/checkpoints/vgg16-397923af.pth``.
* LPIPS linear layers (``lin0..lin4``, v0.1): ``--lpips_weights PATH`` (the ``vgg.pth`` of the `lpips` package or
  taming-transformers), or ``lpips/weights/v0.1/vgg.pth`` inside an installed `lpips` package.
* Or one combined safetensors file made by ``python -m hf_rq.training.lpips --vgg ... --linear ... --output ...``,
  passed as ``--lpips_weights``.

``.pth`` files are pickles: they are read only with ``allow_pickle=True`` (``--allow_pickle``) and then with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

import torch
import torch.nn as nn

from ..checkpoint_utils import load_state_dict

# torchvision's VGG16 ("D") configuration; "M" is a 2x2 max-pool.
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# LPIPS reads relu1_2, relu2_2, relu3_3, relu4_3, relu5_3: indices of those ReLUs in `features`.
LPIPS_TAPS = (3, 8, 15, 22, 29)
LPIPS_CHANNELS = (64, 128, 256, 512, 512)
TORCHVISION_VGG16_FILE = "vgg16-397923af.pth"


class LPIPSWeightsNotFoundError(FileNotFoundError):
    """Pretrained LPIPS weights are needed and could not be found."""


class VGG16Features(nn.Module):
    """``torchvision.models.vgg16().features[:30]``: same modules, same indices, same state-dict keys."""

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for v in VGG16_LAYOUT:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(channels, v, kernel_size=3, padding=1), nn.ReLU(inplace=False)]
                channels = v
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in LPIPS_TAPS:
                taps.append(x)
        return taps


class _Linear(nn.Module):
    # `model.1` (after a dropout slot) keeps the key names of the lpips / taming weight files.
    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x):
        return self.model(x)


class LPIPS(nn.Module):
    """Learned perceptual distance between two image batches in [-1, 1]: `(N, 3, H, W)` x2 -> `(N,)`.

    ``d(x, y) = sum_l mean_hw( w_l . (f_l(x)/|f_l(x)| - f_l(y)/|f_l(y)|)^2 )`` over five VGG16 layers, with the
    input rescaled by the ImageNet-statistics "scaling layer" of the original implementation. The network is
    frozen (``requires_grad=False``) and kept in eval mode; gradients flow to the inputs.
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.vgg = VGG16Features()
        for i, c in enumerate(LPIPS_CHANNELS):
            self.add_module(f"lin{i}", _Linear(c))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # always eval: dropout off, as in every VQGAN trainer
        return super().train(False)

    @staticmethod
    def _unit(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
        return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if input.shape != target.shape or input.ndim != 4 or input.shape[1] != 3:
            raise ValueError(f"LPIPS needs two (N, 3, H, W) batches of the same shape, got {tuple(input.shape)} and "
                             f"{tuple(target.shape)}")
        both = torch.cat([input, target]).float()
        feats = self.vgg((both - self.shift) / self.scale)
        total = 0.0
        for i, f in enumerate(feats):
            fx, fy = self._unit(f).chunk(2)
            total = total + getattr(self, f"lin{i}")((fx - fy).pow(2)).mean(dim=(2, 3))
        return total.flatten()


# ---------------------------------------------------------------------------------------------- weights
def _torch_hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def default_vgg_paths() -> list[Path]:
    return [_torch_hub_checkpoints() / TORCHVISION_VGG16_FILE]


def default_linear_paths() -> list[Path]:
    paths = []
    spec = importlib.util.find_spec("lpips")  # located, not imported (it would import torchvision)
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            paths.append(Path(loc) / "weights" / "v0.1" / "vgg.pth")
    return paths


def _split_state_dict(sd: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """Sort a state dict into (vgg features, linear layers) with this module's key names."""
    vgg, lin = {}, {}
    for k, v in sd.items():
        key = k.removeprefix("module.")
        if key.startswith("vgg.features."):
            vgg[key] = v
        elif key.startswith("features."):  # torchvision's vgg16 file
            vgg["vgg." + key] = v
        elif key.startswith("net.slice"):  # lpips / taming layout: net.slice<k>.<i>.weight keeps torchvision's <i>
            vgg["vgg.features." + key.split(".", 2)[2]] = v
        elif key.startswith("lin") and ".model." in key:
            lin[key] = v
    return vgg, lin


def _not_found(what: str, searched: list[Path], flag: str) -> LPIPSWeightsNotFoundError:
    where = ", ".join(str(p) for p in searched) or "(no default location)"
    return LPIPSWeightsNotFoundError(
        f"The perceptual (LPIPS) loss needs pretrained {what}, which were not found (searched: {where}). "
        f"Pass {flag} PATH (see `python -m hf_rq.training.lpips --help`; .pth files also need --allow_pickle), "
        "or train without the perceptual loss with --perceptual_weight 0."
    )


def load_lpips(vgg_weights: str | os.PathLike | None = None, lpips_weights: str | os.PathLike | None = None,
               allow_pickle: bool = False) -> LPIPS:
    """Build `LPIPS` with pretrained weights, or raise `LPIPSWeightsNotFoundError` saying how to provide them.

    Args:
        vgg_weights: torchvision's ``vgg16`` weights (``features.*`` keys; the classifier is ignored). Default:
            torchvision's cache file, when present.
        lpips_weights: the LPIPS linear layers (``lin*.model.1.weight``), or a combined file holding the VGG
            features too. Default: the weights inside an installed ``lpips`` package, when present.
        allow_pickle: read ``.pth`` files (with ``torch.load(weights_only=True)``).
    """
    model = LPIPS()
    vgg_sd, lin_sd = {}, {}
    if lpips_weights is not None:
        if not Path(lpips_weights).is_file():
            raise _not_found("LPIPS linear-layer weights", [Path(lpips_weights)], "--lpips_weights")
        vgg_sd, lin_sd = _split_state_dict(load_state_dict(lpips_weights, allow_pickle=allow_pickle))
    else:
        found = [p for p in default_linear_paths() if p.is_file()]
        if not found:
            raise _not_found("LPIPS linear-layer weights (lin0..lin4, v0.1)", default_linear_paths(), "--lpips_weights")
        lin_sd = _split_state_dict(load_state_dict(found[0], allow_pickle=allow_pickle))[1]
    if not vgg_sd:
        if vgg_weights is not None:
            candidates = [Path(vgg_weights)]
            if not candidates[0].is_file():
                raise _not_found("VGG16 weights", candidates, "--vgg_weights")
        else:
            candidates = [p for p in default_vgg_paths() if p.is_file()]
            if not candidates:
                raise _not_found(f"VGG16 weights (torchvision's {TORCHVISION_VGG16_FILE})", default_vgg_paths(), "--vgg_weights")
        vgg_sd = _split_state_dict(load_state_dict(candidates[0], allow_pickle=allow_pickle))[0]
    expected = set(model.state_dict())
    got = {**vgg_sd, **lin_sd}
    missing = sorted(expected - set(got))
    if missing:
        raise LPIPSWeightsNotFoundError(
            f"the LPIPS weight files lack {len(missing)} tensors, e.g. {missing[:4]}; "
            "pass both --vgg_weights and --lpips_weights, or a combined file"
        )
    model.load_state_dict({k: got[k] for k in expected}, strict=True)
    return model


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m hf_rq.training.lpips",
        description="Combine VGG16 and LPIPS linear-layer weights into one safetensors file for --lpips_weights.",
    )
    parser.add_argument("--vgg", required=True, help="torchvision's vgg16-397923af.pth (or any file with features.* keys)")
    parser.add_argument("--linear", required=True, help="LPIPS v0.1 vgg.pth (from the lpips package or taming-transformers)")
    parser.add_argument("--output", required=True, help="output .safetensors file")
    parser.add_argument("--allow_pickle", action="store_true", help="read .pth files with torch.load(weights_only=True)")
    args = parser.parse_args(argv)
    model = load_lpips(args.vgg, args.linear, allow_pickle=args.allow_pickle)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.output)
    print(f"wrote {args.output} ({sum(v.numel() for v in model.state_dict().values())} values)")


if __name__ == "__main__":
    main()
