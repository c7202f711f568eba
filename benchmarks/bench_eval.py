"""Speed of hf_rq.evaluation's metrics against the usual NumPy/SciPy/scikit-image computations, same inputs.

    python benchmarks/bench_eval.py [--threads 2] [--repeats 3]

Rows (ours vs baseline, median seconds, ratio = baseline / ours, so > 1 means ours is faster):

* FID, 2048-d features (Inception width), 2000 vs 2000 samples: eigendecomposition of
  ``S_r^(1/2) S_g S_r^(1/2)`` in torch float64 vs pytorch-fid's ``scipy.linalg.sqrtm(S_r @ S_g)``.
* FID, 128-d (the bundled classifier's width), 183 vs 900 samples.
* precision/recall (k=3), 128-d, 2000 vs 2000: torch ``cdist`` vs ``scipy.spatial.distance.cdist`` + sort.
* KID (100 subsets of 1000), 2048-d: ours vs a NumPy loop with the same kernel.
* SSIM of 183 64x64 RGB images: batched separable conv vs scikit-image's ``structural_similarity`` per image
  (skipped when scikit-image is not installed).
* classifier features (images/s) of the bundled evaluator on 64x64 images: batch 64 vs batch 1.

The numbers also check agreement: the max relative difference between the two results is printed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import scipy.linalg
import torch
from scipy.spatial.distance import cdist

from hf_rq.evaluation import metrics as M


def timed(fn, repeats: int):
    result = fn()  # warm-up, and the value for the agreement check
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def fid_scipy(real, fake):
    mu1, mu2 = real.mean(0), fake.mean(0)
    s1, s2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def pr_scipy(real, fake, k=3):
    r_real = np.sort(cdist(real, real), axis=1)[:, k]
    r_fake = np.sort(cdist(fake, fake), axis=1)[:, k]
    d = cdist(fake, real)
    return float((d <= r_real[None]).any(1).mean()), float((d.T <= r_fake[None]).any(1).mean())


def kid_numpy(real, fake, subsets=100, size=1000, seed=0):
    rng = np.random.default_rng(seed)
    d = real.shape[1]
    out = []
    for _ in range(subsets):
        x = real[rng.choice(len(real), size, replace=False)]
        y = fake[rng.choice(len(fake), size, replace=False)]
        kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        m = size
        out.append((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                   - 2 * kxy.mean())
    return float(np.mean(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    rows = []

    def add(name, ours, base):
        (t_ours, v_ours), (t_base, v_base) = ours, base
        a, b = np.atleast_1d(np.asarray(v_ours, dtype=float)), np.atleast_1d(np.asarray(v_base, dtype=float))
        diff = float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12))) if a.shape == b.shape else float("nan")
        rows.append((name, t_ours, t_base, t_base / t_ours, diff))

    mix = rng.normal(size=(2048, 2048)) / 40
    real, fake = rng.normal(size=(2000, 2048)) @ mix, rng.normal(size=(2000, 2048)) @ mix + 0.05
    add("FID 2048-d, 2000 vs 2000", timed(lambda: M.fid_from_features(real, fake), args.repeats),
        timed(lambda: fid_scipy(real, fake), args.repeats))
    r128, f128 = rng.normal(size=(183, 128)), rng.normal(size=(900, 128)) + 0.1
    add("FID 128-d, 183 vs 900", timed(lambda: M.fid_from_features(r128, f128), args.repeats),
        timed(lambda: fid_scipy(r128, f128), args.repeats))
    p_real, p_fake = rng.normal(size=(2000, 128)), rng.normal(size=(2000, 128)) * 1.1
    add("precision/recall k=3, 128-d, 2000 vs 2000",
        timed(lambda: tuple(M.precision_recall(p_real, p_fake).values()), args.repeats),
        timed(lambda: pr_scipy(p_real, p_fake), args.repeats))
    k_real, k_fake = rng.normal(size=(2000, 2048)), rng.normal(size=(2000, 2048)) + 0.02
    # Different random subsets: the values agree only statistically (both about the same MMD^2).
    add("KID 100x1000, 2048-d", timed(lambda: M.kernel_inception_distance(k_real, k_fake)[0], args.repeats),
        timed(lambda: kid_numpy(k_real, k_fake), args.repeats))
    try:
        from skimage.metrics import structural_similarity
    except ImportError:
        structural_similarity = None
    x = rng.random((183, 3, 64, 64))
    y = np.clip(x + 0.05 * rng.normal(size=x.shape), 0, 1)
    if structural_similarity is not None:
        add("SSIM 183 x 64x64 RGB", timed(lambda: M.ssim(x, y).numpy(), args.repeats),
            timed(lambda: np.array([structural_similarity(a.transpose(1, 2, 0), b.transpose(1, 2, 0), data_range=1.0,
                                                          channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                                          use_sample_covariance=False) for a, b in zip(x, y)]),
                  args.repeats))
    try:
        from hf_rq.evaluation import CNNImageClassifier, extract_features

        clf = CNNImageClassifier.from_pretrained("hf-rq/emoji-classifier-64")
        images = torch.rand(256, 3, 64, 64)
        t64, v64 = timed(lambda: extract_features(clf, images, batch_size=64).features, args.repeats)
        t1, v1 = timed(lambda: extract_features(clf, images, batch_size=1).features, args.repeats)
        rows.append(("classifier features, 256 images (batch 64 vs 1)", t64, t1, t1 / t64,
                     float((v64 - v1).abs().max() / v1.abs().max())))
    except OSError as exc:
        print(f"(skipping the classifier row: {exc})")

    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.repeats}")
    print(f"| {'case':<44} | {'ours s':>8} | {'baseline s':>10} | {'ratio':>6} | {'max rel diff':>12} |")
    print(f"|{'-' * 46}|{'-' * 10}|{'-' * 12}|{'-' * 8}|{'-' * 14}|")
    for name, a, b, ratio, diff in rows:
        print(f"| {name:<44} | {a:8.4f} | {b:10.4f} | {ratio:6.2f} | {diff:12.2e} |")


if __name__ == "__main__":
    main()
