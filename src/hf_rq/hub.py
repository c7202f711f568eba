"""Model names: bundled default models resolve offline, everything else goes to the Hub unchanged.

The models trained for this library ship inside the package (``hf_rq/bundled/<name>/``, ``save_pretrained``
folders) and are addressed as ``hf-rq/<name>``, e.g. ``hf-rq/rq-emoji-64``. ``from_pretrained`` of the
pipelines and of the evaluation classifier passes its argument through :func:`resolve_pretrained`, so
these names load without network or Hub cache, while a local folder or any other repo id behaves
exactly as in diffusers/transformers.

This module also reads a folder's (or a Hub repo's) ``model_index.json`` / ``config.json`` to find which
hf_rq class loads it (:func:`load_pipeline`, :func:`load_tokenizer`), which the command line uses.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

BUNDLED_NAMESPACE = "hf-rq"
BUNDLED_DIR = Path(__file__).parent / "bundled"

PIPELINE_CLASSES = ("RQTransformerPipeline", "DQTransformerPipeline", "CTFPipeline", "LlamaGenPipeline")
TOKENIZER_CLASSES = ("RQVAEModel", "DQVAEModel", "LlamaGenVQModel")

_SHORT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ModelNotFoundError(OSError):
    """A model name that is neither a local folder, a bundled model nor a reachable (or cached) Hub repo."""


def _is_model_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "model_index.json").is_file() or (path / "config.json").is_file())


def list_bundled_models() -> list[str]:
    """Names (``hf-rq/<name>``) of the models shipped with this installation, sorted."""
    if not BUNDLED_DIR.is_dir():
        return []
    return [f"{BUNDLED_NAMESPACE}/{p.name}" for p in sorted(BUNDLED_DIR.iterdir()) if _is_model_folder(p)]


def bundled_path(name: str) -> Path | None:
    """Folder of the bundled model ``hf-rq/<name>``, or None when ``name`` is not a bundled model."""
    prefix = BUNDLED_NAMESPACE + "/"
    if not isinstance(name, str) or not name.startswith(prefix):
        return None
    short = name[len(prefix):]
    if not _SHORT_NAME.match(short) or ".." in short:  # never resolve outside the bundled folder
        return None
    path = BUNDLED_DIR / short
    return path if _is_model_folder(path) else None


def resolve_pretrained(name_or_path: str | os.PathLike) -> str:
    """What ``from_pretrained`` should load: a local folder as is, ``hf-rq/<bundled>`` as its folder, else unchanged.

    A local folder wins over a bundled name (as a local folder wins over a Hub id in ``from_pretrained``).
    """
    if isinstance(name_or_path, os.PathLike):
        return os.fspath(name_or_path)
    if not isinstance(name_or_path, str):
        raise TypeError(f"a model name or path must be a string or path, got {type(name_or_path).__name__}")
    if os.path.isdir(name_or_path):
        return name_or_path
    path = bundled_path(name_or_path)
    return str(path) if path is not None else name_or_path


def read_model_json(name_or_path: str, filename: str, revision: str | None = None) -> dict | None:
    """``filename`` (``model_index.json`` / ``config.json``) of a resolved folder or Hub repo; None when it has none.

    Raises :class:`ModelNotFoundError` for a name that is no local folder and cannot be found on the Hub
    (offline: in the Hub cache).
    """
    resolved = resolve_pretrained(name_or_path)
    if os.path.isdir(resolved):
        path = Path(resolved) / filename
        return json.loads(path.read_text()) if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return json.loads(Path(hf_hub_download(resolved, filename, revision=revision)).read_text())
    except LocalEntryNotFoundError as exc:
        # Offline (or unreachable): a cached repo without this file is a real answer; an uncached repo is not.
        if _in_hub_cache(resolved):
            return None
        not_found = exc
    except EntryNotFoundError:  # the repo exists online but has no such file
        return None
    except (HFValidationError, RepositoryNotFoundError, OSError) as exc:
        not_found = exc
    bundled = ", ".join(list_bundled_models()) or "none"
    offline = " (offline: it is not in the Hub cache)" if _hub_offline() else ""
    raise ModelNotFoundError(
        f"unknown model {name_or_path!r}: not a local folder, not a bundled model (bundled: {bundled}), "
        f"and not found on the Hub{offline}"
    ) from not_found


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import constants

    return (Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "snapshots").is_dir()


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _hf_rq_class(class_name: str, allowed: tuple[str, ...], what: str):
    import hf_rq

    cls = getattr(hf_rq, class_name, None) if class_name in allowed else None
    if cls is None:
        available = [c for c in allowed if hasattr(hf_rq, c)]
        raise ValueError(f"{what} class {class_name!r} is not one hf_rq can load (available here: {', '.join(available)})")
    return cls


def pipeline_class_for(name_or_path: str, revision: str | None = None):
    """The hf_rq pipeline class named by the ``_class_name`` of ``model_index.json``."""
    index = read_model_json(name_or_path, "model_index.json", revision)
    if index is None:
        raise ValueError(f"{name_or_path!r} is not a pipeline (it has no model_index.json)")
    return _hf_rq_class(index.get("_class_name"), PIPELINE_CLASSES, "pipeline")


def load_pipeline(name_or_path: str, revision: str | None = None, **kwargs):
    """Load any hf_rq pipeline folder or repo (the class comes from ``model_index.json``)."""
    cls = pipeline_class_for(name_or_path, revision)
    return cls.from_pretrained(resolve_pretrained(name_or_path), revision=revision, **kwargs)


def load_tokenizer(name_or_path: str, revision: str | None = None, **kwargs):
    """Load an hf_rq tokenizer from its own folder, or the tokenizer component of a pipeline folder."""
    index = read_model_json(name_or_path, "model_index.json", revision)
    subfolder = None
    if index is not None:
        found = [(k, v[1]) for k, v in index.items() if isinstance(v, list) and len(v) == 2 and v[1] in TOKENIZER_CLASSES]
        if not found:
            raise ValueError(f"pipeline {name_or_path!r} has no tokenizer component ({', '.join(TOKENIZER_CLASSES)})")
        subfolder, class_name = found[0]
    else:
        config = read_model_json(name_or_path, "config.json", revision)
        if config is None:
            raise ValueError(f"{name_or_path!r} has neither model_index.json nor config.json")
        class_name = config.get("_class_name")
        if class_name is None:
            raise ValueError(f"{name_or_path!r}/config.json names no _class_name, so it is not a tokenizer folder")
    cls = _hf_rq_class(class_name, TOKENIZER_CLASSES, "tokenizer")
    return cls.from_pretrained(resolve_pretrained(name_or_path), subfolder=subfolder, revision=revision, **kwargs)


class BundledModelsMixin:
    """Lets ``from_pretrained`` load the models shipped with hf_rq by their short name, offline.

    ``RQTransformerPipeline.from_pretrained("hf-rq/rq-emoji-64")`` (or a tokenizer / prior with
    ``subfolder=...``) resolves to the folder inside the installed package; a local folder or any other id
    goes to diffusers / transformers unchanged. Put it first in the bases of a pipeline, model or prior.
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        return super().from_pretrained(resolve_pretrained(pretrained_model_name_or_path), *args, **kwargs)
