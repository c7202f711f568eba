"""The RQ top-p draw without a full sort (hf_rq.sampling.nucleus_draw) picks the same token as the sorted formula."""

import pytest
import torch

import hf_rq.sampling as sampling
from hf_rq import RQTransformerConfig, RQTransformerForImageGeneration
from hf_rq.sampling import _nucleus_bucketed, _nucleus_sorted, top_k_logits


def unstable_sort_formula(probs, top_p, u):
    """The draw as written before nucleus_draw (torch's default, unstable sort)."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    cumulative = sorted_probs.cumsum(dim=-1)
    kept = ((cumulative - sorted_probs) < top_p).sum(dim=-1, keepdim=True)
    mass = cumulative.gather(-1, kept - 1)
    index = torch.searchsorted(cumulative, u * mass, right=True).clamp_(max=kept - 1)
    return order.gather(-1, index).squeeze(-1)


def rows(kind, B, K, g):
    """Probability rows of several shapes: near-uniform (an untrained model), peaked, ties, top-k zeros, underflow."""
    scale = {"uniform": 0.02, "mild": 1.0, "peaked": 4.0, "underflow": 40.0, "ties": 1.0, "top_k": 1.0}[kind]
    logits = torch.randn(B, K, generator=g) * scale
    if kind == "ties":
        logits = (logits * 4).round() / 4  # many exactly equal probabilities
    if kind == "top_k":
        logits = top_k_logits(logits, 37)
    return torch.softmax(logits, dim=-1)


@pytest.mark.parametrize("K", [4096, 5000])
@pytest.mark.parametrize("kind", ["uniform", "mild", "peaked", "underflow", "ties", "top_k"])
def test_bucketed_draw_equals_sorted_draw(kind, K):
    g = torch.Generator().manual_seed(K)
    for top_p in (0.01, 0.5, 0.92, 0.999, 1.0):
        probs = rows(kind, 6, K, g)
        u = torch.rand(6, 1, generator=g)
        u[0], u[1] = 0.0, 1.0 - 2.0 ** -24  # both ends of [0, 1)
        assert torch.equal(_nucleus_bucketed(probs, top_p, u), _nucleus_sorted(probs, top_p, u)), (kind, top_p)
    # unnormalised rows whose whole mass is below p: every token is kept, the last one is found before the window
    probs = rows(kind, 6, K, g) * 0.5
    u = torch.rand(6, 1, generator=g)
    assert torch.equal(_nucleus_bucketed(probs, 1.0, u), _nucleus_sorted(probs, 1.0, u))
    # rows summing to ~3 (float64 sums no longer exact): the sorted path answers
    probs = rows(kind, 6, K, g) * 3.0
    assert torch.equal(_nucleus_bucketed(probs, 0.92, u), _nucleus_sorted(probs, 0.92, u))


def test_sorted_draw_is_the_former_formula_and_orders_ties_by_token_id():
    g = torch.Generator().manual_seed(0)
    probs = rows("mild", 8, 1024, g)  # no exact ties
    u = torch.rand(8, 1, generator=g)
    for top_p in (0.5, 0.92, 1.0):
        assert torch.equal(_nucleus_sorted(probs, top_p, u), unstable_sort_formula(probs, top_p, u))
    # exact ties: the lower token id comes first in the order, whatever the sort algorithm would do
    probs = torch.tensor([[0.1, 0.3, 0.2, 0.3, 0.1]])
    assert _nucleus_sorted(probs, 1.0, torch.tensor([[0.1]])).item() == 1
    assert _nucleus_sorted(probs, 1.0, torch.tensor([[0.4]])).item() == 3
    assert _nucleus_sorted(probs, 1.0, torch.tensor([[0.95]])).item() == 4


def test_generate_draws_the_same_codes_on_either_path(monkeypatch):
    """The sampler's codes do not depend on which path the vocabulary size selects."""
    config = RQTransformerConfig(codebook_size=4096, grid_height=2, grid_width=2, code_depth=2, code_embed_dim=8,
                                 hidden_size=16, num_spatial_layers=1, num_depth_layers=1, num_attention_heads=2,
                                 num_classes=3)
    torch.manual_seed(0)
    model = RQTransformerForImageGeneration(config).eval()
    with torch.no_grad():
        model.code_embeddings.normal_()
    labels = torch.tensor([0, 1, 2, 0])
    kwargs = dict(top_p=0.9, temperature=[1.0, 3.0])  # the second depth near-uniform (many buckets, many ties)
    bucketed = model.generate(labels, generator=torch.Generator().manual_seed(1), **kwargs)
    monkeypatch.setattr(sampling, "_BUCKETED_MIN_VOCAB", 10**9)
    assert torch.equal(model.generate(labels, generator=torch.Generator().manual_seed(1), **kwargs), bucketed)
