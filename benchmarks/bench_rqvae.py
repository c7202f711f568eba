"""Encode / decode throughput of RQVAEModel (images/s), as a table of ratios against a baseline.

Baseline: the authors' RQVAE on the same weights, when ``--official PATH`` points to a checkout of
kakaobrain/rq-vae-transformer (never committed here); otherwise our own model decoding image by image,
which is how the authors' sampling script decodes.

    python benchmarks/bench_rqvae.py [--official /path/to/rq-vae-transformer] [--threads 2] [--repeats 5]

Configs: the published 256x256 layout at 1/4 width (ch 32, ch_mult 1,1,2,2,4,4, 2 res blocks, attention
at 8x8, embed 256, K 16384, depth 4), and a 64x64 layout (ch 64, ch_mult 1,1,2,2).
"""

from __future__ import annotations

import argparse
import sys
import types

import torch

from bench_utils import median_time as timed

CONFIGS = {
    "f32-256px-w32": dict(ch=32, ch_mult=[1, 1, 2, 2, 4, 4], resolution=256, attn=[8]),
    "f8-64px-w64": dict(ch=64, ch_mult=[1, 1, 2, 2], resolution=64, attn=[8]),
}


def official_arch(ch, ch_mult, resolution, attn) -> dict:
    h = resolution // 2 ** (len(ch_mult) - 1)
    return {
        "hparams": dict(bottleneck_type="rq", embed_dim=256, n_embed=16384, latent_shape=[h, h, 256],
                        code_shape=[h, h, 4], shared_codebook=True, decay=0.99, restart_unused_codes=True,
                        latent_loss_weight=0.25, loss_type="mse"),
        "ddconfig": dict(double_z=False, z_channels=256, resolution=resolution, in_channels=3, out_ch=3, ch=ch,
                         ch_mult=ch_mult, num_res_blocks=2, attn_resolutions=attn, dropout=0.0),
    }


def load_official_rqvae_class(path: str):
    # The authors' package __init__ imports their transformer configs, which do not import on Python 3.11;
    # register bare parent packages so only the RQ-VAE modules are executed.
    for name, sub in (("rqvae", "/rqvae"), ("rqvae.models", "/rqvae/models")):
        module = types.ModuleType(name)
        module.__path__ = [path + sub]
        sys.modules.setdefault(name, module)
    sys.path.insert(0, path)
    from rqvae.models.rqvae.rqvae import RQVAE

    return RQVAE



@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", default=None, help="checkout of kakaobrain/rq-vae-transformer")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from hf_rq.rq.conversion import convert_rqvae

    rows = []
    for name in args.configs.split(","):
        arch = official_arch(**CONFIGS[name])
        torch.manual_seed(0)
        if args.official:
            official = load_official_rqvae_class(args.official)(**arch["hparams"], ddconfig=arch["ddconfig"]).eval()
            state = {k: v.clone() for k, v in official.state_dict().items()}
        else:
            official = None
            from hf_rq.rq.conversion import rqvae_config_from_official
            from hf_rq import RQVAEModel

            state = None
            ours = RQVAEModel(**rqvae_config_from_official(arch)).eval()
        if state is not None:
            ours = convert_rqvae(state, arch)
        res = arch["ddconfig"]["resolution"]
        images = torch.rand(args.batch, 3, res, res, generator=torch.Generator().manual_seed(1)) * 2 - 1
        codes = ours.encode(images, return_codes=True).codes

        ours_enc = timed(lambda: ours.encode(images, return_codes=True), args.repeats)
        ours_dec = timed(lambda: ours.decode_codes(codes), args.repeats)
        if official is not None:
            assert torch.equal(official.get_codes(images), codes), "official and converted codes differ"
            base_enc = timed(lambda: official.get_codes(images), args.repeats)
            base_dec = timed(lambda: official.decode_code(codes), args.repeats)
            baseline = "authors' RQVAE (batched)"
        else:
            base_enc = timed(lambda: [ours.encode(images[i : i + 1], return_codes=True) for i in range(args.batch)], args.repeats)
            base_dec = timed(lambda: [ours.decode_codes(codes[i : i + 1]) for i in range(args.batch)], args.repeats)
            baseline = "ours, one image at a time"
        for op, t_ours, t_base in (("encode->codes", ours_enc, base_enc), ("codes->decode", ours_dec, base_dec)):
            rows.append((name, op, args.batch / t_ours, args.batch / t_base, t_base / t_ours, baseline))

    print(f"\nRQ-VAE throughput, batch {args.batch}, {args.threads} threads, median of {args.repeats}")
    print("| config | op | ours img/s | baseline img/s | ratio | baseline |")
    print("|---|---|---|---|---|---|")
    for name, op, ours, base, ratio, baseline in rows:
        print(f"| {name} | {op} | {ours:.2f} | {base:.2f} | {ratio:.2f}x | {baseline} |")


if __name__ == "__main__":
    main()
