"""Encode / decode throughput of LlamaGenVQModel (images/s), as a table of ratios against a baseline.

Baseline: LlamaGen's own ``VQModel`` on the same (random) weights, when ``--official PATH`` points to a
checkout of FoundationVision/LlamaGen (imported at run time, never committed here); the run then also
reports whether the codes agree and the largest reconstruction difference. Without it the baseline is
our own model coding image by image.

    python benchmarks/bench_llamagen_vq.py [--official /path/to/LlamaGen] [--threads 2] [--repeats 3]

Configs (``--configs``): ``vq16-w32-128px`` (VQ-16 layout at 1/4 width, 8x8 grid), ``vq8-w32-64px``
(VQ-8 layout at 1/4 width) and ``vq16-256px`` (the released VQ-16 size, 16x16 grid; slow on a CPU).
"""

from __future__ import annotations

import argparse
import sys

import torch

from bench_utils import median_time as timed

CONFIGS = {
    "vq16-w32-128px": dict(ch=32, ch_mult=[1, 1, 2, 2, 4], size=128),
    "vq8-w32-64px": dict(ch=32, ch_mult=[1, 2, 2, 4], size=64),
    "vq16-256px": dict(ch=128, ch_mult=[1, 1, 2, 2, 4], size=256),
}


def official_config(ch, ch_mult, size) -> dict:
    common = dict(ch=ch, ch_mult=ch_mult, num_res_blocks=2, norm_type="group", dropout=0.0, resamp_with_conv=True,
                  z_channels=256)
    return {
        "model_args": dict(codebook_size=16384, codebook_embed_dim=8, encoder_ch_mult=ch_mult, decoder_ch_mult=ch_mult),
        "encoder_kwargs": dict(common, in_channels=3),
        "decoder_kwargs": dict(common, out_channels=3),
    }


def build_official(path: str, config: dict):
    sys.path.insert(0, path)
    from tokenizer.tokenizer_image.vq_model import Decoder, Encoder, ModelArgs, VQModel

    model = VQModel(ModelArgs(**config["model_args"]))
    # VQModel always builds ch=128 encoders/decoders; rebuild them at the benchmark width (same key names).
    model.encoder = Encoder(**config["encoder_kwargs"])
    model.decoder = Decoder(**config["decoder_kwargs"])
    return model.eval()



@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", default=None, help="checkout of FoundationVision/LlamaGen")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--configs", default="vq16-w32-128px,vq8-w32-64px")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from hf_rq import LlamaGenVQModel
    from hf_rq.ctf.conversion import convert_llamagen_vq, llamagen_vq_config_from_official

    rows, checks = [], []
    for name in args.configs.split(","):
        spec = CONFIGS[name]
        config = official_config(**spec)
        torch.manual_seed(0)
        official = build_official(args.official, config) if args.official else None
        if official is not None:
            ours = convert_llamagen_vq({k: v.clone() for k, v in official.state_dict().items()}, config)
        else:
            ours = LlamaGenVQModel(**llamagen_vq_config_from_official(config)).eval()
        size = spec["size"]
        images = torch.rand(args.batch, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
        codes = ours.encode(images, return_codes=True).codes
        grid = codes.shape[1:]

        ours_enc = timed(lambda: ours.encode(images, return_codes=True), args.repeats)
        ours_dec = timed(lambda: ours.decode_codes(codes), args.repeats)
        if official is not None:
            official_codes = official.encode(images)[2][2].reshape(codes.shape)
            recon = official.decode_code(official_codes.reshape(-1), [args.batch, 8, *grid])
            diff = (recon - ours.decode_codes(official_codes).sample).abs().max().item()
            checks.append((name, int((official_codes != codes).sum()), codes.numel(), diff))
            base_enc = timed(lambda: official.encode(images), args.repeats)
            base_dec = timed(lambda: official.decode_code(codes.reshape(-1), [args.batch, 8, *grid]), args.repeats)
            baseline = "LlamaGen VQModel (batched)"
        else:
            base_enc = timed(
                lambda: [ours.encode(images[i : i + 1], return_codes=True) for i in range(args.batch)], args.repeats
            )
            base_dec = timed(lambda: [ours.decode_codes(codes[i : i + 1]) for i in range(args.batch)], args.repeats)
            baseline = "ours, one image at a time"
        for op, t_ours, t_base in (("encode->codes", ours_enc, base_enc), ("codes->decode", ours_dec, base_dec)):
            rows.append((name, op, args.batch / t_ours, args.batch / t_base, t_base / t_ours, baseline))

    print(f"\nLlamaGen VQ throughput, batch {args.batch}, {args.threads} threads, median of {args.repeats}")
    print("| config | op | ours img/s | baseline img/s | ratio | baseline |")
    print("|---|---|---|---|---|---|")
    for name, op, ours_ips, base_ips, ratio, baseline in rows:
        print(f"| {name} | {op} | {ours_ips:.2f} | {base_ips:.2f} | {ratio:.2f}x | {baseline} |")
    if checks:
        print("\n| config | code mismatches vs official | decode max abs diff |")
        print("|---|---|---|")
        for name, mismatches, total, diff in checks:
            print(f"| {name} | {mismatches} / {total} | {diff:.2e} |")


if __name__ == "__main__":
    main()
