"""Quality of inpainting with every family's bundled model, with and without the best-of-n remedy.

    python benchmarks/bench_editing.py [--data /work/shared/data/emoji] [--num-images 36] [--candidates 4]
                                       [--threads 2] [--seed 0]

On the emoji test split (a seeded random subset of ``--num-images`` images, 64x64), the centre quarter of each
image (the central 32x32 pixels: 4x4 of RQ's and CTF's 8x8 tokens, 2x2 of DQ's 4x4 regions) is masked and
regenerated once, conditioned on the image's own class. Rows per family:

* ``reconstruction``: decode(encode(image)), nothing regenerated (the ceiling of both columns);
* ``unconditional``: a fresh sample of the class (all-white mask; no context at all: the floor of consistency);
* ``inpaint``: the masked tokens sampled in the prior's order (raster for RQ and CTF's stage 1, the sampler's own
  order for DQ), each seeing only the known tokens before it;
* ``inpaint, best of N``: N candidates per image, the one under which the known tokens are most likely is kept.

Columns: class-consistency (the bundled emoji classifier's prediction on the edit equals the input's class),
PSNR outside the mask against the plain reconstruction (dB, pixels in [0, 1]; outside the mask the tokens are the
reconstruction's, so only the decoder's spill-over from the regenerated tokens lowers it; infinite values are
capped at 60 dB), and seconds per edited image on this machine.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from bench_utils import load_average
from hf_rq import CTFPipeline, DQTransformerPipeline, RQTransformerPipeline
from hf_rq.evaluation.data import load_imagefolder
from hf_rq.evaluation.evaluator import load_classifier

FAMILIES = (("RQ", RQTransformerPipeline, "hf-rq/rq-emoji-64"), ("DQ", DQTransformerPipeline, "hf-rq/dq-emoji-64"),
            ("CTF", CTFPipeline, "hf-rq/ctf-emoji-64"))


def psnr_outside(edits: torch.Tensor, recon: torch.Tensor, outside: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) over the pixels where ``outside`` `(H, W)` is True; images `(N, 3, H, W)` in [0, 1]."""
    mse = ((edits - recon) ** 2)[..., outside].mean(dim=(1, 2))
    return (10 * torch.log10(1.0 / mse.clamp(min=1e-6))).clamp(max=60.0)


def run_family(pipe, images, labels, names, mask, candidates, batch, seed):
    """-> {row name: (edits (N, 3, H, W) in [0, 1], seconds per image)}."""
    results = {}

    def batched(**kwargs):
        generator = torch.Generator().manual_seed(seed)
        outs, start = [], time.perf_counter()
        for i in range(0, len(images), batch):
            outs.append(pipe([names[int(c)] for c in labels[i:i + batch]], image=images[i:i + batch],
                             generator=generator, output_type="pt", **kwargs).images)
        return torch.cat(outs), (time.perf_counter() - start) / len(images)

    results["reconstruction"] = batched(mask_image=torch.zeros_like(mask))
    results["unconditional"] = batched(mask_image=torch.ones_like(mask))
    results["inpaint"] = batched(mask_image=mask)
    results[f"inpaint, best of {candidates}"] = batched(mask_image=mask, num_candidates=candidates)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="/work/shared/data/emoji")
    parser.add_argument("--num-images", type=int, default=36)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    split = load_imagefolder(args.data, "test")
    order = torch.randperm(len(split.images), generator=torch.Generator().manual_seed(args.seed))[: args.num_images]
    images = split.images[order].float() / 255.0  # (N, 3, 64, 64) in [0, 1]
    labels = split.labels[order]
    classifier = load_classifier()
    by_name = {v: k for k, v in classifier.id2label.items()}
    to_classifier = torch.tensor([by_name[split.id2label[i]] for i in range(len(split.id2label))])
    H, W = images.shape[-2:]
    mask = torch.zeros(H, W)
    mask[H // 4: 3 * H // 4, W // 4: 3 * W // 4] = 1.0
    outside = mask == 0

    @torch.no_grad()
    def consistency(x):
        logits = torch.cat([classifier(x[i:i + 64] * 2 - 1).logits for i in range(0, len(x), 64)])
        return (logits.argmax(-1) == to_classifier[labels]).float().mean().item()

    print(f"emoji test split: {len(images)} of {len(split.images)} images, 1 edit each, centre quarter masked, "
          f"seed {args.seed}, {args.threads} threads, load {load_average()}")
    print(f"classifier accuracy on the original images: {consistency(images):.3f}")
    header = f"{'family':<6} {'edit':<20} {'class-consistency':>17} {'PSNR outside (dB)':>18} {'s / image':>10}"
    print(header)
    print("-" * len(header))
    for family, cls, name in FAMILIES:
        pipe = cls.from_pretrained(name)
        pipe.set_progress_bar_config(disable=True)
        results = run_family(pipe, images, labels, split.id2label, mask, args.candidates, args.batch_size, args.seed)
        recon = results["reconstruction"][0]
        for row, (edits, seconds) in results.items():
            psnr = psnr_outside(edits, recon, outside).mean().item()
            psnr_text = "inf" if math.isinf(psnr) or psnr >= 60 else f"{psnr:.2f}"
            print(f"{family:<6} {row:<20} {consistency(edits):>17.3f} {psnr_text:>18} {seconds:>10.3f}")


if __name__ == "__main__":
    main()
