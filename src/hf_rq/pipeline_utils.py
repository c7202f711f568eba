"""Helpers shared by the generation pipelines of every family."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from .sampling_args import check_sampling_value

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def normalize_id2label(id2label: Mapping | None) -> dict[int, str] | None:
    """JSON turns integer keys into strings; give them back as ints."""
    if not id2label:
        return None
    return {int(k): str(v) for k, v in id2label.items()}


def resolve_class_labels(
    class_labels,
    num_classes: int,
    id2label: Mapping | None = None,
    num_images_per_prompt: int = 1,
    device=None,
) -> torch.LongTensor | None:
    """Turn class ids and/or names into a `(batch * num_images_per_prompt,)` tensor of ids.

    Args:
        class_labels: ``None`` (unconditional), an id, a name, or a list/tensor of them. Names are looked
            up in ``id2label`` (exact match first, then case-insensitive).
        num_classes: number of real classes of the model (0 for an unconditional model).
        id2label: id -> name mapping of the model (keys may be strings, as read from JSON).
        num_images_per_prompt: how many images each label gets (repeated in place: ``[a, a, b, b]``).

    Raises ``ValueError`` naming the label when an id is out of range or a name is unknown, when labels are
    given to an unconditional model, or when a class-conditional model gets none.
    """
    if not isinstance(num_images_per_prompt, int) or isinstance(num_images_per_prompt, bool) or num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")
    if class_labels is None:
        if num_classes > 0:
            raise ValueError(f"this model is class-conditional ({num_classes} classes): pass class_labels (ids or names)")
        return None
    if num_classes == 0:
        raise ValueError("this model is unconditional: it takes no class_labels")
    if isinstance(class_labels, torch.Tensor):
        if class_labels.is_floating_point():
            raise TypeError(f"class_labels must be integer ids, got dtype {class_labels.dtype}")
        class_labels = class_labels.reshape(-1).tolist()
    elif isinstance(class_labels, (int, str)):
        class_labels = [class_labels]
    elif not isinstance(class_labels, Sequence):
        raise TypeError(f"class_labels must be an id, a name or a list of them, got {type(class_labels).__name__}")
    if len(class_labels) == 0:
        raise ValueError("class_labels is empty")
    names = normalize_id2label(id2label) or {}
    by_name = {v: k for k, v in names.items()}
    by_lower = {v.lower(): k for k, v in names.items()}
    ids = []
    for label in class_labels:
        if isinstance(label, str):
            if label in by_name:
                ids.append(by_name[label])
            elif label.lower() in by_lower:
                ids.append(by_lower[label.lower()])
            elif label.isdigit():
                ids.append(int(label))
            else:
                known = ", ".join(sorted(by_name)[:12]) or "none (the model has no id2label)"
                raise ValueError(f"unknown class name {label!r}; known names: {known}")
        elif isinstance(label, bool) or not isinstance(label, int):
            raise TypeError(f"class label {label!r} is neither an integer id nor a name")
        else:
            ids.append(label)
        if not 0 <= ids[-1] < num_classes:
            raise ValueError(f"class id {ids[-1]} is out of range [0, {num_classes})")
    labels = torch.tensor(ids, dtype=torch.long, device=device)
    return labels.repeat_interleave(num_images_per_prompt)


def resolve_generation_labels(class_labels, batch_size, config, device=None) -> torch.LongTensor:
    """A prior's ``generate(class_labels, batch_size)`` -> class ids `(N,)` (names via ``config.id2label``).

    For an unconditional model (``config.num_classes == 0``) the ids are ``batch_size`` zeros (default 1): the
    row of its start token. ``batch_size``, if given with labels, must equal their number.
    """
    c = config
    id2label = c.id2label if c.id2label and len(c.id2label) == c.num_classes else None
    labels = resolve_class_labels(class_labels, c.num_classes, id2label, device=device)
    if labels is None:
        n = 1 if batch_size is None else batch_size
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        return torch.zeros(n, dtype=torch.long, device=device)
    if batch_size is not None and batch_size != labels.numel():
        raise ValueError(f"batch_size={batch_size} disagrees with the {labels.numel()} class labels given")
    return labels


def check_output_type(output_type: str) -> None:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")



class ClassLabelsMixin:
    """Class names of a pipeline's prior: ``id2label`` and ``get_label_ids`` (as in diffusers' ``DiTPipeline``).

    Reads ``self.transformer.config`` (``num_classes``, ``id2label``), which every family's prior has.
    """

    @property
    def id2label(self) -> dict[int, str] | None:
        """Class names of the prior (``transformer.config.id2label``), or None when it has none."""
        c = self.transformer.config
        # PreTrainedConfig invents {0: "LABEL_0", 1: "LABEL_1"} when no names were given; only real names count.
        if c.num_classes and c.id2label and len(c.id2label) == c.num_classes:
            return normalize_id2label(c.id2label)
        return None

    def get_label_ids(self, label: str | list[str]) -> list[int]:
        """Class names (or ids) -> ids."""
        return resolve_class_labels(label, self.transformer.config.num_classes, self.id2label).tolist()

    def prepare_class_labels(self, class_labels, num_images_per_prompt: int):
        """-> ``(class ids (N,) on the execution device, None)``, or ``(None, num_images_per_prompt)`` when
        ``class_labels`` is None (unconditional sampling: the prior's ``generate(batch_size=...)``)."""
        n = num_images_per_prompt
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")
        if class_labels is None:
            return None, num_images_per_prompt
        labels = resolve_class_labels(class_labels, self.transformer.config.num_classes, self.id2label,
                                      num_images_per_prompt, device=self._execution_device)
        return labels, None


def generation_overrides(**kwargs) -> dict:
    """The sampling arguments a caller set: None means "keep the prior's saved ``generation_config`` value".

    Every value set is checked against the one contract of ``hf_rq.sampling_args`` here, at the pipeline's
    boundary (before the components are checked or run); the prior's ``generate()`` checks the merged
    configuration again (a saved ``generation_config`` may hold bad values too). Per-depth lists are checked entry
    by entry; their length is the prior's business.
    """
    overrides = {k: v for k, v in kwargs.items() if v is not None}
    for name, value in overrides.items():
        # A list's entries are checked here; whether the prior takes per-depth lists, and of which length, there.
        check_sampling_value(name, value, depth=len(value) if isinstance(value, (list, tuple)) else None)
    return overrides


def unknown_call_keywords(pipeline, names) -> list[str]:
    """The ``names`` that the ``__call__`` of ``pipeline`` (a pipeline or its class) does not take, in order:
    for scripts that pass sampling settings by name (sweeps, saved defaults) and must refuse a misspelt one."""
    import inspect

    accepted = inspect.signature(pipeline.__call__).parameters
    return [name for name in names if name not in accepted]
