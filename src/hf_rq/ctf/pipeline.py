"""Class-conditional image generation with LlamaGen's GPT or the coarse-to-fine (CTF) prior, decoded by
LlamaGen's VQ tokenizer."""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput

from ..editing import EditingPipelineMixin, known_log_likelihood
from ..image_processing import make_image_grid, postprocess_images
from ..hub import BundledModelsMixin
from ..pipeline_utils import ClassLabelsMixin, check_output_type, generation_overrides
from .llamagen import LlamaGenForImageGeneration
from .prior import CTFForImageGeneration
from .tokenizer import LlamaGenVQModel

__all__ = ["CTFPipeline", "CTFPipelineOutput", "LlamaGenPipeline", "coarse_labels_to_pil"]


class _LlamaGenFamilyPipeline(BundledModelsMixin, ClassLabelsMixin, EditingPipelineMixin, DiffusionPipeline):
    """What the LlamaGen and CTF pipelines share: class resolution, decoding, output types, editing inputs."""

    model_cpu_offload_seq = "transformer->vqvae"

    def _prepare_labels(self, class_labels, num_images_per_prompt):
        """-> ``(class ids (N,) or None, batch_size)``; None samples unconditionally from the null class."""
        if class_labels is None and self.transformer.config.null_class_id is None:
            raise ValueError("this prior has no null class: pass class_labels (ids or names)")
        return self.prepare_class_labels(class_labels, num_images_per_prompt)

    @property
    def edit_image_size(self) -> tuple[int, int]:
        """`(height, width)` of the images this pipeline edits (its token grid times the downsampling factor)."""
        size = self.transformer.config.grid_size * self.vqvae.downsample_factor
        return size, size

    def _encode_edit(self, image, mask_image, class_labels, num_images_per_prompt, num_candidates, generator):
        """-> ``(EditInputs, codes (B, h, w) of the images, class rows (B,) for teacher-forced scoring)``."""
        c = self.transformer.config
        if class_labels is None and c.null_class_id is None:
            raise ValueError("this prior has no null class: pass class_labels (ids or names)")
        edit = self.prepare_edit(image, mask_image, class_labels, num_images_per_prompt, num_candidates,
                                 self.edit_image_size, (c.grid_size, c.grid_size), generator)
        codes = self.vqvae.encode(edit.pixels.to(self.vqvae.device, self.vqvae.dtype), return_codes=True).codes
        rows = edit.class_labels
        if rows is None:
            rows = torch.full((edit.batch_size,), c.null_class_id, dtype=torch.long, device=codes.device)
        return edit, codes.to(self.transformer.device), rows.to(self.transformer.device)

    def _generate_args(self, edit) -> dict:
        return dict(class_labels=edit.class_labels, generator=edit.generator,
                    batch_size=None if edit.class_labels is not None else edit.batch_size)

    def _decode(self, codes: torch.LongTensor, output_type: str):
        if output_type == "latent":
            return codes
        return postprocess_images(self.vqvae.decode_codes(codes.to(self.vqvae.device)).sample, output_type)


class LlamaGenPipeline(_LlamaGenFamilyPipeline):
    r"""LlamaGen image generation: class label in, image out.

    Components:
        vqvae ([`LlamaGenVQModel`]): decodes the sampled codes `(N, h, w)` to images.
        transformer ([`LlamaGenForImageGeneration`]): the GPT prior; its vocabulary must be the codebook.

    Example:
        ```py
        >>> from hf_rq import LlamaGenPipeline
        >>> pipe = LlamaGenPipeline.from_pretrained("path/or/repo")
        >>> image = pipe(class_labels="golden retriever", generator=torch.Generator().manual_seed(0)).images[0]
        ```
    """

    def __init__(self, vqvae: LlamaGenVQModel, transformer: LlamaGenForImageGeneration):
        super().__init__()
        self.register_modules(vqvae=vqvae, transformer=transformer)

    def check_components(self) -> None:
        """Raise ``ValueError`` unless the GPT's vocabulary is the tokenizer's codebook."""
        vocab, book = self.transformer.config.vocab_size, self.vqvae.config.codebook_size
        if vocab != book:
            raise ValueError(f"the GPT predicts {vocab} codes but the tokenizer's codebook has {book} entries")

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | str | list[int | str] | torch.LongTensor | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        guidance_scale: float | None = None,
        cfg_interval: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        do_sample: bool | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        image=None,
        mask_image=None,
        num_candidates: int = 1,
    ):
        r"""Sample images, or edit ``image`` where ``mask_image`` is white.

        Args:
            class_labels: class ids or names (``transformer.config.id2label``), one per image; None samples
                ``num_images_per_prompt`` unconditional images from the null class.
            num_images_per_prompt (`int`): images per label.
            generator (`torch.Generator` or a list of them, *optional*): the same generator state gives the same
                images; a list holds one generator per image (image ``i`` then depends on ``generator[i]`` only).
            image, mask_image, num_candidates: editing, as in :class:`CTFPipeline` (without coarse labels: the
                masked codes are sampled in raster order, the others kept and teacher-forced).
            guidance_scale (`float`): LlamaGen's classifier-free guidance, >= 1 (1 = off; below 1 is an error in
                every family, see ``hf_rq.sampling_args``).
            cfg_interval (`int`): -1 keeps guidance for every token; ``c`` for tokens ``0 .. c + 1`` only.
            temperature, top_k, top_p: LlamaGen's sampling filters (0 / 1.0 / None switch top-k / top-p off).
            do_sample (`bool`): False picks the most likely code at every step.
            output_type (`str`): ``"pil"``, ``"np"`` `(N, H, W, 3)` in [0, 1], ``"pt"`` `(N, 3, H, W)` in [0, 1],
                or ``"latent"`` for the codes `(N, h, w)`.
            return_dict (`bool`): return an ``ImagePipelineOutput`` rather than a tuple.

        Arguments left at None keep the prior's saved ``generation_config`` values.
        """
        check_output_type(output_type)
        self.check_components()
        overrides = generation_overrides(guidance_scale=guidance_scale, cfg_interval=cfg_interval,
                                         temperature=temperature, top_k=top_k, top_p=top_p, do_sample=do_sample)
        if image is not None or mask_image is not None:
            if mask_image is None:
                raise ValueError("image needs mask_image (white = regenerate)")
            edit, known, rows = self._encode_edit(image, mask_image, class_labels, num_images_per_prompt,
                                                  num_candidates, generator)
            kept = ~edit.token_mask.to(known.device)
            codes = known if kept.all() else self.transformer.generate(**self._generate_args(edit),
                                              progress_bar=self.progress_bar, known_codes=known, known_mask=kept,
                                              **overrides)
            if num_candidates > 1:
                scores = known_log_likelihood(self.transformer(codes, rows).logits, codes.flatten(1), kept.flatten(1))
                codes = self.select_candidates(scores, num_candidates, codes)
        else:
            labels, batch_size = self._prepare_labels(class_labels, num_images_per_prompt)
            codes = self.transformer.generate(labels, batch_size=batch_size, generator=generator,
                                              progress_bar=self.progress_bar, **overrides)
        images = self._decode(codes, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


@dataclass
class CTFPipelineOutput(ImagePipelineOutput):
    """Output of :class:`CTFPipeline`.

    Args:
        images: as in ``ImagePipelineOutput``.
        coarse_labels: `(N, h, w)` int64 coarse-label map sampled by stage 1 (with ``return_coarse_labels``);
            :meth:`CTFPipeline.show_coarse_labels` draws it.
    """

    coarse_labels: torch.LongTensor | None = None


def _palette(num_clusters: int) -> np.ndarray:
    """`(num_clusters, 3)` uint8 colours; neighbouring label ids get distant hues (golden-ratio spacing)."""
    colors = []
    for k in range(num_clusters):
        hue = (k * 0.6180339887) % 1.0
        sat = 0.55 + 0.45 * ((k * 7) % 5) / 4
        val = 0.6 + 0.4 * ((k * 3) % 4) / 3
        colors.append([round(255 * c) for c in colorsys.hsv_to_rgb(hue, sat, val)])
    return np.asarray(colors, dtype=np.uint8)


def coarse_labels_to_pil(coarse_labels: torch.LongTensor, num_clusters: int, size: int | None = None) -> list[PIL.Image.Image]:
    """Colour-code coarse-label maps `(N, h, w)` (one colour per label) as PIL images, upscaled (nearest) to
    ``size`` pixels per side (default: 16 pixels per token)."""
    labels = torch.as_tensor(coarse_labels)
    if labels.ndim == 2:
        labels = labels[None]
    if labels.ndim != 3 or labels.is_floating_point():
        raise ValueError(f"coarse_labels must be an integer (N, h, w) map, got {tuple(labels.shape)} {labels.dtype}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_clusters):
        raise ValueError(f"coarse labels must lie in [0, {num_clusters}), got [{int(labels.min())}, {int(labels.max())}]")
    colors = _palette(num_clusters)[labels.cpu().numpy()]
    images = []
    for array in colors:
        image = PIL.Image.fromarray(array)
        side = size or 16 * array.shape[0]
        images.append(image.resize((side * array.shape[1] // array.shape[0], side), PIL.Image.NEAREST))
    return images


class CTFPipeline(_LlamaGenFamilyPipeline):
    r"""Coarse-to-fine image generation: stage 1 samples a coarse-label map, stage 2 the fine codes, the VQ
    decoder the image.

    Components:
        vqvae ([`LlamaGenVQModel`]): decodes the fine codes `(N, h, w)` to images.
        transformer ([`CTFForImageGeneration`]): both stages and the ``fine_to_coarse`` table, which must
            belong to this tokenizer's codebook (checked before sampling).

    Example:
        ```py
        >>> from hf_rq import CTFPipeline
        >>> pipe = CTFPipeline.from_pretrained("path/or/repo")
        >>> out = pipe(class_labels=["tabby cat"], return_coarse_labels=True, generator=torch.Generator().manual_seed(0))
        >>> pipe.show_coarse_labels(out)[0]   # image next to its coarse-label map
        ```
    """

    def __init__(self, vqvae: LlamaGenVQModel, transformer: CTFForImageGeneration):
        super().__init__()
        self.register_modules(vqvae=vqvae, transformer=transformer)
        self._checked = None

    def check_components(self) -> None:
        """Raise ``ValueError`` unless the prior fits the tokenizer (stage-2 vocabulary = codebook size, code
        width, and the clustering of this codebook); see ``CTFForImageGeneration.check_tokenizer``."""
        codebook = self.vqvae.codebook.detach()
        # The nearest-centroid check is a (codebook x clusters) pass: repeat it only when a component changed.
        key = (id(self.vqvae), id(self.transformer), self.vqvae.quantizer.embedding.weight._version,
               self.transformer.fine_to_coarse._version, self.transformer.coarse_centroids._version)
        if self._checked == key:
            return
        self.transformer.check_tokenizer(codebook)
        self._checked = key

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | str | list[int | str] | torch.LongTensor | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        guidance_scale: float | None = None,
        cfg_interval: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        fine_temperature: float | None = None,
        fine_top_k: int | None = None,
        fine_top_p: float | None = None,
        fine_guidance_scale: float | None = None,
        in_cluster_mask: bool | None = None,
        do_sample: bool | None = None,
        return_coarse_labels: bool = False,
        output_type: str = "pil",
        return_dict: bool = True,
        image=None,
        mask_image=None,
        keep_coarse_labels: bool = False,
        num_candidates: int = 1,
    ):
        r"""Sample images, or edit ``image``.

        Args:
            class_labels: class ids or names (``transformer.config.id2label``), one per image; None samples
                ``num_images_per_prompt`` unconditional images from the null class.
            num_images_per_prompt (`int`): images per label.
            generator (`torch.Generator` or a list of them, *optional*): the same generator state gives the same
                images; a list holds one generator per image (image ``i`` then depends on ``generator[i]`` only).
            guidance_scale, cfg_interval, temperature, top_k, top_p: stage 1 (coarse labels); the paper's
                defaults are CFG 2.0 and temperature tau1 = 1.1.
            fine_temperature, fine_top_k, fine_top_p, fine_guidance_scale: stage 2 (fine codes); tau2 = 1.1,
                no top-k and no guidance by default.
            in_cluster_mask (`bool`): restrict every fine code to the members of its coarse label.
            do_sample (`bool`): False makes both stages greedy.
            return_coarse_labels (`bool`): also return the `(N, h, w)` coarse-label map.
            output_type (`str`): ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"`` (the fine codes `(N, h, w)`).
            return_dict (`bool`): return a :class:`CTFPipelineOutput` rather than a tuple
                (``(images,)`` or ``(images, coarse_labels)``).
            image (PIL / numpy / torch, *optional*): an image to edit, at the tokenizer's resolution, encoded to
                fine codes and their coarse labels; ``num_images_per_prompt`` edits are made of each.
            mask_image (PIL / numpy / torch, *optional*): white (>= 0.5) = regenerate, any size with the image's
                aspect ratio; a token is regenerated when any white pixel falls in its ``f x f`` cell
                (``hf_rq.editing``). Stage 1 samples the masked coarse labels in raster order (each sees the known
                labels before it), stage 2 redraws the masked fine codes from the whole label map; the others are
                kept.
            keep_coarse_labels (`bool`): keep the input's coarse-label map and redraw every fine code in one stage-2
                pass (variations inside each code's cluster); with ``mask_image``, stage 1 first resamples the
                masked coarse labels.
            num_candidates (`int`): best-of-n remedy for stage 1's raster order (1 = off): ``n`` candidates per
                output, keeping the one under which the known coarse labels are most likely.

        Arguments left at None keep the prior's saved ``generation_config`` values.
        """
        check_output_type(output_type)
        self.check_components()
        overrides = generation_overrides(
            guidance_scale=guidance_scale, cfg_interval=cfg_interval, temperature=temperature, top_k=top_k,
            top_p=top_p, fine_temperature=fine_temperature, fine_top_k=fine_top_k, fine_top_p=fine_top_p,
            fine_guidance_scale=fine_guidance_scale, in_cluster_mask=in_cluster_mask, do_sample=do_sample,
        )
        if not isinstance(keep_coarse_labels, bool):
            raise TypeError(f"keep_coarse_labels must be a bool, got {keep_coarse_labels!r}")
        if image is not None or mask_image is not None or keep_coarse_labels:
            codes, coarse = self._edit(image, mask_image, keep_coarse_labels, class_labels, num_images_per_prompt,
                                       num_candidates, generator, overrides)
        else:
            labels, batch_size = self._prepare_labels(class_labels, num_images_per_prompt)
            out = self.transformer.generate(labels, batch_size=batch_size, generator=generator,
                                            progress_bar=self.progress_bar, return_dict_in_generate=True, **overrides)
            codes, coarse = out.sequences, out.coarse_labels
        images = self._decode(codes, output_type)
        coarse = coarse if return_coarse_labels else None
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,) if coarse is None else (images, coarse)
        return CTFPipelineOutput(images=images, coarse_labels=coarse)

    def _edit(self, image, mask_image, keep_coarse_labels, class_labels, num_images_per_prompt, num_candidates,
              generator, overrides):
        """Encode; keep the unmasked coarse labels (and, without ``keep_coarse_labels``, the unmasked fine codes);
        sample the rest; keep the best candidates. Returns ``(codes, coarse labels)``, both `(B, h, w)`."""
        if mask_image is None and not keep_coarse_labels:
            raise ValueError("image needs mask_image (white = regenerate) or keep_coarse_labels=True")
        edit, known, rows = self._encode_edit(image, mask_image, class_labels, num_images_per_prompt, num_candidates,
                                              generator)
        kept = (torch.ones_like(known, dtype=torch.bool) if edit.token_mask is None
                else ~edit.token_mask.to(known.device))
        fine_kept = torch.zeros_like(kept) if keep_coarse_labels else kept
        if fine_kept.all():  # an all-black mask: the reconstruction, no draws
            return known, self.transformer.fine_to_coarse[known]
        out = self.transformer.generate(
            **self._generate_args(edit), progress_bar=self.progress_bar,
            return_dict_in_generate=True, known_codes=known, known_mask=fine_kept,
            known_coarse_labels=self.transformer.fine_to_coarse[known], known_coarse_mask=kept, **overrides)
        codes, coarse = out.sequences, out.coarse_labels
        if num_candidates > 1:
            logits = self.transformer.coarse_model(coarse, rows).logits
            scores = known_log_likelihood(logits, coarse.flatten(1), kept.flatten(1))
            codes, coarse = self.select_candidates(scores, num_candidates, codes, coarse)
        return codes, coarse

    def show_coarse_labels(self, output_or_labels, images=None, size: int | None = None) -> list[PIL.Image.Image]:
        """Draw coarse-label maps: one colour per label, each map next to its image when images are known.

        Args:
            output_or_labels: a :class:`CTFPipelineOutput` (with ``coarse_labels``) or a `(N, h, w)` map.
            images: PIL images to show beside the maps (taken from the output when it holds PIL images).
            size: height of each map in pixels (default: the image height, else 16 per token).
        """
        labels = output_or_labels
        if isinstance(output_or_labels, CTFPipelineOutput):
            labels = output_or_labels.coarse_labels
            if labels is None:
                raise ValueError("this output has no coarse_labels: call the pipeline with return_coarse_labels=True")
            if images is None and isinstance(output_or_labels.images, list):
                images = output_or_labels.images
        if images is not None and size is None:
            size = images[0].size[1]
        maps = coarse_labels_to_pil(labels, self.transformer.config.num_clusters, size)
        if images is None:
            return maps
        if len(images) != len(maps):
            raise ValueError(f"got {len(images)} images for {len(maps)} coarse-label maps")
        return [make_image_grid([im.convert("RGB"), m.resize(im.size, PIL.Image.NEAREST)], rows=1, cols=2)
                for im, m in zip(images, maps)]
