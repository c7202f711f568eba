#!/usr/bin/env python
"""Measure a text-to-image pipeline on captioned images: class-consistency and FID per caption split, and a grid.

    python training/evaluate_text_prior.py --model hf-rq/rq-emoji-64-text --data_dir runs/emoji-captions \
        --guidance_scale 1 3 --output eval_text.json --grid prompts.png

For each split (``test``: every caption; ``train``: ``--num_train_captions`` captions drawn with ``--seed``, as
many as the test split by default) one image is sampled per caption (image ``i`` from its own generator seeded
``seed + i``). The bundled emoji classifier then gives **class-consistency** (the share of samples it puts in the
category of the caption's image: the ``label`` column) and, in its feature space, **FID** against the test
split's stored features (``evaluate_images``). Train captions were seen in training and test captions were not:
the gap between the two is memorisation versus generalisation.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch


def read_split(folder: Path, caption_column: str) -> list[dict]:
    path = folder / "metadata.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path} not found (make it with training/make_caption_metadata.py)")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    missing = {caption_column, "label"} - set(rows[0])
    if missing:
        raise SystemExit(f"{path} has no column(s) {sorted(missing)}")
    return rows


def sample(pipe, prompts: list[str], guidance_scale: float, seed: int, batch_size: int) -> list:
    images = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(batch))]
        images += pipe(prompt=batch, guidance_scale=guidance_scale, generator=generators).images
    return images


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="hf-rq/rq-emoji-64-text")
    parser.add_argument("--data_dir", required=True, help="imagefolder with <split>/metadata.jsonl (caption + label)")
    parser.add_argument("--caption_column", default="caption")
    parser.add_argument("--classifier", default="hf-rq/emoji-classifier-64")
    parser.add_argument("--guidance_scale", type=float, nargs="+", default=[1.0])
    parser.add_argument("--num_train_captions", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--output", default=None, help="JSON file for the results")
    parser.add_argument("--grid", default=None, help="PNG: a grid of --grid_prompts (rows) x 4 samples")
    parser.add_argument("--grid_prompts", nargs="+", default=["grinning face", "red apple", "dog face", "rocket",
                                                               "soccer ball", "thumbs up sign", "snowman", "automobile"])
    parser.add_argument("--grid_guidance_scale", type=float, default=None)
    args = parser.parse_args(argv)

    from hf_rq import RQTransformerPipeline
    from hf_rq.evaluation import evaluate_images
    from hf_rq.evaluation.evaluator import load_classifier

    pipe = RQTransformerPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    classifier = load_classifier(args.classifier)
    to_id = {v: int(k) for k, v in classifier.config.id2label.items()}
    data = Path(args.data_dir)
    test = read_split(data / "test", args.caption_column)
    train = read_split(data / "train", args.caption_column)
    train = random.Random(args.seed).sample(train, min(len(train), args.num_train_captions or len(test)))
    results = {"model": args.model, "caption_column": args.caption_column, "classifier": args.classifier, "runs": []}
    for scale in args.guidance_scale:
        for split, rows in (("test", test), ("train", train)):
            start = time.time()
            images = sample(pipe, [r[args.caption_column] for r in rows], scale, args.seed, args.batch_size)
            seconds = time.time() - start
            metrics = evaluate_images(images, [to_id[r["label"]] for r in rows], classifier=classifier)
            run = {"split": split, "guidance_scale": scale, "num_captions": len(rows), "sampling_seconds": round(seconds, 1),
                   **{k: metrics[k] for k in ("fid", "kid_mean", "precision", "recall", "class_consistency")}}
            results["runs"].append(run)
            print(json.dumps(run))
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    if args.grid:
        from hf_rq.image_processing import make_image_grid

        scale = args.grid_guidance_scale or args.guidance_scale[-1]
        images = []
        for i, prompt in enumerate(args.grid_prompts):
            gens = [torch.Generator().manual_seed(args.seed + 4 * i + j) for j in range(4)]
            images += pipe(prompt=prompt, num_images_per_prompt=4, guidance_scale=scale, generator=gens).images
        make_image_grid(images, len(args.grid_prompts), 4).save(args.grid)
        print(f"wrote {args.grid}")


if __name__ == "__main__":
    main()
