"""What every training script shares: flags, the Accelerator, schedules, seeds, logging and the final save."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch

from .distributed import local_tensor

logger = logging.getLogger("hf_rq.training")


def add_training_arguments(parser, default_lr: float = 1e-4) -> None:
    """Flags named as in diffusers' example scripts (``--train_batch_size``, ``--checkpointing_steps``, ...)."""
    g = parser.add_argument_group("training")
    g.add_argument("--output_dir", type=str, required=True, help="Checkpoints, logs and the final model go here.")
    g.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                   help="Fine-tune from this model or pipeline (a local folder or a Hub id) instead of training from scratch.")
    g.add_argument("--revision", type=str, default=None, help="Revision of --pretrained_model_name_or_path on the Hub.")
    g.add_argument("--seed", type=int, default=0, help="Seed for weights, data order, augmentation and sampling.")
    g.add_argument("--train_batch_size", type=int, default=16, help="Batch size per device.")
    g.add_argument("--num_train_epochs", type=int, default=1)
    g.add_argument("--max_train_steps", type=int, default=None, help="Optimizer steps; overrides --num_train_epochs.")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--learning_rate", type=float, default=default_lr)
    g.add_argument("--scale_lr", action="store_true",
                   help="Multiply the learning rate by gradient_accumulation_steps x train_batch_size x processes.")
    g.add_argument("--lr_scheduler", type=str, default="constant_with_warmup",
                   help='"constant", "constant_with_warmup", "cosine", "linear", ... (diffusers.optimization.get_scheduler).')
    g.add_argument("--lr_warmup_steps", type=int, default=0)
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=0.0)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", type=float, default=None, help="Clip the gradient norm (off by default).")
    g.add_argument("--deterministic", action="store_true",
                   help="Deterministic GPU kernels (slower): on GPUs, bit-exact resume needs it; CPU runs are deterministic anyway.")
    g.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                   help="Default: the `accelerate config` / launcher setting.")
    g.add_argument("--gradient_checkpointing", action="store_true",
                   help="Recompute each block's activations in the backward pass: less memory, about a third more "
                        "compute (see benchmarks/bench_training_memory.py).")
    g.add_argument("--use_ema", action="store_true",
                   help="Keep an exponential moving average of the weights; the final model is the EMA.")
    g.add_argument("--ema_decay", type=float, default=0.999)
    g.add_argument("--checkpointing_steps", type=int, default=500, help="Save a resumable checkpoint every N optimizer steps.")
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most N checkpoints.")
    g.add_argument("--resume_from_checkpoint", type=str, default=None,
                   help='"latest" or a checkpoint folder; the run continues exactly where that checkpoint left off.')
    g.add_argument("--validation_steps", type=int, default=500, help="Log image grids and validation metrics every N steps.")
    g.add_argument("--num_validation_images", type=int, default=8)
    g.add_argument("--logging_steps", type=int, default=10, help="Log losses every N optimizer steps.")
    g.add_argument("--report_to", type=str, default="tensorboard", help='"tensorboard", "wandb", "all" or "none".')
    g.add_argument("--logging_dir", type=str, default="logs", help="Tracker logs, relative to --output_dir.")
    g.add_argument("--max_nan_skips", type=int, default=0,
                   help="Skip up to N optimizer steps whose loss is NaN/inf before stopping (default: stop at the first).")
    g.add_argument("--write_rank_report", action="store_true",
                   help="Write output_dir/rank_report_<rank>.json: the sample ids each process trained on and a hash "
                        "of its final weights.")
    g.add_argument("--push_to_hub", action="store_true", help="Upload the final model with a model card.")
    g.add_argument("--hub_model_id", type=str, default=None, help="Repository id for --push_to_hub (default: the output folder name).")
    g.add_argument("--hub_token", type=str, default=None)
    g.add_argument("--hub_private_repo", action="store_true")


def validate_training_arguments(args) -> None:
    problems = []
    for name in ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "validation_steps", "logging_steps"):
        if getattr(args, name) < 1:
            problems.append(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        problems.append(f"--max_train_steps must be >= 1, got {args.max_train_steps}")
    if args.num_train_epochs < 1:
        problems.append(f"--num_train_epochs must be >= 1, got {args.num_train_epochs}")
    if args.learning_rate <= 0:
        problems.append(f"--learning_rate must be > 0, got {args.learning_rate}")
    if not 0 <= args.ema_decay < 1:
        problems.append(f"--ema_decay must be in [0, 1), got {args.ema_decay}")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        problems.append(f"--checkpoints_total_limit must be >= 1, got {args.checkpoints_total_limit}")
    if problems:
        raise ValueError("; ".join(problems))


def make_accelerator(args, project_name: str):
    """An `Accelerator` set up for exact resume, with trackers under ``output_dir/logging_dir``."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    if args.deterministic:
        # cuBLAS reads this when it creates its workspace, i.e. before the first matmul on the device.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.benchmark = False
    log_with = None if args.report_to in (None, "", "none") else args.report_to
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        from accelerate.state import AcceleratorState

        # Accelerate keeps its state per process and refuses a second `Accelerator` with other settings (e.g. a
        # notebook that trains twice with different --mixed_precision); a single process can safely start over.
        AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(
        # Without cpu=True, `--multi_gpu` on a machine without GPUs starts N independent, non-distributed
        # processes that all train without any error (HF_CONVENTIONS trap 6); with it they form a gloo group.
        cpu=not torch.cuda.is_available() and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()),
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)),
        # The seedable sampler makes the shuffling order a function of (seed, epoch), so a resumed run sees the
        # same batches as an uninterrupted one.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and accelerator.num_processes == 1:
        raise RuntimeError(
            f"{world} processes were launched but they are not distributed (each would train on its own). "
            "On a machine without GPUs use `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N ...`."
        )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    for name in ("accelerate.accelerator", "accelerate.checkpointing"):  # ten lines per checkpoint otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
    if accelerator.is_main_process:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    if log_with is not None:
        config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool)) and k != "hub_token"}
        accelerator.init_trackers(project_name, config=config)
    return accelerator


def training_length(args, batches_per_epoch: int) -> tuple[int, int, int]:
    """(optimizer steps per epoch, max_train_steps, num_train_epochs) as diffusers' scripts compute them."""
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    if steps_per_epoch == 0:
        raise ValueError("the training set is smaller than one batch per process; lower --train_batch_size")
    max_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    return steps_per_epoch, max_steps, math.ceil(max_steps / steps_per_epoch)


def make_scheduler(args, optimizer, max_steps: int, num_processes: int):
    from diffusers.optimization import get_scheduler

    # Accelerate steps a prepared scheduler once per process per optimizer step (split_batches=False), so the
    # schedule lengths are multiplied by the number of processes, as in diffusers' scripts.
    return get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps * num_processes,
                         num_training_steps=max_steps * num_processes)


def step_generator(seed: int, *keys: int, device="cpu") -> torch.Generator:
    """A generator for one (rank, step, micro-batch): its draws do not depend on anything that ran before,
    so a resumed run draws exactly what the uninterrupted run drew."""
    digest = hashlib.sha256(json.dumps([int(seed), *map(int, keys)]).encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def log_image_grid(accelerator, tag: str, images: list, step: int, rows: int, save_to: str | os.PathLike | None = None):
    """Log a grid of PIL images to the trackers (tensorboard / wandb) and optionally save it as PNG."""
    from ..image_processing import make_image_grid

    cols = math.ceil(len(images) / rows)
    while len(images) < rows * cols:
        images = images + [images[-1].copy()]
    grid = make_image_grid(images, rows, cols)
    if save_to is not None:
        Path(save_to).parent.mkdir(parents=True, exist_ok=True)
        grid.save(save_to)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(tag, np.asarray(grid), step, dataformats="HWC")
            tracker.writer.flush()
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: [wandb.Image(grid)]}, step=step)
    return grid


def weights_fingerprint(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        tensor = local_tensor(tensor)  # under FSDP: this rank's shard
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return h.hexdigest()


def write_rank_report(args, accelerator, seen_indices: list[int], model) -> None:
    path = Path(args.output_dir) / f"rank_report_{accelerator.process_index}.json"
    path.write_text(json.dumps({"rank": accelerator.process_index, "num_processes": accelerator.num_processes,
                                "indices": seen_indices, "weights_sha256": weights_fingerprint(model)}))


def gather_code_counts(accelerator, counts: torch.Tensor) -> torch.Tensor:
    return accelerator.reduce(counts, "sum") if accelerator.num_processes > 1 else counts
