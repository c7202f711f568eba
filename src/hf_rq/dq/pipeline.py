"""Class-conditional, text-conditional or unconditional image generation with a DQ-Transformer and its DQ-VAE."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput

from ..editing import EditingPipelineMixin
from ..image_processing import numpy_to_pil, postprocess_images
from ..hub import BundledModelsMixin
from ..pipeline_utils import ClassLabelsMixin, check_output_type, generation_overrides
from ..prompts import check_conditioning_kind, prepare_prompts
from .editing import DQKnownTokens
from .prior import DQTransformerForImageGeneration
from .text_conditioning import encode_prompt
from .tokenizer import DQVAEModel


@dataclass
class DQPipelineOutput(ImagePipelineOutput):
    """Output of :class:`DQTransformerPipeline`.

    Args:
        images: the images (``output_type``), or the codes `(B, hf, hf)` for ``output_type="latent"``.
        granularity (`torch.LongTensor` of shape `(B, hc, hc)`, *optional*): with ``return_granularity=True``,
            where the model spent fine codes (1) and where coarse ones (0); see :meth:`DQTransformerPipeline.draw_granularity`.
    """

    granularity: torch.LongTensor | None = None


class DQTransformerPipeline(BundledModelsMixin, ClassLabelsMixin, EditingPipelineMixin, DiffusionPipeline):
    r"""DQ-Transformer image generation: class label or prompt in, image (and optionally its granularity map) out.

    Components:
        vqvae ([`DQVAEModel`]): the dynamic tokenizer; decodes the sampled code map `(B, hf, hf)`.
        transformer ([`DQTransformerForImageGeneration`]): the prior; samples coarse then fine tokens.
        tokenizer ([`~transformers.CLIPTokenizer`], *optional*), text_encoder
            ([`~transformers.CLIPTextModelWithProjection`], *optional*): text-to-image models only; the prompt's
            features are the authors' ``encode_text`` (projected end-of-text state), see
            :mod:`hf_rq.dq.text_conditioning`.

    Example:
        ```py
        >>> from hf_rq import DQTransformerPipeline
        >>> pipe = DQTransformerPipeline.from_pretrained("path/or/repo")
        >>> out = pipe(class_labels="golden retriever", generator=torch.Generator().manual_seed(0), return_granularity=True)
        >>> pipe.draw_granularity(out.images, out.granularity)[0].save("sample_with_grid.png")
        >>> text_pipe = DQTransformerPipeline.from_pretrained("path/to/text-to-image")
        >>> text_pipe(prompt="a red apple").images[0].save("apple.png")
        ```
    """

    model_cpu_offload_seq = "text_encoder->transformer->vqvae"
    _optional_components = ["tokenizer", "text_encoder"]

    def __init__(self, vqvae: DQVAEModel, transformer: DQTransformerForImageGeneration, tokenizer=None,
                 text_encoder=None):
        super().__init__()
        self.register_modules(vqvae=vqvae, transformer=transformer, tokenizer=tokenizer, text_encoder=text_encoder)

    def check_components(self) -> None:
        """Raise ``ValueError`` unless the DQ-VAE and the prior share the codebook size and the grids."""
        vc, tc = self.vqvae.config, self.transformer.config
        if vc.num_grains != 2:
            raise ValueError("the DQ-Transformer models two granularities; this DQ-VAE has three")
        found = dict(codebook_size=vc.codebook_size, coarse_grid_size=self.vqvae.coarse_grid_size)
        expected = dict(codebook_size=tc.codebook_size, coarse_grid_size=tc.coarse_grid_size)
        if found != expected:
            raise ValueError(f"the DQ-VAE {found} does not fit the DQ-Transformer {expected}")
        if tc.text_feature_size:
            if self.tokenizer is None or self.text_encoder is None:
                raise ValueError("the DQ-Transformer is text-conditional: the pipeline needs its tokenizer and text_encoder")
            if not hasattr(self.text_encoder, "text_projection"):
                # CLIPTextModel stops before the projection; the authors' encode_text includes it
                raise ValueError(f"text_encoder must be a CLIPTextModelWithProjection (the authors' features are the "
                                 f"projected end-of-text state), got {type(self.text_encoder).__name__}")
            width = getattr(self.text_encoder.config, "projection_dim", None)
            if width != tc.text_feature_size:
                raise ValueError(f"the text encoder gives {width}-d features, the DQ-Transformer reads "
                                 f"text_feature_size={tc.text_feature_size}")

    def prepare_prompt_features(self, prompt, negative_prompt, class_labels, num_images_per_prompt: int):
        """-> ``(text features (N, D), N)`` for a text-to-image prior (one row per image), ``(None, None)`` for a
        class / unconditional one; refuses a prompt to a class model, class labels to a text model, and
        ``negative_prompt`` (the authors' DQ models have no null text to guide with)."""
        c = self.transformer.config
        check_conditioning_kind(prompt, class_labels, text_conditional=bool(c.text_feature_size),
                                num_classes=c.num_classes)  # the same errors in every family (hf_rq.prompts)
        if negative_prompt is not None:
            raise ValueError("negative_prompt needs classifier-free guidance, and this DQ-Transformer has no null text "
                             "to guide with (the authors' text-to-image model is trained without caption dropout)")
        if not c.text_feature_size:
            return None, None
        prompts, _ = prepare_prompts(prompt, None, num_images_per_prompt)
        return self.encode_prompt(prompts), len(prompts)

    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> text features `(B, D)` for the prior (CLIP ids padded to the context, longer ones truncated
        with a warning, as the authors' ``clip.tokenize``)."""
        return encode_prompt(self.tokenizer, self.text_encoder, prompts, device=self.text_encoder.device)

    @staticmethod
    def draw_granularity(images, granularity: torch.Tensor, alpha: float = 0.35) -> list[PIL.Image.Image]:
        """Draw a granularity map over images: fine regions tinted red, every coarse-grid region outlined.

        Args:
            images: PIL images, or an ``"np"`` / ``"pt"`` batch from this pipeline (values in [0, 1]).
            granularity (`torch.LongTensor` of shape `(B, hc, hc)`): the map returned with ``return_granularity=True``.
        """
        from ..evaluation.visualization import granularity_overlay

        if isinstance(images, torch.Tensor):
            images = images.detach().float().cpu().permute(0, 2, 3, 1).numpy()
        if isinstance(images, np.ndarray):
            images = numpy_to_pil(images)
        images = list(images)
        if len(images) != len(granularity):
            raise ValueError(f"got {len(images)} images but {len(granularity)} granularity maps")
        return [granularity_overlay(im, g, alpha=alpha) for im, g in zip(images, granularity)]

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | str | list[int | str] | torch.LongTensor | None = None,
        num_images_per_prompt: int = 1,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        position_top_k: int | None = None,
        position_top_p: float | None = None,
        fix_fine_position: bool | None = None,
        do_sample: bool | None = None,
        output_type: str = "pil",
        return_granularity: bool = False,
        return_dict: bool = True,
        image=None,
        mask_image=None,
        num_candidates: int = 1,
    ):
        r"""Sample images, or edit ``image`` where ``mask_image`` is white.

        Args:
            class_labels: class ids or names (``transformer.config.id2label``), one per image; None for an
                unconditional model.
            num_images_per_prompt (`int`): images per label or prompt (for an unconditional model: the number of
                images).
            prompt (`str` or `list[str]`, *optional*): text-to-image models only, instead of class labels.
            guidance_scale (`float`, *optional*): classifier-free guidance (``s > 1``) for a class-conditional prior
                trained with a null class (``transformer.config.use_null_class``); None keeps the prior's
                ``generation_config``. The authors' DQ models (class and text) have no null condition: for them it
                must stay None / 1 (clear error).
            negative_prompt: must stay None (no DQ text model has a null text).
            generator (`torch.Generator` or a list of them, *optional*): the same generator state gives the same
                images; a list holds one generator per image (image ``i`` then depends on ``generator[i]`` only).
            temperature, top_k, top_p: content sampling (one temperature for positions too, as the authors);
                position_top_k, position_top_p: position sampling; None keeps the prior's ``generation_config``.
            fix_fine_position (`bool`, *optional*): code every fine cell outside the sampled coarse ones in a fixed
                order instead of sampling the fine positions.
            do_sample (`bool`, *optional*): False picks the most likely token at every step.
            output_type (`str`): ``"pil"``, ``"np"`` `(B, H, W, 3)` in [0, 1], ``"pt"`` `(B, 3, H, W)` in [0, 1], or
                ``"latent"`` for the code map `(B, hf, hf)`.
            return_granularity (`bool`): also return the granularity map `(B, hc, hc)` (1 = fine).
            return_dict (`bool`): return a :class:`DQPipelineOutput` rather than a tuple.
            image (PIL / numpy / torch, *optional*): an image to edit, at the DQ-VAE's ``sample_size``; it is encoded
                to codes and a granularity map, and ``num_images_per_prompt`` edits are made of each image.
            mask_image (PIL / numpy / torch, *optional*): white (>= 0.5) = regenerate, any size with the image's
                aspect ratio. It maps onto the granularity map: a region (a coarse-grid cell, coarse or fine) is
                regenerated, granularity included, when any white pixel falls in it; the others keep their
                granularity and codes. The sampled part follows the authors' sampler and its quirks
                (:mod:`hf_rq.dq.editing` says how the kept tokens are placed).
            num_candidates (`int`): best-of-n remedy for the sequential order (1 = off): ``n`` candidates per output,
                keeping the one under which the kept tokens are most likely.
        """
        check_output_type(output_type)
        self.check_components()
        overrides = generation_overrides(temperature=temperature, top_k=top_k, top_p=top_p,
                                         position_top_k=position_top_k, position_top_p=position_top_p,
                                         fix_fine_position=fix_fine_position, do_sample=do_sample,
                                         guidance_scale=guidance_scale)
        if image is not None or mask_image is not None:
            if prompt is not None or negative_prompt is not None:
                raise ValueError("editing (image / mask_image) takes class_labels, not a prompt: text-conditional "
                                 "DQ editing is not supported yet")
            codes, granularity = self._edit(image, mask_image, class_labels, num_images_per_prompt, num_candidates,
                                            generator, overrides)
        else:
            text_features, batch_size = self.prepare_prompt_features(prompt, negative_prompt, class_labels,
                                                                     num_images_per_prompt)
            if text_features is None:
                class_labels, batch_size = self.prepare_class_labels(class_labels, num_images_per_prompt)
            codes, granularity = self.transformer.generate(class_labels, batch_size=batch_size, generator=generator,
                                                           progress_bar=self.progress_bar,
                                                           return_dict_in_generate=False, text_features=text_features,
                                                           **overrides)
        if output_type == "latent":
            images = codes
        else:
            decoded = self.vqvae.decode_codes(codes.to(self.vqvae.device), granularity.to(self.vqvae.device)).sample
            images = postprocess_images(decoded, output_type)
        self.maybe_free_model_hooks()
        granularity = granularity if return_granularity else None
        if not return_dict:
            return (images,) if granularity is None else (images, granularity)
        return DQPipelineOutput(images=images, granularity=granularity)

    @property
    def edit_image_size(self) -> tuple[int, int]:
        """`(height, width)` of the images this pipeline edits (the DQ-VAE's ``sample_size``)."""
        return self.vqvae.config.sample_size, self.vqvae.config.sample_size

    def _edit(self, image, mask_image, class_labels, num_images_per_prompt, num_candidates, generator, overrides):
        """Encode, keep the regions outside the mask, sample the rest, keep the best candidates."""
        if mask_image is None:
            raise ValueError("image needs mask_image (white = regenerate)")
        c = self.transformer.config
        edit = self.prepare_edit(image, mask_image, class_labels, num_images_per_prompt, num_candidates,
                                 self.edit_image_size, (c.coarse_grid_size, c.coarse_grid_size), generator)
        enc = self.vqvae.encode(edit.pixels.to(self.vqvae.device, self.vqvae.dtype))
        device = self.transformer.device
        known_codes, known_granularity = enc.codes.to(device), enc.granularity.to(device)
        kept = ~edit.token_mask.to(device)
        if kept.all():  # an all-black mask: the reconstruction, no draws
            return known_codes, known_granularity
        codes, granularity = self.transformer.generate(
            edit.class_labels, batch_size=None if edit.class_labels is not None else edit.batch_size,
            generator=edit.generator, progress_bar=self.progress_bar, return_dict_in_generate=False,
            known_codes=known_codes, known_granularity=known_granularity, known_regions=kept, **overrides)
        if num_candidates > 1:
            known = DQKnownTokens(known_codes, known_granularity, kept, c.vocabulary, c.fine_position_order)
            scores = known.known_log_likelihood(self.transformer, codes, granularity, edit.class_labels)
            codes, granularity = self.select_candidates(scores, num_candidates, codes, granularity)
        return codes, granularity
