"""CTF family: LlamaGen-style VQ tokenizer, LlamaGen GPT baseline, coarse-to-fine prior, pipelines, conversion."""

__all__ = []
