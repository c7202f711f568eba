#!/usr/bin/env python
"""Training throughput (images/s) per stage, for a tiny and a moderate configuration.

For each stage the full training step of the scripts in ``training/`` is timed against a baseline measured
in the same run: the bare model's forward + backward + optimizer step. The ratio shows what the recipe
costs on top of the model:

* tokenizer (RQ-VAE): reconstruction + commitment + PatchGAN hinge loss with the adaptive weight (two extra
  backward passes through the decoder's last layer) + the discriminator step + EMA of the weights, and with
  ``--perceptual`` LPIPS (VGG16, random weights: same cost as pretrained ones);
* prior (RQ-Transformer): soft labels and stochastic codes drawn from cached latents every step, soft-target
  cross-entropy, gradient clipping, EMA.

    python benchmarks/bench_training.py                     # CPU, torch threads 2
    python benchmarks/bench_training.py --device cuda --mixed_precision bf16 --perceptual
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from hf_rq import RQVAEModel
from hf_rq.training import LPIPS, NLayerDiscriminator, TokenizerLoss, TokenizerLossConfig, hinge_d_loss

CONFIGS = {
    "tokenizer": {
        "tiny": dict(resolution=32, batch=8, model=dict(block_out_channels=(32, 32), layers_per_block=1,
                     attn_resolutions=(), latent_channels=32, embed_dim=16, codebook_size=64, code_depth=2)),
        "moderate": dict(resolution=64, batch=16, model=dict(block_out_channels=(32, 64, 128, 128), layers_per_block=1,
                         attn_resolutions=(8,), latent_channels=64, embed_dim=64, codebook_size=256, code_depth=4)),
    },
    "prior": {
        "tiny": dict(grid=4, batch=32, codebook=64, depth=2, embed=16,
                     model=dict(hidden_size=64, num_spatial_layers=2, num_depth_layers=1, num_attention_heads=2)),
        "moderate": dict(grid=8, batch=32, codebook=256, depth=4, embed=64,
                         model=dict(hidden_size=256, num_spatial_layers=6, num_depth_layers=2, num_attention_heads=4)),
    },
}


def timed(step, warmup: int, steps: int, device) -> float:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def autocast(device, mixed_precision):
    if mixed_precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if mixed_precision == "bf16" else torch.float16)


def tokenizer_steps(cfg, device, mp, perceptual: bool):
    torch.manual_seed(0)
    r = cfg["resolution"]
    model = RQVAEModel(**cfg["model"], sample_size=r).to(device).train()
    images = (torch.rand(cfg["batch"], 3, r, r, device=device) * 2 - 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.5, 0.9))

    def baseline():
        with autocast(device, mp):
            out = model(images)
            loss = (out.sample.float() - images).pow(2).mean() + 0.25 * out.commitment_loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    disc = NLayerDiscriminator(3, 64, 2).to(device)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=1e-4, betas=(0.5, 0.9))
    lp = LPIPS().to(device) if perceptual else None
    loss_fn = TokenizerLoss(TokenizerLossConfig(perceptual_weight=1.0 if perceptual else 0.0, disc_weight=0.75), lp, disc)
    from diffusers.training_utils import EMAModel

    ema = EMAModel(model.parameters(), decay=0.999)
    ema.to(device)

    def full():
        with autocast(device, mp):
            out = model(images)
            terms = loss_fn(out, images, step=1, last_layer=model.decoder.conv_out.weight)
        terms["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with autocast(device, mp):
            d_loss = 0.75 * hinge_d_loss(disc(images), disc(out.sample.detach()))
        d_loss.backward()
        opt_d.step()
        opt_d.zero_grad(set_to_none=True)
        ema.step(model.parameters())

    params = sum(p.numel() for p in model.parameters()) / 1e6
    return baseline, full, cfg["batch"], f"{r}x{r}, {params:.2f}M params"


def prior_steps(cfg, device, mp, perceptual: bool):
    from hf_rq.quantizers import ResidualQuantizer
    from hf_rq.rq.prior import RQTransformerConfig, RQTransformerForImageGeneration

    torch.manual_seed(0)
    g, K, D, C = cfg["grid"], cfg["codebook"], cfg["depth"], cfg["embed"]
    quantizer = ResidualQuantizer(K, C, D).to(device).eval()
    config = RQTransformerConfig(codebook_size=K, grid_height=g, grid_width=g, code_depth=D, code_embed_dim=C,
                                 num_classes=10, use_null_class=True, class_dropout_prob=0.1, **cfg["model"])
    prior = RQTransformerForImageGeneration(config).to(device).train()
    with torch.no_grad():
        prior.code_embeddings.copy_(quantizer.codebooks[0].weight)
    latents = torch.randn(cfg["batch"], g, g, C, device=device)
    labels = torch.randint(0, 10, (cfg["batch"],), device=device)
    with torch.no_grad():
        codes = quantizer.soft_codes(latents, 0.5)[1]
    opt = torch.optim.AdamW(prior.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=1e-4)

    def baseline():
        with autocast(device, mp):
            loss = prior(codes=codes, class_labels=labels, labels=codes).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    from diffusers.training_utils import EMAModel

    ema = EMAModel(prior.parameters(), decay=0.999)
    ema.to(device)
    gen = torch.Generator(device).manual_seed(0)

    def full():
        soft, sampled = quantizer.soft_codes(latents, 0.5, True, gen)
        with autocast(device, mp):
            loss = prior(codes=sampled, class_labels=labels, soft_labels=soft).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(prior.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.step(prior.parameters())

    params = sum(p.numel() for p in prior.parameters()) / 1e6
    return baseline, full, cfg["batch"], f"{g}x{g}x{D} codes, K={K}, {params:.2f}M params"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--mixed_precision", choices=["no", "bf16", "fp16"], default="no")
    parser.add_argument("--perceptual", action="store_true", help="Include LPIPS in the tokenizer step.")
    parser.add_argument("--stages", nargs="+", default=["tokenizer", "prior"], choices=["tokenizer", "prior"])
    parser.add_argument("--configs", nargs="+", default=["tiny", "moderate"], choices=["tiny", "moderate"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    builders = {"tokenizer": tokenizer_steps, "prior": prior_steps}
    print(f"device={device} threads={torch.get_num_threads()} mixed_precision={args.mixed_precision} "
          f"perceptual={args.perceptual} steps={args.steps} torch={torch.__version__}")
    header = (f"{'stage':<10} {'config':<9} {'shape':<34} {'batch':>5} {'baseline img/s':>15} "
              f"{'full step img/s':>16} {'full/baseline':>14}")
    print(header)
    print("-" * len(header))
    for stage in args.stages:
        for name in args.configs:
            baseline, full, batch, shape = builders[stage](CONFIGS[stage][name], device, args.mixed_precision, args.perceptual)
            t_base = timed(baseline, args.warmup, args.steps, device)
            t_full = timed(full, args.warmup, args.steps, device)
            print(f"{stage:<10} {name:<9} {shape:<34} {batch:>5} {batch / t_base:>15.1f} {batch / t_full:>16.1f} "
                  f"{t_base / t_full:>14.2f}")


if __name__ == "__main__":
    main()
