"""Vector quantizers shared by the tokenizers.

* :class:`EMACodebook` - a codebook trained by exponential moving averages (no gradients), with
  Laplace smoothing and restart of unused codes. RQ-VAE and DQ-VAE both use it.
* :class:`ResidualQuantizer` - residual quantization (RQ-VAE, Lee et al. 2022): a stack of ``depth``
  codes per position, each quantizing what the previous ones left over.
* :class:`VectorQuantizer` - one gradient-trained codebook, optionally l2-normalised (LlamaGen's VQ).

Both follow the authors' numerics exactly (see ``reference/rq/ARCHITECTURE.md`` section 1.4), because
the converters promise the same codes as the authors' code for the same weights.

Layout: quantizers work on channels-last vectors ``(..., embed_dim)``; the tokenizers permute.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class EMACodebook(nn.Module):
    """A codebook of ``num_embeddings`` vectors trained by EMA, plus one padding row.

    The table has ``num_embeddings + 1`` rows because the authors' checkpoints do (an ``nn.Embedding``
    with ``padding_idx=K``); the last row is never a search candidate and never updated. All three
    tensors are buffers: the codebook receives no gradient, and the EMA statistics must survive
    ``save_pretrained`` / ``from_pretrained`` so that training can resume.

    Buffers: ``weight`` `(K + 1, C)`, ``cluster_size_ema`` `(K,)`, ``embed_ema`` `(K, C)`.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        decay: float = 0.99,
        restart_unused_codes: bool = True,
        eps: float = 1e-5,
        init: str = "normal",
    ):
        super().__init__()
        if num_embeddings < 1 or embedding_dim < 1:
            raise ValueError(f"codebook needs positive sizes, got {num_embeddings} x {embedding_dim}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.decay = decay
        self.eps = eps
        self.restart_unused_codes = restart_unused_codes
        if init == "normal":  # RQ-VAE: nn.Embedding default N(0, 1), padding row zeroed
            weight = torch.randn(num_embeddings + 1, embedding_dim)
            weight[-1] = 0
        elif init == "uniform":  # DQ-VAE: the whole table (padding row included) U(-1/K, 1/K)
            weight = torch.empty(num_embeddings + 1, embedding_dim).uniform_(-1 / num_embeddings, 1 / num_embeddings)
        else:
            raise ValueError(f"unknown codebook init {init!r}; expected 'normal' or 'uniform'")
        self.register_buffer("weight", weight)
        self.register_buffer("cluster_size_ema", torch.zeros(num_embeddings))
        self.register_buffer("embed_ema", weight[:-1].clone())

    @property
    def codewords(self) -> torch.Tensor:
        """The `(K, C)` searchable rows (the padding row excluded)."""
        return self.weight[:-1]

    @torch.no_grad()
    def distances(self, vectors: torch.Tensor) -> torch.Tensor:
        """Squared Euclidean distances `(..., K)` from `vectors` `(..., C)` to every codeword.

        Computed as ``|x|^2 + |e|^2 - 2 x.e`` in one ``addmm``, the authors' form: a different but
        mathematically equal formula rounds differently and can flip near-tied codes.
        """
        flat = vectors.reshape(-1, self.embedding_dim)
        codebook_t = self.codewords.t()
        d = torch.addmm(
            flat.pow(2).sum(dim=1, keepdim=True) + codebook_t.pow(2).sum(dim=0, keepdim=True),
            flat,
            codebook_t,
            alpha=-2.0,
        )
        return d.reshape(*vectors.shape[:-1], self.num_embeddings)

    @torch.no_grad()
    def nearest(self, vectors: torch.Tensor) -> torch.LongTensor:
        """Index of the nearest codeword (ties go to the lowest index)."""
        return self.distances(vectors).argmin(dim=-1)

    def embed(self, codes: torch.LongTensor) -> torch.Tensor:
        """Codeword lookup `(...,) -> (..., C)`."""
        return F.embedding(codes, self.weight)

    def forward(self, vectors: torch.Tensor):
        """Quantize `vectors` `(..., C)`; returns ``(codewords, codes)``.

        In training mode the EMA statistics and the table are updated *after* the lookup, so the
        returned codewords are those of the table before this call's refresh (as the authors do).
        """
        codes = self.nearest(vectors)
        codewords = self.embed(codes)
        if self.training:
            self.update(vectors, codes)
        return codewords, codes

    @torch.no_grad()
    def update(self, vectors: torch.Tensor, codes: torch.LongTensor) -> None:
        """One EMA step from `vectors` and their assigned `codes`, then restart and table refresh."""
        flat = vectors.reshape(-1, self.embedding_dim).to(self.embed_ema.dtype)
        codes = codes.reshape(-1)
        one_hot = flat.new_zeros(self.num_embeddings, flat.shape[0])
        one_hot.scatter_(0, codes[None], 1.0)
        counts = one_hot.sum(dim=1)
        sums = one_hot @ flat
        if _distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.cluster_size_ema.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_ema.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        if self.restart_unused_codes:
            self._restart_unused(flat)
        self._refresh_weight()

    @torch.no_grad()
    def _restart_unused(self, flat: torch.Tensor) -> None:
        # Dead codes (EMA count < 1) are re-seeded from the current inputs; with fewer inputs than codes
        # the inputs are tiled with small uniform noise so that restarted codes are distinct.
        candidates = flat
        if flat.shape[0] < self.num_embeddings:
            repeats = math.ceil(self.num_embeddings / flat.shape[0])
            candidates = flat.repeat(repeats, 1)
            candidates = candidates + torch.rand_like(candidates) * (0.01 / math.sqrt(self.embedding_dim))
        candidates = candidates[torch.randperm(candidates.shape[0], device=flat.device)][: self.num_embeddings]
        if _distributed():
            dist.broadcast(candidates, 0)  # every rank must restart the same codes with the same vectors
        alive = (self.cluster_size_ema >= 1).to(flat.dtype)
        self.embed_ema.mul_(alive[:, None]).add_(candidates * (1 - alive[:, None]))
        self.cluster_size_ema.mul_(alive).add_(1 - alive)

    @torch.no_grad()
    def _refresh_weight(self) -> None:
        # Laplace smoothing keeps codes with a tiny EMA count from blowing up when dividing.
        total = self.cluster_size_ema.sum()
        size = total * (self.cluster_size_ema + self.eps) / (total + self.num_embeddings * self.eps)
        self.weight[:-1] = (self.embed_ema / size[:, None]).to(self.weight.dtype)

    def usage_statistics(self, codes: torch.LongTensor) -> dict[str, float]:
        """Share of codes used and perplexity of the code histogram of `codes`."""
        counts = torch.bincount(codes.reshape(-1), minlength=self.num_embeddings).float()
        probs = counts / counts.sum().clamp_min(1)
        entropy = -(probs[probs > 0] * probs[probs > 0].log()).sum()
        return {"usage": (counts > 0).float().mean().item(), "perplexity": entropy.exp().item()}


class ResidualQuantizer(nn.Module):
    """Residual quantization with ``depth`` code levels (RQ-VAE section 3.1).

    ``r_0 = z``; at each depth ``d`` the nearest codeword ``e(k_d)`` to the residual ``r_d`` is chosen and
    ``r_{d+1} = r_d - e(k_d)``. The quantized latent is the sum of the chosen codewords. With
    ``shared_codebook=True`` one codebook serves every depth and is stored once (the authors' checkpoints
    store D identical copies; the converter checks and folds them).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        depth: int,
        shared_codebook: bool = True,
        decay: float = 0.99,
        restart_unused_codes: bool = True,
    ):
        super().__init__()
        if depth < 1:
            raise ValueError(f"code depth must be >= 1, got {depth}")
        self.depth = depth
        self.shared_codebook = shared_codebook
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        n_books = 1 if shared_codebook else depth
        self.codebooks = nn.ModuleList(
            EMACodebook(num_embeddings, embedding_dim, decay, restart_unused_codes) for _ in range(n_books)
        )

    def codebook(self, d: int) -> EMACodebook:
        """The codebook used at depth ``d``."""
        return self.codebooks[0 if self.shared_codebook else d]

    def forward(self, latents: torch.Tensor):
        """Quantize channels-last `latents` `(N, h, w, C)`.

        Returns ``(quantized, codes, commitment_loss, partial_sums)``: the straight-through quantized
        latent `(N, h, w, C)`, codes `(N, h, w, D)`, the commitment loss (mean over depths of the MSE
        between the latent and each partial sum) and the partial sums `(N, h, w, D, C)`.
        """
        residual = latents.detach().clone()
        running = torch.zeros_like(latents)
        partial_sums, codes = [], []
        for d in range(self.depth):
            codewords, code = self.codebook(d)(residual)
            residual = residual - codewords
            running = running + codewords
            partial_sums.append(running)
            codes.append(code)
        partial = torch.stack(partial_sums, dim=-2)
        commitment_loss = torch.stack([(latents - p.detach()).pow(2).mean() for p in partial_sums]).mean()
        quantized = latents + (partial_sums[-1] - latents).detach()
        return quantized, torch.stack(codes, dim=-1), commitment_loss, partial

    def embed_codes_with_depth(self, codes: torch.LongTensor) -> torch.Tensor:
        """Per-depth codewords `(..., D) -> (..., D, C)`, not summed (what the RQ-Transformer reads)."""
        return torch.stack([self.codebook(d).embed(codes[..., d]) for d in range(codes.shape[-1])], dim=-2)

    def embed_codes(self, codes: torch.LongTensor) -> torch.Tensor:
        """Quantized latent from codes: the sum of the codewords of every given depth, `(..., C)`."""
        return self.embed_codes_with_depth(codes).sum(dim=-2)

    @torch.no_grad()
    def soft_codes(
        self,
        latents: torch.Tensor,
        temperature: float = 1.0,
        stochastic: bool = False,
        generator: torch.Generator | None = None,
    ):
        """Soft targets for the RQ-Transformer (RQ paper section 3.3).

        At each depth ``q_d = softmax(-|r_d - e|^2 / temperature)``; the code is the arg-min, or a sample
        from ``q_d`` when ``stochastic``; the next residual follows that code. Returns
        ``(soft (N, h, w, D, K), codes (N, h, w, D))``.
        """
        if temperature <= 0:
            raise ValueError(f"soft-code temperature must be > 0, got {temperature}")
        residual = latents.detach().clone()
        softs, codes = [], []
        for d in range(self.depth):
            book = self.codebook(d)
            dist_ = book.distances(residual)
            soft = F.softmax(-dist_ / temperature, dim=-1)
            if stochastic:
                code = torch.multinomial(soft.reshape(-1, soft.shape[-1]), 1, generator=generator)
                code = code.reshape(soft.shape[:-1])
            else:
                code = dist_.argmin(dim=-1)
            residual = residual - book.embed(code)
            softs.append(soft)
            codes.append(code)
        return torch.stack(softs, dim=-2), torch.stack(codes, dim=-1)


class VectorQuantizer(nn.Module):
    """A single codebook trained by gradients (VQ-VAE / VQGAN), optionally on the unit sphere.

    With ``l2_normalize=True`` (ViT-VQGAN's l2-normalised codes, as LlamaGen's tokenizer uses them) both the
    input vectors and the codebook rows are l2-normalised before the nearest-neighbour search, so the
    squared distance is ``2 - 2 cos``; the quantized vector is the *normalised* row. The stored rows need
    not be unit-norm (a trained codebook's are not), so every lookup normalises them.

    Unlike :class:`EMACodebook` the table is an ``nn.Parameter`` that learns from the codebook loss
    ``mean((z_q - sg[z])^2)``; the encoder learns from the commitment loss ``mean((sg[z_q] - z)^2)`` and,
    through the straight-through estimator, from the reconstruction. Both losses are returned unweighted.

    Parameter: ``embedding.weight`` `(K, C)`.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, l2_normalize: bool = True):
        super().__init__()
        if num_embeddings < 1 or embedding_dim < 1:
            raise ValueError(f"codebook needs positive sizes, got {num_embeddings} x {embedding_dim}")
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.l2_normalize = l2_normalize
        self.embedding = nn.Embedding(num_embeddings, embedding_dim)
        with torch.no_grad():  # the VQGAN init, on the sphere when the codes live there
            self.embedding.weight.uniform_(-1.0 / num_embeddings, 1.0 / num_embeddings)
            if l2_normalize:
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, p=2, dim=-1))

    @property
    def codewords(self) -> torch.Tensor:
        """The `(K, C)` codebook as searched and looked up (l2-normalised rows when ``l2_normalize``)."""
        weight = self.embedding.weight
        return F.normalize(weight, p=2, dim=-1) if self.l2_normalize else weight

    @torch.no_grad()
    def distances(self, vectors: torch.Tensor) -> torch.Tensor:
        """Squared Euclidean distances `(..., K)` from `vectors` `(..., C)` (normalised first if enabled).

        Computed in float32 as ``|x|^2 + |e|^2 - 2 x.e``, the authors' form and order of operations: a
        bf16 search, or a different but equal formula, rounds differently and can flip near-tied codes.
        """
        flat = vectors.reshape(-1, self.embedding_dim).float()
        if self.l2_normalize:
            flat = F.normalize(flat, p=2, dim=-1)
        codebook = self.codewords.float()
        d = flat.pow(2).sum(dim=1, keepdim=True) + codebook.pow(2).sum(dim=1) - 2 * (flat @ codebook.t())
        return d.reshape(*vectors.shape[:-1], self.num_embeddings)

    @torch.no_grad()
    def nearest(self, vectors: torch.Tensor) -> torch.LongTensor:
        """Index of the nearest codeword (ties go to the lowest index)."""
        return self.distances(vectors).argmin(dim=-1)

    def embed(self, codes: torch.LongTensor) -> torch.Tensor:
        """Codeword lookup `(...,) -> (..., C)` (normalised rows when ``l2_normalize``)."""
        return F.embedding(codes, self.codewords)

    def forward(self, vectors: torch.Tensor):
        """Quantize `vectors` `(..., C)`.

        Returns ``(quantized, codes, commitment_loss, codebook_loss)``: the straight-through quantized
        vectors `(..., C)` (value = the chosen codeword, gradient = that of the normalised input), the codes
        `(...)`, and the two unweighted scalar losses.
        """
        codes = self.nearest(vectors)  # normalises a float32 copy itself (once, as the authors do)
        z = F.normalize(vectors, p=2, dim=-1) if self.l2_normalize else vectors
        z_q = self.embed(codes).to(z.dtype)
        codebook_loss = (z_q - z.detach()).pow(2).mean()
        commitment_loss = (z_q.detach() - z).pow(2).mean()
        quantized = z + (z_q - z).detach()
        return quantized, codes, commitment_loss, codebook_loss

    def usage_statistics(self, codes: torch.LongTensor) -> dict[str, float]:
        """Share of codes used and perplexity of the code histogram of `codes`."""
        counts = torch.bincount(codes.reshape(-1), minlength=self.num_embeddings).float()
        probs = counts / counts.sum().clamp_min(1)
        entropy = -(probs[probs > 0] * probs[probs > 0].log()).sum()
        return {"usage": (counts > 0).float().mean().item(), "perplexity": entropy.exp().item()}
