"""Coarse labels for CTF: the torch k-means against scikit-learn, determinism, planted clusters, bad input."""

import json

import pytest
import sklearn.cluster as sklearn_cluster
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from hf_rq.ctf.clustering import build_coarse_labels, kmeans


def _points(n=600, c=8, seed=0):
    return torch.randn(n, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_lloyd_matches_sklearn_from_the_same_start():
    x = _points()
    start = x[torch.randperm(600, generator=torch.Generator().manual_seed(1))[:24]]
    centers, labels, inertia, n_iter = kmeans(x, 24, init=start, max_iter=300, tol=1e-4)
    ref = sklearn_cluster.KMeans(24, init=start.numpy(), n_init=1, max_iter=300, tol=1e-4, algorithm="lloyd").fit(x.numpy())
    assert torch.equal(labels, torch.from_numpy(ref.labels_).long())
    torch.testing.assert_close(centers, torch.from_numpy(ref.cluster_centers_), atol=1e-10, rtol=0)
    assert abs(inertia - ref.inertia_) < 1e-8 * ref.inertia_ and n_iter == ref.n_iter_


def test_kmeans_plusplus_restarts_reach_sklearn_quality():
    x = _points(800, 8, seed=2)
    ours = kmeans(x, 32, n_init=10, seed=0)[2]
    ref = sklearn_cluster.KMeans(32, n_init=10, random_state=0, algorithm="lloyd").fit(x.numpy()).inertia_
    assert ours < 1.02 * ref, (ours, ref)


def test_deterministic_for_a_seed():
    codebook = _points(512, 8, seed=3).float()
    a = build_coarse_labels(codebook, 32, seed=7, n_init=3)
    b = build_coarse_labels(codebook, 32, seed=7, n_init=3)
    c = build_coarse_labels(codebook, 32, seed=8, n_init=3)
    assert torch.equal(a.fine_to_coarse, b.fine_to_coarse) and torch.equal(a.centroids, b.centroids)
    assert not torch.equal(a.fine_to_coarse, c.fine_to_coarse)


def test_recovers_planted_clusters():
    """Unit vectors around 20 well-separated directions, clusters of unequal size, shuffled."""
    g = torch.Generator().manual_seed(4)
    directions = F.normalize(torch.randn(20, 8, generator=g), dim=-1)
    sizes = torch.randint(5, 40, (20,), generator=g)
    planted = torch.repeat_interleave(torch.arange(20), sizes)
    vectors = directions[planted] + 0.02 * torch.randn(len(planted), 8, generator=g)
    order = torch.randperm(len(planted), generator=g)
    vectors, planted = vectors[order] * (0.5 + torch.rand(len(planted), 1, generator=g)), planted[order]  # norms vary
    result = build_coarse_labels(vectors, 20, seed=0, n_init=4)
    found = result.fine_to_coarse
    # Same partition up to renaming: each found cluster maps to exactly one planted cluster and back.
    pairs = torch.unique(torch.stack([planted, found]), dim=1)
    assert pairs.shape[1] == 20
    assert torch.equal(torch.sort(result.cluster_sizes).values, torch.sort(sizes).values)
    stats = result.stats()
    assert stats["empty_clusters"] == 0 and stats["size_min"] == int(sizes.min()) and stats["size_mean"] == len(planted) / 20
    normalized = F.normalize(vectors.double(), dim=-1)
    recomputed = ((normalized - result.centroids.double()[found]) ** 2).sum()
    assert abs(recomputed - result.inertia) < 1e-4


def test_tokenizer_input_and_normalization(fixtures_dir):
    from hf_rq.ctf.conversion import convert_llamagen_vq

    vq = convert_llamagen_vq(load_file(fixtures_dir / "llamagen" / "vq.safetensors"),
                             json.loads((fixtures_dir / "llamagen" / "vq_config.json").read_text()))
    result = build_coarse_labels(vq, num_clusters=16, seed=0, n_init=2)
    assert result.fine_to_coarse.shape == (256,) and result.centroids.shape == (16, 8)
    assert result.fine_to_coarse.dtype == torch.int64 and int(result.cluster_sizes.sum()) == 256
    # normalize=True clusters the unit codewords: the raw stored rows (not unit-norm) give the same result.
    raw = vq.quantizer.embedding.weight.detach()
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(256))
    assert torch.equal(build_coarse_labels(raw, 16, seed=0, n_init=2).fine_to_coarse, result.fine_to_coarse)


def test_bad_input():
    codebook = _points(64, 4).float()
    with pytest.raises(ValueError, match=r"num_clusters \(65\) is larger than the codebook \(64 codes\)"):
        build_coarse_labels(codebook, 65)
    with pytest.raises(ValueError, match="positive integer"):
        build_coarse_labels(codebook, 0)
    with pytest.raises(ValueError, match="distinct vectors"):
        build_coarse_labels(codebook[:4].repeat(16, 1), 8)
    with pytest.raises(TypeError, match="codebook"):
        build_coarse_labels(object(), 8)
    with pytest.raises(ValueError, match="float"):
        build_coarse_labels(torch.zeros(64, 4, dtype=torch.long), 8)
    with pytest.raises(ValueError, match="init must have shape"):
        kmeans(codebook, 8, init=torch.zeros(7, 4))
