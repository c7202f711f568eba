"""RQ family: RQ-VAE tokenizer, RQ-Transformer prior, pipeline and checkpoint conversion."""

from .tokenizer import RQVAEModel

__all__ = ["RQVAEModel"]
