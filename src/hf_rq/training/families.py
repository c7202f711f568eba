"""Which class each ``--model`` name trains, and how to load it from scratch or from a pretrained folder / Hub id.

The families are imported lazily, so that a script for one family does not import (or need) the others.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path


logger = logging.getLogger("hf_rq.training")


class FamilyNotAvailableError(ImportError):
    """The requested model family is not part of this installation of hf_rq."""


def _import(module: str, name: str, what: str):
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise FamilyNotAvailableError(f"{what} ({module}.{name}) is not available: {exc}") from exc
    if not hasattr(mod, name):
        raise FamilyNotAvailableError(f"{what} is not available in this version of hf_rq ({module} has no {name})")
    return getattr(mod, name)


def parse_config_argument(value: str | None) -> dict:
    """``--model_config``: a path to a JSON file (e.g. a saved ``config.json``) or an inline JSON object."""
    if value is None:
        return {}
    text = value.strip()
    if text.startswith("{"):
        try:
            config = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--model_config is not valid JSON: {exc}") from exc
    else:
        if not os.path.isfile(value):
            raise FileNotFoundError(f"--model_config file not found: {value}")
        config = json.loads(Path(value).read_text())
    if not isinstance(config, dict):
        raise ValueError("--model_config must be a JSON object")
    return {k: v for k, v in config.items() if not k.startswith("_")}


class WrongModelClassError(ValueError):
    """A folder or Hub repo that holds another kind of model than the one asked for."""


def find_component(name_or_path: str, class_name: str, revision: str | None = None) -> str | None:
    """Subfolder of a pipeline (``model_index.json``) that holds a ``class_name`` component, or None for a model folder."""
    index = None
    if os.path.isdir(name_or_path):
        p = Path(name_or_path) / "model_index.json"
        index = json.loads(p.read_text()) if p.is_file() else None
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

        try:
            index = json.loads(Path(hf_hub_download(name_or_path, "model_index.json", revision=revision)).read_text())
        except (EntryNotFoundError, LocalEntryNotFoundError, OSError):
            index = None
    if not index:
        return None
    for key, value in index.items():
        if isinstance(value, list) and len(value) == 2 and value[1] == class_name:
            return key
    raise WrongModelClassError(f"{name_or_path} is a pipeline without a {class_name} component (components: "
                     f"{[k for k, v in index.items() if isinstance(v, list)]})")


def load_diffusers_model(cls, name_or_path: str, revision: str | None = None):
    """``cls.from_pretrained`` on a model folder or on the matching component of a pipeline, after checking that
    the saved ``_class_name`` is ``cls`` (diffusers would otherwise build ``cls`` from a foreign config)."""
    subfolder = find_component(name_or_path, cls.__name__, revision)
    config = cls.load_config(name_or_path, subfolder=subfolder, revision=revision)
    found = config.get("_class_name")
    if found is not None and found != cls.__name__:
        raise WrongModelClassError(f"{name_or_path}{'/' + subfolder if subfolder else ''} holds a {found}, not a {cls.__name__}")
    return cls.from_pretrained(name_or_path, subfolder=subfolder, revision=revision)


@dataclass(frozen=True)
class TokenizerSpec:
    name: str
    module: str
    class_name: str
    description: str
    # The modules that run after quantization: what ``train_tokenizer.py --train_decoder_only`` trains.
    decoder_modules: tuple[str, ...] = ("post_quant_conv", "decoder")

    def model_class(self):
        return _import(self.module, self.class_name, f"the {self.description} tokenizer")

    def load_pretrained(self, name_or_path: str, revision: str | None = None):
        return load_diffusers_model(self.model_class(), name_or_path, revision)

    def prepare_config(self, config: dict, args, train_dataset) -> dict:
        """Fill in config values that depend on the training data (none by default)."""
        return config

    def from_config(self, config: dict, resolution: int):
        cls = self.model_class()
        config = dict(config)
        if "sample_size" in _init_arguments(cls) and "sample_size" not in config:
            config["sample_size"] = resolution
        unknown = sorted(set(config) - set(_init_arguments(cls)))
        if unknown:
            raise ValueError(f"--model_config has keys that {cls.__name__} does not take: {unknown}")
        return cls(**config)


def _init_arguments(cls) -> set[str]:
    import inspect

    return set(inspect.signature(cls.__init__).parameters) - {"self"}


@dataclass(frozen=True)
class DQTokenizerSpec(TokenizerSpec):
    def prepare_config(self, config: dict, args, train_dataset) -> dict:
        """The entropy router's threshold is a dataset statistic: unless the config sets ``entropy_threshold``,
        choose it on the training images so that ``fine_grain_ratio`` of the regions are fine (the authors'
        percentile rule, ``hf_rq.dq.entropy``), instead of keeping the ImageNet default."""
        if config.get("router_type", "entropy") != "entropy" or "entropy_threshold" in config:
            return config
        from hf_rq.dq.entropy import compute_entropy_thresholds, threshold_for_ratio

        levels = len(config.get("block_out_channels", _init_defaults(self.model_class())["block_out_channels"]))
        ratio = config.get("fine_grain_ratio", 0.5)
        thresholds = compute_entropy_thresholds(train_dataset.dataset, patch_size=2 ** (levels - 1),
                                                image_size=args.resolution, image_column=train_dataset.image_column)
        logger.info(f"DQ-VAE entropy threshold for a fine ratio of {ratio}: {threshold_for_ratio(thresholds, ratio):.4f}")
        return {**config, "entropy_threshold": threshold_for_ratio(thresholds, ratio)}


def _init_defaults(cls) -> dict:
    import inspect

    return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}


TOKENIZERS = {
    "rqvae": TokenizerSpec("rqvae", "hf_rq.rq.tokenizer", "RQVAEModel", "RQ-VAE"),
    # DQ-VAE adds its learned position embedding to the quantized features, before the decoder.
    "dqvae": DQTokenizerSpec("dqvae", "hf_rq.dq.tokenizer", "DQVAEModel", "DQ-VAE",
                             ("post_quant_conv", "position_embedding", "decoder")),
    "llamagen-vq": TokenizerSpec("llamagen-vq", "hf_rq.ctf.tokenizer", "LlamaGenVQModel", "LlamaGen VQ"),
}


def check_tokenizer_input(model, resolution: int) -> None:
    """Fail before training if ``resolution`` x ``resolution`` images do not fit the tokenizer (one eval encode)."""
    import torch

    from .data import DataConfigError

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model.encode(torch.zeros(1, model.config.in_channels, resolution, resolution,
                                     device=next(model.parameters()).device))
    except ValueError as exc:
        raise DataConfigError(f"--resolution {resolution} does not fit {type(model).__name__}: {exc}") from exc
    finally:
        model.train(was_training)


def downsample_factor(model) -> int:
    if hasattr(model, "downsample_factor"):
        return int(model.downsample_factor)
    channels = getattr(model.config, "block_out_channels", None)
    if channels is None:
        raise ValueError(f"cannot tell the downsampling factor of {type(model).__name__}")
    return 2 ** (len(channels) - 1)


def codebook_size(model) -> int:
    for key in ("codebook_size", "num_embeddings", "n_embed", "vocab_size"):
        value = getattr(model.config, key, None)
        if value is not None:
            return int(value)
    raise ValueError(f"cannot tell the codebook size of {type(model).__name__}")


def with_new_decoder(spec: TokenizerSpec, model, overrides: dict):
    """A copy of ``model`` whose decoder side is rebuilt from ``overrides`` (``decoder_*`` config keys only), with
    every encoder-side tensor (encoder, codebook, router) copied, so that it encodes to exactly the same codes.

    The decoder-side tensors are copied where name and shape still match, and start fresh elsewhere.
    """
    from .priors import copy_matching_weights  # priors imports this module

    cls = type(model)
    init_keys = _init_arguments(cls)
    bad = sorted(k for k in overrides if not k.startswith("decoder_") or k not in init_keys)
    if bad:
        allowed = sorted(k for k in init_keys if k.startswith("decoder_"))
        raise ValueError(f"with --train_decoder_only, --model_config may only change the decoder ({allowed or 'no keys'} "
                         f"for {cls.__name__}); got {bad}")
    config = {k: v for k, v in model.config.items() if k in init_keys}
    new = cls(**{**config, **overrides})
    _, fresh = copy_matching_weights(new, model)
    encoder_side = [name for name in fresh if name.split(".")[0] not in spec.decoder_modules]
    if encoder_side:
        raise ValueError(f"{encoder_side[0]} of the encoder side does not match the pretrained {cls.__name__}; "
                         "the codes would change")
    return new


def freeze_to_decoder(spec: TokenizerSpec, model) -> list:
    """Make only the decoder-side parameters trainable; -> those parameters."""
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(name.split(".")[0] in spec.decoder_modules)
        if param.requires_grad:
            trainable.append(param)
    if not trainable:
        raise ValueError(f"{type(model).__name__} has no parameters in {spec.decoder_modules}")
    return trainable


def tokenizer_spec_for(model) -> TokenizerSpec:
    for spec in TOKENIZERS.values():
        if type(model).__name__ == spec.class_name:
            return spec
    raise ValueError(f"{type(model).__name__} is not a tokenizer hf_rq can train")
