"""Class-conditional, text-conditional or unconditional image generation with a DQ-Transformer and its DQ-VAE."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput

from ..image_processing import numpy_to_pil, postprocess_images
from ..hub import BundledModelsMixin
from ..pipeline_utils import ClassLabelsMixin, check_output_type, generation_overrides, prepare_prompts
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


class DQTransformerPipeline(BundledModelsMixin, ClassLabelsMixin, DiffusionPipeline):
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
        if not self.transformer.config.text_feature_size:
            if prompt is not None or negative_prompt is not None:
                raise ValueError("this DQ-Transformer is not text-conditional (class-conditional or unconditional): it "
                                 "takes no prompt / negative_prompt; pass class_labels")
            return None, None
        if class_labels is not None:
            raise ValueError("this DQ-Transformer is text-conditional: pass prompt, not class_labels")
        prompts, negatives = prepare_prompts(prompt, negative_prompt, num_images_per_prompt)
        if negatives is not None:
            raise ValueError("negative_prompt needs classifier-free guidance, and this DQ-Transformer has no null text "
                             "to guide with (the authors' text-to-image model is trained without caption dropout)")
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
    ):
        r"""Sample images.

        Args:
            class_labels: class ids or names (``transformer.config.id2label``), one per image; None for an
                unconditional model.
            num_images_per_prompt (`int`): images per label or prompt (for an unconditional model: the number of
                images).
            prompt (`str` or `list[str]`, *optional*): text-to-image models only, instead of class labels.
            negative_prompt, guidance_scale: classifier-free guidance; the authors' DQ models (class and text) have
                no null condition, so ``guidance_scale`` must stay None / 1 and ``negative_prompt`` None (clear error).
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
        """
        check_output_type(output_type)
        self.check_components()
        text_features, batch_size = self.prepare_prompt_features(prompt, negative_prompt, class_labels,
                                                                 num_images_per_prompt)
        if text_features is None:
            class_labels, batch_size = self.prepare_class_labels(class_labels, num_images_per_prompt)
        overrides = generation_overrides(temperature=temperature, top_k=top_k, top_p=top_p,
                                         position_top_k=position_top_k, position_top_p=position_top_p,
                                         fix_fine_position=fix_fine_position, do_sample=do_sample,
                                         guidance_scale=guidance_scale)
        codes, granularity = self.transformer.generate(class_labels, batch_size=batch_size, generator=generator,
                                                       progress_bar=self.progress_bar, return_dict_in_generate=False,
                                                       text_features=text_features, **overrides)
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
