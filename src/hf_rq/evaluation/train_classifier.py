"""Train the in-domain evaluation classifier (:class:`CNNImageClassifier`) on an ``imagefolder``.

Usage (what built ``hf_rq/bundled/emoji-classifier-64``; its README.md records the exact command)::

    OMP_NUM_THREADS=1 python -m hf_rq.evaluation.train_classifier --data_dir ../shared/data/emoji \\
        --output_dir src/hf_rq/bundled/emoji-classifier-64

It trains on ``--train_split`` with random translations (white padding) and horizontal flips, reports
the accuracy on ``--eval_split``, and writes into ``--output_dir``: the ``save_pretrained`` folder
(``config.json`` + safetensors), ``reference_features.safetensors`` (penultimate features of the
``--eval_split`` images: the default reference of the in-domain FID/KID/precision/recall),
``training_results.json`` and a README.md with the command, seed, time and accuracies. The dataset's
``ATTRIBUTION.txt`` / ``LICENSE*`` files are copied next to the weights.

Everything is seeded (``--seed``) and runs on the CPU: the same command with the same thread count gives
the same weights (a test checks this on a tiny run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hf_rq.evaluation.train_classifier", description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", required=True, help="local imagefolder (<dir>/<split>/<class>/*.png)")
    p.add_argument("--output_dir", required=True, help="where to save the classifier (save_pretrained folder)")
    p.add_argument("--train_split", default="train")
    p.add_argument("--eval_split", default="test", help="held-out split: accuracy and reference features")
    p.add_argument("--validation_fraction", type=float, default=0.0,
                   help="hold out this share of the train split (seeded) and report accuracy on it; for choosing a "
                        "recipe without looking at --eval_split")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--block_out_channels", type=int, nargs="+", default=[32, 64, 128, 128])
    p.add_argument("--layers_per_block", type=int, default=1)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--learning_rate", type=float, default=2e-3)
    p.add_argument("--weight_decay", type=float, default=5e-4)
    p.add_argument("--label_smoothing", type=float, default=0.1)
    p.add_argument("--max_shift", type=int, default=4, help="random translation in pixels (white padding)")
    p.add_argument("--no_flip", action="store_true", help="no random horizontal flips")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded in the README
    if not 0 <= args.validation_fraction < 1:
        p.error("--validation_fraction must be in [0, 1)")
    return args


def augment(images: torch.Tensor, max_shift: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to ``max_shift`` px (the uncovered border is white, like the emoji background) and flips.

    ``images``: `(N, 3, H, W)` in [-1, 1]. Each sample draws its own shift and flip from ``generator``.
    """
    n, _, h, w = images.shape
    if max_shift > 0:
        padded = F.pad(images, (max_shift,) * 4, value=1.0)
        offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator)
        images = torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets.tolist())])
    if flip:
        mask = torch.rand(n, generator=generator) < 0.5
        images = torch.where(mask[:, None, None, None], images.flip(-1), images)
    return images


def to_model_range(images_uint8: torch.Tensor) -> torch.Tensor:
    return images_uint8.float() / 127.5 - 1.0


@torch.no_grad()
def predict(model, images_uint8: torch.Tensor, batch_size: int = 256):
    """Logits and features of uint8 images `(N, 3, H, W)` (eval mode)."""
    model.eval()
    logits, features = [], []
    for i in range(0, len(images_uint8), batch_size):
        out = model(to_model_range(images_uint8[i:i + batch_size]))
        logits.append(out.logits)
        features.append(out.features)
    return torch.cat(logits), torch.cat(features)


def accuracy_report(logits: torch.Tensor, labels: torch.Tensor, id2label: dict[int, str]) -> dict:
    pred = logits.argmax(-1)
    per_class = {}
    for k, name in id2label.items():
        mask = labels == k
        if mask.any():
            per_class[name] = round(float((pred[mask] == k).double().mean()), 4)
    return {"accuracy": round(float((pred == labels).double().mean()), 4), "num_images": len(labels), "per_class": per_class}


def train(args) -> dict:
    from safetensors.torch import save_file

    from .classifier import CNNImageClassifier
    from .data import load_imagefolder

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    torch.manual_seed(args.seed)
    start = time.time()
    train_data = load_imagefolder(args.data_dir, args.train_split, size=args.resolution)
    eval_data = load_imagefolder(args.data_dir, args.eval_split, size=args.resolution)
    if train_data.labels is None:
        raise ValueError(f"{args.data_dir}/{args.train_split} has no class folders: a classifier needs labels")
    if eval_data.id2label != train_data.id2label:
        raise ValueError(f"the classes of {args.train_split} and {args.eval_split} differ: "
                         f"{train_data.id2label} vs {eval_data.id2label}")
    images, labels = train_data.images, train_data.labels
    val_images = val_labels = None
    if args.validation_fraction > 0:
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed + 1))
        n_val = max(1, round(len(images) * args.validation_fraction))
        val_idx, train_idx = order[:n_val], order[n_val:]
        val_images, val_labels = images[val_idx], labels[val_idx]
        images, labels = images[train_idx], labels[train_idx]

    model = CNNImageClassifier(
        sample_size=args.resolution, block_out_channels=tuple(args.block_out_channels),
        layers_per_block=args.layers_per_block, num_classes=len(train_data.id2label),
        id2label={str(k): v for k, v in train_data.id2label.items()}, dropout=args.dropout,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    steps_per_epoch = -(-len(images) // args.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.learning_rate,
                                                    total_steps=args.epochs * steps_per_epoch, pct_start=0.15)
    generator = torch.Generator().manual_seed(args.seed)
    log = []
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(images), generator=generator)
        total, correct, loss_sum = 0, 0, 0.0
        for i in range(0, len(order), args.batch_size):
            idx = order[i:i + args.batch_size]
            x = augment(to_model_range(images[idx]), args.max_shift, not args.no_flip, generator)
            y = labels[idx]
            logits = model(x).logits
            loss = F.cross_entropy(logits, y, label_smoothing=args.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += len(idx)
            correct += int((logits.argmax(-1) == y).sum())
            loss_sum += loss.item() * len(idx)
        entry = {"epoch": epoch + 1, "loss": round(loss_sum / total, 4), "train_accuracy": round(correct / total, 4),
                 "seconds": round(time.time() - start, 1)}
        if val_images is not None:
            entry["validation_accuracy"] = accuracy_report(predict(model, val_images)[0], val_labels, train_data.id2label)["accuracy"]
        log.append(entry)
        print(json.dumps(entry), flush=True)
    train_seconds = time.time() - start

    model.eval()
    eval_logits, eval_features = predict(model, eval_data.images)
    results = {
        "eval_split": args.eval_split,
        "eval": accuracy_report(eval_logits, eval_data.labels, train_data.id2label),
        "train": accuracy_report(predict(model, images)[0], labels, train_data.id2label)["accuracy"],
        "training_seconds": round(train_seconds, 1),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "seed": args.seed,
        "command": command_line(args.argv),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
        "log": log,
    }
    if val_images is not None:
        results["validation"] = accuracy_report(predict(model, val_images)[0], val_labels, train_data.id2label)

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    save_file(
        {"features": eval_features.contiguous(), "labels": eval_data.labels.contiguous()},
        str(out / "reference_features.safetensors"),
        metadata={"split": args.eval_split, "dataset": Path(args.data_dir).name,
                  "num_images": str(len(eval_data.labels)), "pixels_sha256": eval_data.fingerprint()},
    )
    (out / "training_results.json").write_text(json.dumps(results, indent=2) + "\n")
    for f in sorted(Path(args.data_dir).iterdir()):
        if f.is_file() and (f.name == "ATTRIBUTION.txt" or f.name.startswith("LICENSE")):
            shutil.copyfile(f, out / f.name)
    (out / "README.md").write_text(model_readme(args, results, train_data.id2label))
    return results


def command_line(argv: list[str]) -> str:
    return "python -m hf_rq.evaluation.train_classifier " + " ".join(shlex.quote(str(a)) for a in argv)


def model_readme(args, results: dict, id2label: dict[int, str]) -> str:
    ev = results["eval"]
    per_class = "\n".join(f"| {name} | {acc:.3f} |" for name, acc in ev["per_class"].items())
    threads = os.environ.get("OMP_NUM_THREADS")
    env = f"OMP_NUM_THREADS={threads} " if threads else ""
    name = Path(args.output_dir).name
    notices = sorted(p.name for p in Path(args.output_dir).iterdir() if p.name == "ATTRIBUTION.txt" or p.name.startswith("LICENSE"))
    data_notice = ""
    if notices:
        data_notice = ("## Data and licence\n\nThe weights are derived from the training images; their attribution and "
                       "licences are copied next to the weights: " + ", ".join(f"`{n}`" for n in notices) + ".\n")
    return f"""---
library_name: hf_rq
license: apache-2.0
tags: [image-classification, evaluation]
---

# {name}: in-domain evaluator for hf-rq

A small CNN (`hf_rq.evaluation.CNNImageClassifier`, {results['num_parameters']:,} parameters) trained on the
`{args.train_split}` split of `{Path(args.data_dir).name}` ({len(id2label)} classes, {args.resolution}x{args.resolution}).
hf-rq uses it to measure **class-consistency** of class-conditional samples (share classified as the class
asked for) and **FID / KID / precision / recall in its penultimate-feature space** ({args.block_out_channels[-1]}-d)
against the `{args.eval_split}` split, whose features are stored in `reference_features.safetensors`.

```python
from hf_rq.evaluation import CNNImageClassifier
clf = CNNImageClassifier.from_pretrained("hf-rq/{name}")   # when bundled: offline
```

## Accuracy on the held-out `{args.eval_split}` split: {ev['accuracy']:.3f} ({ev['num_images']} images)

| class | accuracy |
|---|---|
{per_class}

Training-set accuracy (no augmentation): {results['train']:.3f}.

## Training

Trained on CPU ({results['machine']}) in {results['training_seconds']:.0f} s with seed {results['seed']}, torch {results['torch']}:

```bash
{env}{results['command']}
```

Per-epoch loss and accuracy are in `training_results.json`.

{data_notice}"""


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        results = train(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: results[k] for k in ("eval", "training_seconds", "num_parameters")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
