"""``hf-rq evaluate generation | reconstruction``: quality metrics of a generator or a tokenizer.

Registered by :func:`hf_rq.cli.build_parser`; shares its helpers (errors, devices, loading, sampling options).
The metrics themselves are the library's (:mod:`hf_rq.evaluation`); this module only reads arguments and prints.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .cli import (
    DEFAULT_CLASSIFIER,
    DEFAULT_MODEL,
    CLIError,
    _add_common,
    _add_sampling_arguments,
    _device,
    _load_pipeline,
    _load_tokenizer,
    _one_line,
    _positive,
    _prepare_json_output,
    _prepare_output,
    _quiet_libraries,
    _resolve_classes,
    _sampling_overrides,
    _seed,
)


def _print_metrics(metrics: dict) -> None:
    width = max(len(k) for k in metrics)
    for key, value in metrics.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k:<{width}}  {v:.4f}" if isinstance(v, float) else f"  {k:<{width}}  {v}")
        elif isinstance(value, float):
            print(f"{key:<{width}}  {value:.4f}")
        else:
            print(f"{key:<{width}}  {value}")


def _write_json(path: Path | None, metrics: dict) -> None:
    if path is not None:
        import json

        path.write_text(json.dumps(metrics, indent=2) + "\n")
        print(f"wrote {path}")


def _feature_setup(args):
    """-> (extractor or None for the classifier's own features, reference or None for the bundled one)."""
    from .evaluation import evaluator as ev

    extractor = None
    if args.features == "inception":
        from .evaluation.inception import InceptionWeightsNotFoundError

        try:
            extractor = ev.load_feature_extractor("inception", inception_weights=args.inception_weights,
                                                  allow_pickle=args.allow_pickle)
        except InceptionWeightsNotFoundError as exc:
            raise CLIError(_one_line(exc)) from None
        if args.reference is None:
            raise CLIError("--features inception needs --reference DIR (real images to compare with)")
    reference = None
    if args.reference is not None:
        data = _load_split(args.reference, args.reference_split)
        feats = extractor or ev.ClassifierFeatureExtractor(ev.load_classifier(args.classifier))
        labels = None
        if data.id2label is not None:  # in the classifier's ids, for --class-balance reference
            classifier_names = ev.load_classifier(args.classifier).id2label
            try:
                mapping = ev.map_classes_to_classifier(data.id2label, len(data.id2label), classifier_names)
                labels = [mapping[int(c)] for c in data.labels]
            except ValueError:
                labels = None
        reference = ev.reference_from_images(feats, data.images, labels,
                                             description=f"{args.reference} {args.reference_split} split ({len(data.images)} images)")
    return extractor, reference


def _load_split(folder: str, split: str | None, max_images: int | None = None, size: int | None = None):
    from .evaluation.data import load_imagefolder

    try:
        return load_imagefolder(folder, split, size=size, max_images=max_images)
    except (FileNotFoundError, ValueError) as exc:
        raise CLIError(_one_line(exc)) from None


def cmd_evaluate_generation(args) -> int:
    json_out = _prepare_json_output(args.output)
    if (args.model is None) == (args.images is None):
        raise CLIError("give either --model (sample and evaluate) or --images DIR (evaluate saved images)")
    _quiet_libraries(args.verbose, data=True)
    data = _load_split(args.images, args.split) if args.images is not None else None  # fail fast on a bad folder
    import torch

    from .evaluation import evaluator as ev

    try:
        classifier = ev.load_classifier(args.classifier)
    except OSError as exc:
        raise CLIError(f"could not load the classifier {args.classifier!r}: {_one_line(exc)}") from None
    extractor, reference = _feature_setup(args)
    if args.model is not None:
        device = _device(args.device)
        pipe = _load_pipeline(args.model, device)
        overrides = _sampling_overrides(args, pipe)
        class_ids = _resolve_classes(pipe, args.class_labels)
        if class_ids is None:
            raise CLIError(f"{args.model} is unconditional; class-consistency needs a class-conditional model")
        save_images = args.save_images is not None
        if save_images:
            save_dir, _ = _prepare_output(args.save_images, "images")
        try:
            metrics = ev.evaluate_pipeline(
                pipe, num_images_per_class=args.num_images_per_class, class_labels=class_ids,
                batch_size=args.batch_size, generator=torch.Generator(device).manual_seed(args.seed),
                classifier=classifier, extractor=extractor, reference=reference, return_images=save_images,
                progress=not args.quiet, class_balance=args.class_balance, **overrides)
        except (ValueError, TypeError) as exc:
            raise CLIError(_one_line(exc)) from None
        if save_images:
            names = classifier.id2label
            for i, (image, c) in enumerate(zip(metrics.pop("images"), metrics.pop("class_ids"))):
                folder = save_dir / (pipe.id2label or names).get(c, str(c))
                folder.mkdir(exist_ok=True)
                image.save(folder / f"{i:05d}.png")
        metrics = {"model": args.model, **metrics}
    else:
        class_ids = _map_folder_labels(ev, data, classifier) if data.id2label is not None else None
        try:
            metrics = ev.evaluate_images(data.images, class_ids, classifier=classifier, extractor=extractor,
                                         reference=reference, batch_size=args.batch_size)
        except (ValueError, TypeError) as exc:
            raise CLIError(_one_line(exc)) from None
        metrics = {"images": f"{args.images} ({args.split or 'all'})", **metrics}
    metrics["feature_space"] = "inception-v3 (2048-d)" if args.features == "inception" else f"{args.classifier} ({classifier.feature_dim}-d)"
    _print_metrics(metrics)
    _write_json(json_out, metrics)
    return 0


def _map_folder_labels(ev, data, classifier):
    import torch

    try:
        mapping = ev.map_classes_to_classifier(data.id2label, len(data.id2label), classifier.id2label)
    except ValueError as exc:
        raise CLIError(f"the image folder's class names do not match the classifier's: {_one_line(exc)}") from None
    return torch.tensor([mapping[int(c)] for c in data.labels])


def cmd_evaluate_reconstruction(args) -> int:
    json_out = _prepare_json_output(args.output)
    _quiet_libraries(args.verbose, data=True)
    from .evaluation import evaluator as ev

    device = _device(args.device)
    tokenizer = _load_tokenizer(args.model, device)
    size = args.size or getattr(tokenizer.config, "sample_size", None)
    data = _load_split(args.data, args.split, max_images=args.max_images, size=size)
    extractor = None
    if args.features == "inception":
        from .evaluation.inception import InceptionWeightsNotFoundError

        try:
            extractor = ev.load_feature_extractor("inception", inception_weights=args.inception_weights,
                                                  allow_pickle=args.allow_pickle, device=device)
        except InceptionWeightsNotFoundError as exc:
            raise CLIError(_one_line(exc)) from None
    elif args.features == "classifier":
        extractor = ev.load_feature_extractor("classifier", classifier=args.classifier, device=device)
    try:
        metrics = ev.evaluate_reconstruction(tokenizer, data.images, batch_size=args.batch_size, extractor=extractor,
                                             device=device)
    except (ValueError, TypeError) as exc:
        raise CLIError(_one_line(exc)) from None
    metrics = {"model": args.model, "data": f"{args.data} ({args.split})", **metrics}
    if extractor is not None:
        metrics["feature_space"] = "inception-v3 (2048-d)" if args.features == "inception" else args.classifier
    _print_metrics(metrics)
    _write_json(json_out, metrics)
    return 0


def _add_feature_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("feature space")
    g.add_argument("--classifier", default=DEFAULT_CLASSIFIER,
                   help=f"in-domain classifier (class-consistency; default feature space) (default: {DEFAULT_CLASSIFIER})")
    g.add_argument("--features", choices=("classifier", "inception"), default="classifier",
                   help="feature space of FID/KID/precision/recall (inception needs its weights locally)")
    g.add_argument("--inception-weights", metavar="PATH",
                   help="FID Inception-v3 weights (torch-fidelity or pytorch-fid file; default: search the torch hub cache)")
    g.add_argument("--allow-pickle", action="store_true", help="allow reading .pth weights (torch.load(weights_only=True))")


def add_evaluate_parser(sub) -> None:
    e = sub.add_parser("evaluate", help="quality metrics of a generator or a tokenizer",
                       description="Quality metrics: 'generation' (class-consistency, FID/KID/precision/recall/IS of "
                                   "samples) or 'reconstruction' (PSNR, SSIM, rFID, codebook usage of a tokenizer).")
    esub = e.add_subparsers(dest="what", required=True, metavar="WHAT")

    eg = esub.add_parser("generation", help="class-consistency and FID/KID/precision/recall of samples",
                         description="Sample every class of a class-conditional pipeline (or read saved images from an "
                                     "imagefolder) and measure class-consistency with the in-domain classifier and "
                                     "FID/KID/precision/recall/IS in its feature space against the emoji test split "
                                     "(stored with the classifier), or against --reference images.")
    eg.add_argument("--model", default=None, help=f"pipeline to sample (e.g. {DEFAULT_MODEL})")
    eg.add_argument("--images", metavar="DIR", help="evaluate saved images instead: an imagefolder (class sub-folders named as the classifier's classes)")
    eg.add_argument("--split", default=None, help="split of --images (default: test, else the only one)")
    eg.add_argument("--class", dest="class_labels", nargs="+", metavar="NAME_OR_ID", help="classes to sample (default: all)")
    eg.add_argument("--num-images-per-class", type=_positive, default=20, metavar="N",
                    help="samples per class on average: N x classes in all (default: 20)")
    eg.add_argument("--class-balance", choices=("reference", "uniform"), default="reference",
                    help="split the samples over the classes as the reference images are (default), or evenly")
    eg.add_argument("--batch-size", type=_positive, default=16, help="(default: 16)")
    eg.add_argument("--seed", type=_seed, default=0, help="(default: 0)")
    _add_sampling_arguments(eg)
    _add_feature_arguments(eg)
    eg.add_argument("--reference", metavar="DIR", help="real images (imagefolder) to compare with (default: the classifier's stored test-split features)")
    eg.add_argument("--reference-split", default="test", help="(default: test)")
    eg.add_argument("--save-images", metavar="DIR", help="also save the samples, one sub-folder per class")
    eg.add_argument("--output", metavar="JSON", help="write the metrics to this JSON file")
    eg.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_common(eg)
    eg.set_defaults(func=cmd_evaluate_generation)

    er = esub.add_parser("reconstruction", help="PSNR, SSIM, rFID, codebook usage of a tokenizer",
                         description="Round-trip an imagefolder split through a tokenizer: PSNR, SSIM, rFID/rKID "
                                     "(classifier or Inception features), codebook usage and perplexity (per depth for RQ).")
    er.add_argument("--model", required=True, help="tokenizer folder, or a pipeline whose tokenizer to use")
    er.add_argument("--data", required=True, metavar="DIR", help="imagefolder of real images")
    er.add_argument("--split", default="test", help="(default: test)")
    er.add_argument("--max-images", type=_positive, default=None, metavar="N")
    er.add_argument("--size", type=_positive, default=None, help="resize to SIZE x SIZE (default: the tokenizer's sample_size)")
    er.add_argument("--batch-size", type=_positive, default=32, help="(default: 32)")
    _add_feature_arguments(er)
    er.set_defaults(features="classifier")
    er.add_argument("--no-rfid", dest="features", action="store_const", const=None, help="skip rFID/rKID")
    er.add_argument("--output", metavar="JSON", help="write the metrics to this JSON file")
    _add_common(er)
    er.set_defaults(func=cmd_evaluate_reconstruction)
