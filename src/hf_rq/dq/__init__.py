"""DQ family: DQ-VAE tokenizer, DQ-Transformer prior, pipeline and checkpoint conversion."""

__all__ = []
