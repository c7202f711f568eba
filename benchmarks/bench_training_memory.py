#!/usr/bin/env python
"""Peak training memory per GPU for the released prior sizes under DDP, FSDP, ZeRO-2 and ZeRO-3, with and
without gradient checkpointing, and how many 24 / 48 / 80 GiB GPUs each needs. Checked against a measured
peak on a small model on this CPU.

    python benchmarks/bench_training_memory.py                  # table for batch 16 per GPU
    python benchmarks/bench_training_memory.py --batch_size 32 --skip_cpu_check

Nothing large is allocated: each layout is built on the meta device, where parameter counts are exact and a
forward pass records the shape of every tensor autograd saves for the backward (the activations), without
computing anything. Data-dependent input checks (token ranges) cannot run on meta tensors and are answered
"valid" (`meta_checks_pass`).

Memory model, bytes per GPU, P parameters, N GPUs, micro-batch b, bf16 autocast with fp32 AdamW:

* states: DDP 4P weights + 4P grads + 8P Adam + 4P DDP reducer buckets (Accelerate's default copies the grads);
  FSDP (full shard) 16P / N; ZeRO-2 2P bf16 weights + (2P grads + 12P fp32 master + Adam) / N; ZeRO-3 16P / N
  (the ZeRO paper's mixed-precision Adam count);
* gathered / buffered: FSDP holds the current and the prefetched block unsharded (bf16 weights + bf16 grads,
  2 x 4 bytes x largest block) plus the parameters outside the blocks (2 bytes); ZeRO uses its buckets from
  ``training/accelerate_configs/zero{2,3}.json`` (2 bytes an element) and ZeRO-3 one gathered block as FSDP;
* activations: the saved tensors of a bf16 forward at batch b. With gradient checkpointing each block keeps
  only its input, and one block's activations are rebuilt at a time: A_ckpt = A_outside_blocks + sum of block
  inputs + max_block A_block. Attention is counted as SDPA's math kernel saves it (probabilities included);
  flash kernels save less, so long sequences are over-estimated slightly;
* all gradients are counted next to all activations, although backward frees activations as gradients appear:
  the measured CPU peak is 12P + A plus a few MiB, this estimate 16P + A;
* plus a fixed 2 GiB for the CUDA context and allocator fragmentation.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
GiB = 2**30
OVERHEAD = 2 * GiB
CARDS = (24, 48, 80)
GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128)

# The published layouts: RQ-Transformer ImageNet models (rq-vae-transformer configs: E, body / head layers,
# heads; 8x8x4 codes, K 16384, 1000 classes) and LlamaGen's class-conditional GPT presets at 256 px (16x16 tokens).
RQ_COMMON = dict(codebook_size=16384, code_depth=4, grid_height=8, grid_width=8, code_embed_dim=256, num_classes=1000,
                 use_null_class=True, class_dropout_prob=0.1)
LLAMAGEN_COMMON = dict(vocab_size=16384, num_classes=1000, grid_size=16)
LAYOUTS = {
    "RQ-821M": ("rq", dict(hidden_size=1536, num_spatial_layers=24, num_depth_layers=4, num_attention_heads=24)),
    "RQ-1.4B": ("rq", dict(hidden_size=1536, num_spatial_layers=42, num_depth_layers=6, num_attention_heads=24)),
    "RQ-3.8B": ("rq", dict(hidden_size=2560, num_spatial_layers=42, num_depth_layers=6, num_attention_heads=40)),
    "LlamaGen-B": ("llamagen", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12)),
    "LlamaGen-L": ("llamagen", dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16)),
    "LlamaGen-XL": ("llamagen", dict(hidden_size=1280, num_hidden_layers=36, num_attention_heads=20)),
    "LlamaGen-XXL": ("llamagen", dict(hidden_size=1536, num_hidden_layers=48, num_attention_heads=24)),
    "LlamaGen-3B": ("llamagen", dict(hidden_size=3200, num_hidden_layers=24, num_attention_heads=32)),
}


def build(family: str, layout: dict, dtype=torch.bfloat16, device="meta"):
    """(model in training mode, loss function of the model and a batch size, block class)."""
    if family == "rq":
        from hf_rq.rq.prior import RQTransformerConfig, RQTransformerForImageGeneration
        from hf_rq.transformer_blocks import GPTBlock

        config = RQTransformerConfig(**{**RQ_COMMON, **layout})
        with torch.device(device):
            model = RQTransformerForImageGeneration(config).to(dtype)

        def loss(m, b):
            c = m.config
            codes = torch.zeros(b, c.grid_height, c.grid_width, c.code_depth, dtype=torch.long, device=device)
            return m(codes=codes, class_labels=torch.zeros(b, dtype=torch.long, device=device), labels=codes).loss

        return model.train(), loss, GPTBlock
    if family == "llamagen":
        from hf_rq.ctf.llamagen import LlamaGenConfig, LlamaGenForImageGeneration
        from hf_rq.llama_blocks import LlamaGenBlock

        config = LlamaGenConfig(**{**LLAMAGEN_COMMON, **layout})
        with torch.device(device):
            model = LlamaGenForImageGeneration(config).to(dtype)

        def loss(m, b):
            codes = torch.zeros(b, m.config.grid_size**2, dtype=torch.long, device=device)
            return m(codes=codes, class_labels=torch.zeros(b, dtype=torch.long, device=device), labels=codes).loss

        return model.train(), loss, LlamaGenBlock
    raise ValueError(f"unknown family {family!r}")


@contextlib.contextmanager
def meta_checks_pass():
    """Answer data-dependent checks on meta tensors (``bool(t)``, ``int(t)``, ``t.item()``) as "valid"."""
    answers = {"__bool__": False, "__int__": 0, "item": 0}
    saved = {name: getattr(torch.Tensor, name) for name in answers}

    def patched(name):
        original = saved[name]
        return lambda self: answers[name] if self.device.type == "meta" else original(self)

    for name in answers:
        setattr(torch.Tensor, name, patched(name))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def count_activations(model, loss_fn, batch_size: int, block_cls) -> dict:
    """Bytes autograd saves for the backward: in total, per block, outside the blocks, and the block inputs."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, tuple[int, int | None]] = {}
    current: list[int | None] = [None]
    inputs: list[int] = []
    blocks = [m for m in model.modules() if isinstance(m, block_cls)]
    hooks = []
    for i, block in enumerate(blocks):
        def enter(module, args, i=i):
            current[0] = i
            inputs.append(args[0].numel() * args[0].element_size())

        def leave(module, args, output):
            current[0] = None

        hooks += [block.register_forward_pre_hook(enter), block.register_forward_hook(leave)]

    def pack(tensor):
        storage = tensor.untyped_storage()
        key = storage._cdata  # saved tensors stay alive with the graph, so their storages are distinct
        if key not in params and key not in saved:
            saved[key] = (storage.nbytes(), current[0])
        return tensor

    try:
        with meta_checks_pass(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss_fn(model, batch_size)
    finally:
        for h in hooks:
            h.remove()
    per_block = [0] * len(blocks)
    outside = 0
    for nbytes, block in saved.values():
        if block is None:
            outside += nbytes
        else:
            per_block[block] += nbytes
    total = outside + sum(per_block)
    return {"total": total, "checkpointed": outside + sum(inputs) + max(per_block), "per_block_max": max(per_block)}


def activation_terms(acts: dict, gradient_checkpointing: bool) -> dict:
    return {"saved": acts["checkpointed"] if gradient_checkpointing else acts["total"]}


def parameter_counts(model, block_cls) -> dict:
    blocks = [m for m in model.modules() if isinstance(m, block_cls)]
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    total = sum(p.numel() for p in model.parameters())
    return {"total": total, "largest_block": max(sum(p.numel() for p in b.parameters()) for b in blocks),
            "outside_blocks": sum(p.numel() for p in model.parameters() if id(p) not in in_blocks)}


def zero_buckets(stage: int) -> dict:
    config = json.loads((REPO / "training" / "accelerate_configs" / f"zero{stage}.json").read_text())["zero_optimization"]
    return {k: float(v) for k, v in config.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def per_gpu_bytes(strategy: str, n: int, params: dict, activations: dict) -> float:
    P, unit, rest = params["total"], params["largest_block"], params["outside_blocks"]
    if strategy == "DDP":
        states = 20 * P
    elif strategy == "FSDP":
        states = 16 * P / n + 2 * unit * (2 + 2) + 2 * rest
    elif strategy == "ZeRO-2":
        b = zero_buckets(2)
        states = 2 * P + 14 * P / n + 2 * (b.get("reduce_bucket_size", 5e8) + b.get("allgather_bucket_size", 5e8))
    elif strategy == "ZeRO-3":
        b = zero_buckets(3)
        states = 16 * P / n + 2 * unit * (2 + 2) + 2 * (b.get("reduce_bucket_size", 5e8)
                                                         + b.get("stage3_prefetch_bucket_size", 5e7))
    else:
        raise ValueError(strategy)
    return states + activations["saved"] + OVERHEAD


def gpus_needed(strategy, params, activations, capacity_gib) -> str:
    for n in GPU_COUNTS:
        if per_gpu_bytes(strategy, n, params, activations) <= capacity_gib * GiB:
            return str(n)
        if strategy == "DDP":  # every GPU holds everything: more GPUs do not help
            return "-"
    return f">{GPU_COUNTS[-1]}"


def memory_table(batch_size: int, layouts: list[str]) -> list[str]:
    rows = []
    header = (f"| layout | params | strategy | grad ckpt | activations (GiB, b={batch_size}) | per GPU at N=8 (GiB) | "
              + " | ".join(f"GPUs of {c} GiB" for c in CARDS) + " |")
    rows += [header, "|" + "---|" * (6 + len(CARDS))]
    for name in layouts:
        family, layout = LAYOUTS[name]
        model, loss_fn, block_cls = build(family, layout)
        params = parameter_counts(model, block_cls)
        acts = count_activations(model, loss_fn, batch_size, block_cls)
        for strategy in ("DDP", "FSDP", "ZeRO-2", "ZeRO-3"):
            for ckpt in (False, True):
                a = activation_terms(acts, ckpt)
                at8 = per_gpu_bytes(strategy, 8, params, a) / GiB
                needed = [gpus_needed(strategy, params, a, c) for c in CARDS]
                rows.append(f"| {name} | {params['total'] / 1e6:.0f}M | {strategy} | {'yes' if ckpt else 'no'} | "
                            f"{a['saved'] / GiB:.1f} | {at8:.1f} | " + " | ".join(needed) + " |")
        del model
    return rows


# ------------------------------------------------------------------------------------- check on this CPU
CHECK_LAYOUT = ("llamagen", dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=4, multiple_of=64,
                                 vocab_size=1024, num_classes=10, grid_size=16))
CHECK_BATCH = 8


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_cpu_peak(gradient_checkpointing: bool) -> dict:
    """In this process (start it fresh): peak RSS of steady-state fp32 AdamW steps above the RSS before the
    model existed, and the estimate 16P + activations of the same model (fp32 counts)."""
    from hf_rq.training import enable_gradient_checkpointing

    torch.set_num_threads(1)
    family, layout = CHECK_LAYOUT
    meta_model, loss_fn, block_cls = build(family, layout, dtype=torch.float32)
    acts = count_activations(meta_model, loss_fn, CHECK_BATCH, block_cls)
    params = parameter_counts(meta_model, block_cls)
    del meta_model
    before = _rss_bytes()
    model, loss_fn, _ = build(family, layout, dtype=torch.float32, device="cpu")
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for _ in range(2):  # the first step allocates AdamW's state; the second is the steady state measured
        loss_fn(model, CHECK_BATCH).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    a = activation_terms(acts, gradient_checkpointing)
    return {"measured": peak - before, "estimated": 16 * params["total"] + a["saved"],
            "activations": a["saved"], "params": params["total"]}


def cpu_check() -> list[str]:
    results = {}
    for ckpt in (False, True):
        cmd = [sys.executable, __file__, "--_measure", "ckpt" if ckpt else "plain"]
        # A fixed mmap threshold: glibc otherwise raises it after large frees and keeps freed memory in the heap,
        # so the RSS would not follow what torch frees.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(1 << 17)}
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        results[ckpt] = json.loads(out.stdout.strip().splitlines()[-1])
    mib = 2**20
    p = results[False]["params"]
    rows = [f"CPU check: LlamaGen layout {CHECK_LAYOUT[1]['hidden_size']}x{CHECK_LAYOUT[1]['num_hidden_layers']} "
            f"({p / 1e6:.1f}M params), batch {CHECK_BATCH}, fp32 AdamW, one process, peak RSS above the pre-model RSS",
            "| grad ckpt | activations counted (MiB) | estimated 16P + A (MiB) | measured peak (MiB) | "
            "measured / estimated |",
            "|---|---|---|---|---|"]
    for ckpt, r in results.items():
        rows.append(f"| {'yes' if ckpt else 'no'} | {r['activations'] / mib:.0f} | {r['estimated'] / mib:.0f} | "
                    f"{r['measured'] / mib:.0f} | {r['measured'] / r['estimated']:.2f} |")
    saved = results[False]["measured"] - results[True]["measured"]
    counted = results[False]["activations"] - results[True]["activations"]
    rows.append(f"gradient checkpointing saves {saved / mib:.0f} MiB measured, {counted / mib:.0f} MiB counted "
                f"(ratio {saved / counted:.2f})")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_size", type=int, default=16, help="Micro-batch per GPU.")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--skip_cpu_check", action="store_true")
    parser.add_argument("--_measure", choices=["plain", "ckpt"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._measure:
        print(json.dumps(measure_cpu_peak(args._measure == "ckpt")))
        return
    print("\n".join(memory_table(args.batch_size, args.layouts)))
    if not args.skip_cpu_check:
        print()
        print("\n".join(cpu_check()))


if __name__ == "__main__":
    main()
