"""Sampling throughput of RQTransformerForImageGeneration.generate() (images/s), as a table of ratios.

Baseline, measured in the same run on the same weights: the authors' ``RQTransformer.sample`` (KV-cached)
when ``--official PATH`` points to a checkout of kakaobrain/rq-vae-transformer (never committed here; its
model code needs ``omegaconf``); otherwise our own uncached path (``use_cache=False``: both transformers
re-run the whole prefix at every step), which is what a sampler without a KV cache costs.

    python benchmarks/bench_rq_sampling.py [--official /path/to/rq-vae-transformer] [--threads 2] [--repeats 3]

Config ("Measured here" in the RQ ARCHITECTURE.md): 8x8x4 codes, vocab 1024 and 16384, embed 512, 8 spatial +
4 depth layers, 8 heads, 1000 classes, codeword width 256; sampling ``temperature=1.0, top_k=vocab,
top_p=0.92`` (the ImageNet setting); batch sweep 1, 8, 32; float32, ``torch.set_num_threads(threads)``.
Each entry is the median of ``--repeats`` timed runs after one warm-up. On a shared machine check the load
(printed) and compare only numbers taken back to back.
"""

from __future__ import annotations

import argparse
import os
import sys
import types

import torch

from bench_utils import load_average, median_time as timed

HIDDEN, SPATIAL_LAYERS, DEPTH_LAYERS, HEADS, CLASSES, CODE_DIM = 512, 8, 4, 8, 1000, 256


def official_configs(vocab: int) -> tuple[dict, dict]:
    """The authors' stage-1 and stage-2 ``arch`` blocks (all keys, as after their ``augment_arch_defaults``)."""
    # Only the RQ-VAE's codebook matters for sampling, so its encoder/decoder are kept small.
    rqvae = {
        "hparams": dict(bottleneck_type="rq", embed_dim=CODE_DIM, n_embed=vocab, latent_shape=[8, 8, CODE_DIM],
                        code_shape=[8, 8, 4], shared_codebook=True, decay=0.99, restart_unused_codes=True,
                        latent_loss_weight=0.25, loss_type="mse"),
        "ddconfig": dict(double_z=False, z_channels=64, resolution=64, in_channels=3, out_ch=3, ch=32,
                         ch_mult=[1, 1, 2, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0),
    }
    block = dict(embed_dim=HIDDEN, n_head=HEADS, mlp_bias=True, attn_bias=True, attn_pdrop=0.0, resid_pdrop=0.1, gelu="v1")
    tf = dict(type="rq-transformer", ema=None, ar_hierarchy=None, vocab_size=vocab, block_size=[8, 8, 4],
              vocab_size_cond=CLASSES, block_size_cond=1, embed_dim=HIDDEN, input_embed_dim=CODE_DIM,
              use_padding_emb=False, input_emb_vqvae=True, head_emb_vqvae=True, scaled_head_emb_vqvae=False,
              cumsum_depth_ctx=True, shared_tok_emb=True, embd_pdrop=0.0, shared_cls_emb=True,
              body=dict(n_layer=SPATIAL_LAYERS, block=dict(block)), head=dict(n_layer=DEPTH_LAYERS, block=dict(block)))
    return rqvae, tf


def load_official_classes(path: str):
    """Import the authors' RQVAE and RQTransformer classes from a checkout, without their package __init__s."""
    sys.path.insert(0, path)
    for name in ("rqvae", "rqvae.models", "rqvae.models.rqtransformer", "rqvae.utils", "rqvae.optimizer"):
        module = types.ModuleType(name)
        module.__path__ = [os.path.join(path, *name.split("."))]
        sys.modules.setdefault(name, module)
    # Their configs.py does not import on Python >= 3.11 (dataclass instances as field defaults). The model code
    # uses those classes only in annotations; the config itself is an OmegaConf DictConfig built below.
    configs = types.ModuleType("rqvae.models.rqtransformer.configs")
    for cls in ("AttentionBlockConfig", "AttentionStackConfig", "RQTransformerConfig"):
        setattr(configs, cls, type(cls, (), {}))
    sys.modules.setdefault(configs.__name__, configs)
    from rqvae.models.rqtransformer.transformers import RQTransformer
    from rqvae.models.rqvae.rqvae import RQVAE

    return RQVAE, RQTransformer


def build(vocab: int, official_path: str | None):
    """(our prior, the authors' (transformer, rqvae) or None) on the same weights."""
    from hf_rq import RQTransformerConfig, RQTransformerForImageGeneration, RQVAEModel
    from hf_rq.rq.conversion import (convert_rqtransformer, convert_rqvae, rqtransformer_config_from_official,
                                     rqvae_config_from_official)

    rqvae_arch, tf_arch = official_configs(vocab)
    torch.manual_seed(0)
    if official_path:
        from omegaconf import OmegaConf

        RQVAE, RQTransformer = load_official_classes(official_path)
        their_vq = RQVAE(**rqvae_arch["hparams"], ddconfig=rqvae_arch["ddconfig"]).eval()
        their_tf = RQTransformer(OmegaConf.create(tf_arch)).eval()
        vq = convert_rqvae({k: v.clone() for k, v in their_vq.state_dict().items()}, rqvae_arch)
        ours = convert_rqtransformer({k: v.clone() for k, v in their_tf.state_dict().items()}, tf_arch, vq)
        return ours, (their_tf, their_vq)
    vq = RQVAEModel(**rqvae_config_from_official(rqvae_arch))
    config = RQTransformerConfig(**rqtransformer_config_from_official(tf_arch))
    return RQTransformerForImageGeneration.from_tokenizer(config, vq).eval(), None




@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", default=None, help="checkout of kakaobrain/rq-vae-transformer")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vocabs", default="1024,16384")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--no-check", action="store_true", help="skip the greedy equality check against the authors' sampler")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, load average at start {load_average()}", flush=True)

    rows = []
    for vocab in [int(v) for v in args.vocabs.split(",")]:
        ours, theirs = build(vocab, args.official)
        params = sum(p.numel() for p in ours.parameters())
        sampling = dict(temperature=1.0, top_k=vocab, top_p=0.92)
        if theirs is not None and not args.no_check:
            labels = torch.arange(2)
            their_codes = theirs[0].sample(torch.zeros(2, 8, 8, 4, dtype=torch.long), theirs[1], cond=labels, top_k=1)
            assert torch.equal(ours.generate(labels, do_sample=False), their_codes), "greedy codes differ from the authors'"
            print(f"vocab {vocab}: greedy codes equal the authors' on the same weights", flush=True)
        for batch in [int(b) for b in args.batches.split(",")]:
            labels = torch.randint(0, CLASSES, (batch,), generator=torch.Generator().manual_seed(batch))
            gen = torch.Generator().manual_seed(0)
            t_ours = timed(lambda: ours.generate(labels, generator=gen, **sampling), args.repeats)
            if theirs is not None:
                tf, vq = theirs
                start = torch.zeros(batch, 8, 8, 4, dtype=torch.long)
                t_base = timed(lambda: tf.sample(start, vq, cond=labels, cached=True, **sampling), args.repeats)
                baseline = "authors' sample(cached=True)"
            else:
                # the uncached path is slow: time it once, without warm-up
                t_base = timed(lambda: ours.generate(labels, generator=gen, use_cache=False, **sampling), 1, warmup=False)
                baseline = "ours, use_cache=False"
            rows.append((vocab, params, batch, batch / t_ours, batch / t_base, t_base / t_ours, baseline, load_average()))
            print(f"vocab {vocab} batch {batch}: ours {t_ours:.2f} s, baseline {t_base:.2f} s (load {load_average()})", flush=True)

    print(f"\nRQ-Transformer sampling, 8x8x4 codes, E={HIDDEN}, {SPATIAL_LAYERS}+{DEPTH_LAYERS} layers, {args.threads} threads, "
          f"median of {args.repeats}")
    print("| vocab | params | batch | ours img/s | baseline img/s | ratio | baseline | load |")
    print("|---|---|---|---|---|---|---|---|")
    for vocab, params, batch, ours_ips, base_ips, ratio, baseline, ld in rows:
        print(f"| {vocab} | {params / 1e6:.1f}M | {batch} | {ours_ips:.2f} | {base_ips:.2f} | {ratio:.2f}x | {baseline} | {ld} |")


if __name__ == "__main__":
    main()
