"""Claim 3, CTF (Guo et al. 2025): at a fixed autoregressive model size and codebook, predicting coarse labels
(k-means clusters of the codebook) and then the fine codes gives better samples than predicting the fine codes
directly, and samples no slower; the paper's ablation varies the number of clusters.

One LlamaGen VQ tokenizer (codebook 4096 by default, so that many codes are near-duplicates and clustering has
something to merge) is trained once per output directory by ``training/train_tokenizer.py --model llamagen-vq``
and shared by every prior, so all of them model the same codes. Then, per seed, ``training/train_prior.py``
trains a LlamaGen GPT (``--model llamagen``: next-code prediction over the whole codebook) and CTF priors
(``--model ctf``) at each ``--clusters`` count, whose stage-1 GPT has the GPT's architecture (hidden size,
layers, heads) and whose stage-2 auxiliary model is reported separately. Same data, steps, batch and learning
rate for all.

Each prior is scored by ``hf_rq.evaluation.evaluate_pipeline`` on the same number of samples, split over the
classes in the evaluation split's proportions and drawn from the same generator seed: FID, KID,
precision/recall and class-consistency in the bundled classifier's feature space, against that split's images.
Its images/s (sampling and decoding) is measured in the same process, and the speed column is each prior's
img/s over the GPT's of the same seed. Every prior samples with its model's default settings (the papers':
LlamaGen CFG 2.0, temperature 1.0; CTF CFG 2.0, tau1 = tau2 = 1.1), unless ``--guidance_scale`` overrides both.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from .common import (add_common_arguments, cached_run, check_common_arguments, format_table, load_training_script,
                     metric_cell, plot_points, resolve_device, save_outputs, summarize)

# On a shared CPU, spinning OpenMP waits distort img/s (see benchmarks/bench_ctf_sampling.py); only effective
# when this module is imported before torch, as reproduce_claims.py does.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# 64x64 -> 8x8 codes (64 tokens per image). Quick: narrow, short-trained; full: the bundled ctf-emoji-64
# tokenizer's shape with a 4x larger codebook.
TOKENIZER_QUICK = {"block_out_channels": [16, 32, 32, 64], "layers_per_block": 1, "latent_channels": 32,
                   "embed_dim": 8, "norm_num_groups": 8}
TOKENIZER_FULL = {"block_out_channels": [32, 64, 128, 128], "layers_per_block": 1, "latent_channels": 64,
                  "embed_dim": 8, "norm_num_groups": 32}
# The AR size (the GPT, and CTF's stage 1) and CTF's stage-2 auxiliary model. The paper's auxiliary model is
# as large as or larger than the AR model; here it has the AR model's size.
AR_QUICK = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "multiple_of": 32}
AR_FULL = {"hidden_size": 256, "num_hidden_layers": 8, "num_attention_heads": 8, "multiple_of": 64}
CLUSTERS = "32,128,512"
METRICS = ("fid", "kid_mean", "precision", "recall", "class_consistency", "images_per_second", "speed_vs_gpt")


def parse_clusters(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--clusters is a comma-separated list of integers, got {text!r}") from None
    if not values or any(v < 2 for v in values) or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"--clusters: distinct cluster counts >= 2, got {text!r}")
    return values


def json_or_file(text: str) -> dict:
    try:
        value = json.loads(Path(text).read_text() if os.path.isfile(text) else text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not a JSON object or a JSON file: {text!r} ({exc.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def common_train_argv(args, steps: int, batch: int, lr: float, seed: int, output_dir: Path) -> list[str]:
    return ["--train_data_dir", str(args.data), "--resolution", str(args.resolution), "--random_flip",
            "--train_batch_size", str(batch), "--learning_rate", str(lr), "--max_train_steps", str(steps),
            "--seed", str(seed), "--checkpointing_steps", str(steps), "--checkpoints_total_limit", "1",
            "--validation_steps", str(steps + 1), "--report_to", "none", "--output_dir", str(output_dir)]


def tokenizer_argv(args, output_dir: Path) -> list[str]:
    config = {**args.tokenizer_arch, "codebook_size": args.codebook_size}
    # No LPIPS (no VGG weights offline) and no GAN: a tokenizer good enough to tell the priors apart, not to
    # win on reconstruction; seed 0 whatever --seeds, since every prior of every seed shares it.
    return ["--model", "llamagen-vq", "--model_config", json.dumps(config), "--perceptual_weight", "0",
            "--disc_weight", "0", *common_train_argv(args, args.tokenizer_steps, args.tokenizer_batch_size,
                                                     args.tokenizer_learning_rate, 0, output_dir)]


def prior_argv(args, tokenizer_dir: Path, clusters: int | None, seed: int, output_dir: Path) -> list[str]:
    if clusters is None:
        model, config = "llamagen", dict(args.ar_arch)
        extra = []
    else:
        model, config = "ctf", {"coarse_config": args.ar_arch, "fine_config": args.aux_arch}
        extra = ["--num_clusters", str(clusters)]
    return ["--model", model, "--tokenizer_name_or_path", str(tokenizer_dir), "--model_config", json.dumps(config),
            *extra, "--code_cache_dir", str(Path(args.output_dir) / "code_cache"),
            "--lr_warmup_steps", str(min(100, args.steps // 10)), "--num_validation_images", "0",
            *common_train_argv(args, args.steps, args.batch_size, args.learning_rate, seed, output_dir)]


def train_tokenizer(args, out_root: Path, test) -> dict:
    """The shared tokenizer, trained once and reused while its arguments are unchanged."""
    from hf_rq.ctf.tokenizer import LlamaGenVQModel
    from hf_rq.training.code_cache import tokenizer_fingerprint

    tok_dir = out_root / "tokenizer"
    argv = tokenizer_argv(args, tok_dir)
    cached = cached_run(tok_dir / "claim_result.json", argv, len(test.images))
    if cached is not None:
        print(f"tokenizer: reused {tok_dir}", flush=True)
        return cached
    print(f"tokenizer: training LlamaGen VQ ({args.codebook_size} codes) for {args.tokenizer_steps} steps", flush=True)
    t0 = time.time()
    load_training_script("train_tokenizer").main(argv)
    model = LlamaGenVQModel.from_pretrained(tok_dir)
    result = {"path": str(tok_dir), "train_argv": argv, "test_images": len(test.images),
              "fingerprint": tokenizer_fingerprint(model), "train_seconds": round(time.time() - t0, 1),
              "parameters": sum(p.numel() for p in model.parameters())}
    (tok_dir / "claim_result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def score_tokenizer(args, tokenizer: dict, test, class_ids, classifier, reference, device) -> dict:
    """PSNR and codebook usage of the shared tokenizer, and the generation metrics of its reconstructions of the
    evaluation split: about what a perfect prior over its codes would score, the reference for every prior."""
    import torch

    from hf_rq.ctf.tokenizer import LlamaGenVQModel
    from hf_rq.evaluation import evaluator as ev

    model = LlamaGenVQModel.from_pretrained(tokenizer["path"]).to(device).eval()
    metrics = ev.evaluate_reconstruction(model, test, batch_size=args.eval_batch_size, extractor=None, device=device)
    with torch.no_grad():
        recon = torch.cat([(model(x.to(device).float() / 255 * 2 - 1).sample.float().cpu().clamp(-1, 1) + 1) / 2
                           for x in test.images.split(args.eval_batch_size)])
    metrics.update({f"recon_{k}": v for k, v in ev.evaluate_images(recon, class_ids, classifier=classifier,
                                                                    reference=reference).items()})
    tokenizer["metrics"] = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    m = tokenizer["metrics"]
    print(f"    PSNR {m['psnr']:.2f}  codebook usage {m['codebook_usage']:.3f}  reconstructions: FID "
          f"{m['recon_fid']:.2f}, class-consistency {m['recon_class_consistency']:.3f}", flush=True)
    return tokenizer


def config_name(clusters: int | None) -> str:
    return "gpt" if clusters is None else f"ctf-{clusters}"


def run(args) -> dict:
    import torch

    from hf_rq.ctf.pipeline import CTFPipeline, LlamaGenPipeline
    from hf_rq.evaluation import evaluator as ev
    from hf_rq.evaluation.data import load_imagefolder

    device = resolve_device(args.device)
    out_root = Path(args.output_dir)
    out_root.mkdir(parents=True, exist_ok=True)
    test = load_imagefolder(args.data, args.split, size=args.resolution, max_images=args.max_test_images)
    if test.labels is None:
        raise SystemExit(f"--data {args.data}: the {args.split} split has no class folders; the priors are "
                         "class-conditional and class-consistency needs labels")
    classifier = ev.load_classifier(args.classifier, device=device)
    # The reference is the evaluation split itself (features and labels in the classifier's ids), so the
    # samples' class proportions follow it and --data / --max_test_images change both sides alike.
    to_clf = ev.map_classes_to_classifier(test.id2label, len(test.id2label), classifier.id2label)
    class_ids = [to_clf[int(c)] for c in test.labels]
    reference = ev.reference_from_images(ev.ClassifierFeatureExtractor(classifier), test.images, class_ids,
                                         batch_size=args.eval_batch_size,
                                         description=f"{args.data} {args.split} split ({len(test.images)} images)")
    tokenizer = train_tokenizer(args, out_root, test)
    tokenizer = score_tokenizer(args, tokenizer, test, class_ids, classifier, reference, device)
    train = load_training_script("train_prior")
    sampling = {} if args.guidance_scale is None else {"guidance_scale": args.guidance_scale}
    evaluation = {"images_per_class": args.images_per_class, "sample_batch_size": args.sample_batch_size,
                  "sample_seed": args.sample_seed, "sampling": sampling}

    runs = []
    configs = [None, *args.clusters]
    # Seed-major, outputs rewritten after every run: a benchmark stopped early still has every configuration.
    plan = [(clusters, seed) for seed in range(args.seeds) for clusters in configs]
    start = time.time()
    for i, (clusters, seed) in enumerate(plan):
        name = config_name(clusters)
        run_dir = out_root / f"{name}-seed{seed}"
        argv = prior_argv(args, Path(tokenizer["path"]), clusters, seed, run_dir)
        result_file = run_dir / "claim_result.json"
        cached = cached_run(result_file, argv, len(test.images))
        if cached is not None and cached.get("tokenizer") != tokenizer["fingerprint"]:
            cached = None  # the tokenizer was retrained under the same path: other codes, so train again
        if cached is not None and cached.get("evaluation") == evaluation:
            runs.append(cached)
            print(f"[{i + 1}/{len(plan)}] {name} seed {seed}: reused {result_file}", flush=True)
            continue
        if cached is not None:  # same training, other sampling settings: only the evaluation is redone
            train_seconds = cached["train_seconds"]
            print(f"[{i + 1}/{len(plan)}] {name} seed {seed}: re-evaluating {run_dir}", flush=True)
        else:
            print(f"[{i + 1}/{len(plan)}] {name} seed {seed}: training {args.steps} steps "
                  f"({time.time() - start:.0f} s elapsed)", flush=True)
            t0 = time.time()
            train.main(argv)
            train_seconds = round(time.time() - t0, 1)
        pipe = (LlamaGenPipeline if clusters is None else CTFPipeline).from_pretrained(run_dir).to(device)
        prior = pipe.transformer
        if clusters is None:
            ar_params, aux_params = sum(p.numel() for p in prior.parameters()), 0
        else:
            ar_params = sum(p.numel() for p in prior.coarse_model.parameters())
            aux_params = sum(p.numel() for p in prior.fine_model.parameters())
        metrics = ev.evaluate_pipeline(pipe, num_images_per_class=args.images_per_class,
                                       batch_size=args.sample_batch_size,
                                       generator=torch.Generator(device).manual_seed(args.sample_seed),
                                       classifier=classifier, reference=reference, progress=False, **sampling)
        result = {"config": name, "model": "llamagen" if clusters is None else "ctf", "num_clusters": clusters,
                  "seed": seed, "tokenizer": tokenizer["fingerprint"], "ar_parameters": ar_params, "aux_parameters": aux_params,
                  "sampling_defaults": {k: v for k, v in prior.generation_config.to_dict().items()
                                        if k in prior._GENERATE_ARGS and v is not None},
                  "train_seconds": train_seconds, "test_images": len(test.images), "train_argv": argv,
                  "evaluation": evaluation,
                  "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
        result_file.write_text(json.dumps(result, indent=2) + "\n")
        runs.append(result)
        print(f"    FID {metrics['fid']:.2f}  class-consistency {metrics['class_consistency']:.3f}  "
              f"{metrics['images_per_second']:.1f} img/s  ({train_seconds:.0f} s training)", flush=True)
        write_outputs(args, tokenizer, runs, out_root, len(test.images), final=False)
    return write_outputs(args, tokenizer, runs, out_root, len(test.images), final=True)


def add_speed_ratios(runs: list[dict]) -> None:
    """img/s over the GPT's of the same seed: both timed in this process, so machine load mostly cancels."""
    gpt = {r["seed"]: r["metrics"]["images_per_second"] for r in runs if r["num_clusters"] is None}
    for r in runs:
        if r["seed"] in gpt:
            r["metrics"]["speed_vs_gpt"] = r["metrics"]["images_per_second"] / gpt[r["seed"]]


def table(rows: list[dict], tokenizer_metrics: dict) -> str:
    header = ["config", "clusters", "AR params", "aux params", "seeds", "FID", "KID", "precision", "recall",
              "class-cons.", "img/s", "speed vs GPT"]
    lines = []
    for r in rows:
        lines.append([r["config"], str(r["num_clusters"] or "-"), f"{r['ar_parameters'] / 1e3:.0f}K",
                      f"{r['aux_parameters'] / 1e3:.0f}K" if r["aux_parameters"] else "-", str(len(r["seeds"])),
                      metric_cell(r, "fid", "{:.2f}"), metric_cell(r, "kid_mean", "{:.3f}"),
                      metric_cell(r, "precision", "{:.3f}"), metric_cell(r, "recall", "{:.3f}"),
                      metric_cell(r, "class_consistency", "{:.3f}"), metric_cell(r, "images_per_second", "{:.1f}"),
                      metric_cell(r, "speed_vs_gpt", "{:.2f}")])
    m = tokenizer_metrics  # the reference: the tokenizer's own reconstructions of the evaluation images
    lines.append(["(tokenizer recon.)", "-", "-", "-", "-", f"{m['recon_fid']:.2f}", f"{m['recon_kid_mean']:.3f}",
                  f"{m['recon_precision']:.3f}", f"{m['recon_recall']:.3f}", f"{m['recon_class_consistency']:.3f}",
                  "-", "-"])
    return format_table(header, lines)


def write_outputs(args, tokenizer: dict, runs: list[dict], out_root: Path, num_test: int, final: bool) -> dict:
    order = [config_name(c) for c in [None, *args.clusters]]
    runs = sorted(runs, key=lambda r: (order.index(r["config"]), r["seed"]))
    add_speed_ratios(runs)
    rows = summarize(runs, ("config", "model", "num_clusters", "ar_parameters", "aux_parameters"), METRICS)
    text = table(rows, tokenizer["metrics"])
    mode = "quick" if args.quick else "full"
    tm = tokenizer["metrics"]
    n_samples = runs[0]["metrics"].get("num_generated", "?") if runs else "?"
    title = (f"CTF vs LlamaGen GPT ({mode}: {args.steps} steps, batch {args.batch_size}, {args.seeds} seed(s), "
             f"{n_samples} samples vs {num_test} {args.split} images)")
    tok_line = (f"shared tokenizer: LlamaGen VQ, {args.codebook_size} codes, {args.tokenizer_steps} steps, "
                f"PSNR {tm['psnr']:.2f} dB, codebook usage {tm['codebook_usage']:.3f}")
    # The GPT sits at K = V (every code its own cluster: direct prediction is the limit of the ablation).
    points = [((r["num_clusters"] or args.codebook_size), r.get("fid_mean", float("nan")),
               r.get("fid_std", float("nan")), f"CTF K={r['num_clusters']}" if r["num_clusters"]
               else "GPT, K=V") for r in rows]
    ctf_points = [i for i, r in enumerate(rows) if r["num_clusters"]]
    extra = {"learning_rate": args.learning_rate, "ar_architecture": args.ar_arch, "aux_architecture": args.aux_arch,
             "tokenizer_architecture": args.tokenizer_arch, "tokenizer": tokenizer}
    xlabel = f"coarse labels K (log scale; the GPT at K = V = {args.codebook_size})"
    return save_outputs(args, "ctf", out_root, title, tok_line + "\n" + text, rows, runs, extra, "fid_vs_clusters.png",
                        lambda path: plot_points(points, path, title, xlabel, "FID (classifier features)",
                                                 series={"ctf": ctf_points}), final)


def add_parser(sub) -> None:
    p = sub.add_parser("ctf", help="CTF coarse-then-fine prediction vs a LlamaGen GPT of the same AR size, "
                                   "and the cluster-count ablation")
    add_common_arguments(p, "runs/claims/ctf")
    p.add_argument("--clusters", type=parse_clusters, default=None, help=f"CTF cluster counts (default: {CLUSTERS})")
    p.add_argument("--quick", action="store_true",
                   help="narrow tokenizer and priors, 400 steps (about 20 min for 3 seeds on 2 free CPU cores)")
    p.add_argument("--steps", type=int, default=None, help="prior training steps (default: 400 quick, 5000 full)")
    p.add_argument("--batch_size", type=int, default=None, help="prior training batch (default: 32 quick, 64 full)")
    p.add_argument("--learning_rate", type=float, default=None,
                   help="prior learning rate (default: 1e-3 quick, for the tiny priors' few steps; 3e-4 full)")
    p.add_argument("--ar_config", type=json_or_file, default=None,
                   help="AR size overrides (JSON or file: hidden_size, num_hidden_layers, ...): the GPT and CTF stage 1")
    p.add_argument("--aux_config", type=json_or_file, default=None,
                   help="CTF stage-2 size (default: the AR size)")
    g = p.add_argument_group("shared tokenizer")
    g.add_argument("--codebook_size", type=int, default=4096, help="(default: 4096)")
    g.add_argument("--tokenizer_steps", type=int, default=None, help="(default: 400 quick, 5000 full)")
    g.add_argument("--tokenizer_batch_size", type=int, default=16)
    g.add_argument("--tokenizer_learning_rate", type=float, default=4e-4)
    g.add_argument("--tokenizer_config", type=json_or_file, default=None,
                   help="tokenizer architecture overrides (codebook_size comes from --codebook_size)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--images_per_class", type=int, default=None,
                   help="samples = this x classes, split in the evaluation split's class proportions "
                        "(default: 20 quick, 100 full)")
    g.add_argument("--sample_batch_size", type=int, default=64)
    g.add_argument("--sample_seed", type=int, default=0, help="generator seed of every prior's samples")
    g.add_argument("--guidance_scale", type=float, default=None,
                   help="CFG scale for every prior (default: each model's own, 2.0 for both)")


def main(parser, args) -> dict:
    args.clusters = args.clusters or parse_clusters(CLUSTERS)
    args.steps = args.steps or (400 if args.quick else 5000)
    args.learning_rate = args.learning_rate or (1e-3 if args.quick else 3e-4)
    args.batch_size = args.batch_size or (32 if args.quick else 64)
    args.tokenizer_steps = args.tokenizer_steps or (400 if args.quick else 5000)
    args.images_per_class = args.images_per_class or (20 if args.quick else 100)
    args.tokenizer_arch = {**(TOKENIZER_QUICK if args.quick else TOKENIZER_FULL), **(args.tokenizer_config or {})}
    args.tokenizer_arch.pop("codebook_size", None)
    args.ar_arch = {**(AR_QUICK if args.quick else AR_FULL), **(args.ar_config or {})}
    args.aux_arch = {**args.ar_arch, **(args.aux_config or {})}
    # Argument-only checks first: they must not depend on whether the data folder exists on this machine.
    if args.classifier == "none":
        parser.error("--classifier none: the CTF claim is scored by the classifier (FID space and class-consistency)")
    if max(args.clusters) >= args.codebook_size:
        parser.error(f"--clusters must be below --codebook_size ({args.codebook_size}), got {max(args.clusters)}")
    for name in ("tokenizer_steps", "images_per_class", "sample_batch_size", "tokenizer_batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be positive")
    check_common_arguments(parser, args)
    return run(args)
