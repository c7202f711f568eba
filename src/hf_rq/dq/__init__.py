"""DQ family: DQ-VAE tokenizer, DQ-Transformer prior, pipeline and checkpoint conversion."""

from .tokens import DQTokens, DQVocabulary, codes_to_tokens, tokens_to_codes
from .entropy import compute_entropy_thresholds, patch_entropy, threshold_for_ratio
from .tokenizer import DQVAEEncoderOutput, DQVAEModel
from .prior import DQTransformerConfig, DQTransformerForImageGeneration, DQTransformerGenerateOutput, DQTransformerOutput
from .pipeline import DQPipelineOutput, DQTransformerPipeline

__all__ = [
    "DQTokens",
    "DQVocabulary",
    "codes_to_tokens",
    "tokens_to_codes",
    "compute_entropy_thresholds",
    "patch_entropy",
    "threshold_for_ratio",
    "DQVAEEncoderOutput",
    "DQVAEModel",
    "DQTransformerConfig",
    "DQTransformerForImageGeneration",
    "DQTransformerGenerateOutput",
    "DQTransformerOutput",
    "DQPipelineOutput",
    "DQTransformerPipeline",
]
