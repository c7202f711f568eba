"""The RQ authors' text tokenizer as a transformers tokenizer (``PreTrainedTokenizerFast``, saved as ``tokenizer.json``).

The authors' CC-3M model reads captions through the `tokenizers` library's ``CharBPETokenizer`` (their
``bpe16k_huggingface``: BERT normalisation with lower-casing, BERT pre-tokenisation, BPE with the ``</w>``
end-of-word suffix, ``[UNK]`` for unknown characters), to which their dataset adds a ``[PAD]`` special token,
right padding to ``context_length`` (32) and right truncation. No BOS/EOS tokens. The same ``tokenizers``
object, wrapped in ``PreTrainedTokenizerFast`` with ``pad_token="[PAD]"`` and ``model_max_length=context_length``,
gives the same ids through the ordinary transformers call
``tokenizer(texts, padding="max_length", truncation=True)``; ``hf_rq.prompts.tokenize_prompts`` makes that call.

Their vocabulary files (``bpe-16k-vocab.json`` / ``bpe-16k-merges.txt``) are not shipped with hf-rq: the
converter reads them from the authors' checkout. A model trained here gets its own vocabulary, trained on its
captions with the same tokenizer class (:func:`train_rq_text_tokenizer`).
"""

from __future__ import annotations

from typing import Iterable

from transformers import PreTrainedTokenizerFast

UNK_TOKEN = "[UNK]"
PAD_TOKEN = "[PAD]"


def _wrap(bpe, context_length: int) -> PreTrainedTokenizerFast:
    if not isinstance(context_length, int) or context_length < 1:
        raise ValueError(f"context_length must be a positive integer, got {context_length!r}")
    bpe.add_special_tokens([PAD_TOKEN])  # as the authors' dataset does, after loading the vocabulary
    bpe.no_padding()
    bpe.no_truncation()  # padding/truncation are the transformers call's business (same result)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, unk_token=UNK_TOKEN, pad_token=PAD_TOKEN,
                                   model_max_length=context_length, padding_side="right", truncation_side="right")


def rq_text_tokenizer_from_files(vocab_file: str, merges_file: str, context_length: int = 32) -> PreTrainedTokenizerFast:
    """The authors' tokenizer from their ``bpe-16k-vocab.json`` / ``bpe-16k-merges.txt`` (lower-casing, no BPE dropout)."""
    from tokenizers import CharBPETokenizer

    for name, path in (("vocab_file", vocab_file), ("merges_file", merges_file)):
        try:
            open(path, "rb").close()
        except OSError as exc:
            raise FileNotFoundError(f"{name} {path!r} cannot be read: {exc}") from exc
    return _wrap(CharBPETokenizer.from_file(vocab_filename=str(vocab_file), merges_filename=str(merges_file),
                                            unk_token=UNK_TOKEN, lowercase=True), context_length)


def train_rq_text_tokenizer(texts: Iterable[str], vocab_size: int, context_length: int = 32,
                            min_frequency: int = 1) -> PreTrainedTokenizerFast:
    """A tokenizer of the authors' kind with a vocabulary trained on ``texts`` (``vocab_size`` includes ``[PAD]``
    (id 0) and ``[UNK]`` (id 1); a small corpus may give fewer tokens)."""
    from tokenizers import CharBPETokenizer

    if vocab_size < 3:
        raise ValueError(f"vocab_size must be >= 3 ([UNK], [PAD] and one token), got {vocab_size}")
    bpe = CharBPETokenizer(unk_token=UNK_TOKEN, lowercase=True)
    # [PAD] = 0 and [UNK] = 1, as in the authors' bpe-16k vocabulary.
    bpe.train_from_iterator(list(texts), vocab_size=vocab_size, min_frequency=min_frequency,
                            special_tokens=[PAD_TOKEN, UNK_TOKEN], show_progress=False)
    return _wrap(bpe, context_length)
