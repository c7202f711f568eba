"""Captions for text-to-image priors: the text tokenizer of a run and the caption ids of every training row.

Captions are *not* part of the code cache: the cache holds what the image tokenizer computes (codes, latents)
and is keyed by its fingerprint; the captions are tokenized at start-up into a table `(rows, text_length)`
indexed by the cache's ``index`` column. Changing the captions or the text tokenizer therefore never
invalidates (or silently reuses) cached codes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..prompts import tokenize_prompts

logger = logging.getLogger("hf_rq.training")


def add_text_arguments(parser) -> None:
    g = parser.add_argument_group("text conditioning (with --caption_column)")
    g.add_argument("--text_dropout_prob", type=float, default=0.1,
                   help="Caption dropout: replace a caption by the null text (the empty caption) with this probability "
                        "(enables classifier-free guidance and negative prompts). 0 trains the authors' way, without.")
    g.add_argument("--text_tokenizer_name_or_path", type=str, default=None,
                   help="A transformers tokenizer folder (e.g. a converted pipeline's tokenizer/). Default: train one of "
                        "the RQ authors' kind (CharBPE, lower-case) on the training captions, or reuse the fine-tuned "
                        "pipeline's.")
    g.add_argument("--text_vocab_size", type=int, default=1024, help="Vocabulary size of a tokenizer trained here.")
    g.add_argument("--text_length", type=int, default=None,
                   help="Text tokens the prior reads (the authors' block_size_cond; default: the --model_config's "
                        "text_length, else 32).")


def load_text_tokenizer(args, captions: list[str], config: dict | None = None):
    """The run's text tokenizer: ``--text_tokenizer_name_or_path``, the pretrained pipeline's, or trained on ``captions``."""
    from transformers import AutoTokenizer

    from ..rq.text_tokenizer import train_rq_text_tokenizer

    length = args.text_length or (config or {}).get("text_length") or 32
    source = args.text_tokenizer_name_or_path
    if source is None and args.pretrained_model_name_or_path:
        source = args.pretrained_model_name_or_path
        tok = AutoTokenizer.from_pretrained(source, subfolder="tokenizer", revision=args.revision)
    elif source is not None:
        tok = AutoTokenizer.from_pretrained(source)
    else:
        tok = train_rq_text_tokenizer(captions, args.text_vocab_size, length)
        logger.info(f"trained a text tokenizer on {len(captions)} captions: {len(tok)} tokens")
    if tok.pad_token_id is None:
        raise ValueError(f"the text tokenizer from {source!r} has no pad token (the null text is made of pads)")
    tok.model_max_length = length
    return tok


def caption_table(text_tokenizer, captions: list[str], text_length: int) -> torch.LongTensor:
    """Token ids `(len(captions), text_length)`, row ``i`` for the dataset's row ``i``."""
    return tokenize_prompts(text_tokenizer, captions, text_length)
