"""What every claim benchmark shares: the training scripts as modules, run caching, mean +- std tables, PIL plots."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA = "../shared/data/emoji"


def load_training_script(name: str):
    """``training/<name>.py`` as a module, so a run goes through the library's own training script."""
    spec = importlib.util.spec_from_file_location(f"_train_{name}", REPO / "training" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def resolve_device(name: str):
    import torch

    if name == "cpu":  # the training scripts' Accelerator reads this
        os.environ["ACCELERATE_USE_CPU"] = "1"
    return torch.device(name if name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))


def cached_run(result_file: Path, argv: list[str], num_test: int) -> dict | None:
    """The saved result of a run trained with exactly ``argv`` and scored on ``num_test`` images, else None: an
    interrupted benchmark continues where it stopped, and a changed argument retrains."""
    if not result_file.is_file():
        return None
    cached = json.loads(result_file.read_text())
    if cached.get("train_argv") == argv and cached.get("test_images") == num_test:
        return cached
    return None


def mean_std(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return float("nan"), float("nan")
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


def summarize(runs: list[dict], keys: tuple[str, ...], metrics: tuple[str, ...]) -> list[dict]:
    """Per configuration (in order of first appearance): the shared ``keys`` and mean/std of each metric."""
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(run["config"], []).append(run)
    rows = []
    for group in groups.values():
        row = {k: group[0][k] for k in keys if k in group[0]}
        row["seeds"] = [r["seed"] for r in group]
        for metric in metrics:
            values = [r["metrics"][metric] for r in group if metric in r["metrics"]]
            if values:
                row[metric + "_mean"], row[metric + "_std"] = mean_std(values)
        rows.append(row)
    return rows


def metric_cell(row: dict, metric: str, fmt: str) -> str:
    if metric + "_mean" not in row:
        return "-"
    return f"{fmt.format(row[metric + '_mean'])} +- {fmt.format(row[metric + '_std'])}"


def format_table(header: list[str], lines: list[list[str]]) -> str:
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(cells, widths)) for cells in lines]
    return "\n".join(out)


COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


def plot_points(points: list[tuple[float, float, float, str]], path: Path, title: str, xlabel: str, ylabel: str,
                log2_x: bool = True, series: dict[str, list[int]] | None = None) -> None:
    """Scatter of ``(x, mean, std, label)`` with std error bars, drawn with PIL (no plotting dependency).

    ``series`` optionally joins points (indices into ``points``) with a line per named series, e.g. one line per
    fine-ratio sweep; x is on a log2 axis with power-of-two ticks unless ``log2_x`` is False.
    """
    from PIL import Image, ImageDraw

    points = [p for p in points if math.isfinite(p[1])]
    width, height, left, right, top, bottom = 720, 480, 80, 30, 50, 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 15), title, fill="black")
    if not points:
        draw.text((left, height // 2), "no finite results", fill="black")
        image.save(path)
        return
    xs = [math.log2(p[0]) if log2_x else p[0] for p in points]
    lows = [p[1] - (p[2] if math.isfinite(p[2]) else 0) for p in points]
    highs = [p[1] + (p[2] if math.isfinite(p[2]) else 0) for p in points]
    span = max(xs) - min(xs)
    x_pad = 0.5 if log2_x else max(span * 0.08, 1e-3)
    x0, x1 = min(xs) - x_pad, max(xs) + x_pad
    y0, y1 = min(lows), max(highs)
    pad = max(y1 - y0, 1e-3) * 0.15
    y0, y1 = y0 - pad, y1 + pad

    def px(x, y):
        return (left + (x - x0) / (x1 - x0) * (width - left - right),
                top + (y1 - y) / (y1 - y0) * (height - top - bottom))

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for i in range(6):
        y = y0 + (y1 - y0) * i / 5
        _, yy = px(x0, y)
        draw.line([left - 4, yy, left, yy], fill="black")
        draw.text((8, yy - 6), f"{y:.2f}", fill="black")
    ticks = [(e, str(2 ** e)) for e in range(math.ceil(x0), math.floor(x1) + 1)] if log2_x else \
        [(x0 + (x1 - x0) * i / 5, f"{x0 + (x1 - x0) * i / 5:.3g}") for i in range(6)]
    for x, label in ticks:
        xx, _ = px(x, y0)
        draw.line([xx, height - bottom, xx, height - bottom + 4], fill="black")
        draw.text((xx - 12, height - bottom + 8), label, fill="black")
    draw.text((width // 2 - 80, height - 22), xlabel, fill="black")
    draw.text((8, top - 18), ylabel, fill="black")
    for j, (name, indices) in enumerate((series or {}).items()):
        color = COLORS[j % len(COLORS)]
        line = [px(xs[i], points[i][1]) for i in indices if i < len(points)]
        if len(line) > 1:
            draw.line(line, fill=color, width=1)
    for i, ((_, mean, std, label), x) in enumerate(zip(points, xs)):
        color = COLORS[i % len(COLORS)]
        cx, cy = px(x, mean)
        if math.isfinite(std):
            _, lo = px(x, mean - std)
            _, hi = px(x, mean + std)
            draw.line([cx, lo, cx, hi], fill=color, width=2)
            draw.line([cx - 5, lo, cx + 5, lo], fill=color)
            draw.line([cx - 5, hi, cx + 5, hi], fill=color)
        draw.ellipse([cx - 5, cy - 5, cx + 5, cy + 5], fill=color)
        draw.text((cx + 8, cy - 14 if i % 2 else cy + 2), label, fill=color)
    image.save(path)


def add_common_arguments(p: argparse.ArgumentParser, output_dir: str, seeds: int = 3) -> None:
    """The arguments every claim takes (data, seeds, evaluation, device, output)."""
    p.add_argument("--data", default=DEFAULT_DATA, help=f"imagefolder with train/test splits (default: {DEFAULT_DATA})")
    p.add_argument("--split", default="test", help="evaluation split (default: test)")
    p.add_argument("--seeds", type=int, default=seeds, help=f"seeds per configuration (default: {seeds})")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--max_test_images", type=int, default=None)
    p.add_argument("--eval_batch_size", type=int, default=64)
    p.add_argument("--classifier", default="hf-rq/emoji-classifier-64",
                   help="feature space of the FID-type metrics (the bundled classifier); 'none' skips them")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (training and evaluation)")
    p.add_argument("--output_dir", default=output_dir)


def check_common_arguments(parser: argparse.ArgumentParser, args) -> None:
    if args.seeds < 1 or args.steps < 1 or args.batch_size < 1:
        parser.error("--seeds, --steps and --batch_size must be positive")
    if not os.path.isdir(args.data):
        parser.error(f"--data: image folder not found: {args.data}")


def reconstruction_setup(args, base_arch: dict, per_config_keys: tuple[str, ...]):
    """What a tokenizer claim needs before its runs: ``(device, arch, out_root, train_tokenizer module, test
    images, feature extractor or None)``. ``arch`` is ``base_arch`` with ``--model_config`` on top, less the keys
    each configuration sets itself."""
    from hf_rq.evaluation import evaluator as ev
    from hf_rq.evaluation.data import load_imagefolder

    device = resolve_device(args.device)
    arch = dict(base_arch)
    if args.model_config:
        arch.update(json.loads(Path(args.model_config).read_text() if os.path.isfile(args.model_config)
                               else args.model_config))
    for key in per_config_keys:
        arch.pop(key, None)
    out_root = Path(args.output_dir)
    out_root.mkdir(parents=True, exist_ok=True)
    test = load_imagefolder(args.data, args.split, size=args.resolution, max_images=args.max_test_images)
    extractor = ev.load_feature_extractor("classifier", classifier=args.classifier, device=device) \
        if args.classifier != "none" else None
    return device, arch, out_root, load_training_script("train_tokenizer"), test, extractor


def run_plan(plan: list[tuple], train, steps: int, num_test: int, score, write) -> dict:
    """Train and score every ``(name, seed, run_dir, argv, config)`` of ``plan`` in order.

    ``score(config, seed, run_dir)`` loads the trained model and returns ``(result dict, one-line summary)``;
    ``write(runs, final)`` writes the outputs. A run already saved with the same ``argv`` is reused, and the
    outputs are rewritten after every run, so a stopped benchmark keeps what it finished (plans are seed-major
    so that every configuration has its first seeds early).
    """
    runs = []
    start = time.time()
    for i, (name, seed, run_dir, argv, config) in enumerate(plan):
        result_file = Path(run_dir) / "claim_result.json"
        cached = cached_run(result_file, argv, num_test)
        if cached is not None:
            runs.append(cached)
            print(f"[{i + 1}/{len(plan)}] {name} seed {seed}: reused {result_file}", flush=True)
            continue
        print(f"[{i + 1}/{len(plan)}] {name} seed {seed}: training {steps} steps "
              f"({time.time() - start:.0f} s elapsed)", flush=True)
        t0 = time.time()
        train.main(argv)
        train_seconds = time.time() - t0
        result, summary = score(config, seed, run_dir)
        result.update(train_seconds=round(train_seconds, 1), test_images=num_test, train_argv=argv)
        result_file.write_text(json.dumps(result, indent=2) + "\n")
        runs.append(result)
        print(f"    {summary}  ({train_seconds:.0f} s training)", flush=True)
        write(runs, final=False)
    return write(runs, final=True)


def save_outputs(args, claim: str, out_root: Path, title: str, text: str, rows: list[dict], runs: list[dict],
                 extra: dict, plot_name: str, draw, final: bool) -> dict:
    """Write one claim's ``results.json`` (the run settings, ``extra``, the summary rows and every run),
    ``table.txt`` and its plot (``draw(path)``); print the table when ``final``. Returns the result dict."""
    if final:
        print("\n" + title + "\n" + text)
    result = {"claim": claim, "mode": "quick" if args.quick else "full", "data": str(args.data), "split": args.split,
              "steps": args.steps, "batch_size": args.batch_size, "seeds": args.seeds, **extra,
              "feature_space": args.classifier, "summary": rows, "runs": runs}
    (out_root / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    draw(out_root / plot_name)
    (out_root / "table.txt").write_text(title + "\n" + text + "\n")
    if final:
        print(f"\nwrote {out_root / 'results.json'}, {out_root / 'table.txt'}, {out_root / plot_name}")
    return result
