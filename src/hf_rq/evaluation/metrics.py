"""Image-quality metrics as plain functions of features, probabilities, images or codes.

Generation metrics take features `(N, F)` from any extractor (``features.py``): the bundled in-domain
classifier, the FID Inception-v3, or your own. Reconstruction metrics take images `(N, C, H, W)` in
[0, 1]. All statistics are computed in float64; inputs may be torch tensors or numpy arrays.

Conventions (those of the reference implementations, so numbers are comparable):

* FID (Heusel et al. 2017): ``|mu_r - mu_g|^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2))`` with unbiased
  covariances (``ddof=1``), as pytorch-fid and torch-fidelity.
* KID (Binkowski et al. 2018): unbiased MMD^2 with the kernel ``(x.y / F + 1)^3``, averaged over random
  subsets (mean and population std), as torch-fidelity.
* Inception Score (Salimans et al. 2016): ``exp(E_x KL(p(y|x) || p(y)))`` per split, mean and std.
* Precision / recall (Kynkaanniemi et al. 2019): k-NN balls (radius = distance to the k-th nearest other
  sample) around each real (for precision) or generated (for recall) feature.
* PSNR with data range 1 and SSIM with an 11x11 Gaussian window (sigma 1.5), ``K1 = 0.01``,
  ``K2 = 0.03``, population (co)variances and only the window positions that lie inside the image (Wang
  et al. 2004; skimage's ``structural_similarity(gaussian_weights=True, use_sample_covariance=False)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


def _as_features(x, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor or numpy array, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (num_samples, num_features), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, got dtype {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return x.detach().to("cpu", torch.float64)


def _check_pair(real: torch.Tensor, fake: torch.Tensor) -> None:
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and generated features differ in width: {real.shape[1]} vs {fake.shape[1]}")


# ------------------------------------------------------------------------------------------------ FID
@dataclass
class FeatureStatistics:
    """Mean `(F,)` and unbiased covariance `(F, F)` of a feature set, in float64 (what FID compares)."""

    mean: torch.Tensor
    covariance: torch.Tensor
    num_samples: int

    @classmethod
    def from_features(cls, features) -> "FeatureStatistics":
        x = _as_features(features, "features")
        if x.shape[0] < 2:
            raise ValueError(f"feature statistics need at least 2 samples, got {x.shape[0]}")
        mean = x.mean(0)
        centered = x - mean
        return cls(mean, centered.T @ centered / (x.shape[0] - 1), x.shape[0])


def _sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix (tiny negative eigenvalues are rounding)."""
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(stats_real: FeatureStatistics, stats_fake: FeatureStatistics) -> float:
    """Frechet distance between two Gaussians given by their statistics.

    ``Tr((S_r S_g)^(1/2))`` is the sum of the square roots of the eigenvalues of ``S_r^(1/2) S_g S_r^(1/2)``,
    a symmetric PSD matrix with the same spectrum as ``S_r S_g``. Taking it with ``eigh`` avoids the
    general (non-symmetric) matrix square root that ``scipy.linalg.sqrtm`` computes, whose complex
    round-off pytorch-fid has to discard; the value is the same (tests compare with ``sqrtm``).
    """
    if stats_real.mean.shape != stats_fake.mean.shape:
        raise ValueError(f"statistics differ in width: {tuple(stats_real.mean.shape)} vs {tuple(stats_fake.mean.shape)}")
    s1, s2 = stats_real.covariance.double(), stats_fake.covariance.double()
    root1 = _sqrt_psd(s1)
    middle = root1 @ s2 @ root1
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    diff = stats_real.mean.double() - stats_fake.mean.double()
    return float(diff @ diff + torch.trace(s1) + torch.trace(s2) - 2 * trace_sqrt)


def fid_from_features(real_features, fake_features) -> float:
    """FID between two feature sets `(N_r, F)` and `(N_g, F)`."""
    real, fake = _as_features(real_features, "real_features"), _as_features(fake_features, "fake_features")
    _check_pair(real, fake)
    return frechet_distance(FeatureStatistics.from_features(real), FeatureStatistics.from_features(fake))


# ------------------------------------------------------------------------------------------------ KID
def _polynomial_mmd2(x: torch.Tensor, y: torch.Tensor, degree: int, gamma: float, coef0: float) -> float:
    m = x.shape[0]
    k_xx = (gamma * x @ x.T + coef0) ** degree
    k_yy = (gamma * y @ y.T + coef0) ** degree
    k_xy = (gamma * x @ y.T + coef0) ** degree
    off_diag = m * (m - 1)
    return float((k_xx.sum() - k_xx.diagonal().sum()) / off_diag + (k_yy.sum() - k_yy.diagonal().sum()) / off_diag
                 - 2 * k_xy.mean())


def kernel_inception_distance(
    real_features,
    fake_features,
    num_subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: float | None = None,
    coef0: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """KID: unbiased polynomial-kernel MMD^2 averaged over ``num_subsets`` random subsets; ``(mean, std)``.

    Each subset draws ``min(subset_size, N_r, N_g)`` samples without replacement from each set, with
    ``generator`` (fixed seed 0 when None, so repeated calls agree). ``gamma`` defaults to ``1 / F``.
    """
    real, fake = _as_features(real_features, "real_features"), _as_features(fake_features, "fake_features")
    _check_pair(real, fake)
    m = min(subset_size, real.shape[0], fake.shape[0])
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples in each set, got {real.shape[0]} and {fake.shape[0]}")
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be >= 1, got {num_subsets}")
    gamma = 1.0 / real.shape[1] if gamma is None else gamma
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    values = []
    for _ in range(num_subsets):
        x = real[torch.randperm(real.shape[0], generator=generator)[:m]]
        y = fake[torch.randperm(fake.shape[0], generator=generator)[:m]]
        values.append(_polynomial_mmd2(x, y, degree, gamma, coef0))
    values = np.asarray(values)
    return float(values.mean()), float(values.std())


# ------------------------------------------------------------------------------------ Inception Score
def inception_score(logits=None, probs=None, splits: int = 10) -> tuple[float, float]:
    """Inception Score of class logits (or probabilities) `(N, K)`: ``(mean, std)`` over ``splits`` chunks.

    Chunks are contiguous, as in the original implementation; shuffle the samples first if their order
    is not random (e.g. grouped by class). The maximum possible value is ``K``.
    """
    if (logits is None) == (probs is None):
        raise ValueError("pass exactly one of logits or probs")
    if logits is not None:
        p = _as_features(logits, "logits").softmax(-1)
    else:
        p = _as_features(probs, "probs")
        if (p < 0).any() or not torch.allclose(p.sum(-1), torch.ones(p.shape[0], dtype=p.dtype), atol=1e-4):
            raise ValueError("probs must be non-negative and sum to 1 over the last axis")
    if not 1 <= splits <= p.shape[0]:
        raise ValueError(f"splits must be in [1, num_samples={p.shape[0]}], got {splits}")
    scores = []
    for chunk in torch.tensor_split(p, splits):
        log_p = chunk.clamp_min(1e-30).log()
        log_marginal = chunk.mean(0, keepdim=True).clamp_min(1e-30).log()
        kl = (chunk * (log_p - log_marginal)).sum(-1).mean()
        scores.append(math.exp(float(kl)))
    scores = np.asarray(scores)
    return float(scores.mean()), float(scores.std())


# --------------------------------------------------------------------------------- precision / recall
def _pairwise_distances(a: torch.Tensor, b: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    return torch.cat([torch.cdist(a[i:i + chunk], b) for i in range(0, a.shape[0], chunk)])


def _knn_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    # Distance to the k-th nearest *other* sample: index 0 of the sorted row is the sample itself.
    d = _pairwise_distances(x, x)
    return d.kthvalue(k + 1, dim=1).values


def precision_recall(real_features, fake_features, k: int = 3) -> dict[str, float]:
    """Improved precision and recall (Kynkaanniemi et al., NeurIPS 2019).

    precision: share of generated samples inside the k-NN manifold of the real ones (fidelity);
    recall: share of real samples inside the k-NN manifold of the generated ones (coverage).
    """
    real, fake = _as_features(real_features, "real_features"), _as_features(fake_features, "fake_features")
    _check_pair(real, fake)
    if not 1 <= k < min(real.shape[0], fake.shape[0]):
        raise ValueError(f"k={k} needs more than k samples in each set (got {real.shape[0]} and {fake.shape[0]})")
    real_radii, fake_radii = _knn_radii(real, k), _knn_radii(fake, k)
    d = _pairwise_distances(fake, real)  # (N_g, N_r)
    precision = (d <= real_radii[None, :]).any(1).double().mean()
    recall = (d.T <= fake_radii[None, :]).any(1).double().mean()
    return {"precision": float(precision), "recall": float(recall)}


# ---------------------------------------------------------------------------------- classification
def class_consistency(logits, class_ids) -> float:
    """Share of samples whose predicted class (argmax of ``logits`` `(N, K)`) is the class asked for."""
    logits = torch.as_tensor(logits)
    class_ids = torch.as_tensor(class_ids).reshape(-1)
    if logits.ndim != 2 or logits.shape[0] != class_ids.shape[0]:
        raise ValueError(f"logits (N, K) and class_ids (N,) disagree: {tuple(logits.shape)} vs {tuple(class_ids.shape)}")
    if class_ids.numel() == 0:
        raise ValueError("class_consistency needs at least one sample")
    return float((logits.argmax(-1).cpu() == class_ids.cpu()).double().mean())


# ------------------------------------------------------------------------------------ reconstruction
def _as_images(x, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a float tensor (N, C, H, W) in [0, 1], got {getattr(x, 'dtype', type(x))}")
    if x.ndim != 4:
        raise ValueError(f"{name} must have shape (N, C, H, W), got {tuple(x.shape)}")
    return x.detach().double()


def psnr(images, references, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB `(N,)` of images `(N, C, H, W)` against references (both in [0, data_range]).

    Identical images give ``inf``; average the finite values or the MSE yourself when that matters.
    """
    x, y = _as_images(images, "images"), _as_images(references, "references")
    if x.shape != y.shape:
        raise ValueError(f"images and references differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    mse = (x - y).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(data_range**2 / mse)).float()


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Normalised 1-D Gaussian window `(size,)` in float64."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-(coords**2) / (2 * sigma**2))
    return w / w.sum()


def ssim(
    images,
    references,
    data_range: float = 1.0,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Per-image SSIM `(N,)`: the mean of the SSIM map over channels and all fully-inside window positions.

    ``dtype`` of the filtering: float32 (default) agrees with a float64 computation to about 1e-6 and is
    several times faster on CPU (torch's float64 convolutions are not vectorised as well).
    """
    x, y = _as_images(images, "images").to(dtype), _as_images(references, "references").to(dtype)
    if x.shape != y.shape:
        raise ValueError(f"images and references differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    if min(x.shape[-2:]) < window_size:
        raise ValueError(f"SSIM needs images of at least {window_size}x{window_size} pixels, got {tuple(x.shape[-2:])}")
    channels = x.shape[1]
    g = gaussian_window(window_size, sigma).to(dtype)
    # The 2-D Gaussian is separable: filter rows, then columns (depthwise, no padding = 'valid').
    wy = g.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    wx = g.view(1, 1, 1, -1).expand(channels, 1, 1, -1)

    def blur(t):
        return F.conv2d(F.conv2d(t, wy, groups=channels), wx, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1).float()


# ----------------------------------------------------------------------------------------- codebook
def codebook_statistics_from_counts(counts) -> dict[str, float]:
    """Usage (share of codes used at least once) and perplexity ``exp(H)`` of a code histogram `(K,)`."""
    counts = torch.as_tensor(counts).double()
    total = counts.sum()
    if total == 0:
        return {"codebook_usage": 0.0, "codebook_perplexity": 0.0}
    p = counts[counts > 0] / total
    return {"codebook_usage": float((counts > 0).double().mean()),
            "codebook_perplexity": math.exp(-float((p * p.log()).sum()))}


def code_histogram(codes: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """Counts `(K,)` of the code ids in ``codes`` (any shape); raises on ids outside [0, K)."""
    if not isinstance(codes, torch.Tensor) or codes.is_floating_point() or codes.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor, got {getattr(codes, 'dtype', type(codes))}")
    flat = codes.reshape(-1).cpu().long()
    if flat.numel() and (flat.min() < 0 or flat.max() >= codebook_size):
        raise ValueError(f"codes must lie in [0, {codebook_size}), got range [{flat.min()}, {flat.max()}]")
    return torch.bincount(flat, minlength=codebook_size)


def codebook_usage(codes: torch.Tensor, codebook_size: int, depth_axis: int | None = None) -> dict[str, float]:
    """Codebook usage and perplexity of ``codes``; with ``depth_axis`` (RQ: -1) also per depth.

    Per-depth entries are ``codebook_usage_depth{d}`` / ``codebook_perplexity_depth{d}`` (1-based, coarse
    first): residual codebooks are used very differently at each depth.
    """
    out = codebook_statistics_from_counts(code_histogram(codes, codebook_size))
    if depth_axis is not None:
        for d, level in enumerate(codes.unbind(depth_axis), start=1):
            stats = codebook_statistics_from_counts(code_histogram(level, codebook_size))
            out.update({f"{k}_depth{d}": v for k, v in stats.items()})
    return out
