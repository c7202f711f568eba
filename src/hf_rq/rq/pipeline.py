"""Class-conditional, text-conditional or unconditional image generation with an RQ-Transformer and its RQ-VAE."""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput

from ..image_processing import postprocess_images
from ..hub import BundledModelsMixin
from ..pipeline_utils import ClassLabelsMixin, check_output_type, generation_overrides
from ..prompts import check_conditioning_kind, prepare_prompts, tokenize_prompts
from .prior import RQTransformerForImageGeneration
from .tokenizer import RQVAEModel


class RQTransformerPipeline(BundledModelsMixin, ClassLabelsMixin, DiffusionPipeline):
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
        """
        check_output_type(output_type)
        c = self.transformer.config
        check_conditioning_kind(prompt, class_labels, text_conditional=c.is_text_conditional, num_classes=c.num_classes)
        overrides = generation_overrides(temperature=temperature, top_k=top_k, top_p=top_p,
                                         guidance_scale=guidance_scale, do_sample=do_sample)
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
        self.transformer.check_codebook(self.vqvae)
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
