"""Reproduce the seed papers' central claims at small scale: train, evaluate, print a table, write JSON and a plot.

Sub-commands (one per claim; so far):

- ``rq``: RQ-VAE, Lee et al. 2022. At a fixed 8x8 grid and codebook 256, a residual stack of depth D = 2, 4, 8
  should reconstruct better than plain VQ (D = 1), and a deeper stack should beat a larger codebook at equal
  bits (D = 1 with 4096 codes spends 12 bits per position, as D = 3 with 16 codes does).

Every configuration is trained by the library's own ``training/train_tokenizer.py --model rqvae`` (same steps,
batch, data and architecture apart from the quantizer) for each seed, and evaluated on the test split with
``hf_rq.evaluation.evaluate_reconstruction`` (PSNR, SSIM, rFID in the bundled classifier's feature space).
The rate is bits per image: grid cells x depth x log2(codebook size).

    python benchmarks/reproduce_claims.py rq --quick              # ~15 min on a 2-core CPU, the ranking counts
    python benchmarks/reproduce_claims.py rq --device cuda        # full: a wider model, 3000 steps per run

Outputs in ``--output_dir`` (default ``runs/claims/rq``): ``results.json`` (every run and the per-configuration
mean/std), ``rate_distortion.png`` (rate vs PSNR), and one trained tokenizer per run (reused when the same run
is asked again with the same arguments, so an interrupted benchmark continues where it stopped).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = "../shared/data/emoji"

# 64x64 -> 8x8 without the quantizer (set per configuration). Full: the bundled rq-emoji-64 tokenizer at twice
# its width in the first levels; quick: narrower, without attention, so 18 runs fit in ~15 CPU minutes.
RQ_FULL_ARCH = {"block_out_channels": [32, 64, 128, 128], "layers_per_block": 1, "attn_resolutions": [8],
                "latent_channels": 64, "embed_dim": 64, "norm_num_groups": 8}
RQ_QUICK_ARCH = {"block_out_channels": [16, 32, 32, 64], "layers_per_block": 1, "attn_resolutions": [],
                 "latent_channels": 32, "embed_dim": 32, "norm_num_groups": 8}
RQ_CONFIGS = "1x256,2x256,4x256,8x256,1x4096,3x16"
METRICS = ("psnr", "ssim", "rfid")


def load_training_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_train_{name}", REPO / "training" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_quantizer(spec: str) -> tuple[int, int]:
    """``"4x256"`` -> (depth 4, codebook 256)."""
    try:
        depth, size = (int(v) for v in spec.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a configuration is DEPTHxCODEBOOK (e.g. 4x256), got {spec!r}") from None
    if depth < 1 or size < 2:
        raise argparse.ArgumentTypeError(f"{spec!r}: depth must be >= 1 and codebook size >= 2")
    return depth, size


def mean_std(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return float("nan"), float("nan")
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


def summarize(runs: list[dict], keys=("config", "depth", "codebook_size", "grid", "bits_per_image")) -> list[dict]:
    """Per configuration (in order of first appearance): the shared keys and mean/std of each metric."""
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(run["config"], []).append(run)
    rows = []
    for config, group in groups.items():
        row = {k: group[0][k] for k in keys}
        row["seeds"] = [r["seed"] for r in group]
        for metric in METRICS + ("codebook_usage",):
            values = [r["metrics"][metric] for r in group if metric in r["metrics"]]
            if values:
                row[metric + "_mean"], row[metric + "_std"] = mean_std(values)
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    header = ["config", "grid", "D", "K", "bits/img", "seeds", "PSNR (dB)", "SSIM", "rFID", "usage"]
    lines = []
    for r in rows:
        cells = [r["config"], f"{r['grid'][0]}x{r['grid'][1]}", str(r["depth"]), str(r["codebook_size"]),
                 str(r["bits_per_image"]), str(len(r["seeds"]))]
        for metric, fmt in (("psnr", "{:.2f}"), ("ssim", "{:.4f}"), ("rfid", "{:.2f}"), ("codebook_usage", "{:.3f}")):
            if metric + "_mean" in r:
                cells.append(f"{fmt.format(r[metric + '_mean'])} +- {fmt.format(r[metric + '_std'])}")
            else:
                cells.append("-")
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(cells, widths)) for cells in lines]
    return "\n".join(out)


def plot_rate_distortion(rows: list[dict], path: Path, title: str, metric: str = "psnr",
                         ylabel: str = "PSNR (dB)") -> None:
    """Rate (bits per image, log2 axis) vs ``metric``, mean +- std per configuration, drawn with PIL."""
    from PIL import Image, ImageDraw

    points = [(r["bits_per_image"], r[metric + "_mean"], r[metric + "_std"], r["config"]) for r in rows
              if math.isfinite(r.get(metric + "_mean", float("nan")))]
    width, height, left, right, top, bottom = 720, 480, 80, 30, 50, 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 15), title, fill="black")
    if not points:
        draw.text((left, height // 2), "no finite results", fill="black")
        image.save(path)
        return
    xs = [math.log2(p[0]) for p in points]
    lows, highs = [p[1] - p[2] for p in points], [p[1] + p[2] for p in points]
    x0, x1 = min(xs) - 0.5, max(xs) + 0.5
    y0, y1 = min(lows), max(highs)
    pad = max(y1 - y0, 1e-3) * 0.15
    y0, y1 = y0 - pad, y1 + pad

    def px(x, y):
        return (left + (x - x0) / (x1 - x0) * (width - left - right),
                top + (y1 - y) / (y1 - y0) * (height - top - bottom))

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for i in range(6):  # y ticks
        y = y0 + (y1 - y0) * i / 5
        _, yy = px(x0, y)
        draw.line([left - 4, yy, left, yy], fill="black")
        draw.text((8, yy - 6), f"{y:.2f}", fill="black")
    for e in range(math.ceil(x0), math.floor(x1) + 1):  # x ticks at powers of two
        xx, _ = px(e, y0)
        draw.line([xx, height - bottom, xx, height - bottom + 4], fill="black")
        draw.text((xx - 12, height - bottom + 8), str(2 ** e), fill="black")
    draw.text((width // 2 - 60, height - 22), "rate (bits per image, log scale)", fill="black")
    draw.text((8, top - 18), ylabel, fill="black")
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
    for i, ((bits, mean, std, label), x) in enumerate(zip(points, xs)):
        color = colors[i % len(colors)]
        cx, cy = px(x, mean)
        _, lo = px(x, mean - std)
        _, hi = px(x, mean + std)
        draw.line([cx, lo, cx, hi], fill=color, width=2)
        draw.line([cx - 5, lo, cx + 5, lo], fill=color)
        draw.line([cx - 5, hi, cx + 5, hi], fill=color)
        draw.ellipse([cx - 5, cy - 5, cx + 5, cy + 5], fill=color)
        draw.text((cx + 8, cy - 14 if i % 2 else cy + 2), label, fill=color)
    image.save(path)


# ----------------------------------------------------------------------------- rq


def rq_train_argv(args, arch: dict, depth: int, codebook_size: int, seed: int, output_dir: Path) -> list[str]:
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


def run_rq(args) -> dict:
    import torch

    from hf_rq import RQVAEModel
    from hf_rq.evaluation import evaluator as ev
    from hf_rq.evaluation.data import load_imagefolder

    if args.device == "cpu":  # the training script's Accelerator reads this
        os.environ["ACCELERATE_USE_CPU"] = "1"
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    arch = dict(RQ_QUICK_ARCH if args.quick else RQ_FULL_ARCH)
    if args.model_config:
        arch.update(json.loads(Path(args.model_config).read_text() if os.path.isfile(args.model_config)
                               else args.model_config))
        arch.pop("code_depth", None), arch.pop("codebook_size", None)
    out_root = Path(args.output_dir)
    out_root.mkdir(parents=True, exist_ok=True)
    train = load_training_script("train_tokenizer")
    test = load_imagefolder(args.data, args.split, size=args.resolution, max_images=args.max_test_images)
    extractor = ev.load_feature_extractor("classifier", classifier=args.classifier, device=device) \
        if args.classifier != "none" else None

    runs = []
    # Seed-major, and the outputs are rewritten after every run: a benchmark stopped early still has every
    # configuration at its first seeds.
    plan = [(spec, seed) for seed in range(args.seeds) for spec in args.configs]
    start = time.time()
    for i, ((depth, size), seed) in enumerate(plan):
        name = f"{depth}x{size}"
        run_dir = out_root / f"{name}-seed{seed}"
        argv = rq_train_argv(args, arch, depth, size, seed, run_dir)
        result_file = run_dir / "claim_result.json"
        cached = json.loads(result_file.read_text()) if result_file.is_file() else None
        if cached is not None and cached.get("train_argv") == argv and cached.get("test_images") == len(test.images):
            runs.append(cached)
            print(f"[{i + 1}/{len(plan)}] {name} seed {seed}: reused {result_file}", flush=True)
            continue
        print(f"[{i + 1}/{len(plan)}] {name} seed {seed}: training {args.steps} steps "
              f"({time.time() - start:.0f} s elapsed)", flush=True)
        t0 = time.time()
        train.main(argv)
        train_seconds = time.time() - t0
        model = RQVAEModel.from_pretrained(run_dir).to(device)
        with torch.no_grad():
            codes = model(test.images[:1].to(device).float() / 255 * 2 - 1).codes
            metrics = ev.evaluate_reconstruction(model, test, batch_size=args.eval_batch_size, extractor=extractor,
                                                 device=device)
        grid = list(codes.shape[1:3])
        bits = grid[0] * grid[1] * depth * math.log2(size)
        run = {"config": name, "depth": depth, "codebook_size": size, "seed": seed, "grid": grid,
               "bits_per_image": int(bits) if bits.is_integer() else round(bits, 1),
               "parameters": sum(p.numel() for p in model.parameters()), "train_seconds": round(train_seconds, 1),
               "test_images": len(test.images), "train_argv": argv,
               "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
        result_file.write_text(json.dumps(run, indent=2) + "\n")
        runs.append(run)
        print(f"    PSNR {metrics['psnr']:.2f}  SSIM {metrics['ssim']:.4f}  rFID {metrics.get('rfid', float('nan')):.2f}"
              f"  ({train_seconds:.0f} s training)", flush=True)
        write_rq_outputs(args, arch, runs, out_root, len(test.images), final=False)
    return write_rq_outputs(args, arch, runs, out_root, len(test.images), final=True)


def write_rq_outputs(args, arch: dict, runs: list[dict], out_root: Path, num_test: int, final: bool) -> dict:
    runs = sorted(runs, key=lambda r: ([f"{d}x{k}" for d, k in args.configs].index(r["config"]), r["seed"]))
    rows = summarize(runs)
    table = format_table(rows)
    mode = "quick" if args.quick else "full"
    title = (f"RQ-VAE rate vs distortion ({mode}: {args.steps} steps, batch {args.batch_size}, "
             f"{args.seeds} seed(s), {num_test} test images)")
    if final:
        print("\n" + title + "\n" + table)
    result = {"claim": "rq", "mode": mode, "data": str(args.data), "split": args.split, "steps": args.steps,
              "batch_size": args.batch_size, "seeds": args.seeds, "architecture": arch,
              "feature_space": args.classifier, "summary": rows, "runs": runs}
    (out_root / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_rate_distortion(rows, out_root / "rate_distortion.png", title)
    (out_root / "table.txt").write_text(title + "\n" + table + "\n")
    if final:
        print(f"\nwrote {out_root / 'results.json'}, {out_root / 'table.txt'}, {out_root / 'rate_distortion.png'}")
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Reproduce the seed papers' claims at small scale. "
                                                 "Claims implemented so far: rq (RQ-VAE depth vs plain VQ).")
    sub = parser.add_subparsers(dest="claim", required=True)
    p = sub.add_parser("rq", help="RQ depth D = 1, 2, 4, 8 vs plain VQ and a larger codebook, rate vs distortion")
    p.add_argument("--data", default=DEFAULT_DATA, help=f"imagefolder with train/test splits (default: {DEFAULT_DATA})")
    p.add_argument("--split", default="test", help="evaluation split (default: test)")
    p.add_argument("--configs", type=lambda s: [parse_quantizer(v) for v in s.split(",")], default=None,
                   help=f"DEPTHxCODEBOOK list (default: {RQ_CONFIGS})")
    p.add_argument("--seeds", type=int, default=3, help="seeds per configuration (default: 3)")
    p.add_argument("--quick", action="store_true",
                   help="narrow model, 200 steps of 16 (about 15 min for 6 configurations x 3 seeds on a 2-core CPU)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: 200 quick, 3000 full)")
    p.add_argument("--batch_size", type=int, default=None, help="training batch (default: 16 quick, 32 full)")
    p.add_argument("--learning_rate", type=float, default=4e-4)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--model_config", default=None,
                   help="architecture overrides (JSON file or inline JSON); code_depth/codebook_size come from --configs")
    p.add_argument("--max_test_images", type=int, default=None)
    p.add_argument("--eval_batch_size", type=int, default=64)
    p.add_argument("--classifier", default="hf-rq/emoji-classifier-64",
                   help="feature space of rFID (the bundled classifier); 'none' skips rFID")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (training and evaluation)")
    p.add_argument("--output_dir", default="runs/claims/rq")
    return parser


def main(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.claim == "rq":
        args.configs = args.configs or [parse_quantizer(v) for v in RQ_CONFIGS.split(",")]
        args.steps = args.steps or (200 if args.quick else 3000)
        args.batch_size = args.batch_size or (16 if args.quick else 32)
        if args.seeds < 1 or args.steps < 1 or args.batch_size < 1:
            parser.error("--seeds, --steps and --batch_size must be positive")
        if not os.path.isdir(args.data):
            parser.error(f"--data: image folder not found: {args.data}")
        return run_rq(args)
    raise AssertionError(args.claim)


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
