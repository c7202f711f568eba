"""Class-conditional, text-conditional or unconditional image generation with an RQ-Transformer and its RQ-VAE."""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput

from ..editing import EditingPipelineMixin, known_log_likelihood
from ..image_processing import postprocess_images
from ..hub import BundledModelsMixin
from ..pipeline_utils import ClassLabelsMixin, check_output_type, generation_overrides
from ..prompts import check_conditioning_kind, prepare_prompts, tokenize_prompts
from .prior import RQTransformerForImageGeneration
from .tokenizer import RQVAEModel


class RQTransformerPipeline(BundledModelsMixin, ClassLabelsMixin, EditingPipelineMixin, DiffusionPipeline):
    r"""RQ-Transformer image generation: class label (or prompt, for a text-conditional prior) in, image out.

    Components:
        vqvae ([`RQVAEModel`]): the tokenizer; decodes the sampled codes `(N, h, w, D)` to images.
        transformer ([`RQTransformerForImageGeneration`]): the prior; samples the codes. It carries a copy of
            the tokenizer's codebook, which must equal ``vqvae``'s (checked at every call).
        tokenizer ([`~transformers.PreTrainedTokenizerFast`], *optional*): the text tokenizer of a
            text-conditional prior (``transformer.config.text_length > 0``); None for class models.

    Example:
        ```py
        >>> from hf_rq import RQTransformerPipeline
        >>> pipe = RQTransformerPipeline.from_pretrained("path/or/repo")
        >>> image = pipe(class_labels="golden retriever", generator=torch.Generator().manual_seed(0)).images[0]
        >>> # editing: regenerate the white part of the mask; or keep depth 1 everywhere and redraw the finer ones
        >>> edited = pipe("golden retriever", image=image, mask_image=mask, num_images_per_prompt=3).images
        >>> variations = pipe("golden retriever", image=image, keep_depth=1, num_images_per_prompt=3).images
        >>> pipe = RQTransformerPipeline.from_pretrained("hf-rq/rq-emoji-64-text")  # text-conditional
        >>> pipe(prompt="grinning face", guidance_scale=3.0).images[0].save("face.png")
        ```
    """

    model_cpu_offload_seq = "transformer->vqvae"
    _optional_components = ["tokenizer"]

    def __init__(self, vqvae: RQVAEModel, transformer: RQTransformerForImageGeneration, tokenizer=None):
        super().__init__()
        self.register_modules(vqvae=vqvae, transformer=transformer, tokenizer=tokenizer)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | str | list[int | str] | torch.LongTensor | None = None,
        num_images_per_prompt: int = 1,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        temperature: float | list[float] | None = None,
        top_k: int | list[int] | None = None,
        top_p: float | list[float] | None = None,
        guidance_scale: float | None = None,
        do_sample: bool | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        image=None,
        mask_image=None,
        keep_depth: int | None = None,
        num_candidates: int = 1,
    ):
        r"""Sample images.

        Args:
            class_labels: class ids or names (``transformer.config.id2label``), one per image; None for an
                unconditional model.
            num_images_per_prompt (`int`): images per label or prompt (for an unconditional model: the number of images).
            prompt (`str` or `list[str]`, *optional*): the caption(s) of a text-conditional prior (tokenized by
                ``tokenizer``; longer ones are truncated, with a warning, as the authors do).
            negative_prompt (`str` or `list[str]`, *optional*): replaces the null text as the unconditional branch
                of guidance (needs ``guidance_scale > 1`` and a prior trained with caption dropout).
            generator (`torch.Generator` or a list of them, *optional*): the same generator state gives the same
                images; a list holds one generator per image (image ``i`` then depends on ``generator[i]`` only).
            temperature, top_k, top_p: sampling filters, each a number or a per-depth list (coarse to fine);
                None keeps the prior's saved ``generation_config`` value.
            guidance_scale (`float`, *optional*): classifier-free guidance scale, >= 1 (1 = off; below 1 is an error
                in every family, see ``hf_rq.sampling_args``); above 1 it needs a prior with a null class (null text).
            do_sample (`bool`, *optional*): False picks the most likely code at every step.
            output_type (`str`): ``"pil"``, ``"np"`` `(N, H, W, 3)` in [0, 1], ``"pt"`` `(N, 3, H, W)` in [0, 1], or
                ``"latent"`` for the codes `(N, h, w, D)`.
            return_dict (`bool`): return an ``ImagePipelineOutput`` rather than a tuple.
            image (PIL / numpy / torch, *optional*): an image to edit, at the tokenizer's resolution; it is
                encoded to codes `(h, w, D)` and ``num_images_per_prompt`` edits are made of it (several images
                make a batch; one class label or one mask serves them all).
            mask_image (PIL / numpy / torch, *optional*): white (>= 0.5 after thresholding) = regenerate, any size
                with the image's aspect ratio; a position is regenerated when any white pixel falls in its
                ``f x f`` pixel cell (``hf_rq.editing``). Regenerated positions are sampled in raster order and
                see only the known codes before them; the known ones are teacher-forced and never change.
            keep_depth (`int`, *optional*): ``k`` in ``0..D``: keep depths ``1..k`` of every position and resample
                the finer ones (variations at the fine level); with ``mask_image``, positions outside the mask
                keep all their depths and positions inside keep depths ``1..k``.
            num_candidates (`int`): best-of-n remedy for raster order (1 = off): sample ``n`` edits per output
                and keep the one under which the known codes are most likely (the known codes after the mask do
                see the samples), at ``n`` times the sampling cost.
        """
        check_output_type(output_type)
        c = self.transformer.config
        check_conditioning_kind(prompt, class_labels, text_conditional=c.is_text_conditional, num_classes=c.num_classes)
        overrides = generation_overrides(temperature=temperature, top_k=top_k, top_p=top_p,
                                         guidance_scale=guidance_scale, do_sample=do_sample)
        editing = image is not None or mask_image is not None or keep_depth is not None
        if editing and c.is_text_conditional:
            raise ValueError("editing (image / mask_image / keep_depth) takes class labels: it is not supported for "
                             "a text-conditional prior yet")
        self.transformer.check_codebook(self.vqvae)
        if editing:
            codes = self._edit(image, mask_image, keep_depth, class_labels, num_images_per_prompt, num_candidates,
                               generator, overrides)
        else:
            text = {}
            if c.is_text_conditional:
                prompts, negatives = prepare_prompts(prompt, negative_prompt, num_images_per_prompt, guidance_scale)
                if self.tokenizer is None:
                    raise ValueError("this text-conditional pipeline has no tokenizer component: load it with its "
                                     "tokenizer/ folder or pass tokenizer=... (a PreTrainedTokenizerFast)")
                device = self._execution_device
                text["text_ids"] = tokenize_prompts(self.tokenizer, prompts, c.text_length, device)
                if negatives is not None:
                    text["negative_text_ids"] = tokenize_prompts(self.tokenizer, negatives, c.text_length, device)
                class_labels, batch_size = None, None
            else:
                if negative_prompt is not None:
                    raise ValueError("negative_prompt needs a text-conditional model; this one takes no prompt")
                class_labels, batch_size = self.prepare_class_labels(class_labels, num_images_per_prompt)
            codes = self.transformer.generate(class_labels, batch_size=batch_size, generator=generator,
                                              progress_bar=self.progress_bar, **text, **overrides)
        if output_type == "latent":
            images = codes
        else:
            images = postprocess_images(self.vqvae.decode_codes(codes.to(self.vqvae.device)).sample, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    @property
    def edit_image_size(self) -> tuple[int, int]:
        """`(height, width)` of the images this pipeline edits (its token grid times the downsampling factor)."""
        c, f = self.transformer.config, self.vqvae.downsample_factor
        return c.grid_height * f, c.grid_width * f

    def _edit(self, image, mask_image, keep_depth, class_labels, num_images_per_prompt, num_candidates, generator,
              overrides):
        """Encode, build the known-code mask `(B, h, w, D)`, sample the rest, keep the best candidates."""
        c = self.transformer.config
        D = c.code_depth
        if keep_depth is not None and (isinstance(keep_depth, bool) or not isinstance(keep_depth, int)
                                       or not 0 <= keep_depth <= D):
            raise ValueError(f"keep_depth must be an integer in 0..{D} (the code depth), got {keep_depth!r}")
        if mask_image is None and keep_depth is None:
            raise ValueError("image needs mask_image (white = regenerate) or keep_depth")
        edit = self.prepare_edit(image, mask_image, class_labels, num_images_per_prompt, num_candidates,
                                 self.edit_image_size, (c.grid_height, c.grid_width), generator)
        known_codes = self.vqvae.encode(edit.pixels.to(self.vqvae.device, self.vqvae.dtype), return_codes=True).codes
        shape = (edit.batch_size, c.grid_height, c.grid_width, D)
        deep = torch.arange(D, device=known_codes.device) < (keep_depth or 0)  # depths kept at edited positions
        kept = deep.expand(shape)
        if edit.token_mask is not None:
            kept = kept | ~edit.token_mask.to(known_codes.device)[..., None]
        if kept.all():  # nothing to sample (an all-black mask, keep_depth=D): the reconstruction, no draws
            return known_codes
        codes = self.transformer.generate(edit.class_labels, batch_size=None if edit.class_labels is not None
                                          else edit.batch_size, generator=edit.generator, progress_bar=self.progress_bar,
                                          known_codes=known_codes, known_mask=kept, **overrides)
        if num_candidates > 1:
            logits = self.transformer(codes, class_labels=edit.class_labels).logits
            codes = self.select_candidates(known_log_likelihood(logits, codes, kept), num_candidates, codes)
        return codes
