"""Image editing shared by every family: inputs, mask -> token grid, outpainting canvases, best-of-n choice.

The pipelines take diffusers' inpainting convention: ``image`` plus ``mask_image``, **white = regenerate**.
What the families do with it differs (RQ keeps depths, DQ keeps regions of its granularity map, CTF keeps
coarse labels), but turning user images and masks into tensors, and a pixel mask into a token mask, is the
same and lives here once.

How a mask becomes a token mask (:func:`mask_to_token_grid`): the mask is thresholded at 0.5 at its own
resolution (values ``>= 0.5`` are white), then a token is regenerated when **any** white pixel falls in its
cell, the token's ``f x f`` pixel footprint (``f`` = the tokenizer's downsampling factor), scaled to the mask's
size. So a mask of any size with the image's aspect ratio works, and a one-pixel stroke still regenerates the
tokens under it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from .image_processing import preprocess_images
from .sampling_args import check_generator

MASK_THRESHOLD = 0.5


@dataclass
class EditInputs:
    """Validated editing inputs, one row per image of the output batch.

    Args:
        pixels (`torch.Tensor` of shape `(B, 3, H, W)`): the images in [-1, 1].
        token_mask (`torch.BoolTensor` of shape `(B, h, w)`, *optional*): True where a token is regenerated;
            None when no ``mask_image`` was given.
        class_labels (`torch.LongTensor` of shape `(B,)`, *optional*): one class id per row (None: unconditional).
        generator: the pipeline's generator; a per-image list is expanded to one entry per row (each output
            image's candidates share its generator, drawn in row order, so an output depends on its own only).
    """

    pixels: torch.Tensor
    token_mask: torch.BoolTensor | None
    class_labels: torch.LongTensor | None
    generator: torch.Generator | list[torch.Generator] | None = None

    @property
    def batch_size(self) -> int:
        return self.pixels.shape[0]


def load_image(image, height: int, width: int) -> torch.Tensor:
    """``image`` (PIL / list of PIL / numpy `(H, W, 3)` or `(B, H, W, 3)` / torch `(3, H, W)` or `(B, 3, H, W)`,
    values in [0, 1] or uint8) -> `(B, 3, height, width)` in [-1, 1]. The size must be the tokenizer's: a prior
    has a fixed token grid, so an image of another size is an error rather than a silent resize."""
    if isinstance(image, (str, bytes)):
        raise TypeError("image must be a PIL image, a numpy array or a tensor, not a path (open it with PIL first)")
    pixels = preprocess_images(image)
    if tuple(pixels.shape[-2:]) != (height, width):
        raise ValueError(
            f"image is {pixels.shape[-1]}x{pixels.shape[-2]} (width x height) but this pipeline's tokenizer and prior "
            f"work at {width}x{height}; resize or crop it first"
        )
    return pixels


def _mask_array(mask_image) -> torch.Tensor:
    """Any accepted mask form -> float `(B, h, w)` in [0, 1] (not yet thresholded)."""
    if isinstance(mask_image, PIL.Image.Image):
        mask_image = [mask_image]
    if isinstance(mask_image, (list, tuple)):
        if not mask_image or not all(isinstance(m, PIL.Image.Image) for m in mask_image):
            raise TypeError("a list passed as mask_image must be a non-empty list of PIL images")
        arrays = []
        for m in mask_image:
            if m.mode in ("1", "L", "I", "F"):
                arrays.append(np.asarray(m.convert("F"), dtype=np.float32)[..., None] / (1.0 if m.mode == "1" else 255.0))
            else:
                if m.mode not in ("RGB", "RGBA", "LA"):
                    raise ValueError(f"mask_image has PIL mode {m.mode!r}; use a grayscale ('L') or RGB image")
                # Alpha is not a mask channel here: a transparent PNG mask is read by its colour.
                arrays.append(np.asarray(m.convert("RGB"), dtype=np.float32) / 255.0)
        if len({a.shape for a in arrays}) != 1:
            raise ValueError(f"all masks must have the same size, got {sorted({a.shape[:2] for a in arrays})}")
        return _channels_last_to_single(torch.from_numpy(np.stack(arrays)))
    if isinstance(mask_image, np.ndarray):
        m = torch.from_numpy(np.ascontiguousarray(mask_image))
        if m.ndim == 2:
            m = m[None, ..., None]
        elif m.ndim == 3:
            m = m[None] if m.shape[-1] <= 4 else m[..., None]  # (H, W, C): a width <= 4 is no image
        if m.ndim != 4:
            raise ValueError(f"numpy masks must be (H, W), (H, W, C), (B, H, W) or (B, H, W, C), got {mask_image.shape}")
        return _channels_last_to_single(_to_unit_range(m))
    if isinstance(mask_image, torch.Tensor):
        m = mask_image.detach().cpu()
        if m.ndim == 2:
            m = m[None, None]
        elif m.ndim == 3:
            m = m[None]
        if m.ndim != 4:
            raise ValueError(f"tensor masks must be (H, W), (C, H, W) or (B, C, H, W), got {tuple(mask_image.shape)}")
        return _channels_last_to_single(_to_unit_range(m).permute(0, 2, 3, 1))
    raise TypeError(f"mask_image must be a PIL image, a numpy array or a tensor, got {type(mask_image).__name__}")


def _to_unit_range(m: torch.Tensor) -> torch.Tensor:
    if m.dtype == torch.bool:
        return m.float()
    if m.dtype == torch.uint8:
        return m.float() / 255.0
    if not m.is_floating_point():
        raise TypeError(f"mask_image must be bool, uint8 or float in [0, 1], got dtype {m.dtype}")
    m = m.float()
    if m.numel() and (m.min() < 0 or m.max() > 1):
        raise ValueError(f"mask_image values must lie in [0, 1] (or be uint8), got [{m.min():.3g}, {m.max():.3g}]")
    return m


def _channels_last_to_single(m: torch.Tensor) -> torch.Tensor:
    """`(B, h, w, C)` -> `(B, h, w)`; C must be 1, or 3 equal channels (a black-and-white RGB file)."""
    if m.shape[-1] == 3:
        if not (torch.equal(m[..., 0], m[..., 1]) and torch.equal(m[..., 0], m[..., 2])):
            raise ValueError("mask_image has 3 channels that differ: pass a single-channel (grayscale) mask, "
                             "white = regenerate")
        m = m[..., :1]
    if m.shape[-1] != 1:
        raise ValueError(f"mask_image must have 1 channel (or 3 equal ones), got {m.shape[-1]}")
    return m[..., 0]


def load_mask(mask_image, height: int, width: int) -> tuple[torch.Tensor, torch.BoolTensor]:
    """``mask_image`` -> ``(values, mask)``: float `(B, h, w)` in [0, 1] and bool `(B, h, w)` thresholded at 0.5
    (True = regenerate), both at the mask's own resolution.

    Accepts a PIL image (any mode; RGB only with equal channels) or a list of them, numpy `(H, W)`, `(H, W, C)`,
    `(B, H, W)`, `(B, H, W, C)`, or a tensor `(H, W)`, `(C, H, W)`, `(B, C, H, W)`, with ``C = 1`` (or 3 equal
    channels); values bool, uint8 or float in [0, 1]. The mask may have any size with the image's aspect ratio
    (``height x width``); it is mapped to the token grid at its own resolution.
    """
    values = _mask_array(mask_image)
    h, w = values.shape[-2:]
    if abs(h / w - height / width) > 0.02 * height / width:
        raise ValueError(f"mask_image is {w}x{h} (width x height) but the image is {width}x{height}: the aspect "
                         "ratios differ, so the mask cannot be mapped onto the image")
    return values, values >= MASK_THRESHOLD


def mask_to_token_grid(mask: torch.BoolTensor, grid_height: int, grid_width: int) -> torch.BoolTensor:
    """Pixel mask `(B, h, w)` -> token mask `(B, grid_height, grid_width)`: a token is True when any True pixel
    lies in its cell (adaptive max pooling: the cells tile the mask, sharing boundary pixels when the sizes do not
    divide)."""
    pooled = F.adaptive_max_pool2d(mask[:, None].float(), (grid_height, grid_width))
    return pooled[:, 0] > 0


def prepare_edit_inputs(image, mask_image, height: int, width: int, grid_height: int, grid_width: int,
                        class_labels: torch.LongTensor | None, repeats: int = 1) -> EditInputs:
    """Images, masks and labels of an edit, broadcast to one batch and repeated ``repeats`` times in place.

    One image (or mask, or label) serves every row of the others; otherwise their counts must agree. A mask that
    is not all black but has no pixel at or above 0.5 touches no token: that is almost always a mistake (a mask in
    [0, 1] saved as values 0..1 of a uint8 file, or the inverted convention), so it is an error; an all-black mask
    is the documented way to get the reconstruction.
    """
    if image is None:
        raise ValueError("an edit needs image: mask_image, keep_depth or keep_coarse_labels was given without image")
    pixels = load_image(image, height, width)
    token_mask = None
    if mask_image is not None:
        raw, mask = load_mask(mask_image, height, width)
        token_mask = mask_to_token_grid(mask, grid_height, grid_width)
        untouched = ~token_mask.flatten(1).any(1) & (raw.flatten(1).amax(1) > 0)
        if untouched.any():
            i = int(untouched.nonzero()[0])
            raise ValueError(
                f"mask {i} touches no token: it is not black but no pixel reaches the threshold {MASK_THRESHOLD} "
                f"(max {float(raw[i].max()):.3g}); white (>= 0.5) marks what to regenerate, an all-black mask "
                "returns the reconstruction"
            )
    counts = {"images": pixels.shape[0]}
    if token_mask is not None:
        counts["masks"] = token_mask.shape[0]
    if class_labels is not None:
        counts["class labels"] = class_labels.numel()
    batch = max(counts.values())
    bad = {k: v for k, v in counts.items() if v not in (1, batch)}
    if bad:
        raise ValueError(f"batch sizes disagree: {counts}; give one of each, or the same number of each")

    def expand(x):
        if x is None:
            return None
        x = x.expand(batch, *x.shape[1:]) if x.shape[0] == 1 else x
        return x.repeat_interleave(repeats, dim=0)

    return EditInputs(pixels=expand(pixels), token_mask=expand(token_mask),
                      class_labels=expand(class_labels.reshape(-1)) if class_labels is not None else None)


def outpaint_inputs(image: PIL.Image.Image, size: tuple[int, int] | int | None = None,
                    offset: tuple[int, int] = (0, 0), scale: float = 1.0, fill=(255, 255, 255)):
    """An outpainting canvas for a prior with a fixed token grid: ``(canvas, mask)`` PIL images.

    The image is resized by ``scale`` (``< 1`` zooms out: the known content shrinks and the border is new) and
    pasted at ``offset = (dx, dy)`` pixels from the top-left of a ``size`` canvas (default: the image's size, so
    ``scale=1`` with an offset is a shifted crop); everything the image does not cover is white in the mask and
    ``fill`` in the canvas (its value does not matter: those tokens are regenerated). The priors' grids are fixed
    (learned position tables), so a larger canvas than the model's resolution is not possible; zooming out is how
    to extend the image on every side.
    """
    if not isinstance(image, PIL.Image.Image):
        raise TypeError("outpaint_inputs takes a PIL image")
    image = image.convert("RGB")
    W, H = (image.size if size is None else ((size, size) if isinstance(size, int) else (size[1], size[0])))
    if not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1], got {scale}")
    w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    dx, dy = offset
    if dx >= W or dy >= H or dx + w <= 0 or dy + h <= 0:
        raise ValueError(f"offset {offset} with the image at {w}x{h} leaves nothing of it on the {W}x{H} canvas")
    canvas = PIL.Image.new("RGB", (W, H), fill)
    canvas.paste(image.resize((w, h), PIL.Image.BICUBIC) if (w, h) != image.size else image, (dx, dy))
    mask = PIL.Image.new("L", (W, H), 255)
    mask.paste(0, (max(dx, 0), max(dy, 0), min(dx + w, W), min(dy + h, H)))
    return canvas, mask


def best_of_candidates(scores: torch.Tensor, num_candidates: int) -> torch.LongTensor:
    """Row index of the best-scoring candidate of every group of ``num_candidates`` consecutive rows `(B,)`."""
    groups = scores.reshape(-1, num_candidates)
    return groups.argmax(dim=1) + torch.arange(groups.shape[0], device=scores.device) * num_candidates


def check_num_candidates(num_candidates) -> int:
    if isinstance(num_candidates, bool) or not isinstance(num_candidates, int) or num_candidates < 1:
        raise ValueError(f"num_candidates must be a positive integer, got {num_candidates!r}")
    return num_candidates


def known_log_likelihood(logits: torch.Tensor, targets: torch.LongTensor, known: torch.BoolTensor) -> torch.Tensor:
    """Sum over the known tokens of ``log p(target)``: logits `(B, ..., V)`, targets / known `(B, ...)` -> `(B,)`.

    The score of the best-of-n remedy: under a causal prior the sampled tokens cannot see the known tokens after
    them, but the known tokens' likelihood does see the samples, so the candidate that makes the known context
    most likely is the one that fits it best.
    """
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)
    return (logp * known).flatten(1).sum(1)


def check_known_tokens(known_codes, known_mask, shape: tuple, vocab_size: int, device=None):
    """Validate the ``known_codes`` / ``known_mask`` pair of a prior's ``generate()`` (same ``shape``, integer
    codes in ``[0, vocab_size)``, a bool mask). Returns ``(codes, mask)`` on ``device`` with unknown codes zeroed,
    so that nothing about them can leak into sampling."""
    if known_codes is None or known_mask is None:
        raise ValueError("pass known_codes and known_mask together")
    shape = tuple(shape)
    if not isinstance(known_codes, torch.Tensor) or known_codes.is_floating_point() or known_codes.dtype == torch.bool:
        raise TypeError(f"known_codes must be an integer tensor, got {getattr(known_codes, 'dtype', type(known_codes).__name__)}")
    if tuple(known_codes.shape) != shape:
        raise ValueError(f"known_codes must have shape {shape}, got {tuple(known_codes.shape)}")
    if not isinstance(known_mask, torch.Tensor) or known_mask.dtype != torch.bool or tuple(known_mask.shape) != shape:
        raise ValueError(f"known_mask must be a bool tensor of shape {shape}, got "
                         f"{getattr(known_mask, 'dtype', type(known_mask).__name__)} {tuple(getattr(known_mask, 'shape', ()))}")
    known_mask = known_mask.to(device)
    codes = torch.where(known_mask, known_codes.to(device).long(), 0)
    if codes.numel() and (codes.min() < 0 or codes.max() >= vocab_size):
        raise ValueError(f"known_codes must lie in [0, {vocab_size}) where known_mask is True, got "
                         f"[{int(codes.min())}, {int(codes.max())}]")
    return codes, known_mask


class KnownTokens:
    """Which tokens a sampler is given: the mask `(N, steps, ...)` and, read once as Python lists so that the
    per-step tests cost no device sync, whether every / any image of the batch knows each token (``all``, ``any``:
    indexed like the mask without its batch dimension) and each whole step (``step_all``)."""

    def __init__(self, mask: torch.BoolTensor):
        self.mask = mask
        self.all = mask.all(dim=0).tolist()
        self.any = mask.any(dim=0).tolist()
        self.step_all = mask.flatten(2).all(dim=0).all(dim=-1).tolist() if mask.ndim > 2 else self.all


class EditingPipelineMixin:
    """The family-independent half of a pipeline's editing call: inputs to one batch, best-of-n choice.

    Needs ``self.prepare_class_labels`` (``ClassLabelsMixin``) and ``self._execution_device``.
    """

    def prepare_edit(self, image, mask_image, class_labels, num_images_per_prompt: int, num_candidates: int,
                     image_size: tuple[int, int], grid_size: tuple[int, int], generator=None) -> EditInputs:
        """Validated :class:`EditInputs`: every image (with its mask and label) repeated
        ``num_images_per_prompt * num_candidates`` times in place, pixels on the execution device; a generator
        list (one per output image) repeated ``num_candidates`` times in place to match the rows."""
        n = num_images_per_prompt
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"num_images_per_prompt must be a positive integer, got {n!r}")
        repeats = n * check_num_candidates(num_candidates)
        labels = None
        if class_labels is not None:
            labels, _ = self.prepare_class_labels(class_labels, 1)
        edit = prepare_edit_inputs(image, mask_image, *image_size, *grid_size, labels, repeats)
        generator = check_generator(generator, edit.batch_size // num_candidates)
        if isinstance(generator, list):
            generator = [g for g in generator for _ in range(num_candidates)]
        edit.generator = generator
        edit.pixels = edit.pixels.to(self._execution_device)
        if edit.token_mask is not None:
            edit.token_mask = edit.token_mask.to(self._execution_device)
        return edit

    @staticmethod
    def select_candidates(scores: torch.Tensor, num_candidates: int, *tensors):
        """Keep, of every ``num_candidates`` consecutive rows, the one with the highest score (in every tensor)."""
        if num_candidates == 1:
            return tensors if len(tensors) > 1 else tensors[0]
        index = best_of_candidates(scores, num_candidates)
        picked = tuple(t[index.to(t.device)] for t in tensors)
        return picked if len(picked) > 1 else picked[0]
