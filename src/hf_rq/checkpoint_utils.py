"""Safe loading of the authors' checkpoints and strict state-dict checks for the converters."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


class CheckpointError(ValueError):
    """A checkpoint or config that a converter does not understand."""


def load_state_dict(path: str | os.PathLike, allow_pickle: bool = False, key: str | None = None) -> dict[str, torch.Tensor]:
    """Load a flat ``{name: tensor}`` dict from a safetensors or PyTorch file.

    Pickle-based files (``.pt``, ``.pth``, ``.ckpt``, ``.bin``) are read only when ``allow_pickle=True``
    and then always with ``torch.load(weights_only=True)``, which refuses arbitrary Python objects.
    ``key`` selects a nested dict (e.g. ``"model"`` or ``"state_dict"``); without it the common wrappers
    are unwrapped automatically.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: Any = load_file(str(path))
    elif path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise CheckpointError(
                f"{path} is a pickle-based checkpoint; pass allow_pickle=True (CLI: --allow-pickle) to read it "
                "with torch.load(weights_only=True), or convert it to .safetensors first"
            )
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # weights_only refuses custom classes; say so instead of a pickle trace
            raise CheckpointError(f"could not read {path} with torch.load(weights_only=True): {exc}") from exc
    else:
        raise CheckpointError(f"unsupported checkpoint format {path.suffix!r} for {path}; expected .safetensors or .pt")
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            raise CheckpointError(f"{path} has no top-level entry {key!r}")
        obj = obj[key]
    else:
        for wrapper in ("state_dict", "model", "module"):
            if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not contain a flat state dict of tensors")
    return dict(obj)


def load_config_file(path: str | os.PathLike, section: str | None = None) -> dict:
    """Read a JSON or YAML config; with ``section`` return that top-level block if present."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        config = yaml.safe_load(text)
    else:
        config = json.loads(text)
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} does not hold a mapping")
    if section is not None and section in config:
        config = config[section]
    return config


def check_state_dict(
    converted: Mapping[str, torch.Tensor], model: torch.nn.Module, source: str = "checkpoint"
) -> None:
    """Raise ``CheckpointError`` unless `converted` has exactly the model's keys with the same shapes."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    wrong = [
        f"{k}: {tuple(converted[k].shape)} vs expected {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(converted))
        if converted[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    if wrong:
        problems.append(f"shape mismatches ({len(wrong)}): {wrong[:8]}{' ...' if len(wrong) > 8 else ''}")
    if problems:
        raise CheckpointError(f"{source} does not match the model config: " + "; ".join(problems))


def require_keys(config: Mapping, keys, where: str) -> None:
    missing = [k for k in keys if k not in config]
    if missing:
        raise CheckpointError(f"{where} is missing required key(s) {missing}")


def build_prior_config(config_cls, kwargs: Mapping[str, Any], what: str, id2label: Mapping | None = None):
    """``config_cls(**kwargs)`` for a converter, with optional class names for ``num_classes`` classes.

    Raises :class:`CheckpointError` when ``id2label`` does not name exactly the classes ``0..num_classes-1``
    or the config rejects the values (huggingface_hub's strict-dataclass errors are not ``ValueError``\\ s).
    """
    kwargs = dict(kwargs)
    if id2label:
        id2label = {int(k): str(v) for k, v in id2label.items()}
        if sorted(id2label) != list(range(kwargs["num_classes"])):
            raise CheckpointError(
                f"id2label must name classes 0..{kwargs['num_classes'] - 1}, got {len(id2label)} entries")
        kwargs["id2label"] = id2label
    try:
        return config_cls(**kwargs)
    except Exception as exc:
        raise CheckpointError(f"the {what} config is not valid: {exc}") from exc
