"""Atomic, rotating training checkpoints on top of `Accelerator.save_state` / `load_state`.

Layout under ``<output_dir>/checkpoints/``::

    checkpoint-<step>/        complete checkpoints (model, optimizers, schedulers, RNG states, TrainState ...)
    latest                    text file: the name of the newest complete checkpoint (replaced atomically)
    .tmp-checkpoint-<step>/   a save in progress; never read, removed by the next save

A checkpoint is written into the temporary folder, marked complete, and only then renamed to its final
name (a rename within one file system is atomic), after which ``latest`` is replaced with ``os.replace``.
A process killed mid-save therefore leaves the previous checkpoint and ``latest`` untouched. Old
checkpoints are deleted only after the new one is in place, oldest first, by renaming them away before
removing their files, so a half-deleted folder never carries a checkpoint name.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

PREFIX = "checkpoint-"
MARKER = "hf_rq_checkpoint.json"


@dataclass
class TrainState:
    """Progress counters saved with every checkpoint (registered with `Accelerator.register_for_checkpointing`).

    ``step``: optimizer steps done; ``epoch``: current epoch; ``batches_in_epoch``: micro-batches of that epoch
    already consumed (what a resumed run skips).
    """

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.step, self.epoch, self.batches_in_epoch = int(state["step"]), int(state["epoch"]), int(state["batches_in_epoch"])


def checkpoints_root(output_dir) -> Path:
    return Path(output_dir) / "checkpoints"


def _step_of(path: Path) -> int | None:
    name = path.name
    if not name.startswith(PREFIX):
        return None
    try:
        return int(name[len(PREFIX):])
    except ValueError:
        return None


def is_complete(path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / MARKER).is_file()


def list_checkpoints(output_dir) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    found = [(s, p) for p in root.iterdir() if (s := _step_of(p)) is not None and is_complete(p)]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir) -> Path | None:
    """The checkpoint named by ``latest`` if it is complete, else the newest complete one, else None."""
    root = checkpoints_root(output_dir)
    pointer = root / "latest"
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if is_complete(candidate):
            return candidate
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def resolve_resume_checkpoint(value: str | None, output_dir) -> Path | None:
    """``--resume_from_checkpoint``: ``"latest"`` (None if there is none yet) or a checkpoint folder (must exist)."""
    if not value:
        return None
    if value == "latest":
        return latest_checkpoint(output_dir)
    path = Path(value)
    if not path.is_dir() and (checkpoints_root(output_dir) / value).is_dir():
        path = checkpoints_root(output_dir) / value
    if not is_complete(path):
        raise FileNotFoundError(
            f"--resume_from_checkpoint {value!r}: not a complete checkpoint folder "
            f"(expected a folder with {MARKER}; complete ones: {[p.name for p in list_checkpoints(output_dir)]})"
        )
    return path


def _remove_tree(path: Path) -> None:
    trash = path.with_name(".trash-" + path.name)
    if trash.exists():
        shutil.rmtree(trash, ignore_errors=True)
    os.rename(path, trash)  # the checkpoint name disappears atomically, then the files go
    shutil.rmtree(trash, ignore_errors=True)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_tree(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def save_checkpoint(accelerator, output_dir, state: TrainState, total_limit: int | None = None) -> Path:
    """Save a complete training state as ``checkpoint-<state.step>`` atomically; keep at most ``total_limit``.

    Every process must call it (``save_state`` writes per-rank RNG states); only the main process renames.
    """
    root = checkpoints_root(output_dir)
    final = root / f"{PREFIX}{state.step}"
    tmp = root / f".tmp-{PREFIX}{state.step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):  # left by a save that was killed
            shutil.rmtree(stale, ignore_errors=True)
        for stale in root.glob(".trash-*"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / MARKER).write_text(json.dumps({"step": state.step, "epoch": state.epoch,
                                              "batches_in_epoch": state.batches_in_epoch}) + "\n")
        _fsync_tree(tmp)
        if final.exists():  # e.g. the same step saved again after a resume
            _remove_tree(final)
        os.rename(tmp, final)
        _write_text_atomic(root / "latest", final.name + "\n")
        if total_limit is not None and total_limit > 0:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                _remove_tree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path) -> None:
    """Restore a checkpoint made by `save_checkpoint` (model, optimizers, schedulers, RNG, registered objects)."""
    path = Path(path)
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {MARKER})")
    accelerator.load_state(str(path))
    # load_state does not restore Accelerate's own checkpoint counter (HF_CONVENTIONS trap 7); keep it in
    # step with ours in case anything saves with automatic naming later.
    accelerator.project_configuration.iteration = (_step_of(path) or 0) + 1


def prepare_resumable_state(accelerator, args, model, **ema_kwargs):
    """EMA weights (with ``--use_ema``), the step counter and the NaN guard, registered for checkpointing,
    then restored from ``--resume_from_checkpoint`` when given. Call after ``accelerator.prepare``.

    Returns ``(ema, state, guard)``; ``ema`` is a diffusers ``EMAModel`` or None. Everything that a resumed
    run needs to continue exactly is registered here, in one place, so the two scripts cannot diverge.
    """
    from .losses import NonFiniteGuard

    ema = None
    if args.use_ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(model.parameters(), decay=args.ema_decay, **ema_kwargs)
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    state, guard = TrainState(), NonFiniteGuard(args.max_nan_skips)
    accelerator.register_for_checkpointing(state)
    accelerator.register_for_checkpointing(guard)
    resume_from = resolve_resume_checkpoint(args.resume_from_checkpoint, args.output_dir)
    if resume_from is not None:
        accelerator.print(f"resuming from {resume_from}")
        load_checkpoint(accelerator, resume_from)
        if ema is not None:
            ema.to(accelerator.device)  # loading puts the shadow weights back on the CPU
    return ema, state, guard
