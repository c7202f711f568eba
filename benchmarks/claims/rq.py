"""Claim 1, RQ-VAE (Lee et al. 2022): at a fixed 8x8 grid and codebook 256, a residual stack of depth D = 2, 4, 8
should reconstruct better than plain VQ (D = 1), and a deeper stack should beat a larger codebook at equal bits
(D = 1 with 4096 codes spends 12 bits per position, as D = 3 with 16 codes does).

Every configuration is trained by the library's own ``training/train_tokenizer.py --model rqvae`` (same steps,
batch, data and architecture apart from the quantizer) for each seed, and evaluated on the test split with
``hf_rq.evaluation.evaluate_reconstruction`` (PSNR, SSIM, rFID in the bundled classifier's feature space).
The rate is bits per image: grid cells x depth x log2(codebook size).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from .common import (add_common_arguments, check_common_arguments, format_table, metric_cell, plot_points,
                     reconstruction_setup, run_plan, save_outputs, summarize)

# 64x64 -> 8x8 without the quantizer (set per configuration). Full: the bundled rq-emoji-64 tokenizer at twice
# its width in the first levels; quick: narrower, without attention, so 18 runs fit in ~15 CPU minutes.
RQ_FULL_ARCH = {"block_out_channels": [32, 64, 128, 128], "layers_per_block": 1, "attn_resolutions": [8],
                "latent_channels": 64, "embed_dim": 64, "norm_num_groups": 8}
RQ_QUICK_ARCH = {"block_out_channels": [16, 32, 32, 64], "layers_per_block": 1, "attn_resolutions": [],
                 "latent_channels": 32, "embed_dim": 32, "norm_num_groups": 8}
RQ_CONFIGS = "1x256,2x256,4x256,8x256,1x4096,3x16"
METRICS = ("psnr", "ssim", "rfid", "codebook_usage")


def parse_quantizer(spec: str) -> tuple[int, int]:
    """``"4x256"`` -> (depth 4, codebook 256)."""
    try:
        depth, size = (int(v) for v in spec.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a configuration is DEPTHxCODEBOOK (e.g. 4x256), got {spec!r}") from None
    if depth < 1 or size < 2:
        raise argparse.ArgumentTypeError(f"{spec!r}: depth must be >= 1 and codebook size >= 2")
    return depth, size


def table(rows: list[dict]) -> str:
    header = ["config", "grid", "D", "K", "bits/img", "seeds", "PSNR (dB)", "SSIM", "rFID", "usage"]
    lines = [[r["config"], f"{r['grid'][0]}x{r['grid'][1]}", str(r["depth"]), str(r["codebook_size"]),
              str(r["bits_per_image"]), str(len(r["seeds"])), metric_cell(r, "psnr", "{:.2f}"),
              metric_cell(r, "ssim", "{:.4f}"), metric_cell(r, "rfid", "{:.2f}"),
              metric_cell(r, "codebook_usage", "{:.3f}")] for r in rows]
    return format_table(header, lines)


def train_argv(args, arch: dict, depth: int, codebook_size: int, seed: int, output_dir: Path) -> list[str]:
    config = {**arch, "code_depth": depth, "codebook_size": codebook_size}
    steps = args.steps
    return ["--model", "rqvae", "--model_config", json.dumps(config), "--train_data_dir", str(args.data),
            "--resolution", str(args.resolution), "--random_flip", "--train_batch_size", str(args.batch_size),
            "--learning_rate", str(args.learning_rate), "--max_train_steps", str(steps), "--seed", str(seed),
            # The claim is about the quantizer: no LPIPS (no VGG weights offline) and no GAN, whose instability
            # at a few hundred steps would swamp the differences between configurations.
            "--perceptual_weight", "0", "--disc_weight", "0",
            "--checkpointing_steps", str(steps), "--checkpoints_total_limit", "1",
            "--validation_steps", str(steps + 1), "--report_to", "none", "--output_dir", str(output_dir)]


def run(args) -> dict:
    import torch

    from hf_rq import RQVAEModel
    from hf_rq.evaluation import evaluator as ev

    device, arch, out_root, train, test, extractor = reconstruction_setup(
        args, RQ_QUICK_ARCH if args.quick else RQ_FULL_ARCH, ("code_depth", "codebook_size"))

    def score(config, seed, run_dir):
        depth, size = config
        model = RQVAEModel.from_pretrained(run_dir).to(device)
        with torch.no_grad():
            codes = model(test.images[:1].to(device).float() / 255 * 2 - 1).codes
            metrics = ev.evaluate_reconstruction(model, test, batch_size=args.eval_batch_size, extractor=extractor,
                                                 device=device)
        grid = list(codes.shape[1:3])
        bits = grid[0] * grid[1] * depth * math.log2(size)
        result = {"config": f"{depth}x{size}", "depth": depth, "codebook_size": size, "seed": seed, "grid": grid,
                  "bits_per_image": int(bits) if bits.is_integer() else round(bits, 1),
                  "parameters": sum(p.numel() for p in model.parameters()),
                  "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
        return result, (f"PSNR {metrics['psnr']:.2f}  SSIM {metrics['ssim']:.4f}  "
                        f"rFID {metrics.get('rfid', float('nan')):.2f}")

    plan = [(f"{depth}x{size}", seed, out_root / f"{depth}x{size}-seed{seed}",
             train_argv(args, arch, depth, size, seed, out_root / f"{depth}x{size}-seed{seed}"), (depth, size))
            for seed in range(args.seeds) for depth, size in args.configs]
    return run_plan(plan, train, args.steps, len(test.images), score,
                    lambda runs, final: write_outputs(args, arch, runs, out_root, len(test.images), final))


def write_outputs(args, arch: dict, runs: list[dict], out_root: Path, num_test: int, final: bool) -> dict:
    runs = sorted(runs, key=lambda r: ([f"{d}x{k}" for d, k in args.configs].index(r["config"]), r["seed"]))
    rows = summarize(runs, ("config", "depth", "codebook_size", "grid", "bits_per_image"), METRICS)
    text = table(rows)
    mode = "quick" if args.quick else "full"
    title = (f"RQ-VAE rate vs distortion ({mode}: {args.steps} steps, batch {args.batch_size}, "
             f"{args.seeds} seed(s), {num_test} test images)")
    points = [(r["bits_per_image"], r.get("psnr_mean", float("nan")), r.get("psnr_std", float("nan")), r["config"])
              for r in rows]
    return save_outputs(args, "rq", out_root, title, text, rows, runs, {"architecture": arch}, "rate_distortion.png",
                        lambda path: plot_points(points, path, title, "rate (bits per image, log scale)", "PSNR (dB)"),
                        final)


def add_parser(sub) -> None:
    p = sub.add_parser("rq", help="RQ depth D = 1, 2, 4, 8 vs plain VQ and a larger codebook, rate vs distortion")
    add_common_arguments(p, "runs/claims/rq")
    p.add_argument("--configs", type=lambda s: [parse_quantizer(v) for v in s.split(",")], default=None,
                   help=f"DEPTHxCODEBOOK list (default: {RQ_CONFIGS})")
    p.add_argument("--quick", action="store_true",
                   help="narrow model, 200 steps of 16 (about 15 min for 6 configurations x 3 seeds on a 2-core CPU)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: 200 quick, 3000 full)")
    p.add_argument("--batch_size", type=int, default=None, help="training batch (default: 16 quick, 32 full)")
    p.add_argument("--learning_rate", type=float, default=4e-4)
    p.add_argument("--model_config", default=None,
                   help="architecture overrides (JSON file or inline JSON); code_depth/codebook_size come from --configs")


def main(parser, args) -> dict:
    args.configs = args.configs or [parse_quantizer(v) for v in RQ_CONFIGS.split(",")]
    args.steps = args.steps or (200 if args.quick else 3000)
    args.batch_size = args.batch_size or (16 if args.quick else 32)
    check_common_arguments(parser, args)
    return run(args)
