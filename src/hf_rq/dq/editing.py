"""Known tokens of a DQ edit: which regions of the granularity map are kept, and how the sampler keeps them.

A DQ sequence lists the coarse cells, then the fine cells, each part in the training order (coarse raster;
fine in ``fine_position_order``), and the sampler *chooses* each next position. An edit keeps whole regions
(cells of the coarse grid, i.e. of the granularity map): a kept coarse region is one known coarse token, a kept
fine region four known fine tokens, each with its code. Regenerated regions get a new granularity and new codes.

How the sampler keeps them, with its own draws untouched: at each step the positions it may draw are the
authors' allowed set restricted to regenerated cells, plus the **next known position** of the current part (the
known ones come in training order, interleaved where the model chooses); the end token is allowed only once the
known ones are all placed. When the next known position is drawn, its content is the known code. With no known
region this is exactly the authors' sampler; with every region known the only allowed position is the next known
one, so the sequence is the input's.
"""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import pad_sequence

from ..editing import known_log_likelihood
from .tokens import DQVocabulary, _fine_position_grid, check_grid_form, codes_to_tokens, upsample_granularity


class DQKnownTokens:
    """Queues of known positions and their codes for one batch (see the module docstring).

    Args:
        codes (`torch.LongTensor` of shape `(B, hf, hf)`), granularity (`(B, hc, hc)`): the encoded input.
        known_regions (`torch.BoolTensor` of shape `(B, hc, hc)`): True where the region is kept.
        vocab (:class:`DQVocabulary`), fine_position_order (`str`): the prior's.
    """

    def __init__(self, codes, granularity, known_regions, vocab: DQVocabulary, fine_position_order: str):
        hc = vocab.coarse_grid_size
        B, device = codes.shape[0], codes.device
        if not isinstance(known_regions, torch.Tensor) or known_regions.dtype != torch.bool or \
                tuple(known_regions.shape) != (B, hc, hc):
            raise ValueError(f"known_regions must be a bool tensor of shape ({B}, {hc}, {hc}) (the granularity map's "
                             f"grid), got {getattr(known_regions, 'dtype', None)} {tuple(getattr(known_regions, 'shape', ()))}")
        check_grid_form(codes, granularity, vocab.codebook_size)
        known_regions = known_regions.to(device)
        self.vocab = vocab
        self.index = torch.arange(vocab.fine_position_vocab_size, device=device)
        coarse_known = (known_regions & (granularity == 0)).reshape(B, -1)
        fine_known = upsample_granularity((known_regions & (granularity == 1)).long()).bool().reshape(B, -1)
        cells = torch.arange(vocab.num_coarse_positions, device=device)
        order = _fine_position_grid(hc, fine_position_order, device).reshape(-1)
        self.coarse_queue = pad_sequence([torch.cat([cells[coarse_known[b]], cells.new_tensor([vocab.coarse_eos])])
                                          for b in range(B)], True, vocab.coarse_eos)
        self.fine_queue = pad_sequence([torch.cat([order[fine_known[b][order]], order.new_tensor([vocab.fine_eos])])
                                        for b in range(B)], True, vocab.fine_eos)
        self.coarse_pointer = torch.zeros(B, dtype=torch.long, device=device)
        self.fine_pointer = torch.zeros(B, dtype=torch.long, device=device)
        self.coarse_codes = codes[:, ::2, ::2].reshape(B, -1)
        self.fine_codes = codes.reshape(B, -1)
        self.fine_known = fine_known
        # Positions the sampler may draw freely: cells of regenerated regions (never a special token).
        V = vocab.fine_position_vocab_size
        self.coarse_free = torch.zeros(B, V, dtype=torch.bool, device=device)
        self.coarse_free[:, : vocab.num_coarse_positions] = ~known_regions.reshape(B, -1)
        self.fine_free = torch.zeros(B, V, dtype=torch.bool, device=device)
        self.fine_free[:, : vocab.num_fine_positions] = upsample_granularity((~known_regions).long()).bool().reshape(B, -1)

    def _next(self, queue, pointer):
        return queue.gather(1, pointer.clamp(max=queue.shape[1] - 1)[:, None]).squeeze(1)

    def restrict(self, allowed: torch.BoolTensor, finished: torch.BoolTensor, fine: bool) -> torch.BoolTensor:
        """The authors' allowed positions `(B, V)` -> those of the edit (finished rows unchanged)."""
        queue, pointer = (self.fine_queue, self.fine_pointer) if fine else (self.coarse_queue, self.coarse_pointer)
        free = self.fine_free if fine else self.coarse_free
        nxt = self.index[None] == self._next(queue, pointer)[:, None]
        return torch.where(finished[:, None], allowed, (allowed & free) | nxt)

    def keep(self, position: torch.LongTensor, code: torch.LongTensor, fine: bool) -> torch.LongTensor:
        """After the draws of one step: a known position gets its known code; the queue moves on."""
        v = self.vocab
        if fine:
            known = self.fine_known.gather(1, position.clamp(max=v.num_fine_positions - 1)[:, None]).squeeze(1)
            known &= position < v.num_fine_positions
            table, eos = self.fine_codes, v.fine_eos
            self.fine_pointer += (position == self._next(self.fine_queue, self.fine_pointer)) & (position != eos)
        else:
            known = position < v.num_coarse_positions
            known &= ~self.coarse_free.gather(1, position.clamp(max=v.num_coarse_positions - 1)[:, None]).squeeze(1)
            table, eos = self.coarse_codes, v.coarse_eos
            self.coarse_pointer += (position == self._next(self.coarse_queue, self.coarse_pointer)) & (position != eos)
        limit = table.shape[1] - 1
        return torch.where(known, table.gather(1, position.clamp(max=limit)[:, None]).squeeze(1), code)

    def known_log_likelihood(self, model, codes, granularity, class_labels) -> torch.Tensor:
        """Best-of-n score `(B,)`: log-likelihood (position + content) of the known tokens of sampled code maps, in
        the training layout (``codes_to_tokens``), under ``model`` (a ``DQTransformerForImageGeneration``)."""
        v = self.vocab
        tokens = codes_to_tokens(codes, granularity, v.codebook_size, model.config.fine_position_order)
        seq = model.prepare_sequences(tokens, class_labels)
        out = model(tokens=tokens, class_labels=class_labels)
        cp, fp = seq["coarse_position"][:, 1:], seq["fine_position"]
        coarse_flag = (cp < v.num_coarse_positions) & ~self.coarse_free.gather(1, cp.clamp(max=v.num_coarse_positions - 1))
        fine_flag = (fp < v.num_fine_positions) & self.fine_known.gather(1, fp.clamp(max=v.num_fine_positions - 1))
        flags = torch.cat([coarse_flag, fine_flag], 1)
        positions = torch.cat([cp, fp], 1)
        contents = torch.cat([seq["coarse_content"], seq["fine_content"]], 1)[:, 1:]
        return (known_log_likelihood(out.position_logits, positions, flags)
                + known_log_likelihood(out.content_logits, contents, flags))
