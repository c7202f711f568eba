"""RQ completion parity: continuing a prefix equals the authors' ``sample(partial_sample, start_loc=...)`` run on the
same random weights (fixtures/rq/partial_sample.safetensors, made by fixtures/rq/make_partial_sample.py), through
``prefix_codes`` and through the editing path (``known_codes`` / ``known_mask``)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from hf_rq.rq.conversion import convert_rqtransformer, convert_rqvae

CASES = ["greedy_2_3", "greedy_5_0", "sample_2_3", "sample_topk_4_5"]


@pytest.fixture(scope="module")
def prior(fixtures_dir):
    d = fixtures_dir / "rq"
    vqvae = convert_rqvae(load_file(d / "rqvae.safetensors"), json.loads((d / "rqvae_config.json").read_text()))
    return convert_rqtransformer(load_file(d / "rqtransformer.safetensors"),
                                 json.loads((d / "rqtransformer_config.json").read_text()), vqvae).eval()


@pytest.fixture(scope="module")
def ref(fixtures_dir):
    return load_file(fixtures_dir / "rq" / "tensors.safetensors") | load_file(fixtures_dir / "rq" / "partial_sample.safetensors")


def _sampling(ref, name):
    top_k = int(ref[f"{name}.top_k"])
    return dict(temperature=float(ref[f"{name}.temperature"]), top_k=None if top_k < 0 else top_k)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("path", ["prefix_codes", "known_mask"])
@torch.no_grad()
def test_completion_matches_authors_partial_sample(prior, ref, name, path):
    codes, cond, expected = ref["tf.codes"], ref["tf.cond"], ref[f"{name}.codes"]
    N, H, W, D = codes.shape
    h0, w0 = ref[f"{name}.start"].tolist()
    P = h0 * W + w0
    if path == "prefix_codes":
        kwargs = dict(prefix_codes=codes.reshape(N, H * W, D)[:, :P])
    else:
        known = torch.zeros(N, H * W, D, dtype=torch.bool)
        known[:, :P] = True
        kwargs = dict(known_codes=codes, known_mask=known.reshape(N, H, W, D))
    # The authors draw with torch.multinomial on the global generator: seed it the same way (generator=None).
    torch.manual_seed(int(ref[f"{name}.seed"]))
    ours = prior.generate(cond, **kwargs, **_sampling(ref, name))
    assert torch.equal(ours.reshape(N, -1, D)[:, :P], codes.reshape(N, -1, D)[:, :P])
    assert torch.equal(ours, expected)
