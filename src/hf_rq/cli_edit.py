"""``hf-rq edit``: inpainting, outpainting and variations of an image with any family's pipeline.

Registered by :func:`hf_rq.cli.build_parser`; shares its helpers (errors, devices, loading, sampling options).
"""

from __future__ import annotations

import inspect
import os

from .cli import (
    DEFAULT_MODEL,
    CLIError,
    _add_common,
    _add_sampling_arguments,
    _device,
    _load_pipeline,
    _one_line,
    _positive,
    _prepare_output,
    _quiet_libraries,
    _sampling_overrides,
    _seed,
)


def _open(path: str, what: str):
    import PIL.Image

    if not os.path.isfile(path):
        raise CLIError(f"{what} file not found: {path}")
    try:
        with PIL.Image.open(path) as im:
            im.load()
            return im.copy()
    except (PIL.UnidentifiedImageError, OSError, ValueError) as exc:
        raise CLIError(f"not a readable image file: {path} ({_one_line(exc)})") from None


def cmd_edit(args) -> int:
    out, is_file = _prepare_output(args.output)
    if not is_file:
        raise CLIError("--output must be an image file (.png/.jpg): the strip input | mask | edits")
    image = _open(args.image, "image").convert("RGB")  # before loading the model: a bad file fails fast
    mask = _open(args.mask, "mask") if args.mask else None
    outpaint = args.outpaint is not None or args.zoom_out is not None
    if outpaint and mask is not None:
        raise CLIError("--outpaint / --zoom-out make their own mask: do not pass --mask too")
    if mask is None and not outpaint and args.keep_depth is None and not args.keep_coarse_labels:
        raise CLIError("give --mask (white = regenerate), --outpaint/--zoom-out, --keep-depth or --keep-coarse-labels")
    _quiet_libraries(args.verbose)
    import PIL.Image
    import torch

    from .editing import outpaint_inputs
    from .evaluation.visualization import labeled_grid

    device = _device(args.device)
    pipe = _load_pipeline(args.model, device)
    pipe.set_progress_bar_config(disable=args.quiet)
    if not hasattr(pipe, "edit_image_size"):
        raise CLIError(f"{type(pipe).__name__} does not edit images")
    height, width = pipe.edit_image_size
    if image.size != (width, height):
        if not args.resize:
            raise CLIError(f"{args.image} is {image.width}x{image.height} but {args.model} works at {width}x{height}: "
                           "pass --resize, or resize it first")
        image = image.resize((width, height), PIL.Image.BICUBIC)
    if outpaint:
        dx, dy = args.outpaint or (0, 0)
        scale = args.zoom_out or 1.0
        if args.zoom_out is not None and args.outpaint is None:  # centre the shrunken image
            dx, dy = round(width * (1 - scale) / 2), round(height * (1 - scale) / 2)
        try:
            image, mask = outpaint_inputs(image, offset=(dx, dy), scale=scale)
        except ValueError as exc:
            raise CLIError(_one_line(exc)) from None
    kwargs = dict(image=image, mask_image=mask, num_images_per_prompt=args.num_images,
                  num_candidates=args.num_candidates, generator=torch.Generator(device).manual_seed(args.seed),
                  **_sampling_overrides(args, pipe))
    for flag, key, value in (("--keep-depth", "keep_depth", args.keep_depth),
                             ("--keep-coarse-labels", "keep_coarse_labels", args.keep_coarse_labels or None)):
        if value is not None:
            if key not in inspect.signature(pipe.__call__).parameters:
                raise CLIError(f"{flag} is not supported by {type(pipe).__name__}")
            kwargs[key] = value
    label = args.class_label
    if label is not None and label.isdigit():
        label = int(label)
    try:
        edits = pipe(label, **kwargs).images
    except (ValueError, TypeError) as exc:
        raise CLIError(_one_line(exc)) from None
    shown = mask.convert("L").resize((width, height), PIL.Image.NEAREST) if mask is not None else PIL.Image.new("L", (width, height), 255)
    titles = ["input", "mask"] + [f"edit {i + 1}" for i in range(len(edits))]
    labeled_grid([[image, shown.convert("RGB"), *edits]], titles).save(out)
    print(f"wrote {out} (input, mask, {len(edits)} edit{'s' * (len(edits) > 1)})")
    return 0


def add_edit_parser(sub) -> None:
    p = sub.add_parser(
        "edit", help="inpaint, outpaint or vary an image",
        description="Edit an image with a pipeline: regenerate where --mask is white (inpainting), around a shifted "
                    "or shrunken image (--outpaint / --zoom-out), or at the fine level only (--keep-depth for RQ, "
                    "--keep-coarse-labels for CTF). Writes one strip: input, mask, edits.",
        epilog="Example: hf-rq edit --model hf-rq/rq-emoji-64 --image in.png --mask mask.png --class animals_nature "
               "--output out.png")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"pipeline folder, bundled name or Hub id (default: {DEFAULT_MODEL})")
    p.add_argument("--image", required=True, help="the image to edit (the model's resolution, or pass --resize)")
    p.add_argument("--mask", help="mask image: white (>= 50%%) = regenerate, black = keep; any size with the image's aspect ratio")
    p.add_argument("--resize", action="store_true", help="resize the image to the model's resolution first")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--keep-depth", type=int, metavar="K", help="RQ: keep code depths 1..K, redraw the finer ones")
    kind.add_argument("--keep-coarse-labels", action="store_true",
                      help="CTF: keep the coarse-label map, redraw every fine code")
    p.add_argument("--outpaint", type=int, nargs=2, metavar=("DX", "DY"),
                   help="shift the image by DX, DY pixels and regenerate the uncovered border")
    p.add_argument("--zoom-out", type=float, metavar="SCALE", help="shrink the image by SCALE (< 1) and regenerate around it")
    p.add_argument("--class", dest="class_label", metavar="NAME_OR_ID", help="class of the edits (class-conditional models)")
    p.add_argument("--num-images", type=_positive, default=3, metavar="N", help="edits to make (default: 3)")
    p.add_argument("--num-candidates", type=_positive, default=1, metavar="N",
                   help="best-of-N per edit: keep the candidate under which the kept tokens are most likely (default: 1)")
    p.add_argument("--seed", type=_seed, default=0, help="random seed (default: 0)")
    _add_sampling_arguments(p)
    p.add_argument("--output", required=True, metavar="FILE", help="the strip (.png/.jpg)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_common(p)
    p.set_defaults(func=cmd_edit)


__all__ = ["add_edit_parser", "cmd_edit"]
