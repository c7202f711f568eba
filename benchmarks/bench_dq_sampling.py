"""Benchmark: DQ-Transformer sampling speed, cached generate() vs the authors' sampler (or our uncached path).

Config = the "Measured here" section of ``reference/dq/ARCHITECTURE.md``: 256 px images, 8x8 coarse / 16x16 fine
grid, codebook 1024, 1000 classes, width 512, 8 heads, 2 position + 2 content layers, batch 8, labels
``(arange(8) * 997) % 1000``, torch threads 2, sampling as the authors' sample script (temperature 1, top-k 300,
top-k positions 1024, top-p 1.0 for both).

Baseline, measured in the same run on the same weights and the same seed:

* ``--official PATH``: the authors' ``Dualformer.sample_from_scratch`` from a checkout of
  CrossmodalGroup/DynamicVectorQuantization (never part of this repository). Its StackGPT is built with their
  code and initialisation (``torch.manual_seed(1234)``) and converted into our model with our converter.
  ``pytorch_lightning`` and ``einops`` are replaced by minimal stand-ins when they are not installed (the sampler
  only needs ``nn.Module`` and one reshape).
* otherwise: our own uncached path (``use_cache=False``), which re-runs both stacks on the whole prefix at every
  step exactly like the authors' sampler.

Random weights make sequence lengths vary, so the main comparison is time **per sampler step** (one position +
one content token for the whole batch); the script also reports whether both samplers produced the identical
sequences (then the steps are also of equal sequence length). Run on an idle machine:

    python benchmarks/bench_dq_sampling.py --official ../official-dq [--fix-fine-position] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import types

# On a shared machine, spinning OpenMP waits make 2-thread timings 5-20x slower and meaningless (both sides alike).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--official", default=None, help="checkout of CrossmodalGroup/DynamicVectorQuantization")
    p.add_argument("--runs", type=int, default=3, help="timed runs per sampler (median reported)")
    p.add_argument("--baseline-runs", type=int, default=None, help="timed runs of the baseline (default: --runs)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fix-fine-position", action="store_true", help="the authors' fixed fine-position mode")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


CONFIG = dict(codebook_size=1024, coarse_grid_size=8, num_classes=1000, hidden_size=512, num_position_layers=2,
              num_content_layers=2, num_attention_heads=8, max_position_embeddings=324, use_segment_embedding=True,
              fine_position_order="row-first", embd_pdrop=0.1, attn_pdrop=0.1, resid_pdrop=0.1)
SAMPLING = dict(temperature=1.0, top_k=300, top_p=1.0, position_top_k=1024, position_top_p=1.0)


# ------------------------------------------------------------------------------------------ the authors' code
def _install_stand_ins() -> None:
    """Minimal replacements for two heavy/absent dependencies of the authors' modules (sampler path only)."""
    try:
        import pytorch_lightning  # noqa: F401
    except ImportError:
        pl = types.ModuleType("pytorch_lightning")
        pl.LightningModule = torch.nn.Module
        sys.modules["pytorch_lightning"] = pl
    try:
        import einops  # noqa: F401
    except ImportError:
        ein = types.ModuleType("einops")

        def rearrange(x, pattern, **sizes):
            # The only pattern the sampler path uses ("B (h w) -> B h w"); anything else is refused.
            if pattern.replace(" ", "") != "B(hw)->Bhw":
                raise NotImplementedError(f"einops stand-in: pattern {pattern!r}; install einops")
            return x.reshape(x.shape[0], sizes["h"], sizes["w"])

        ein.rearrange = rearrange
        sys.modules["einops"] = ein


def build_official(path: str, vocab):
    """The authors' Dualformer (sampler attributes + StackGPT) with their init under torch.manual_seed(1234)."""
    sys.path.insert(0, os.path.abspath(path))
    _install_stand_ins()
    from models.stage2_dynamic.dqtransformer_class2_entropy import Dualformer

    K, hc, C = CONFIG["codebook_size"], CONFIG["coarse_grid_size"], CONFIG["num_classes"]
    hf = 2 * hc
    transformer = dict(target="modules.dynamic_modules.stackgpt.StackGPT", params=dict(
        vocab_size=vocab.content_vocab_size, coarse_position_size=vocab.coarse_position_vocab_size,
        fine_position_size=vocab.fine_position_vocab_size, segment_size=2, block_size=CONFIG["max_position_embeddings"],
        position_layer=CONFIG["num_position_layers"], content_layer=CONFIG["num_content_layers"],
        n_head=CONFIG["num_attention_heads"], n_embd=CONFIG["hidden_size"], embd_pdrop=0.1, resid_pdrop=0.1,
        attn_pdrop=0.1, content_pad_code=K, coarse_position_pad_code=hc * hc, fine_position_pad_code=hf * hf,
        activate_pad_ignore=True))
    config = dict(
        transformer_config=transformer,
        first_stage_config=dict(target="torch.nn.Identity"),  # the sampler never touches the DQ-VAE
        class_cond_stage_config=dict(target="modules.dynamic_modules.label_provider.ClassAwareSOSProvider", params=dict(
            n_classes=C, threshold_content=K + 2, threshold_coarse_position=hc * hc + 2,
            threshold_fine_position=hf * hf + 2, coarse_seg_sos=0, fine_seg_sos=1)),
        permuter_config=dict(target="modules.dynamic_modules.permuter.DualGrainSeperatePermuter", params=dict(
            coarse_hw=hc, fine_hw=hf, content_pad_code=K, content_eos_code=K + 1, coarse_position_pad_code=hc * hc,
            coarse_position_eos_code=hc * hc + 1, fine_position_pad_code=hf * hf, fine_position_eos_code=hf * hf + 1,
            fine_position_order="row-first")),
    )
    torch.manual_seed(1234)
    model = Dualformer(**config).eval()
    return model, config


def official_sample(model, labels, args):
    c = model.encode_to_c(labels)
    return model.sample_from_scratch(*c, temperature=SAMPLING["temperature"], sample=True, top_k=SAMPLING["top_k"],
                                     top_p=SAMPLING["top_p"], top_k_pos=SAMPLING["position_top_k"],
                                     top_p_pos=SAMPLING["position_top_p"], process=False,
                                     fix_fine_position=args.fix_fine_position)


# ------------------------------------------------------------------------------------------------- timing
def timed(fn, runs):
    """Wall-clock and process CPU seconds of ``runs`` calls (CPU time is the steadier number on a busy machine)."""
    times, cpu, results = [], [], None
    for _ in range(runs):
        start, start_cpu = time.perf_counter(), time.process_time()
        results = fn()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return times, cpu, results


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from hf_rq.dq.conversion import convert_dqtransformer_state_dict
    from hf_rq.dq.prior import DQTransformerConfig, DQTransformerForImageGeneration

    config = DQTransformerConfig(**CONFIG)
    labels = (torch.arange(args.batch) * 997) % CONFIG["num_classes"]
    official = None
    if args.official:
        official, _ = build_official(args.official, config.vocabulary)
        ours = DQTransformerForImageGeneration(config).eval()
        ours.load_state_dict(convert_dqtransformer_state_dict(official.transformer.state_dict()), strict=True)
        official.to(args.device)
        ours.to(args.device)
    else:
        torch.manual_seed(1234)
        ours = DQTransformerForImageGeneration(config).eval().to(args.device)
    params = sum(p.numel() for p in ours.parameters())
    labels = labels.to(args.device)
    kwargs = dict(SAMPLING, do_sample=True, fix_fine_position=args.fix_fine_position, return_dict_in_generate=True)

    def run_ours(use_cache=True):
        gen = torch.Generator(args.device).manual_seed(args.seed)
        return ours.generate(class_labels=labels, generator=gen, use_cache=use_cache, **kwargs)

    def run_official():
        torch.manual_seed(args.seed)  # their sampler draws from the global generator
        return official_sample(official, labels, args)

    run_ours()  # warm-up (allocations, lazy init); the authors' sampler needs none at ~0.3 s a step
    load_before = os.getloadavg()[0]
    ours_times, ours_cpu, out = timed(run_ours, args.runs)
    seqs = (out.tokens.coarse_content, out.tokens.fine_content, out.tokens.coarse_position, out.tokens.fine_position)
    ours_steps = seqs[0].shape[1] + seqs[1].shape[1]

    base_runs = args.baseline_runs or args.runs
    if official is not None:
        name = "authors' sampler (no cache)"
        base_times, base_cpu, base = timed(run_official, base_runs)
        base_seqs = tuple(t.cpu() for t in base)
    else:
        name = "ours, use_cache=False"
        base_times, base_cpu, base = timed(lambda: run_ours(use_cache=False), base_runs)
        base_seqs = (base.tokens.coarse_content, base.tokens.fine_content, base.tokens.coarse_position,
                     base.tokens.fine_position)
    base_steps = base_seqs[0].shape[1] + base_seqs[1].shape[1]
    same = all(a.shape == b.shape and torch.equal(a.cpu(), b.cpu()) for a, b in zip(seqs, base_seqs))

    o_med, b_med = statistics.median(ours_times), statistics.median(base_times)
    o_step, b_step = 1000 * o_med / ours_steps, 1000 * b_med / base_steps
    print(f"DQ-Transformer sampling, {'fixed' if args.fix_fine_position else 'sampled'} fine positions; batch {args.batch}, "
          f"{params / 1e6:.2f} M parameters, torch {torch.__version__}, {args.threads} threads, {args.device}")
    print(f"1-minute load average before/after: {load_before:.2f} / {os.getloadavg()[0]:.2f} "
          f"(wall times are only meaningful on an idle machine; CPU time is less sensitive)")
    print(f"steps (coarse + fine): ours {seqs[0].shape[1]} + {seqs[1].shape[1]} = {ours_steps}; baseline "
          f"{base_seqs[0].shape[1]} + {base_seqs[1].shape[1]} = {base_steps}; identical sequences: {'yes' if same else 'no'}")
    o_cpu = 1000 * statistics.median(ours_cpu) / ours_steps
    b_cpu = 1000 * statistics.median(base_cpu) / base_steps
    header = (f"| {'sampler':34} | {'runs (s)':24} | {'median s':>8} | {'images/s':>8} | {'ms/step':>8} | "
              f"{'speed-up/step':>13} | {'CPU ms/step':>11} | {'CPU speed-up':>12} |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    rows = ((name, base_times, b_med, b_step, b_cpu), ("ours, cached (static KV cache)", ours_times, o_med, o_step, o_cpu))
    for label, times, med, per_step, cpu in rows:
        runs = ", ".join(f"{t:.2f}" for t in times)
        print(f"| {label:34} | {runs:24} | {med:8.2f} | {args.batch / med:8.3f} | {per_step:8.2f} | "
              f"{b_step / per_step:12.1f}x | {cpu:11.2f} | {b_cpu / cpu:11.1f}x |")


if __name__ == "__main__":
    main()
