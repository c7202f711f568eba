"""Opt-in bfloat16 priors on the bundled models: sampling speed and the quality change, float32 vs bf16.

For each bundled pipeline the prior (``pipe.transformer``) is cast to bfloat16 (the tokenizer stays float32;
codes are integers) and both versions are evaluated like ``hf-rq evaluate generation``: the same classes, the
same seed, the bundled emoji classifier for class-consistency and FID in its feature space. Sampling logits are
cast to float32 before the filters, so only the transformer arithmetic changes. Speed is the evaluator's
images/s (sampling and decoding) and a direct ``generate()`` timing of the prior alone, both in the same run.

    python benchmarks/bench_prior_bf16.py [--models rq-emoji-64,dq-emoji-64,ctf-emoji-64] [--num-images-per-class 20]
"""

from __future__ import annotations

import argparse

import torch

from bench_utils import load_average, median_time as timed


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="rq-emoji-64,dq-emoji-64,ctf-emoji-64")
    parser.add_argument("--num-images-per-class", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from hf_rq.evaluation import evaluate_pipeline
    from hf_rq.hub import load_pipeline

    print(f"torch {torch.__version__}, {args.threads} threads, load average at start {load_average()}", flush=True)
    rows = []
    for name in args.models.split(","):
        pipe = load_pipeline(f"hf-rq/{name}")
        prior = pipe.transformer.eval()
        labels = list(range(min(args.batch_size, len(prior.config.id2label or {}) or args.batch_size)))
        labels = (labels * args.batch_size)[: args.batch_size]
        for dtype in (torch.float32, torch.bfloat16):
            prior.to(dtype)
            t_prior = timed(lambda: prior.generate(labels, generator=torch.Generator().manual_seed(0)), args.repeats)
            metrics = evaluate_pipeline(pipe, num_images_per_class=args.num_images_per_class, batch_size=args.batch_size,
                                        generator=torch.Generator().manual_seed(0), progress=False)
            row = (name, str(dtype).replace("torch.", ""), args.batch_size / t_prior, metrics["images_per_second"],
                   metrics["class_consistency"], metrics["fid"], load_average())
            rows.append(row)
            print(row, flush=True)
        prior.to(torch.float32)

    print(f"\nBundled models, float32 vs bfloat16 prior, {args.threads} threads, {args.num_images_per_class} images per "
          f"class (seed 0); prior img/s = generate() alone at batch {args.batch_size}, median of {args.repeats}")
    print("| model | prior dtype | prior img/s | pipeline img/s | class-consistency | FID | load |")
    print("|---|---|---|---|---|---|---|")
    for name, dtype, prior_ips, pipe_ips, cc, fid, ld in rows:
        print(f"| {name} | {dtype} | {prior_ips:.1f} | {pipe_ips:.1f} | {cc:.3f} | {fid:.2f} | {ld} |")


if __name__ == "__main__":
    main()
