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

**Roofline.** The script also measures the machine: the time of every matmul shape the sampler uses with its
weight already in cache (GEMM throughput at the sampler's own shapes), and the weight-streaming bandwidth (a
matrix-vector pass over 256 MiB of distinct weights). One ``generate()`` makes a known list of matmuls
(:func:`sampler_gemms`), so its floor is the larger of the compute time (every call at in-cache speed) and the
weight-read time (every weight read once per call, at the streaming bandwidth). The table prints that roofline
per batch size and the fraction of it that ours and the baseline reach (roofline time / measured time;
attention, sampling and Python are what separates a sampler from its roofline).

``--compile`` adds ours with ``generate(compile=True)`` (compile time excluded by the warm-up, printed
separately); ``--dtype bfloat16`` runs ours in bf16 (the baseline stays float32). Peak RSS of one
``generate()`` at the largest batch is measured for both in fresh processes (the first call after building the
models, above the RSS before it: a warm process would reuse freed heap and show nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import types

# On a shared machine, OpenMP threads that spin while waiting for a descheduled peer make 2-thread runs 5-20x
# slower and their timings meaningless; passive waiting applies to ours and the baseline alike.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import time  # noqa: E402

import torch.nn.functional as F  # noqa: E402

from bench_utils import load_average, median_time as timed, peak_rss_growth_mb  # noqa: E402

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




def sampler_gemms(vocab: int, batch: int, depth: int = 4, positions: int = 64) -> list[tuple[int, int, int, int]]:
    """``(rows, in, out, calls)`` of every matmul in one ``generate()`` (no guidance; q/k/v fused or not, the
    same weights are read and the same products computed)."""
    E, C = HIDDEN, CODE_DIM
    gemms = []
    for fan_in, fan_out in ((E, 3 * E), (E, E), (E, 4 * E), (4 * E, E)):  # qkv, proj, fc_in, fc_out
        gemms.append((batch, fan_in, fan_out, positions * SPATIAL_LAYERS))
        gemms.append((batch, fan_in, fan_out, positions * depth * DEPTH_LAYERS))
    gemms.append((batch, E, vocab, positions * depth))  # lm_head
    gemms.append((batch * depth, C, E, positions - 1))  # spatial input: every codeword of a position
    gemms.append((batch, C, E, positions * (depth - 1)))  # depth input: partial sums
    return gemms


def gemm_seconds_in_cache(rows: int, fan_in: int, fan_out: int, dtype=torch.float32, calls: int = 30) -> float:
    """Seconds per ``linear`` call at this shape with the weight already in cache (best of 3 bursts)."""
    x = torch.randn(rows, fan_in, dtype=dtype)
    w, b = torch.randn(fan_out, fan_in, dtype=dtype), torch.randn(fan_out, dtype=dtype)
    F.linear(x, w, b)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(calls):
            F.linear(x, w, b)
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def weight_stream_bandwidth(dtype=torch.float32, total_mib: int = 256) -> float:
    """Bytes/s at which matrix-vector products read distinct weights that do not fit in any cache (best of 3)."""
    E = HIDDEN
    weights = [torch.randn(4 * E, E, dtype=dtype) for _ in range(total_mib * 2**20 // (4 * E * E * dtype.itemsize))]
    x = torch.randn(1, E, dtype=dtype)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for w in weights:
            F.linear(x, w)
        best = min(best, time.perf_counter() - start)
    return sum(w.numel() * w.element_size() for w in weights) / best


def roofline_seconds(vocab: int, batch: int, bandwidth: float, dtype=torch.float32, shape_cache: dict | None = None):
    """``(compute s, weight-read s)`` of one generate(): every matmul at in-cache speed / every weight at ``bandwidth``."""
    shape_cache = {} if shape_cache is None else shape_cache
    compute = weight_bytes = 0.0
    for rows, fan_in, fan_out, calls in sampler_gemms(vocab, batch):
        key = (rows, fan_in, fan_out, dtype)
        if key not in shape_cache:
            shape_cache[key] = gemm_seconds_in_cache(rows, fan_in, fan_out, dtype)
        compute += calls * shape_cache[key]
        weight_bytes += calls * (fan_in + 1) * fan_out * dtype.itemsize
    return compute, weight_bytes / bandwidth


def rss_in_child(args, vocab: int, batch: int, which: str) -> float:
    """Peak-RSS growth (MiB) of the first ``generate()`` in a fresh process (this script with ``--rss-child``)."""
    cmd = [sys.executable, __file__, "--rss-child", which, "--vocabs", str(vocab), "--batches", str(batch),
           "--threads", str(args.threads), "--dtype", args.dtype] + (["--official", args.official] if args.official else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["rss_mib"]


@torch.no_grad()
def rss_child(args) -> None:
    torch.set_num_threads(args.threads)
    vocab, batch = int(args.vocabs), int(args.batches)
    ours, theirs = build(vocab, args.official)
    ours.to(getattr(torch, args.dtype))
    labels = torch.randint(0, CLASSES, (batch,), generator=torch.Generator().manual_seed(batch))
    sampling = dict(temperature=1.0, top_k=vocab, top_p=0.92)
    if args.rss_child == "ours":
        fn = lambda: ours.generate(labels, generator=torch.Generator().manual_seed(0), **sampling)  # noqa: E731
    else:
        fn = lambda: theirs[0].sample(torch.zeros(batch, 8, 8, 4, dtype=torch.long), theirs[1], cond=labels,  # noqa: E731
                                      cached=True, **sampling)
    print(json.dumps({"rss_mib": peak_rss_growth_mb(fn)}))


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", default=None, help="checkout of kakaobrain/rq-vae-transformer")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vocabs", default="1024,16384")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--compile", action="store_true", help="also time ours with generate(compile=True)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="our prior's dtype")
    parser.add_argument("--no-check", action="store_true", help="skip the greedy equality check against the authors' sampler")
    parser.add_argument("--rss-child", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        return rss_child(args)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, {args.threads} threads (OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}), "
          f"ours in {args.dtype}, load average at start {load_average()}", flush=True)
    bandwidth = weight_stream_bandwidth(dtype)
    print(f"weight-streaming bandwidth ({args.dtype}): {bandwidth / 1e9:.1f} GB/s (load {load_average()})", flush=True)
    shape_cache = {}
    batches = [int(b) for b in args.batches.split(",")]

    rows, rss = [], []
    for vocab in [int(v) for v in args.vocabs.split(",")]:
        ours, theirs = build(vocab, args.official)
        ours.to(dtype)
        params = sum(p.numel() for p in ours.parameters())
        sampling = dict(temperature=1.0, top_k=vocab, top_p=0.92)
        if theirs is not None and not args.no_check and dtype == torch.float32:
            labels = torch.arange(2)
            their_codes = theirs[0].sample(torch.zeros(2, 8, 8, 4, dtype=torch.long), theirs[1], cond=labels, top_k=1)
            assert torch.equal(ours.generate(labels, do_sample=False), their_codes), "greedy codes differ from the authors'"
            if args.compile:
                assert torch.equal(ours.generate(labels, do_sample=False, compile=True), their_codes), \
                    "compiled greedy codes differ from the authors'"
            print(f"vocab {vocab}: greedy codes equal the authors' on the same weights"
                  f"{' (eager and compiled)' if args.compile else ''}", flush=True)
        for batch in batches:
            labels = torch.randint(0, CLASSES, (batch,), generator=torch.Generator().manual_seed(batch))
            gen = torch.Generator().manual_seed(0)
            ours_fn = lambda: ours.generate(labels, generator=gen, **sampling)  # noqa: E731
            t_ours = timed(ours_fn, args.repeats)
            t_comp = None
            if args.compile:
                start = time.perf_counter()
                ours.generate(labels, generator=gen, compile=True, **sampling)
                print(f"  compile + first generate: {time.perf_counter() - start:.1f} s", flush=True)
                t_comp = timed(lambda: ours.generate(labels, generator=gen, compile=True, **sampling), args.repeats)
            if theirs is not None:
                tf, vq = theirs
                start_codes = torch.zeros(batch, 8, 8, 4, dtype=torch.long)
                base_fn = lambda: tf.sample(start_codes, vq, cond=labels, cached=True, **sampling)  # noqa: E731
                t_base = timed(base_fn, args.repeats)
                baseline = "authors' sample(cached=True)"
            else:
                # the uncached path is slow: time it once, without warm-up
                base_fn = lambda: ours.generate(labels, generator=gen, use_cache=False, **sampling)  # noqa: E731
                t_base = timed(base_fn, 1, warmup=False)
                baseline = "ours, use_cache=False"
            compute, reads = roofline_seconds(vocab, batch, bandwidth, dtype, shape_cache)
            roof = max(compute, reads)
            if batch == max(batches):
                rss.append((vocab, batch, rss_in_child(args, vocab, batch, "ours"),
                            rss_in_child(args, vocab, batch, "baseline") if theirs is not None else float("nan")))
            rows.append((vocab, params, batch, t_ours, t_base, t_comp, compute, reads, roof, baseline, load_average()))
            print(f"vocab {vocab} batch {batch}: ours {t_ours:.2f} s, baseline {t_base:.2f} s, roofline {roof:.2f} s "
                  f"(compute {compute:.2f} s, weight reads {reads:.2f} s)"
                  f"{f', compiled {t_comp:.2f} s' if t_comp else ''} (load {load_average()})", flush=True)

    print(f"\nRQ-Transformer sampling, 8x8x4 codes, E={HIDDEN}, {SPATIAL_LAYERS}+{DEPTH_LAYERS} layers, {args.threads} threads, "
          f"ours in {args.dtype}, median of {args.repeats}; baseline: {rows[0][9]}; weight streaming "
          f"{bandwidth / 1e9:.1f} GB/s")
    compiled = " ours compiled img/s | compiled ratio |" if args.compile else ""
    print(f"| vocab | params | batch | ours img/s | baseline img/s | ratio |{compiled} roofline s (compute / reads) | "
          "ours % of roofline | baseline % of roofline | load |")
    print("|---|---|---|---|---|---|" + ("---|---|" if args.compile else "") + "---|---|---|---|")
    for vocab, params, batch, t_ours, t_base, t_comp, compute, reads, roof, baseline, ld in rows:
        comp = f" {batch / t_comp:.2f} | {t_base / t_comp:.2f}x |" if args.compile else ""
        print(f"| {vocab} | {params / 1e6:.1f}M | {batch} | {batch / t_ours:.2f} | {batch / t_base:.2f} | "
              f"{t_base / t_ours:.2f}x |{comp} {roof:.2f} ({compute:.2f} / {reads:.2f}) | {100 * roof / t_ours:.0f}% | "
              f"{100 * roof / t_base:.0f}% | {ld} |")
    print(f"\n| vocab | batch | peak RSS of one generate() above the loaded models, ours MiB | authors' MiB |")
    print("|---|---|---|---|")
    for vocab, batch, ours_mb, base_mb in rss:
        print(f"| {vocab} | {batch} | {ours_mb:.0f} | {base_mb:.0f} |")


if __name__ == "__main__":
    main()
