"""Helpers to exercise Hub loading offline: fill the hub cache with a local folder."""

import hashlib
import shutil
from pathlib import Path


def put_in_hub_cache(src_dir, repo_id: str, repo_type: str = "model", revision: str = "main") -> Path:
    """Copy ``src_dir`` into the hub cache as snapshot ``revision`` of ``repo_id``; returns the snapshot dir.

    The cache layout needs no blobs or symlinks: ``refs/<revision>`` naming a commit and a plain-file
    ``snapshots/<commit>/`` folder are what ``from_pretrained`` resolves offline.
    """
    from huggingface_hub import constants

    folder = Path(constants.HF_HUB_CACHE) / f"{repo_type}s--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = folder / "snapshots" / commit
    shutil.copytree(src_dir, snapshot, dirs_exist_ok=True)
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / revision).write_text(commit)
    return snapshot
