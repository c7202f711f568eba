"""Pictures for reading a tokenizer: side-by-side reconstructions, RQ depth by depth, DQ granularity overlays."""

from __future__ import annotations

import inspect

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import torch

from ..image_processing import postprocess_images, preprocess_images

FINE_TINT = (230, 40, 40)


def granularity_overlay(image: PIL.Image.Image, granularity: torch.Tensor, alpha: float = 0.35) -> PIL.Image.Image:
    """Tint the regions a dynamic tokenizer (DQ-VAE) coded finely and outline every coarse region.

    Args:
        image: the (reconstructed) image, ``H x W``.
        granularity (`torch.LongTensor` of shape `(h, w)`): 0 = coarse, 1 = fine (values > 0 count as finer),
            one entry per coarse region; ``H`` and ``W`` must be multiples of ``h`` and ``w``.
    """
    g = torch.as_tensor(granularity)
    if g.ndim != 2:
        raise ValueError(f"granularity must be a 2-D map (h, w), got shape {tuple(g.shape)}")
    w_img, h_img = image.size
    h, w = g.shape
    if h_img % h or w_img % w:
        raise ValueError(f"image size {h_img}x{w_img} is not a multiple of the granularity map {h}x{w}")
    cell_h, cell_w = h_img // h, w_img // w
    levels = g.float() / max(int(g.max()), 1)
    mask = np.kron(levels.cpu().numpy(), np.ones((cell_h, cell_w)))[..., None] * alpha
    array = np.asarray(image.convert("RGB"), dtype=np.float64)
    array = array * (1 - mask) + np.asarray(FINE_TINT, dtype=np.float64) * mask
    out = PIL.Image.fromarray(array.round().clip(0, 255).astype(np.uint8))
    draw = PIL.ImageDraw.Draw(out)
    for i in range(1, h):
        draw.line([(0, i * cell_h), (w_img, i * cell_h)], fill=(128, 128, 128))
    for j in range(1, w):
        draw.line([(j * cell_w, 0), (j * cell_w, h_img)], fill=(128, 128, 128))
    return out


def _decode_codes_has_depth(tokenizer) -> bool:
    fn = getattr(tokenizer, "decode_codes", None)
    depth = getattr(tokenizer.config, "code_depth", 1)
    return fn is not None and "depth" in inspect.signature(fn).parameters and depth > 1


@torch.no_grad()
def reconstruction_columns(tokenizer, images: list[PIL.Image.Image]) -> tuple[list[str], list[list[PIL.Image.Image]]]:
    """Round-trip ``images`` through ``tokenizer``; returns column titles and one row of PIL images per input.

    Columns: the input, then for a residual tokenizer (``decode_codes(codes, depth=d)``, RQ-VAE) the
    reconstruction from the first ``d`` code levels for every ``d`` (coarse to fine, the last one is the
    full reconstruction); otherwise the reconstruction, plus the granularity overlay when the tokenizer
    returns a granularity map (DQ-VAE).
    """
    device = next(tokenizer.parameters()).device
    x = preprocess_images(images).to(device)
    tokenizer.eval()
    columns = [images]
    if _decode_codes_has_depth(tokenizer):
        depth = tokenizer.config.code_depth
        codes = tokenizer.encode(x, return_codes=True).codes
        titles = ["input"] + [f"depth {d}" if d < depth else f"depth {d} (full)" for d in range(1, depth + 1)]
        for d in range(1, depth + 1):
            columns.append(postprocess_images(tokenizer.decode_codes(codes, depth=d).sample, "pil"))
    else:
        out = tokenizer(x)
        titles = ["input", "decoded"]  # 64 px columns: short titles
        recon = postprocess_images(out.sample, "pil")
        columns.append(recon)
        granularity = getattr(out, "granularity", None)
        if granularity is not None:
            titles.append("red: fine")
            columns.append([granularity_overlay(im, g) for im, g in zip(recon, granularity)])
    rows = [list(r) for r in zip(*columns)]
    return titles, rows


def labeled_grid(rows: list[list[PIL.Image.Image]], titles: list[str] | None = None, pad: int = 2,
                 header: int = 14) -> PIL.Image.Image:
    """Paste rows of equally sized images into one picture, with a title above each column."""
    if not rows or not rows[0]:
        raise ValueError("labeled_grid needs at least one image")
    w, h = rows[0][0].size
    cols = max(len(r) for r in rows)
    top = header if titles else 0
    canvas = PIL.Image.new("RGB", (cols * w + (cols - 1) * pad, top + len(rows) * h + (len(rows) - 1) * pad), "white")
    if titles:
        draw = PIL.ImageDraw.Draw(canvas)
        font = PIL.ImageFont.load_default()
        for j, title in enumerate(titles):
            # Shorten titles that do not fit their column (64 px columns are narrow).
            text = title
            while text and draw.textlength(text, font=font) > w:
                text = text[:-1]
            draw.text((j * (w + pad), 1), text, fill=(0, 0, 0), font=font)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            canvas.paste(image.convert("RGB"), (j * (w + pad), top + i * (h + pad)))
    return canvas
