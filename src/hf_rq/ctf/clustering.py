"""Coarse labels for CTF: k-means over the tokenizer's codebook vectors.

CTF (Guo et al., 2025) groups the codebook entries whose vectors are close: decoding any member of a
cluster gives nearly the same image, so the autoregressive stage only has to choose the cluster. The
paper uses k-means with K = 512 for LlamaGen's 16384 x 8 codebook; METHOD.md recommends the
l2-normalised codewords (what LlamaGen's quantizer and decoder use), k-means++ initialisation, several
restarts and a fixed seed.

The k-means here is a small torch implementation of scikit-learn's ``KMeans(algorithm="lloyd")``
(greedy k-means++ with ``2 + log K`` local trials, Lloyd iterations until the labels stop changing or the
centre shift falls under ``tol`` times the mean feature variance, a final assignment step, empty clusters
moved to the points farthest from their centres). It is tested against scikit-learn, which stays an
optional test dependency; torch keeps the library's runtime dependencies unchanged and runs on the GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = ["CoarseLabels", "build_coarse_labels", "kmeans"]


@dataclass
class CoarseLabels:
    """A clustering of a codebook into coarse labels.

    Args:
        fine_to_coarse: `(codebook_size,)` int64, the coarse label of every code.
        centroids: `(num_clusters, C)` float32 cluster centres (in the space k-means ran in).
        inertia: sum of squared distances of the code vectors to their centre.
        cluster_sizes: `(num_clusters,)` int64 number of codes per coarse label.
        seed, normalize, n_init, n_iter: how it was made (``n_iter``: Lloyd iterations of the kept run).
    """

    fine_to_coarse: torch.LongTensor
    centroids: torch.Tensor
    inertia: float
    cluster_sizes: torch.LongTensor
    seed: int | None = None
    normalize: bool = True
    n_init: int = 1
    n_iter: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def num_clusters(self) -> int:
        return self.centroids.shape[0]

    def stats(self) -> dict:
        """Cluster-size statistics and the inertia, as plain Python numbers (for logs and reports)."""
        sizes = self.cluster_sizes.double()
        return dict(
            num_clusters=self.num_clusters,
            codebook_size=int(self.fine_to_coarse.numel()),
            inertia=float(self.inertia),
            mean_inertia_per_code=float(self.inertia) / max(1, self.fine_to_coarse.numel()),
            size_min=int(sizes.min()),
            size_max=int(sizes.max()),
            size_mean=float(sizes.mean()),
            size_std=float(sizes.std(unbiased=False)),
            size_median=float(sizes.median()),
            empty_clusters=int((sizes == 0).sum()),
            n_iter=self.n_iter,
        )


def _squared_distances(x: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """`(N, C)`, `(K, C)` -> `(N, K)` squared Euclidean distances (clamped at 0 against rounding)."""
    d = (x * x).sum(1, keepdim=True) - 2.0 * x @ centers.T + (centers * centers).sum(1)[None, :]
    return d.clamp_min_(0.0)


def _kmeans_plusplus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ (as scikit-learn): each new centre is the best of ``2 + log k`` D^2-sampled candidates."""
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    first = int(torch.randint(n, (1,), generator=generator))
    centers = [x[first]]
    closest = _squared_distances(x, x[first][None]).squeeze(1)
    potential = closest.sum()
    for _ in range(1, k):
        draws = torch.rand(trials, generator=generator, dtype=x.dtype).to(x.device) * potential
        candidates = torch.searchsorted(closest.cumsum(0), draws).clamp_(max=n - 1)
        dist = torch.minimum(closest[None, :], _squared_distances(x[candidates], x))  # (trials, N)
        pots = dist.sum(1)
        best = int(pots.argmin())
        closest, potential = dist[best], pots[best]
        centers.append(x[candidates[best]])
    return torch.stack(centers)


def _update_centers(x: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor, dist_to_own: torch.Tensor):
    """Means of the assigned points; an empty cluster takes the point farthest from its own centre."""
    k = centers.shape[0]
    counts = torch.bincount(labels, minlength=k)
    sums = torch.zeros_like(centers).index_add_(0, labels, x)
    empty = (counts == 0).nonzero().flatten()
    if empty.numel():
        far = torch.topk(dist_to_own, empty.numel()).indices
        # Move each far point out of its cluster into an empty one (scikit-learn's relocation).
        sums.index_add_(0, labels[far], -x[far])
        counts.index_add_(0, labels[far], -torch.ones_like(far))
        sums[empty] = x[far]
        counts[empty] = 1
    return sums / counts.clamp_min(1)[:, None].to(x.dtype)


def _assign(x: torch.Tensor, x_sq: torch.Tensor, centers: torch.Tensor):
    """Nearest centre of every point and the squared distance to it. ``||x||^2`` does not change the arg-min,
    so it is added after the (N, K) pass: one fused addmm over the big matrix instead of several passes."""
    partial = torch.addmm((centers * centers).sum(1)[None, :], x, centers.T, alpha=-2.0)
    best, labels = partial.min(1)
    return labels, (best + x_sq).clamp_min_(0.0)


def _lloyd(x: torch.Tensor, centers: torch.Tensor, max_iter: int, tol: float):
    labels_old = None
    n_iter = 0
    strict = False
    x_sq = (x * x).sum(1)
    for n_iter in range(1, max_iter + 1):
        labels, dist_to_own = _assign(x, x_sq, centers)
        new_centers = _update_centers(x, labels, centers, dist_to_own)
        shift = ((new_centers - centers) ** 2).sum()
        centers = new_centers
        if labels_old is not None and torch.equal(labels, labels_old):
            strict = True
            break
        if shift <= tol:
            break
        labels_old = labels
    if not strict:
        # A last assignment step, so that every point's label is its nearest returned centre.
        labels = _assign(x, x_sq, centers)[0]
    return centers, labels, n_iter


def kmeans(points: torch.Tensor, num_clusters: int, n_init: int = 10, max_iter: int = 300, tol: float = 1e-4,
           seed: int | None = 0, init: torch.Tensor | None = None, generator: torch.Generator | None = None):
    """k-means (Lloyd) of `points` `(N, C)`; returns ``(centroids (K, C), labels (N,), inertia, n_iter)``.

    Runs in float64 on the points' device. ``init`` `(K, C)` gives explicit starting centres (one run);
    otherwise ``n_init`` greedy k-means++ restarts draw from ``generator`` (a CPU generator seeded with
    ``seed`` when not given) and the run with the lowest inertia is kept, so a seed fixes the result.
    ``tol`` is relative to the mean per-feature variance, as in scikit-learn.
    """
    if points.ndim != 2:
        raise ValueError(f"points must be (N, C), got shape {tuple(points.shape)}")
    n = points.shape[0]
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, int) or num_clusters < 1:
        raise ValueError(f"num_clusters must be a positive integer, got {num_clusters!r}")
    if num_clusters > n:
        raise ValueError(f"num_clusters ({num_clusters}) is larger than the number of codebook vectors ({n})")
    if not isinstance(n_init, int) or n_init < 1:
        raise ValueError(f"n_init must be a positive integer, got {n_init!r}")
    x = points.detach().to(torch.float64)
    tol_abs = tol * float(x.var(dim=0, unbiased=False).mean())
    if init is not None:
        init = torch.as_tensor(init, dtype=torch.float64, device=x.device)
        if init.shape != (num_clusters, x.shape[1]):
            raise ValueError(f"init must have shape ({num_clusters}, {x.shape[1]}), got {tuple(init.shape)}")
        starts = [init]
    else:
        if generator is None:
            generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
        starts = None
    best = None
    for run in range(1 if init is not None else n_init):
        start = starts[0] if starts is not None else _kmeans_plusplus(x, num_clusters, generator)
        centers, labels, n_iter = _lloyd(x, start, max_iter, tol_abs)
        inertia = float(((x - centers[labels]) ** 2).sum())
        if best is None or inertia < best[2]:
            best = (centers, labels, inertia, n_iter)
    return best


def build_coarse_labels(tokenizer_or_codebook, num_clusters: int = 512, seed: int | None = 0, normalize: bool = True,
                        n_init: int = 10, max_iter: int = 300, tol: float = 1e-4, device=None) -> CoarseLabels:
    """Cluster a codebook into ``num_clusters`` coarse labels with k-means (see :func:`kmeans`).

    Args:
        tokenizer_or_codebook: a tokenizer with a ``.codebook`` `(K, C)` tensor (e.g. ``LlamaGenVQModel``:
            the rows as used for search) or that tensor.
        num_clusters: number of coarse labels (CTF uses 512 for a 16384-entry codebook).
        seed: fixes the k-means++ draws; the same seed gives the same table.
        normalize: cluster l2-normalised vectors (LlamaGen's quantizer and decoder use unit codewords, so
            Euclidean distance between them is the cosine distance the quantizer searches with).
        n_init, max_iter, tol: k-means++ restarts, Lloyd iteration cap, relative convergence tolerance.
        device: where to run (default: the codebook's device).

    Raises ``ValueError`` when ``num_clusters`` exceeds the codebook size or the codebook has fewer distinct
    vectors than clusters (some coarse label would stay empty).
    """
    codebook = tokenizer_or_codebook
    if not isinstance(codebook, torch.Tensor):
        codebook = getattr(tokenizer_or_codebook, "codebook", None)
        if not isinstance(codebook, torch.Tensor):
            raise TypeError("build_coarse_labels needs a tokenizer with a `.codebook` (K, C) tensor, or that tensor; "
                            f"got {type(tokenizer_or_codebook).__name__}")
    if codebook.ndim != 2 or not codebook.is_floating_point():
        raise ValueError(f"the codebook must be a float (K, C) tensor, got {tuple(codebook.shape)} {codebook.dtype}")
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, int) or num_clusters < 1:
        raise ValueError(f"num_clusters must be a positive integer, got {num_clusters!r}")
    if num_clusters > codebook.shape[0]:
        raise ValueError(f"num_clusters ({num_clusters}) is larger than the codebook ({codebook.shape[0]} codes)")
    x = codebook.detach().to(device=device, dtype=torch.float64)
    if normalize:
        x = F.normalize(x, dim=-1)
    distinct = torch.unique(x, dim=0).shape[0]
    if distinct < num_clusters:
        raise ValueError(f"the codebook has only {distinct} distinct vectors, fewer than num_clusters={num_clusters}")
    centers, labels, inertia, n_iter = kmeans(x, num_clusters, n_init=n_init, max_iter=max_iter, tol=tol, seed=seed)
    sizes = torch.bincount(labels, minlength=num_clusters)
    if (sizes == 0).any():  # only possible with heavily duplicated vectors; refuse rather than store a dead label
        raise ValueError(f"k-means left {int((sizes == 0).sum())} cluster(s) empty; use fewer clusters")
    return CoarseLabels(
        fine_to_coarse=labels.cpu().long(), centroids=centers.float().cpu(), inertia=inertia,
        cluster_sizes=sizes.cpu().long(), seed=seed, normalize=normalize, n_init=n_init, n_iter=n_iter,
    )
