"""One contract for the sampling arguments of every family: the checks every prior's ``generate()`` and every
pipeline's ``__call__`` run before any model code.

Each argument means the same thing, and has the same valid range, in the RQ, DQ, LlamaGen and CTF priors:

* ``temperature`` (and ``fine_temperature``): a finite number ``> 0``; logits are divided by it. None = 1.
* ``top_k`` (``fine_top_k``, ``position_top_k``): None or 0 = off (transformers' and LlamaGen's spelling), else an
  integer ``>= 1``: keep the ``k`` most likely tokens (ties at the k-th value kept).
* ``top_p`` (``fine_top_p``, ``position_top_p``): None = off, else a finite number in ``(0, 1]``.
* ``guidance_scale`` (``fine_guidance_scale``): None or a finite number ``>= 1``. 1 = no guidance; ``s > 1`` draws
  from ``uncond + s * (cond - uncond)``. Scales below 1 are refused everywhere. Why: the method papers and the
  authors' code define classifier-free guidance for ``s > 1`` only (LlamaGen applies it only when
  ``cfg_scale > 1``, and so does diffusers: ``do_classifier_free_guidance = guidance_scale > 1``), where a
  smaller value silently means "off". ``0 <= s < 1`` would interpolate towards the unconditional model and
  ``s < 0`` push away from the class: neither is a setting any of these models was tuned or evaluated at, and
  a value below 1 is far more often a typo than a wish, so it is an error that says what 1 means. Unconditional
  samples are asked for with ``class_labels=None``, not with ``guidance_scale=0``.
* ``cfg_interval``: None or an integer ``>= -1`` (-1 = guidance at every token; LlamaGen's ``cfg_interval``).
* switches (``do_sample``, ``in_cluster_mask``, ``fix_fine_position``, ``use_cache``, ``output_logits``, ...):
  a bool or None (None = the default; ``do_sample=None`` samples: image priors always sample unless told not to).
* per-depth lists: a prior with several codes per position (RQ, ``depth > 1``) also takes a list with one value
  per depth for ``temperature`` / ``top_k`` / ``top_p``; every entry obeys the rule above.
* ``generator``: None, a ``torch.Generator``, or a list of them with one generator per image (as diffusers);
  see :func:`check_generator`.

A value of the wrong type raises ``TypeError``, a value out of range (or NaN / inf) ``ValueError``; both name the
argument. Class labels, ``batch_size`` and ``num_images_per_prompt`` are checked by
``hf_rq.pipeline_utils.resolve_class_labels``.
"""

from __future__ import annotations

import copy
import math
import numbers
from typing import Any, Callable

import torch

__all__ = [
    "check_cfg_interval",
    "check_compile",
    "check_flag",
    "check_generator",
    "check_guidance_scale",
    "check_sampling_value",
    "check_temperature",
    "check_top_k",
    "check_top_p",
    "per_depth",
    "validate_generation_config",
]


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _type_error(name: str, value, wanted: str) -> TypeError:
    hint = ("; per-depth lists are only taken by priors with several codes per position (RQ)"
            if isinstance(value, (list, tuple)) else "")
    return TypeError(f"{name} must be {wanted}, got {type(value).__name__} {value!r}{hint}")


def _number(value, name: str, default, wanted: str, valid: Callable[[float], bool], why: str = ""):
    """``default`` for None; else a finite real number with ``valid(value)``, as a float."""
    if value is None:
        return default
    if not _is_real(value):
        raise _type_error(name, value, wanted)
    value = float(value)
    if not math.isfinite(value) or not valid(value):
        raise ValueError(f"{name}={value!r}: must be {wanted}{why}")
    return value


def check_temperature(value, name: str = "temperature") -> float:
    """A finite number > 0 (None = 1.0)."""
    return _number(value, name, 1.0, "a finite number > 0", lambda v: v > 0, " (logits are divided by it)")


def check_top_k(value, name: str = "top_k") -> int | None:
    """None or 0 = off (returns None), else an integer >= 1."""
    wanted = "an integer >= 1, or 0 / None for no top-k"
    if value is None:
        return None
    if not _is_int(value):
        raise _type_error(name, value, wanted)
    if value < 0:
        raise ValueError(f"{name}={value!r}: must be {wanted}")
    return int(value) or None


def check_top_p(value, name: str = "top_p") -> float | None:
    """None = off, else a finite number in (0, 1]."""
    return _number(value, name, None, "a finite number in (0, 1], or None for no top-p", lambda v: 0.0 < v <= 1.0)


def check_guidance_scale(value, name: str = "guidance_scale") -> float:
    """None = 1.0 (no guidance), else a finite number >= 1 (see the module docstring for why not below 1)."""
    return _number(value, name, 1.0, "a finite number >= 1", lambda v: v >= 1.0,
                   " (1 = no guidance, s > 1 = classifier-free guidance uncond + s * (cond - uncond)); scales below 1 "
                   "are not supported by any family. For unconditional samples pass class_labels=None")


def check_cfg_interval(value, name: str = "cfg_interval") -> int:
    """None = -1 (guidance at every token), else an integer >= -1."""
    if value is None:
        return -1
    if not _is_int(value):
        raise _type_error(name, value, "an integer >= -1 (-1 = guidance at every token)")
    if value < -1:
        raise ValueError(f"{name}={value!r}: must be an integer >= -1 (-1 = guidance at every token)")
    return int(value)


def check_flag(value, name: str, default: bool = False) -> bool:
    """A bool (None = ``default``). Numbers and strings are refused: ``do_sample="no"`` must not mean True."""
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _type_error(name, value, "True or False")
    return value


_FLAG_DEFAULTS = {"do_sample": True, "use_cache": True, "in_cluster_mask": False, "fix_fine_position": False,
                  "output_logits": False, "output_scores": False, "return_dict_in_generate": False}

# Argument name -> check. The stage / token-kind prefixes (CTF's stage 2, DQ's positions) follow the same rules.
_RULES: dict[str, Callable[[Any, str], Any]] = {
    "temperature": check_temperature, "fine_temperature": check_temperature,
    "top_k": check_top_k, "fine_top_k": check_top_k, "position_top_k": check_top_k,
    "top_p": check_top_p, "fine_top_p": check_top_p, "position_top_p": check_top_p,
    "guidance_scale": check_guidance_scale, "fine_guidance_scale": check_guidance_scale,
    "cfg_interval": check_cfg_interval,
    **{flag: (lambda v, n, d=default: check_flag(v, n, d)) for flag, default in _FLAG_DEFAULTS.items()},
}
PER_DEPTH_ARGUMENTS = ("temperature", "top_k", "top_p")


def per_depth(value, depth: int, name: str, check: Callable[[Any, str], Any]) -> list:
    """Expand a scalar or a per-depth list to ``depth`` checked values (entries named ``name[d]``)."""
    if isinstance(value, (list, tuple)):
        values = list(value)
        if len(values) != depth:
            raise ValueError(f"{name} was given as a list of length {len(values)}; it must have one entry per code "
                             f"depth ({depth})")
        return [check(v, f"{name}[{d}]") for d, v in enumerate(values)]
    return [check(value, name)] * depth


def check_sampling_value(name: str, value, depth: int | None = None):
    """Check one sampling argument by its name (see the module docstring); returns the normalised value.

    With ``depth`` (a prior with several codes per position), ``temperature`` / ``top_k`` / ``top_p`` may be
    per-depth lists and come back as lists of length ``depth``. Unknown names pass unchanged.
    """
    rule = _RULES.get(name)
    if rule is None:
        return value
    if depth is not None and name in PER_DEPTH_ARGUMENTS:
        return per_depth(value, depth, name, rule)
    return rule(value, name)


def check_null_class_config(config) -> None:
    """A prior config's class-guidance fields (``num_classes``, ``use_null_class``, ``class_dropout_prob``), one
    rule for RQ and DQ: the null class (the unconditional branch of guidance) needs classes, and class dropout
    needs the null class to drop labels to."""
    if config.num_classes < 0:
        raise ValueError(f"num_classes must be >= 0 (0 = unconditional), got {config.num_classes}")
    if config.use_null_class and config.num_classes == 0:
        raise ValueError("use_null_class needs a class-conditional model (num_classes > 0)")
    if not 0.0 <= config.class_dropout_prob < 1.0:
        raise ValueError(f"class_dropout_prob must be in [0, 1), got {config.class_dropout_prob}")
    if config.class_dropout_prob > 0 and not config.use_null_class:
        raise ValueError("class_dropout_prob > 0 needs use_null_class=True (dropped labels become the null class)")


def prepare_generation_config(model, generation_config, kwargs: dict, allowed=None, defaults=None):
    """The ``GenerationConfig`` one ``generate()`` call uses: a copy of ``generation_config`` (else the model's own),
    with ``defaults`` filled where the stored config predates a field, then ``kwargs`` on top.

    A keyword that is not a sampling argument raises a TypeError naming it, rather than being silently ignored:
    with ``allowed`` (the accepted names), anything outside it; without, anything ``GenerationConfig.update``
    does not know.
    """
    config = copy.deepcopy(generation_config if generation_config is not None else model.generation_config)
    for key, value in (defaults or {}).items():
        if not hasattr(config, key):
            setattr(config, key, value)
    if allowed is not None:
        unknown = sorted(set(kwargs) - set(allowed))
        for key in set(kwargs) - set(unknown):
            setattr(config, key, kwargs[key])
    else:
        unknown = sorted(config.update(**kwargs))
    if unknown:
        accepted = f"; accepted sampling arguments: {sorted(allowed)}" if allowed is not None else ""
        raise TypeError(f"{type(model).__name__}.generate() got unexpected keyword arguments: {unknown}{accepted}")
    return config


def validate_generation_config(config, names, depth: int | None = None) -> dict[str, Any]:
    """The checked, normalised values of ``names`` read from a ``GenerationConfig`` (or a dict).

    Missing / None values get the contract's defaults (temperature 1, no top-k / top-p, guidance 1, cfg_interval
    -1, the switches' defaults). ``depth``: see :func:`check_sampling_value`.
    """
    read = config.get if isinstance(config, dict) else (lambda key: getattr(config, key, None))
    return {name: check_sampling_value(name, read(name), depth) for name in names}


def check_compile(value, name: str = "compile"):
    """The ``generate(compile=...)`` switch: False / None (eager, the default), True, or a dict of
    ``torch.compile`` keyword arguments (e.g. ``{"mode": "reduce-overhead"}``). Returns it (None as False)."""
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, dict):
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise TypeError(f"{name} dict keys must be torch.compile argument names, got {bad[0]!r}")
        return value
    raise TypeError(f"{name} must be a bool or a dict of torch.compile arguments, got {type(value).__name__} {value!r}")


def check_generator(generator, batch_size: int, name: str = "generator"):
    """Check the ``generator`` argument against the number of images ``batch_size``; returns it (a list as a list).

    Accepted, as in diffusers: None (torch's global generator), one ``torch.Generator`` for the whole batch, or a
    list of ``batch_size`` generators, one per image: image ``i`` then draws all its random numbers from
    ``generator[i]``, so it is the same image whatever else is in the batch (the priors draw each image's row
    from its own generator; see ``hf_rq.sampling``). Anything else raises ``TypeError``; a list of the wrong length
    ``ValueError``.
    """
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, (list, tuple)):
        bad = [i for i, g in enumerate(generator) if not isinstance(g, torch.Generator)]
        if bad:
            g = generator[bad[0]]
            raise TypeError(f"{name}[{bad[0]}] must be a torch.Generator, got {type(g).__name__} {g!r}")
        if len(generator) != batch_size:
            raise ValueError(f"{name} is a list of {len(generator)} generators, but {batch_size} images are sampled "
                             "(class labels x num_images_per_prompt, or batch_size): pass one torch.Generator per "
                             "image, or a single torch.Generator for the whole batch")
        return list(generator)
    raise TypeError(f"{name} must be a torch.Generator or a list of them (one per image), got "
                    f"{type(generator).__name__} {generator!r}; e.g. torch.Generator().manual_seed(0)")
