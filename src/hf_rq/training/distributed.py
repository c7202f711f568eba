"""Training the released sizes: gradient checkpointing, and what sharded data parallelism changes in the scripts.

Data parallelism (DDP) keeps a full copy of the weights, gradients and AdamW state on every rank: 16 bytes a
parameter in fp32 / bf16-autocast training, 62 GB for the 3.9B RQ-Transformer before any activation. FSDP (full
shard) and DeepSpeed ZeRO-3 split all three over the ranks and gather one transformer block at a time; ZeRO-2
splits gradients and optimizer state only. ``training/accelerate_configs/`` has a launcher config for each and
``benchmarks/bench_training_memory.py`` says which sizes need which.

With sharded parameters the scripts change in three places, all here:

* the model used for validation samples and for the final ``save_pretrained`` folder is a plain copy gathered
  from the shards (`gathered_model`: a collective, so every rank calls it; only the main process gets the copy);
* ``--use_ema`` is refused: diffusers' ``EMAModel`` would average rank-local shards and Accelerate saves custom
  objects from the main process only, so a resumed run would lose the other ranks' shadow weights;
* a launcher that asked for FSDP but got plain data parallelism is an error, not a silent fall-back (Accelerate
  turns FSDP on only for accelerator devices; a CPU launch with an FSDP config otherwise trains as DDP).
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger("hf_rq.training")


class ParallelismConfigError(RuntimeError):
    """The launcher's parallelism (FSDP / DeepSpeed) does not fit this script or these flags."""


def enable_gradient_checkpointing(model) -> None:
    """Recompute each transformer block (priors) or encoder/decoder block (tokenizers) in the backward pass.

    Priors are transformers models whose repeated block is a ``GradientCheckpointingLayer``; tokenizers are
    diffusers models whose ``Encoder`` / ``Decoder`` (and the DQ-VAE's multi-granularity encoder) checkpoint
    their blocks. Both use non-reentrant
    ``torch.utils.checkpoint``, which restores the RNG state, so dropout draws the same masks and the gradients
    equal those without checkpointing.
    """
    name = type(model).__name__
    if hasattr(model, "supports_gradient_checkpointing"):  # transformers PreTrainedModel
        if not model.supports_gradient_checkpointing:
            raise ValueError(f"--gradient_checkpointing: {name} does not support gradient checkpointing")
        # transformers >= 5.x renames the method; both take the checkpoint kwargs first.
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    elif hasattr(model, "enable_gradient_checkpointing"):  # diffusers ModelMixin
        if not getattr(model, "_supports_gradient_checkpointing", False):
            raise ValueError(f"--gradient_checkpointing: {name} does not support gradient checkpointing")
        model.enable_gradient_checkpointing()
    else:
        raise ValueError(f"--gradient_checkpointing: {name} is neither a transformers nor a diffusers model")


def sharding(accelerator) -> str | None:
    """``"fsdp"``, ``"zero1"``, ``"zero2"`` or ``"zero3"`` when states are sharded over the ranks, else None."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return "fsdp"
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        stage = int(accelerator.state.deepspeed_plugin.zero_stage)
        return f"zero{stage}" if stage else None
    return None


def params_are_sharded(accelerator) -> bool:
    return sharding(accelerator) in ("fsdp", "zero3")


def check_parallelism(accelerator, args, allow_sharding: bool = True) -> None:
    """Fail at start-up when the launcher's parallelism cannot do what was asked (see the module docstring)."""
    from accelerate.utils import DistributedType

    kind = sharding(accelerator)
    for name, wanted in (("FSDP", DistributedType.FSDP), ("DeepSpeed", DistributedType.DEEPSPEED)):
        flag = f"ACCELERATE_USE_{name.upper()}"
        if os.environ.get(flag, "false").lower() in ("1", "true") and accelerator.distributed_type != wanted:
            raise ParallelismConfigError(
                f"the launcher asked for {name} ({flag}) but Accelerate set up {accelerator.distributed_type.value} "
                f"({accelerator.num_processes} process(es) on {accelerator.device.type}): Accelerate turns {name} on "
                "only for runs on GPU-type devices, so this run would not shard anything. Launch on GPUs, or use "
                "training/accelerate_configs/ddp.yaml")
    if kind is None:
        return
    if not allow_sharding:
        raise ParallelismConfigError(
            f"this script trains with plain data parallelism only, got {kind}: its models (tokenizer, "
            "discriminator, LPIPS) are small enough for DDP; use training/accelerate_configs/ddp.yaml")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # DeepSpeed clips inside its optimizer step (Accelerate's clip_grad_norm_ does nothing there), with the
        # JSON's value: a different --max_grad_norm would be silently ignored.
        clip = accelerator.state.deepspeed_plugin.deepspeed_config.get("gradient_clipping", "auto")
        wanted = getattr(args, "max_grad_norm", None) or 0.0
        if clip != "auto" and float(clip) != float(wanted):
            raise ParallelismConfigError(
                f"--max_grad_norm {wanted} differs from the DeepSpeed config's gradient_clipping {clip}; DeepSpeed "
                "clips with its config's value, so set them equal")
    if getattr(args, "use_ema", False) and params_are_sharded(accelerator):
        raise ParallelismConfigError(
            f"--use_ema is not supported with {kind} (sharded parameters): the EMA would average rank-local "
            "shards and only the main process's would be checkpointed; drop --use_ema or use ZeRO-2 / DDP")


def gathered_model(accelerator, model, model_cls, config):
    """A plain, unsharded copy of ``model`` on the main process (None elsewhere); ``unwrap_model`` without sharding.

    Collective under FSDP / ZeRO-3: every rank must call it. ``model_cls`` and ``config`` rebuild the module
    (FSDP2 swaps the class of the wrapped model); persistent buffers come with the gathered state dict.
    """
    if not params_are_sharded(accelerator):
        return accelerator.unwrap_model(model)
    state_dict = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return None
    plain = model_cls(config)
    missing, unexpected = plain.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"gathering the sharded {model_cls.__name__}: missing keys {missing}, unexpected {unexpected}")
    return plain.to(accelerator.device)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The rank-local shard of a DTensor (FSDP2), the tensor itself otherwise."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor
