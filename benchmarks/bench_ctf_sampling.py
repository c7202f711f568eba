"""Sampling throughput (images/s) of the CTF prior against the LlamaGen GPT of the same autoregressive size.

Both run in the same process on random weights (speed does not depend on training): LlamaGen samples
``grid**2`` tokens over the full codebook; CTF samples them over ``--clusters`` coarse labels with the same
GPT, then runs one pass of its stage-2 model over the codebook. Both use CFG 2.0 (the batch is doubled),
a KV cache and ``generate()`` as users call it; CTF is timed with and without the in-cluster mask, and
the share of its stage-2 pass is shown. VQ decoding is the same for both and is left out.

    python benchmarks/bench_ctf_sampling.py                      # CPU: scaled-down configs, 2 threads
    python benchmarks/bench_ctf_sampling.py --preset B --grid 16 --batch-sizes 8,32,64 --device cuda --dtype bfloat16

The paper (CTF Table 2, A100, batch 64, 256 tokens, 343M stage-2 model) reports CTF 0.93x LlamaGen's speed
for GPT-B and 1.16x / 1.18x for GPT-L / GPT-XL: the 512-way head saves work at each of the 256 steps,
and the single stage-2 pass costs about the same whatever the AR size.
"""

from __future__ import annotations

import argparse
import os

# On a shared machine, spinning OpenMP waits make 2-thread timings 5-20x slower and meaningless (both sides alike).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from bench_utils import load_average, median_time as timed  # noqa: E402

# (hidden, layers, heads). The LlamaGen presets, plus CPU-sized ones that keep the head/body balance of a
# 16384-way output (at small width the head dominates, as in the paper's B model it is a large share).
PRESETS = {
    "cpu-S": (128, 4, 4),
    "cpu-M": (256, 6, 4),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1280, 36, 20),
}


def build(preset: str, aux_preset: str, codebook: int, clusters: int, grid: int, device, dtype):
    from hf_rq.ctf.llamagen import LlamaGenConfig, LlamaGenForImageGeneration
    from hf_rq.ctf.prior import CTFConfig, CTFForImageGeneration

    def size(name):
        d, n, h = PRESETS[name]
        return dict(hidden_size=d, num_hidden_layers=n, num_attention_heads=h)

    torch.manual_seed(0)
    with torch.device(device):  # random init directly on the device: the L/XL models are large
        gpt = LlamaGenForImageGeneration(LlamaGenConfig(vocab_size=codebook, num_classes=1000, grid_size=grid,
                                                        **size(preset)))
        ctf = CTFForImageGeneration(CTFConfig(coarse_config=size(preset), fine_config=size(aux_preset),
                                              num_clusters=clusters, codebook_size=codebook, codebook_dim=8,
                                              num_classes=1000, grid_size=grid))
    ctf.set_coarse_labels(torch.randperm(codebook) % clusters)
    for model in (gpt, ctf):
        with torch.no_grad():  # the zero-initialised heads would make every distribution uniform
            for head in [m for m in model.modules() if m.__class__.__name__ == "LlamaGenOutputHead"]:
                head.weight.normal_(0, 0.02)
        model.to(device=device, dtype=dtype).eval()
    return gpt, ctf



@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu-S,cpu-M", help=f"AR sizes, comma-separated, from {sorted(PRESETS)}")
    parser.add_argument("--aux", default=None, help="stage-2 size (default: the same as the AR size; the paper uses L)")
    parser.add_argument("--grid", type=int, default=8, help="tokens per side (16 = 256 px with a downsample-16 VQ)")
    parser.add_argument("--codebook", type=int, default=16384)
    parser.add_argument("--clusters", type=int, default=512)
    parser.add_argument("--batch-sizes", default="1,4,16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    batches = [int(b) for b in args.batch_sizes.split(",")]

    print(f"device {device} {args.dtype}, threads {args.threads} (OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}), "
          f"load average at start {load_average()}, grid {args.grid}x{args.grid}, codebook {args.codebook}, "
          f"{args.clusters} clusters, CFG 2.0, median of {args.repeats}", flush=True)
    header = (f"{'AR':>6} {'aux':>6} {'batch':>5} | {'LlamaGen img/s':>14} | {'CTF img/s':>9} {'ratio':>6} | "
              f"{'CTF+mask img/s':>14} {'ratio':>6} | {'stage-2 share':>13} | load")
    print(header)
    print("-" * len(header), flush=True)
    for preset in args.preset.split(","):
        aux = args.aux or preset
        gpt, ctf = build(preset, aux, args.codebook, args.clusters, args.grid, device, dtype)
        for batch in batches:
            labels = torch.arange(batch, device=device) % 1000

            def sample(model, **kw):
                return lambda: model.generate(labels, generator=torch.Generator(device).manual_seed(0), **kw)

            t_gpt = timed(sample(gpt, guidance_scale=2.0), args.repeats, device)
            t_ctf = timed(sample(ctf, guidance_scale=2.0), args.repeats, device)
            t_mask = timed(sample(ctf, guidance_scale=2.0, in_cluster_mask=True), args.repeats, device)
            coarse = ctf.generate(labels, guidance_scale=2.0, return_dict_in_generate=True).coarse_labels.flatten(1)
            t_stage2 = timed(lambda: ctf._sample_fine(coarse, labels, True, 1.1, None, None, 1.0, False,
                                                      torch.Generator(device).manual_seed(0), False),
                             args.repeats, device)
            share = t_stage2 / t_ctf
            print(f"{preset:>6} {aux:>6} {batch:>5} | {batch / t_gpt:>14.2f} | {batch / t_ctf:>9.2f} {t_gpt / t_ctf:>5.2f}x | "
                  f"{batch / t_mask:>14.2f} {t_gpt / t_mask:>5.2f}x | {share:>12.0%} | {load_average()}", flush=True)
        del gpt, ctf


if __name__ == "__main__":
    main()
