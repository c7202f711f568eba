"""RQ family: RQ-VAE tokenizer, RQ-Transformer prior, pipeline and checkpoint conversion."""

from .tokenizer import RQVAEModel
from .prior import RQTransformerConfig, RQTransformerForImageGeneration, RQTransformerGenerateOutput, RQTransformerOutput
from .pipeline import RQTransformerPipeline

__all__ = [
    "RQVAEModel",
    "RQTransformerConfig",
    "RQTransformerForImageGeneration",
    "RQTransformerGenerateOutput",
    "RQTransformerOutput",
    "RQTransformerPipeline",
]
