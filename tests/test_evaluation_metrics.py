"""Metric functions of hf_rq.evaluation against independent NumPy/SciPy (and scikit-image) computations."""

import math

import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage
import torch
from scipy.spatial.distance import cdist

from hf_rq.evaluation import metrics as M


@pytest.fixture(scope="module")
def features():
    rng = np.random.default_rng(0)
    # Correlated, shifted features so that every FID term matters.
    mix = rng.normal(size=(16, 16))
    real = rng.normal(size=(300, 16)) @ mix
    fake = rng.normal(size=(250, 16)) @ (mix + 0.3 * rng.normal(size=(16, 16))) + 0.5
    return real, fake


def fid_numpy(real, fake):
    """pytorch-fid's formula with scipy.linalg.sqrtm."""
    mu1, mu2 = real.mean(0), fake.mean(0)
    s1, s2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_fid_matches_scipy_sqrtm(features):
    real, fake = features
    ours = M.fid_from_features(torch.from_numpy(real).float(), fake)  # tensor and array inputs both work
    ref = fid_numpy(real.astype(np.float32).astype(np.float64), fake)
    assert ours == pytest.approx(ref, rel=1e-6)
    # Identical sets: 0 (up to round-off); FID is symmetric.
    assert abs(M.fid_from_features(real, real)) < 1e-8
    assert M.fid_from_features(fake, real) == pytest.approx(M.fid_from_features(real, fake), rel=1e-8)


def test_fid_rank_deficient_covariance():
    # Fewer samples than feature dimensions (the in-domain evaluator's 183 test images in 128-d are close).
    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(20, 32)), rng.normal(size=(25, 32)) * 1.5 + 0.2
    assert M.fid_from_features(real, fake) == pytest.approx(fid_numpy(real, fake), rel=1e-5)


def test_feature_statistics_and_errors(features):
    real, _ = features
    stats = M.FeatureStatistics.from_features(real)
    np.testing.assert_allclose(stats.covariance.numpy(), np.cov(real, rowvar=False), rtol=1e-10)
    with pytest.raises(ValueError, match="width"):
        M.fid_from_features(real, real[:, :8])
    with pytest.raises(ValueError, match="NaN"):
        M.fid_from_features(np.full((4, 2), np.nan), real[:, :2])
    with pytest.raises(ValueError, match="num_samples, num_features"):
        M.fid_from_features(real[0], real)
    with pytest.raises(TypeError, match="floating point"):
        M.fid_from_features(torch.ones(4, 2, dtype=torch.long), torch.ones(4, 2))


def kid_numpy(x, y):
    """Unbiased polynomial-kernel MMD^2 (Binkowski et al.), written out with explicit sums."""
    d = x.shape[1]
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    m = x.shape[0]
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
            - 2 * kxy.sum() / (m * m))


def test_kid_matches_numpy(features):
    real, fake = features
    # One subset of all samples: no randomness left (the order does not matter).
    mean, std = M.kernel_inception_distance(real[:250], fake, num_subsets=1, subset_size=250)
    assert mean == pytest.approx(kid_numpy(real[:250], fake), rel=1e-9)
    assert std == 0.0
    # Random subsets: reproducible with the same generator, and each one is an unbiased MMD of its draw.
    a = M.kernel_inception_distance(real, fake, num_subsets=5, subset_size=50, generator=torch.Generator().manual_seed(3))
    b = M.kernel_inception_distance(real, fake, num_subsets=5, subset_size=50, generator=torch.Generator().manual_seed(3))
    assert a == b
    g = torch.Generator().manual_seed(3)
    draws = []
    for _ in range(5):
        i = torch.randperm(300, generator=g)[:50].numpy()
        j = torch.randperm(250, generator=g)[:50].numpy()
        draws.append(kid_numpy(real[i], fake[j]))
    assert a[0] == pytest.approx(np.mean(draws), rel=1e-9)
    assert a[1] == pytest.approx(np.std(draws), rel=1e-9)
    # Same distribution -> KID about 0; shifted -> clearly positive.
    rng = np.random.default_rng(5)
    x, y, z = rng.normal(size=(200, 16)), rng.normal(size=(200, 16)), rng.normal(size=(200, 16)) + 0.5
    same = M.kernel_inception_distance(x, y, num_subsets=10, subset_size=100)[0]
    assert abs(same) < 0.1 * M.kernel_inception_distance(x, z, num_subsets=10, subset_size=100)[0]


def test_inception_score_matches_numpy():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(100, 7)) * 3
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for part in np.array_split(p, 4):
        py = part.mean(0, keepdims=True)
        scores.append(np.exp((part * (np.log(part) - np.log(py))).sum(1).mean()))
    mean, std = M.inception_score(logits=logits, splits=4)
    assert mean == pytest.approx(np.mean(scores), rel=1e-9)
    assert std == pytest.approx(np.std(scores), rel=1e-9)
    assert M.inception_score(probs=p, splits=4)[0] == pytest.approx(mean, rel=1e-9)
    # Confident and uniformly spread over K classes -> K; one class only -> 1.
    onehot = np.eye(5)[np.arange(100) % 5]
    assert M.inception_score(probs=onehot, splits=1)[0] == pytest.approx(5.0)
    assert M.inception_score(probs=np.eye(5)[np.zeros(10, dtype=int)], splits=1)[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="exactly one"):
        M.inception_score()
    with pytest.raises(ValueError, match="sum to 1"):
        M.inception_score(probs=np.ones((4, 3)))


def precision_recall_numpy(real, fake, k):
    """Kynkaanniemi et al.: k-NN radius = distance to the k-th nearest other sample."""
    def radii(x):
        return np.sort(cdist(x, x), axis=1)[:, k]  # column 0 is the sample itself
    d = cdist(fake, real)
    precision = np.mean((d <= radii(real)[None, :]).any(1))
    recall = np.mean((d.T <= radii(fake)[None, :]).any(1))
    return precision, recall


def test_precision_recall_matches_numpy(features):
    real, fake = features
    for k in (1, 3, 5):
        out = M.precision_recall(real, fake, k=k)
        p, r = precision_recall_numpy(real, fake, k)
        assert out["precision"] == pytest.approx(p) and out["recall"] == pytest.approx(r)
    assert 0 < out["precision"] < 1 and 0 < out["recall"] < 1
    # A mode-collapsed generator: high precision is possible, recall collapses.
    collapsed = np.repeat(real[:3], 50, axis=0) + 1e-3
    assert M.precision_recall(real, collapsed, k=3)["recall"] < 0.1
    with pytest.raises(ValueError, match="k=3"):
        M.precision_recall(real[:3], fake, k=3)


def test_class_consistency():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 5.0]])
    assert M.class_consistency(logits, [0, 1, 1, 1]) == 0.75
    with pytest.raises(ValueError, match="disagree"):
        M.class_consistency(logits, [0, 1])


def psnr_numpy(x, y):
    return 10 * np.log10(1.0 / ((x - y) ** 2).reshape(len(x), -1).mean(1))


def ssim_numpy(x, y, sigma=1.5, data_range=1.0):
    """Wang et al. 2004 with scipy's Gaussian filter (truncate 3.5 -> 11 taps), border cropped, per channel."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    out = []
    for a, b in zip(x, y):
        maps = []
        for ca, cb in zip(a, b):
            f = lambda t: scipy.ndimage.gaussian_filter(t, sigma, truncate=3.5)  # noqa: E731
            ma, mb = f(ca), f(cb)
            va, vb, cov = f(ca * ca) - ma**2, f(cb * cb) - mb**2, f(ca * cb) - ma * mb
            s = ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2))
            maps.append(s[5:-5, 5:-5])
        out.append(np.mean(maps))
    return np.asarray(out)


@pytest.fixture(scope="module")
def image_pair():
    rng = np.random.default_rng(4)
    # Smooth images plus noise: realistic SSIM values (not ~0 as for white noise).
    base = scipy.ndimage.gaussian_filter(rng.random((3, 3, 40, 48)), sigma=(0, 0, 3, 3))
    base = (base - base.min()) / (base.max() - base.min())
    noisy = np.clip(base + 0.05 * rng.normal(size=base.shape), 0, 1)
    return base, noisy


def test_psnr_matches_numpy(image_pair):
    x, y = image_pair
    np.testing.assert_allclose(M.psnr(torch.from_numpy(x), y).numpy(), psnr_numpy(x, y), rtol=1e-5)
    assert torch.isinf(M.psnr(x, x)).all()
    with pytest.raises(ValueError, match="differ in shape"):
        M.psnr(x, y[:, :, :20])


def test_ssim_matches_reference(image_pair):
    x, y = image_pair
    ours = M.ssim(x, y).numpy()
    np.testing.assert_allclose(ours, ssim_numpy(x, y), rtol=1e-5, atol=1e-6)
    assert 0.3 < ours.mean() < 0.99
    np.testing.assert_allclose(M.ssim(x, x).numpy(), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="at least 11x11"):
        M.ssim(x[..., :8, :8], y[..., :8, :8])


def test_ssim_matches_scikit_image(image_pair):
    import skimage.metrics as skimage_metrics  # a test dependency (setup.py extras "test")
    x, y = image_pair
    ref = [skimage_metrics.structural_similarity(a.transpose(1, 2, 0), b.transpose(1, 2, 0), data_range=1.0,
                                                 channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                                 use_sample_covariance=False)
           for a, b in zip(x, y)]
    np.testing.assert_allclose(M.ssim(x, y).numpy(), ref, rtol=1e-5, atol=1e-6)


def test_codebook_usage_and_perplexity():
    codes = torch.tensor([[0, 1], [0, 2], [0, 3], [0, 3]])  # (N, D=2)
    out = M.codebook_usage(codes, codebook_size=8, depth_axis=-1)
    counts = np.array([4, 1, 1, 2, 0, 0, 0, 0])
    p = counts[counts > 0] / counts.sum()
    assert out["codebook_usage"] == pytest.approx(4 / 8)
    assert out["codebook_perplexity"] == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    assert out["codebook_usage_depth1"] == pytest.approx(1 / 8) and out["codebook_perplexity_depth1"] == pytest.approx(1.0)
    assert out["codebook_usage_depth2"] == pytest.approx(3 / 8)
    # Uniform use of all K codes: perplexity K.
    assert M.codebook_usage(torch.arange(16).repeat(3), 16)["codebook_perplexity"] == pytest.approx(16.0)
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        M.codebook_usage(torch.tensor([9]), 8)
    with pytest.raises(TypeError, match="integer"):
        M.codebook_usage(torch.tensor([1.0]), 8)
