"""Evaluate a class-conditional pipeline under many sampling settings (to choose its saved defaults).

    OMP_NUM_THREADS=1 python training/sweep_sampling.py --model hf-rq/rq-emoji-64 \
        --grid '{"guidance_scale": [1.5, 2, 3], "temperature": [0.9, 1.0]}' --seeds 0 1 --output sweep.json

Every combination of the grid's values (the pipeline's ``__call__`` keywords, e.g. CTF's ``fine_temperature``)
is evaluated as ``hf-rq evaluate generation`` does it: ``--num_images_per_class`` x classes samples, split over
the classes as the emoji test split is, metrics in the bundled classifier's feature space. ``{}`` (one empty
combination) measures the saved defaults. Results are appended to ``--output`` after every run, so a stopped
sweep keeps what it measured and a rerun skips the settings already there. ``--table`` prints the results
already in ``--output`` as a markdown table (one row per model and setting, the seeds side by side) instead.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

from hf_rq.evaluation import evaluator as ev
from hf_rq.hub import load_pipeline
from hf_rq.pipeline_utils import unknown_call_keywords

KEPT = ("fid", "kid_mean", "precision", "recall", "class_consistency")


def combinations(grid: dict) -> list[dict]:
    keys = list(grid)
    values = [v if isinstance(v, list) else [v] for v in grid.values()]
    return [dict(zip(keys, combo)) for combo in itertools.product(*values)]


def markdown_table(results: list[dict]) -> str:
    rows: dict[tuple, list[dict]] = {}
    for r in results:
        rows.setdefault((r["model"], json.dumps(r["settings"], sort_keys=True)), []).append(r)
    lines = ["| model | settings | seeds | FID | class-consistency | precision | recall |", "|---|---|---|---|---|---|---|"]
    for (model, settings), runs in rows.items():
        runs = sorted(runs, key=lambda r: r["seed"])
        cells = ["/".join(f"{r[k]:.{2 if k == 'fid' else 3}f}" for r in runs) for k in ("fid", "class_consistency",
                                                                                        "precision", "recall")]
        shown = ", ".join(f"{k}={v}" for k, v in json.loads(settings).items() if v is not None) or "saved defaults"
        lines.append(f"| {model.split('/')[-1]} | {shown} | {'/'.join(str(r['seed']) for r in runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="bundled name (hf-rq/<name>), folder or Hub id")
    parser.add_argument("--grid", default="{}", help="JSON object: keyword -> value or list of values")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--num_images_per_class", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--output", type=Path, required=True, help="JSON list of results (appended to)")
    parser.add_argument("--table", action="store_true", help="print --output as a markdown table and stop")
    args = parser.parse_args(argv)
    if args.table:
        print(markdown_table(json.loads(args.output.read_text())))
        return 0

    grid = json.loads(args.grid)
    if not isinstance(grid, dict):
        parser.error("--grid must be a JSON object")
    pipe = load_pipeline(args.model)
    unknown = unknown_call_keywords(pipe, grid)
    if unknown:
        parser.error(f"{type(pipe).__name__} takes no {', '.join(unknown)}")
    classifier = ev.load_classifier(ev.DEFAULT_CLASSIFIER)
    results = json.loads(args.output.read_text()) if args.output.is_file() else []
    done = {(r["model"], json.dumps(r["settings"], sort_keys=True), r["seed"]) for r in results}
    for settings in combinations(grid):
        for seed in args.seeds:
            key = (args.model, json.dumps(settings, sort_keys=True), seed)
            if key in done:
                continue
            start = time.perf_counter()
            metrics = ev.evaluate_pipeline(pipe, num_images_per_class=args.num_images_per_class,
                                           batch_size=args.batch_size, generator=torch.Generator().manual_seed(seed),
                                           classifier=classifier, progress=False, **settings)
            row = {"model": args.model, "settings": settings, "seed": seed,
                   **{k: round(float(metrics[k]), 4) for k in KEPT}, "seconds": round(time.perf_counter() - start, 1)}
            results.append(row)
            args.output.write_text(json.dumps(results, indent=1) + "\n")
            print(json.dumps({k: row[k] for k in ("settings", "seed", "fid", "class_consistency", "precision",
                                                   "recall")}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
