"""Grid form <-> token form of DQ codes, shared by :class:`~hf_rq.DQVAEModel` and the DQ-Transformer.

**Grid form** (what the tokenizer produces and decodes): ``codes`` `(B, hf, hf)` at the *fine* grid plus a
granularity map ``granularity`` `(B, hc, hc)` with ``hf = 2 * hc`` (0 = coarse, 1 = fine). A coarse cell is
stored as a 2x2 block of four equal codes.

**Token form** (what the DQ-Transformer models), the authors' "separate" layout (ARCHITECTURE.md 2.2):

* coarse tokens: one per coarse cell, in raster order of the coarse grid; content = the cell's code, position =
  its coarse raster index ``i * hc + j``;
* fine tokens: the four codes of every fine cell with their *fine-grid* raster indices ``r * hf + c``. In the
  published ``"row-first"`` order they are listed in raster order of the fine grid (the four codes of one cell
  are *not* consecutive); ``"region-first"`` lists the fine cells in coarse raster order, four codes each
  (top-left, top-right, bottom-left, bottom-right);
* each list ends with its end token and is right-padded to the batch maximum with its pad token.

Three separate index spaces (plus class/start tokens that only the prior uses), see :class:`DQVocabulary`:

=================  ====================  =======  =========  ===================
space              real values           pad      end (EOS)  start (class ``c``)
=================  ====================  =======  =========  ===================
content            codes ``0..K-1``      ``K``    ``K+1``    ``K+2+c``
coarse position    ``0..Nc-1``           ``Nc``   ``Nc+1``   ``Nc+2+c``
fine position      ``0..Nf-1``           ``Nf``   ``Nf+1``   ``Nf+2+c``
=================  ====================  =======  =========  ===================

A model with a null class (classifier-free guidance, not in the authors' models) uses ``c = C`` for it, one
start token after the class tokens in every space.

:func:`codes_to_tokens` and :func:`tokens_to_codes` are the one pair of functions converting between the two.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence

FINE_POSITION_ORDERS = ("row-first", "region-first")


@dataclass(frozen=True)
class DQVocabulary:
    """Sizes and special tokens of the three DQ index spaces.

    Args:
        codebook_size: ``K``.
        coarse_grid_size: ``hc``; the fine grid is ``hf = 2 * hc``.
        num_classes: ``C`` classes; 0 = unconditional, which has a single start token per space (``c = 0``).
        use_null_class: one more start token per space, class id ``C`` (the null class of classifier-free
            guidance; not in the authors' models). It comes after the class tokens, so every other index keeps
            its value and a model without it has exactly the authors' layout.
    """

    codebook_size: int
    coarse_grid_size: int
    num_classes: int = 0
    use_null_class: bool = False

    @property
    def fine_grid_size(self) -> int:
        return 2 * self.coarse_grid_size

    @property
    def num_coarse_positions(self) -> int:
        return self.coarse_grid_size**2

    @property
    def num_fine_positions(self) -> int:
        return self.fine_grid_size**2

    @property
    def num_start_tokens(self) -> int:
        return max(self.num_classes, 1) + int(self.use_null_class)

    @property
    def null_class_id(self) -> int | None:
        return self.num_classes if self.use_null_class else None

    # content space
    @property
    def content_pad(self) -> int:
        return self.codebook_size

    @property
    def content_eos(self) -> int:
        return self.codebook_size + 1

    @property
    def content_vocab_size(self) -> int:
        return self.codebook_size + 2 + self.num_start_tokens

    # coarse-position space
    @property
    def coarse_pad(self) -> int:
        return self.num_coarse_positions

    @property
    def coarse_eos(self) -> int:
        return self.num_coarse_positions + 1

    @property
    def coarse_position_vocab_size(self) -> int:
        return self.num_coarse_positions + 2 + self.num_start_tokens

    # fine-position space
    @property
    def fine_pad(self) -> int:
        return self.num_fine_positions

    @property
    def fine_eos(self) -> int:
        return self.num_fine_positions + 1

    @property
    def fine_position_vocab_size(self) -> int:
        return self.num_fine_positions + 2 + self.num_start_tokens

    def start_tokens(self, class_ids: torch.LongTensor) -> tuple[torch.LongTensor, torch.LongTensor, torch.LongTensor]:
        """``(content, coarse position, fine position)`` start tokens `(B,)` for class ids `(B,)` (zeros if
        unconditional; ``null_class_id`` for the null class). The class is offset into every space; the same
        content token starts both parts."""
        return (class_ids + self.codebook_size + 2, class_ids + self.num_coarse_positions + 2,
                class_ids + self.num_fine_positions + 2)


@dataclass
class DQTokens:
    """A batch of DQ token sequences (no start tokens), right-padded to the batch maximum.

    Args:
        coarse_content (`torch.LongTensor` of shape `(B, Lc)`): coarse codes, then ``K+1``, then pads ``K``.
        coarse_position (`torch.LongTensor` of shape `(B, Lc)`): coarse raster indices, then ``Nc+1``, then ``Nc``.
        fine_content (`torch.LongTensor` of shape `(B, Lf)`): fine codes, then ``K+1``, then ``K``.
        fine_position (`torch.LongTensor` of shape `(B, Lf)`): fine raster indices, then ``Nf+1``, then ``Nf``.
    """

    coarse_content: torch.LongTensor
    coarse_position: torch.LongTensor
    fine_content: torch.LongTensor
    fine_position: torch.LongTensor

    def to(self, device) -> "DQTokens":
        return DQTokens(*(t.to(device) for t in (self.coarse_content, self.coarse_position, self.fine_content,
                                                  self.fine_position)))


def check_grid_form(codes: torch.Tensor, granularity: torch.Tensor, codebook_size: int | None = None,
                    check_consistency: bool = True) -> None:
    """Raise a clear error unless ``codes`` `(B, 2h, 2h)` and ``granularity`` `(B, h, h)` form valid DQ codes.

    Checks dtypes, shapes, value ranges and (``check_consistency``) that every coarse cell holds four equal codes.
    """
    for name, t in (("codes", codes), ("granularity", granularity)):
        if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if codes.ndim != 3 or codes.shape[1] != codes.shape[2]:
        raise ValueError(f"codes must have shape (B, hf, hf) at the fine grid, got {tuple(codes.shape)}")
    if granularity.ndim != 3 or granularity.shape[1] != granularity.shape[2]:
        raise ValueError(f"granularity must have shape (B, hc, hc), got {tuple(granularity.shape)}")
    if granularity.shape[0] != codes.shape[0] or 2 * granularity.shape[1] != codes.shape[1]:
        raise ValueError(
            f"granularity map {tuple(granularity.shape)} does not fit codes {tuple(codes.shape)}: the code grid must "
            "be twice the granularity grid and the batch sizes must agree"
        )
    if granularity.numel() and (granularity.min() < 0 or granularity.max() > 1):
        raise ValueError(f"granularity must hold 0 (coarse) or 1 (fine), got values in [{granularity.min()}, {granularity.max()}]")
    if codebook_size is not None and codes.numel() and (codes.min() < 0 or codes.max() >= codebook_size):
        raise ValueError(f"codes must lie in [0, {codebook_size}), got range [{codes.min()}, {codes.max()}]")
    if check_consistency:
        B, hc = granularity.shape[:2]
        blocks = codes.reshape(B, hc, 2, hc, 2).permute(0, 1, 3, 2, 4).reshape(B, hc, hc, 4)
        uneven = (blocks != blocks[..., :1]).any(-1) & (granularity == 0)
        if uneven.any():
            b, i, j = uneven.nonzero()[0].tolist()
            raise ValueError(
                f"granularity map inconsistent with the codes: coarse cell ({i}, {j}) of image {b} holds four different "
                f"codes {blocks[b, i, j].tolist()}; a coarse cell must be a 2x2 block of one code "
                f"({int(uneven.sum())} such cell(s) in total)"
            )


def _fine_position_grid(hc: int, order: str, device) -> torch.Tensor:
    """Fine raster indices arranged `(hc, hc, 4)` per coarse cell (region-first) or `(2hc, 2hc)` (row-first)."""
    hf = 2 * hc
    grid = torch.arange(hf * hf, device=device).reshape(hf, hf)
    if order == "region-first":
        return grid.reshape(hc, 2, hc, 2).permute(0, 2, 1, 3).reshape(hc, hc, 4)
    return grid


def upsample_granularity(granularity: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Nearest upsampling of a `(B, h, w)` map to `(B, factor*h, factor*w)` (as the authors' repeat_interleave)."""
    return granularity.repeat_interleave(factor, dim=-1).repeat_interleave(factor, dim=-2)


def codes_to_tokens(codes: torch.LongTensor, granularity: torch.LongTensor, codebook_size: int,
                    fine_position_order: str = "row-first", check: bool = True) -> DQTokens:
    """Grid form -> token form (the authors' permuter).

    Args:
        codes (`torch.LongTensor` of shape `(B, hf, hf)`): codes at the fine grid.
        granularity (`torch.LongTensor` of shape `(B, hc, hc)`): 0 = coarse, 1 = fine; ``hf = 2 * hc``.
        codebook_size: ``K`` (sets the pad/end tokens).
        fine_position_order: ``"row-first"`` (published) or ``"region-first"``.
        check: validate shapes, ranges and that coarse cells hold four equal codes (raises ``ValueError``).

    Returns:
        :class:`DQTokens`; the code of a coarse cell is taken from the top-left of its 2x2 block.
    """
    if fine_position_order not in FINE_POSITION_ORDERS:
        raise ValueError(f"fine_position_order must be one of {FINE_POSITION_ORDERS}, got {fine_position_order!r}")
    if check:
        check_grid_form(codes, granularity, codebook_size)
    B, hc = granularity.shape[:2]
    vocab = DQVocabulary(codebook_size, hc)
    device = codes.device
    coarse_cells = torch.arange(hc * hc, device=device)
    coarse_codes = codes[:, ::2, ::2].reshape(B, -1)
    is_coarse = granularity.reshape(B, -1) == 0
    if fine_position_order == "row-first":
        fine_mask = upsample_granularity(granularity).reshape(B, -1) == 1
        fine_codes = codes.reshape(B, -1)
        fine_cells = _fine_position_grid(hc, "row-first", device).reshape(-1)
    else:
        fine_mask = (granularity == 1)[..., None].expand(B, hc, hc, 4).reshape(B, -1)
        fine_codes = codes.reshape(B, hc, 2, hc, 2).permute(0, 1, 3, 2, 4).reshape(B, -1)
        fine_cells = _fine_position_grid(hc, "region-first", device).reshape(-1)

    def one(values, mask, eos):
        return [torch.cat([values[b][mask[b]], values.new_tensor([eos])]) for b in range(B)]

    return DQTokens(
        coarse_content=pad_sequence(one(coarse_codes, is_coarse, vocab.content_eos), True, vocab.content_pad),
        coarse_position=pad_sequence(one(coarse_cells.expand(B, -1), is_coarse, vocab.coarse_eos), True, vocab.coarse_pad),
        fine_content=pad_sequence(one(fine_codes, fine_mask, vocab.content_eos), True, vocab.content_pad),
        fine_position=pad_sequence(one(fine_cells.expand(B, -1), fine_mask, vocab.fine_eos), True, vocab.fine_pad),
    )


def _before_end(positions: torch.Tensor, eos: int) -> torch.Tensor:
    """True for the entries of each row that come before its first ``eos``."""
    return (positions == eos).long().cumsum(dim=1) == 0


def tokens_to_codes(tokens: DQTokens, codebook_size: int, coarse_grid_size: int
                    ) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Token form -> grid form (the authors' ``forward_back``), plus the granularity map.

    Each sequence is read up to its end token. Coarse codes are written to their cells and broadcast to 2x2
    blocks, then fine codes are scattered to their fine positions. As in the authors' code, a fine position that
    no token names stays **code 0** (a sampled sequence may stop before covering every fine cell); such cells are
    still marked fine in the granularity map, which is 0 exactly at the cells named by coarse tokens.

    Returns:
        ``(codes (B, hf, hf), granularity (B, hc, hc))``.

    Raises ``ValueError`` when a token before the end token is out of range (a pad or start token, a position
    outside the grid, a content that is not a code).
    """
    vocab = DQVocabulary(codebook_size, coarse_grid_size)
    hc, hf = coarse_grid_size, vocab.fine_grid_size
    cc, cp, fc, fp = tokens.coarse_content, tokens.coarse_position, tokens.fine_content, tokens.fine_position
    if cc.shape != cp.shape or fc.shape != fp.shape or cc.ndim != 2 or fc.ndim != 2 or cc.shape[0] != fc.shape[0]:
        raise ValueError(
            f"token sequences must be (B, Lc) content/position pairs and (B, Lf) pairs with one batch size, got "
            f"{tuple(cc.shape)}, {tuple(cp.shape)}, {tuple(fc.shape)}, {tuple(fp.shape)}"
        )
    B = cc.shape[0]
    device = cc.device

    def scatter(content, position, eos, size, what):
        valid = _before_end(position, eos)
        bad_pos = valid & ((position < 0) | (position >= size))
        bad_code = valid & ((content < 0) | (content >= codebook_size))
        if bad_pos.any() or bad_code.any():
            b, t = (bad_pos | bad_code).nonzero()[0].tolist()
            raise ValueError(
                f"{what} token {t} of image {b} is (content {int(content[b, t])}, position {int(position[b, t])}) before "
                f"its end token; contents must be codes in [0, {codebook_size}) and positions in [0, {size})"
            )
        # Invalid entries go to a spare column that is dropped afterwards.
        index = torch.where(valid, position, torch.full_like(position, size))
        out = torch.zeros(B, size + 1, dtype=torch.long, device=device)
        hit = torch.zeros(B, size + 1, dtype=torch.bool, device=device)
        out.scatter_(1, index, torch.where(valid, content, torch.zeros_like(content)))
        hit.scatter_(1, index, valid)
        return out[:, :size], hit[:, :size]

    coarse_codes, coarse_hit = scatter(cc, cp, vocab.coarse_eos, hc * hc, "coarse")
    fine_codes, fine_hit = scatter(fc, fp, vocab.fine_eos, hf * hf, "fine")
    codes = upsample_granularity(coarse_codes.reshape(B, hc, hc)).reshape(B, -1)
    codes = torch.where(fine_hit, fine_codes, codes)
    granularity = (~coarse_hit).long().reshape(B, hc, hc)
    return codes.reshape(B, hf, hf), granularity
