"""Claim 2, DQ-VAE (Huang et al. 2023): at an equal token budget, coding each region at the granularity its
content needs (dynamic) reconstructs better than coding every region at one granularity (fixed).

Configurations, all the same DQ-VAE code (trunk, heads, codebook, decoder) trained with the same data, steps,
batch and seed list, so that only the routing differs:

- ``coarse-only`` / ``fine-only``: the fixed-grain models, every region coarse (``hc x hc`` tokens) or every
  region fine (``hf x hf = 4 hc^2`` tokens): the entropy router with a threshold no patch entropy can exceed
  (above ln 32, the entropy of a uniform 32-bin histogram) or that every patch exceeds (below 0). Their parameter
  count is the entropy DQ-VAE's exactly.
- ``entropy-<r>``: the entropy router with the threshold the training script picks on the training images for a
  fine ratio ``r`` (the dataset percentile rule).
- ``feature-<r>``: the learned feature router with the budget loss pulling the fine share towards ``r`` (it
  adds the router MLP's parameters, reported).

A fixed grid *at* the DQ budget cannot be built: from a square image, power-of-two strides give square grids
of 16, 64, 256 ... tokens, and a DQ budget ``hc^2 (1 + 3 r)`` lies strictly between the coarse and the fine
grid. The fixed-grain reference at a DQ budget is therefore the straight line between the two trained
fixed-grain models on a log-token axis (PSNR is close to linear in the log of the rate); the table reports
dPSNR, dSSIM and drFID = dynamic - that reference. It is an interpolation, not a trained model; below a
curve that is concave in log tokens it is a lower bound, so a small positive gap is weaker evidence than a
large one.

The budget actually used is measured from each model's codes on the test images: the number of tokens of the
token form (one per coarse region, four per fine region), averaged over the images. Every run is trained by
``training/train_tokenizer.py --model dqvae`` and scored by ``hf_rq.evaluation.evaluate_reconstruction`` (PSNR,
SSIM, rFID in the bundled classifier's feature space).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from .common import (add_common_arguments, check_common_arguments, format_table, metric_cell, plot_points,
                     reconstruction_setup, run_plan, save_outputs, summarize)

# Strides 16 (coarse) and 8 (fine) as the paper's F16/F8 model, so a 64x64 image has a 4x4 coarse and an 8x8
# fine grid (16 and 64 tokens). Full: training/configs/dqvae_emoji64.json; quick: half its width (8
# configurations x 3 seeds of 150 steps took 37 min on a 2-core CPU shared with other jobs).
DQ_FULL_ARCH = {"block_out_channels": [32, 32, 64, 64, 128], "layers_per_block": 1, "attn_resolutions": [],
                "decoder_block_out_channels": [32, 32, 64, 64], "decoder_layers_per_block": 1,
                "decoder_attn_resolutions": [], "latent_channels": 64, "embed_dim": 64, "codebook_size": 512,
                "norm_num_groups": 32, "router_norm_num_groups": 32}
DQ_QUICK_ARCH = {"block_out_channels": [16, 16, 32, 32, 64], "layers_per_block": 1, "attn_resolutions": [],
                 "decoder_block_out_channels": [16, 16, 32, 32], "decoder_layers_per_block": 1,
                 "decoder_attn_resolutions": [], "latent_channels": 32, "embed_dim": 32, "codebook_size": 256,
                 "norm_num_groups": 8, "router_norm_num_groups": 8}
ROUTERS = ("entropy", "feature")
DEFAULT_RATIOS = "0.25,0.5,0.75"
# Entropy thresholds that make the entropy router a fixed-grain one: no 32-bin gray-level histogram has an
# entropy above ln 32 = 3.47 nats, and none below 0.
ALL_COARSE_THRESHOLD = 4.0
ALL_FINE_THRESHOLD = -1.0
METRICS = ("psnr", "ssim", "rfid", "tokens_per_image", "fine_share", "codebook_usage")
# Compared with the fixed-grain line at the same budget (dX = dynamic - fixed; higher is better except rFID).
REFERENCE_METRICS = ("psnr", "ssim", "rfid")


def parse_ratios(text: str) -> list[float]:
    try:
        ratios = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ratios is a comma-separated list of fine ratios, got {text!r}") from None
    bad = [r for r in ratios if not 0.0 < r < 1.0]
    if bad:
        raise argparse.ArgumentTypeError(f"fine ratios must lie strictly between 0 and 1 (0 and 1 are the "
                                         f"coarse-only and fine-only models, always included), got {bad}")
    return ratios


def parse_routers(text: str) -> list[str]:
    routers = [v.strip() for v in text.split(",") if v.strip()]
    bad = [r for r in routers if r not in ROUTERS]
    if bad or not routers:
        raise argparse.ArgumentTypeError(f"--routers takes {', '.join(ROUTERS)} (comma-separated), got {text!r}")
    return routers


def configurations(routers: list[str], ratios: list[float]) -> list[dict]:
    """Name, router and the DQ-VAE config entries of every configuration, fixed-grain models first."""
    configs = [{"config": "coarse-only", "router": "fixed", "fine_ratio": 0.0,
                "model": {"router_type": "entropy", "entropy_threshold": ALL_COARSE_THRESHOLD}},
               {"config": "fine-only", "router": "fixed", "fine_ratio": 1.0,
                "model": {"router_type": "entropy", "entropy_threshold": ALL_FINE_THRESHOLD}}]
    for router in routers:
        for ratio in ratios:
            # Without entropy_threshold the training script derives it from the training images for this ratio.
            configs.append({"config": f"{router}-{ratio:g}", "router": router, "fine_ratio": ratio,
                            "model": {"router_type": router, "fine_grain_ratio": ratio}})
    return configs


def train_argv(args, arch: dict, config: dict, seed: int, output_dir: Path) -> list[str]:
    steps = args.steps
    return ["--model", "dqvae", "--model_config", json.dumps({**arch, **config["model"]}),
            "--train_data_dir", str(args.data), "--resolution", str(args.resolution), "--random_flip",
            "--train_batch_size", str(args.batch_size), "--learning_rate", str(args.learning_rate),
            "--max_train_steps", str(steps), "--seed", str(seed),
            # As for the RQ claim: no LPIPS (no VGG weights offline) and no GAN, whose early instability would
            # swamp the differences between routings.
            "--perceptual_weight", "0", "--disc_weight", "0",
            # The script's own validation is only logged (the claim's metrics come from the evaluator): keep it short.
            "--max_eval_samples", "64", "--num_validation_images", "0",
            "--checkpointing_steps", str(steps), "--checkpoints_total_limit", "1",
            "--validation_steps", str(steps + 1), "--report_to", "none", "--output_dir", str(output_dir)]


def measure_budget(model, images, batch_size: int, device) -> dict:
    """Tokens per image counted in the token form of the model's codes (one per coarse region, four per fine
    region), and the share of fine regions, over ``images`` (uint8)."""
    import torch

    model.eval()
    K = model.config.codebook_size
    tokens, fine = [], []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size].to(device).float() / 255 * 2 - 1
            enc = model.encode(x)
            form = model.codes_to_tokens(enc.codes, enc.granularity)
            # Real tokens are codes < K; end and pad tokens are K + 1 and K.
            tokens.append((form.coarse_content < K).sum(1) + (form.fine_content < K).sum(1))
            fine.append(enc.granularity.float().flatten(1).mean(1))
    tokens, fine = torch.cat(tokens).float(), torch.cat(fine)
    return {"tokens_per_image": float(tokens.mean()), "tokens_min": int(tokens.min()), "tokens_max": int(tokens.max()),
            "fine_share": float(fine.mean())}


def fixed_reference(rows: list[dict], tokens: float, metric: str = "psnr") -> float:
    """The fixed-grain ``metric`` at ``tokens`` per image: linear in log tokens between the two fixed models
    (NaN unless both were run)."""
    ends = {r["config"]: r for r in rows if r["config"] in ("coarse-only", "fine-only")}
    if len(ends) < 2 or any(metric + "_mean" not in r for r in ends.values()):
        return float("nan")
    lo, hi = ends["coarse-only"], ends["fine-only"]
    t0, t1 = lo["tokens_per_image_mean"], hi["tokens_per_image_mean"]
    share = (math.log(tokens) - math.log(t0)) / (math.log(t1) - math.log(t0))
    return lo[metric + "_mean"] + share * (hi[metric + "_mean"] - lo[metric + "_mean"])


def table(rows: list[dict]) -> str:
    header = ["config", "router", "target r", "tokens/img", "fine share", "params", "seeds", "PSNR (dB)", "SSIM",
              "rFID", "dPSNR", "dSSIM", "drFID"]

    def gap(row, metric, fmt):
        value = row.get(metric + "_vs_fixed")
        return "-" if value is None or not math.isfinite(value) else fmt.format(value)

    lines = [[r["config"], r["router"], f"{r['fine_ratio']:g}", metric_cell(r, "tokens_per_image", "{:.1f}"),
              metric_cell(r, "fine_share", "{:.3f}"), str(r["parameters"]), str(len(r["seeds"])),
              metric_cell(r, "psnr", "{:.2f}"), metric_cell(r, "ssim", "{:.4f}"), metric_cell(r, "rfid", "{:.2f}"),
              gap(r, "psnr", "{:+.2f}"), gap(r, "ssim", "{:+.4f}"), gap(r, "rfid", "{:+.2f}")] for r in rows]
    return format_table(header, lines)


def run(args) -> dict:
    import torch

    from hf_rq import DQVAEModel
    from hf_rq.evaluation import evaluator as ev

    # Two granularities, and router settings per configuration (the entropy router has no third grain).
    device, arch, out_root, train, test, extractor = reconstruction_setup(
        args, DQ_QUICK_ARCH if args.quick else DQ_FULL_ARCH,
        ("router_type", "entropy_threshold", "fine_grain_ratio", "num_grains"))

    def score(config, seed, run_dir):
        model = DQVAEModel.from_pretrained(run_dir).to(device)
        budget = measure_budget(model, test.images, args.eval_batch_size, device)
        with torch.no_grad():
            metrics = ev.evaluate_reconstruction(model, test, batch_size=args.eval_batch_size, extractor=extractor,
                                                 device=device)
        metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        metrics.update(tokens_per_image=budget["tokens_per_image"], fine_share=budget["fine_share"])
        result = {"config": config["config"], "router": config["router"], "fine_ratio": config["fine_ratio"],
                  "seed": seed, "coarse_grid": model.coarse_grid_size, "fine_grid": model.fine_grid_size,
                  "entropy_threshold": (model.config.entropy_threshold
                                        if model.config.router_type == "entropy" else None),
                  "tokens_min": budget["tokens_min"], "tokens_max": budget["tokens_max"],
                  "parameters": sum(p.numel() for p in model.parameters()), "metrics": metrics}
        return result, (f"{budget['tokens_per_image']:.1f} tokens/img  PSNR {metrics['psnr']:.2f}  "
                        f"SSIM {metrics['ssim']:.4f}  rFID {metrics.get('rfid', float('nan')):.2f}")

    plan = [(config["config"], seed, out_root / f"{config['config']}-seed{seed}",
             train_argv(args, arch, config, seed, out_root / f"{config['config']}-seed{seed}"), config)
            for seed in range(args.seeds) for config in args.configs]
    return run_plan(plan, train, args.steps, len(test.images), score,
                    lambda runs, final: write_outputs(args, arch, runs, out_root, len(test.images), final))


def write_outputs(args, arch: dict, runs: list[dict], out_root: Path, num_test: int, final: bool) -> dict:
    order = [c["config"] for c in args.configs]
    runs = sorted(runs, key=lambda r: (order.index(r["config"]), r["seed"]))
    rows = summarize(runs, ("config", "router", "fine_ratio", "coarse_grid", "fine_grid", "parameters"), METRICS)
    for row in rows:
        for metric in REFERENCE_METRICS:
            if row["router"] != "fixed" and metric + "_mean" in row:
                row[metric + "_fixed_reference"] = fixed_reference(rows, row["tokens_per_image_mean"], metric)
                row[metric + "_vs_fixed"] = row[metric + "_mean"] - row[metric + "_fixed_reference"]
    text = table(rows)
    mode = "quick" if args.quick else "full"
    title = (f"DQ-VAE dynamic vs fixed granularity ({mode}: {args.steps} steps, batch {args.batch_size}, "
             f"{args.seeds} seed(s), {num_test} test images)")
    short = {"fixed": "", "entropy": "E ", "feature": "F "}
    points = [(r.get("tokens_per_image_mean", float("nan")), r.get("psnr_mean", float("nan")),
               r.get("psnr_std", float("nan")),
               r["config"] if r["router"] == "fixed" else f"{short[r['router']]}{r['fine_ratio']:g}") for r in rows]
    # One line per router through its fine ratios; the fixed-grain line is the reference of dPSNR.
    series = {}
    for i, r in enumerate(rows):
        series.setdefault(r["router"], []).append(i)
    plot_title = title.replace("DQ-VAE dynamic vs fixed granularity",
                               "DQ-VAE PSNR vs tokens (E = entropy, F = feature)")
    extra = {"architecture": arch,
             "fixed_reference": "<metric>_fixed_reference: the metric linear in log(tokens) between coarse-only and "
                                "fine-only (interpolated, not trained); <metric>_vs_fixed = mean - reference"}
    return save_outputs(args, "dq", out_root, title, text, rows, runs, extra, "psnr_vs_tokens.png",
                        lambda path: plot_points(points, path, plot_title, "tokens per image (log); line coarse-fine: "
                                                 "fixed-grain reference", "PSNR (dB)", series=series), final)


def add_parser(sub) -> None:
    p = sub.add_parser("dq", help="DQ-VAE entropy / feature routers vs coarse-only and fine-only coding, "
                                  "reconstruction vs tokens per image")
    add_common_arguments(p, "runs/claims/dq")
    p.add_argument("--routers", type=parse_routers, default=list(ROUTERS), help="entropy,feature (default: both)")
    p.add_argument("--ratios", type=parse_ratios, default=None,
                   help=f"fine ratios of the dynamic models (default: {DEFAULT_RATIOS})")
    p.add_argument("--quick", action="store_true",
                   help="narrow model, 150 steps of 16 (8 configurations x 3 seeds: 37 min measured on a 2-core CPU "
                        "shared with other jobs, less on free cores)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: 150 quick, 3000 full)")
    p.add_argument("--batch_size", type=int, default=None, help="training batch (default: 16 quick, 32 full)")
    p.add_argument("--learning_rate", type=float, default=4e-4)
    p.add_argument("--model_config", default=None,
                   help="architecture overrides (JSON file or inline JSON); the router settings come from each "
                        "configuration")


def main(parser, args) -> dict:
    args.configs = configurations(args.routers, args.ratios or parse_ratios(DEFAULT_RATIOS))
    args.steps = args.steps or (150 if args.quick else 3000)
    args.batch_size = args.batch_size or (16 if args.quick else 32)
    check_common_arguments(parser, args)
    return run(args)
