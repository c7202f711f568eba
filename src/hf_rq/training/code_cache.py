"""Encode a dataset once with a frozen tokenizer and keep the codes as a `datasets` dataset on disk.

The cache folder is named after a fingerprint of everything the codes depend on: the tokenizer's class,
config and every weight and buffer (the codebook included), the source dataset's own fingerprint and the
image transform. A different tokenizer or transform therefore gets a different folder, and a stale cache
is never read; the fingerprint is also stored inside the folder and checked on load. Folders are written
to a temporary name and renamed when complete, so an interrupted caching run is redone, not half-used.

Columns: ``codes`` (int32, the tokenizer's code layout, e.g. `(h, w, D)` for RQ-VAE), ``granularity`` for
dynamic tokenizers, ``latents`` `(C, h, w)` float32 when requested (the RQ soft-label recipe samples codes
from them at every step), ``class_labels`` when the dataset has labels, ``index`` and ``flipped``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

META_FILE = "hf_rq_code_cache.json"


class CodeCacheError(ValueError):
    """A code cache that does not belong to the tokenizer/dataset at hand."""


def tokenizer_fingerprint(tokenizer: torch.nn.Module, **settings) -> str:
    """SHA-256 of the tokenizer (class, config, all weights and buffers) and of ``settings`` (JSON-serialisable)."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__qualname__.encode())
    config = dict(getattr(tokenizer, "config", {}) or {})
    h.update(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}, sort_keys=True, default=str).encode())
    for name, tensor in sorted(tokenizer.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy().tobytes())
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _source_settings(dataset) -> dict:
    tf = dataset.transform
    return {
        "dataset": getattr(dataset.dataset, "_fingerprint", None) or len(dataset.dataset),
        "rows": len(dataset.dataset),
        "image_column": dataset.image_column,
        "label_column": dataset.label_column,
        "resolution": tf.resolution,
        "center_crop": tf.center_crop,
        "flip_all": dataset.flip_all,
    }


@torch.no_grad()
def _encode(tokenizer, images: torch.Tensor, store_latents: bool) -> dict[str, np.ndarray]:
    out = tokenizer.encode(images, return_codes=True)
    columns = {"codes": out.codes.to(torch.int32).cpu().numpy()}
    if getattr(out, "granularity", None) is not None:
        columns["granularity"] = out.granularity.to(torch.int8).cpu().numpy()
    if store_latents:
        columns["latents"] = out.latents.float().cpu().numpy()
    return columns


def _array_feature(array: np.ndarray):
    from datasets import Array2D, Array3D, Array4D, Sequence, Value

    shape, dtype = tuple(array.shape[1:]), str(array.dtype)
    if len(shape) == 1:
        return Sequence(Value(dtype), length=shape[0])
    return {2: Array2D, 3: Array3D, 4: Array4D}[len(shape)](shape=shape, dtype=dtype)


def cache_codes(tokenizer, dataset, cache_root, *, batch_size: int = 64, store_latents: bool = False,
                accelerator=None, device=None, show_progress: bool = True):
    """Return the codes of ``dataset`` (an `ImageDataset`) under ``tokenizer`` as a `datasets.Dataset`.

    Reads ``cache_root/codes-<fingerprint>`` when it exists and matches, otherwise encodes the dataset (on the
    main process, with a progress bar) and writes it. Other processes wait and then read it.
    """
    import datasets

    settings = {**_source_settings(dataset), "store_latents": store_latents, "format": 1}
    fingerprint = tokenizer_fingerprint(tokenizer, **settings)
    folder = Path(cache_root) / f"codes-{fingerprint[:20]}"
    is_main = accelerator is None or accelerator.is_main_process
    if is_main and not (folder / META_FILE).is_file():
        # Building must not advance the global RNG: a run would otherwise train differently depending on
        # whether the cache already existed.
        device = torch.device(device or next(tokenizer.parameters()).device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            _build(tokenizer, dataset, folder, fingerprint, settings, batch_size, store_latents, device, show_progress)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    meta = json.loads((folder / META_FILE).read_text())
    if meta.get("fingerprint") != fingerprint:
        raise CodeCacheError(f"code cache {folder} was made with a different tokenizer or data (fingerprint mismatch)")
    return datasets.load_from_disk(str(folder / "data"))


def _build(tokenizer, dataset, folder: Path, fingerprint: str, settings: dict, batch_size: int, store_latents: bool,
           device, show_progress: bool) -> None:
    import datasets

    was_training = tokenizer.training
    tokenizer.eval()
    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    chunks, features = [], None
    for batch in tqdm(loader, desc="caching codes", disable=not show_progress):
        columns = _encode(tokenizer, batch["pixel_values"].to(device), store_latents)
        n = len(batch["index"])
        rows = batch["index"].numpy()
        columns["index"] = (rows % len(dataset.dataset)).astype(np.int64)
        columns["flipped"] = rows >= len(dataset.dataset)
        if "class_labels" in batch:
            columns["class_labels"] = batch["class_labels"].numpy().astype(np.int64)
        if features is None:
            from datasets import Features, Value

            features = Features({k: (_array_feature(v) if v.ndim > 1 else
                                     Value("bool" if v.dtype == bool else str(v.dtype))) for k, v in columns.items()})
        chunks.append(datasets.Dataset.from_dict({k: list(v) if v.ndim > 1 else v for k, v in columns.items()},
                                                 features=features))
        assert len(chunks[-1]) == n
    tokenizer.train(was_training)
    if not chunks:
        raise CodeCacheError("cannot cache codes of an empty dataset")
    data = datasets.concatenate_datasets(chunks)
    bars_were_off = datasets.is_progress_bar_enabled() is False
    datasets.disable_progress_bars()  # one bar (the encoding) is enough
    try:
        data.save_to_disk(str(tmp / "data"))
    finally:
        if not bars_were_off:
            datasets.enable_progress_bars()
    (tmp / META_FILE).write_text(json.dumps({"fingerprint": fingerprint, "num_rows": len(data),
                                             "tokenizer_class": type(tokenizer).__name__, "settings": settings}, indent=2))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
