"""The ``hf-rq`` command line: generate, edit, reconstruct, convert, evaluate.

Exit codes: 0 success; 1 the command failed (unknown model or class, unreadable image, unwritable output,
...), with a one-line ``hf-rq <command>: error: ...`` on stderr; 2 bad command-line usage (argparse).
Set ``HF_RQ_DEBUG=1`` to get the full traceback instead of the one-line error.

Only the standard library is imported at module level, so ``--help`` does not wait for torch; each
sub-command imports what it needs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .cli_prompts import add_prompt_arguments, prompt_call_arguments, prompt_file_label, prompt_requests

DEFAULT_MODEL = "hf-rq/rq-emoji-64"
DEFAULT_CLASSIFIER = "hf-rq/emoji-classifier-64"  # == hf_rq.evaluation.DEFAULT_CLASSIFIER (not imported: slow)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class CLIError(Exception):
    """An error the user can fix; printed as one line, exit code 1."""


# ---------------------------------------------------------------------------------------------- helpers
def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _quiet_libraries(verbose: bool, data: bool = False) -> None:
    """diffusers/transformers (and datasets) log and draw bars while loading; keep the output to the command's own."""
    if verbose:
        return
    if data:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    import warnings

    warnings.filterwarnings("ignore")
    from diffusers.utils import logging as dlogging
    from transformers.utils import logging as tlogging

    dlogging.set_verbosity_error()
    tlogging.set_verbosity_error()
    # Loading bars ("Loading pipeline components", "Loading weights"); the sampling bar is the pipeline's own.
    dlogging.disable_progress_bar()
    tlogging.disable_progress_bar()


def _check_writable_dir(folder: Path, what: str) -> None:
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".hf-rq-write-test-"):
            pass
    except OSError as exc:
        raise CLIError(f"cannot write the {what} to {folder}: {exc.strerror or exc}") from None


def _prepare_output(path: str, what: str = "output") -> tuple[Path, bool]:
    """-> (path, is_file). A path with an image suffix is one file; anything else is a folder (created)."""
    out = Path(path)
    is_file = out.suffix.lower() in IMAGE_SUFFIXES
    if is_file:
        if out.is_dir():
            raise CLIError(f"--output {out} is an existing folder, not an image file")
        _check_writable_dir(out.parent if str(out.parent) else Path("."), what)
    else:
        if out.exists() and not out.is_dir():
            raise CLIError(f"--output {out} exists and is not a folder (give a folder, or a file ending in .png/.jpg)")
        _check_writable_dir(out, what)
    return out, is_file


def _prepare_json_output(path: str | None) -> Path | None:
    if path is None:
        return None
    out = Path(path)
    if out.is_dir():
        raise CLIError(f"--output {out} is a folder; give a .json file")
    _check_writable_dir(out.parent if str(out.parent) else Path("."), "metrics")
    return out


def _device(name: str | None):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise CLIError(f"unknown --device {name!r}: {_one_line(exc)}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda was asked for but CUDA is not available")
    return device


def _load(loader, what: str, name: str):
    """``loader(name)`` with its failures turned into one-line CLI errors."""
    from .hub import ModelNotFoundError

    try:
        return loader(name)
    except ModelNotFoundError as exc:
        raise CLIError(_one_line(exc)) from None
    except (OSError, ValueError) as exc:
        raise CLIError(f"could not load {what} {name!r}: {_one_line(exc)}") from None


def _load_pipeline(name: str, device):
    from .hub import load_pipeline

    return _load(load_pipeline, "model", name).to(device)


def _scalar_or_list(values):
    if values is None:
        return None
    return values[0] if len(values) == 1 else list(values)


def _sampling_overrides(args, pipe) -> dict:
    import inspect

    given = {"temperature": _scalar_or_list(args.temperature), "top_k": _scalar_or_list(args.top_k),
             "top_p": _scalar_or_list(args.top_p), "guidance_scale": args.guidance_scale}
    given = {k: v for k, v in given.items() if v is not None}
    accepted = inspect.signature(pipe.__call__).parameters
    for key in given:
        if key not in accepted:
            raise CLIError(f"--{key.replace('_', '-')} is not supported by {type(pipe).__name__}")
    return given


def _pipeline_classes(pipe) -> tuple[int, dict[int, str] | None]:
    config = pipe.transformer.config
    return int(getattr(config, "num_classes", 0) or 0), getattr(pipe, "id2label", None)


def _resolve_classes(pipe, class_args):
    """-> list of class ids to sample (None for an unconditional model)."""
    from .pipeline_utils import resolve_class_labels

    num_classes, names = _pipeline_classes(pipe)
    if not class_args:
        return list(range(num_classes)) if num_classes else None
    try:
        return resolve_class_labels(list(class_args), num_classes, names).tolist()
    except (ValueError, TypeError) as exc:
        raise CLIError(_one_line(exc)) from None


def _add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (default: the model's saved generation config)")
    g.add_argument("--temperature", type=float, nargs="+", metavar="T",
                   help="softmax temperature; several values = one per code depth (RQ)")
    g.add_argument("--top-k", type=int, nargs="+", metavar="K", help="keep the K most likely codes; per depth as above")
    g.add_argument("--top-p", type=float, nargs="+", metavar="P", help="nucleus sampling mass; per depth as above")
    g.add_argument("--guidance-scale", type=float, metavar="S", help="classifier-free guidance scale (models with a null class)")


def _batched(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


def _seed(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer seed, got {value!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer seed, got {n}")
    return n


# --------------------------------------------------------------------------------------------- generate
def cmd_generate(args) -> int:
    out, is_file = _prepare_output(args.output)
    _quiet_libraries(args.verbose)
    import torch

    from .image_processing import make_image_grid

    device = _device(args.device)
    pipe = _load_pipeline(args.model, device)
    overrides = _sampling_overrides(args, pipe)
    prompts = prompt_requests(pipe, args, CLIError)
    class_ids = None if prompts else _resolve_classes(pipe, args.class_labels)
    _, names = _pipeline_classes(pipe)
    generator = torch.Generator(device).manual_seed(args.seed)
    if prompts:
        requested = [p for p in prompts for _ in range(args.num_images)]
    elif class_ids is None:
        requested = [None] * args.num_images
    else:
        requested = [c for c in class_ids for _ in range(args.num_images)]
    batches = list(_batched(requested, args.batch_size))
    images = []
    for i, batch in enumerate(batches, start=1):
        pipe.set_progress_bar_config(desc=f"batch {i}/{len(batches)}", disable=args.quiet)
        try:
            if prompts:
                result = pipe(generator=generator, **prompt_call_arguments(batch, args), **overrides)
            elif batch[0] is None:
                result = pipe(num_images_per_prompt=len(batch), generator=generator, **overrides)
            else:
                result = pipe(class_labels=batch, generator=generator, **overrides)
        except (ValueError, TypeError) as exc:
            raise CLIError(_one_line(exc)) from None
        images.extend(result.images)

    def label(c):
        if isinstance(c, str):
            return prompt_file_label(c)
        return "sample" if c is None else (names or {}).get(c, f"class{c}")

    if is_file:
        if len(images) == 1:
            picture = images[0]
        else:
            if prompts and args.num_images > 1:
                rows = len(prompts)  # one row per prompt, one column per sample
            elif prompts:
                rows = 1
            elif class_ids is not None and args.num_images > 1:
                rows = len(class_ids)  # one row per class, one column per sample
            elif class_ids is not None:
                rows = 1  # one sample per class: a single row
            else:
                rows = max(1, round(len(images) ** 0.5))
            cols = -(-len(images) // rows)
            picture = make_image_grid(images + [images[0].copy().point(lambda _: 255)] * (rows * cols - len(images)), rows, cols)
        picture.save(out)
        print(f"wrote {out} ({len(images)} image{'s' * (len(images) > 1)})")
    else:
        for i, (image, c) in enumerate(zip(images, requested)):
            image.save(out / f"{i:04d}_{label(c)}.png")
        print(f"wrote {len(images)} images to {out}/")
    return 0


# ------------------------------------------------------------------------------------------ reconstruct
def _open_images(paths: list[str], size: int | None):
    import PIL.Image

    images = []
    for path in paths:
        if not os.path.isfile(path):
            raise CLIError(f"image file not found: {path}")
        try:
            with PIL.Image.open(path) as im:
                im.load()
                image = im.convert("RGB")
        except (PIL.UnidentifiedImageError, OSError, ValueError) as exc:
            raise CLIError(f"not a readable image file: {path} ({_one_line(exc)})") from None
        if size is not None and image.size != (size, size):
            image = image.resize((size, size), PIL.Image.BICUBIC)
        images.append(image)
    if size is None and len({im.size for im in images}) > 1:
        raise CLIError("the images differ in size; pass --size to resize them")
    return images


def _load_tokenizer(name: str, device):
    from .hub import load_tokenizer

    return _load(load_tokenizer, "tokenizer", name).to(device).eval()


def cmd_reconstruct(args) -> int:
    out, is_file = _prepare_output(args.output)
    images = _open_images(args.images, args.size)  # before loading the model: a bad file fails fast
    _quiet_libraries(args.verbose)
    from .evaluation.visualization import labeled_grid, reconstruction_columns

    device = _device(args.device)
    tokenizer = _load_tokenizer(args.model, device)
    if args.size is None:
        size = getattr(tokenizer.config, "sample_size", None)
        if size and images[0].size != (size, size):
            images = _open_images(args.images, size)
    try:
        titles, rows = reconstruction_columns(tokenizer, images)
    except (ValueError, TypeError) as exc:
        raise CLIError(_one_line(exc)) from None
    if is_file:
        labeled_grid(rows, titles).save(out)
        print(f"wrote {out} ({len(rows)} image{'s' * (len(rows) > 1)}, columns: {', '.join(titles)})")
    else:
        for path, row in zip(args.images, rows):
            target = out / f"{Path(path).stem}_reconstruction.png"
            labeled_grid([row], titles).save(target)
        print(f"wrote {len(rows)} comparison{'s' * (len(rows) > 1)} to {out}/ (columns: {', '.join(titles)})")
    return 0


# ----------------------------------------------------------------------------------------------- convert
def cmd_convert(args) -> int:
    from .convert import main as convert_main

    return convert_main(args.convert_args, prog="hf-rq convert")


class _Delegated(argparse.Namespace):
    """``hf-rq convert ...``: everything after the word goes to ``hf_rq.convert`` untouched (its own --help too)."""

    def __init__(self, rest: list[str]):
        super().__init__(command="convert", convert_args=rest, func=cmd_convert)


# ------------------------------------------------------------------------------------------------ parser
def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--verbose", action="store_true", help="show library warnings and logs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-rq",
        description="Autoregressive image generation over quantized tokens (RQ, DQ, CTF): sample, inspect, convert, evaluate.",
        epilog="Exit codes: 0 success, 1 the command failed (one-line error), 2 bad usage. HF_RQ_DEBUG=1 shows tracebacks.",
    )
    try:
        from importlib.metadata import version

        parser.add_argument("--version", action="version", version=f"hf-rq {version('hf-rq')}")
    except Exception:  # not installed as a distribution (e.g. run from a source tree)
        pass
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="sample images from a pipeline",
                       description="Sample class-conditional, text-conditional (--prompt) or unconditional images "
                                   "from an hf-rq pipeline.",
                       epilog="Examples: hf-rq generate --output out.png; "
                              "hf-rq generate --model hf-rq/rq-emoji-64-text --prompt \"grinning face\" --output face.png; "
                              "hf-rq generate --class animals_nature flags --num-images 4 --seed 1 --output samples/")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"pipeline folder, bundled name or Hub id (default: {DEFAULT_MODEL})")
    g.add_argument("--class", dest="class_labels", nargs="+", metavar="NAME_OR_ID",
                   help="class names or ids (default: every class of a class-conditional model)")
    g.add_argument("--num-images", type=_positive, default=1, metavar="N",
                   help="images per class (unconditional model: in total) (default: 1)")
    g.add_argument("--seed", type=_seed, default=0, help="random seed; the same seed gives the same images (default: 0)")
    g.add_argument("--batch-size", type=_positive, default=16, help="images sampled at once (default: 16)")
    add_prompt_arguments(g)
    _add_sampling_arguments(g)
    g.add_argument("--output", required=True, metavar="FILE_OR_DIR",
                   help="an image file (.png/.jpg: one image, or a grid: one row per class, one column per sample) or a folder "
                        "(one PNG per image)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_common(g)
    g.set_defaults(func=cmd_generate)

    from .cli_edit import add_edit_parser  # the edit command lives in its own module

    add_edit_parser(sub)

    r = sub.add_parser("reconstruct", help="round-trip images through a tokenizer, side by side",
                       description="Encode and decode images with a tokenizer and write side-by-side comparisons: RQ "
                                   "tokenizers show one column per code depth (coarse to fine), DQ tokenizers their "
                                   "granularity map.")
    r.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    r.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"tokenizer folder, or a pipeline whose tokenizer to use; bundled name or Hub id (default: {DEFAULT_MODEL})")
    r.add_argument("--size", type=_positive, default=None,
                   help="resize images to SIZE x SIZE first (default: the tokenizer's sample_size)")
    r.add_argument("--output", required=True, metavar="FILE_OR_DIR",
                   help="an image file (all rows in one picture) or a folder (one picture per image)")
    _add_common(r)
    r.set_defaults(func=cmd_reconstruct)

    c = sub.add_parser("convert", help="convert the authors' checkpoints (see hf-rq convert --help)", add_help=False,
                       description="Convert official checkpoints to save_pretrained folders (hf_rq.convert).")
    c.add_argument("convert_args", nargs=argparse.REMAINDER)

    from .cli_evaluate import add_evaluate_parser  # the evaluate commands live in their own module

    add_evaluate_parser(sub)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # argparse's REMAINDER does not capture leading options such as --help, so hand over before parsing.
    args = _Delegated(argv[1:]) if argv[:1] == ["convert"] else parser.parse_args(argv)
    name = args.command if args.command != "evaluate" else f"evaluate {args.what}"
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"hf-rq {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line, not a traceback: the CLI's contract (HF_RQ_DEBUG=1 shows it)
        if os.environ.get("HF_RQ_DEBUG"):
            raise
        message = _one_line(exc)
        if not isinstance(exc, CLIError):
            message = f"{type(exc).__name__}: {message}"
        print(f"hf-rq {name}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
