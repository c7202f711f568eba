"""The default models shipped inside the package: they load offline by their short name, in float32, with the
data's attribution next to them, and sample reproducibly with a seed."""

import json

import numpy as np
import pytest
import torch

from hf_rq import CTFPipeline, DQTransformerPipeline, RQTransformerPipeline, hub

DEFAULTS = {
    "hf-rq/rq-emoji-64": RQTransformerPipeline,
    "hf-rq/dq-emoji-64": DQTransformerPipeline,
    "hf-rq/ctf-emoji-64": CTFPipeline,
}
CLASSES = ["activities", "animals_nature", "flags", "food_drink", "objects", "people_body", "smileys_emotion",
           "symbols", "travel_places"]


@pytest.fixture(scope="module", params=sorted(DEFAULTS))
def bundled(request):
    return request.param, DEFAULTS[request.param].from_pretrained(request.param)


def test_all_defaults_are_bundled():
    assert set(DEFAULTS) <= set(hub.list_bundled_models())


def test_loads_offline_in_float32_with_attribution(bundled):
    name, pipe = bundled
    folder = hub.bundled_path(name)
    for notice in ("ATTRIBUTION.txt", "LICENSE-Noto-Emoji-Apache-2.0.txt", "LICENSE-emoji-data-MIT.txt"):
        assert (folder / notice).is_file(), notice
    for component in pipe.components.values():  # optional text components of a class model are None
        assert component is None or all(p.dtype == torch.float32 for p in component.parameters())
    assert [pipe.transformer.config.id2label[i] for i in range(9)] == CLASSES
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == type(pipe).__name__
    # the components load by the short name too (diffusers ModelMixin / transformers PreTrainedModel)
    for sub in ("vqvae", "transformer"):
        alone = type(getattr(pipe, sub)).from_pretrained(name, subfolder=sub)
        for (k, a), b in zip(getattr(pipe, sub).state_dict().items(), alone.state_dict().values()):
            assert torch.equal(a, b), (sub, k)


def test_same_seed_same_images_and_class_names(bundled):
    _, pipe = bundled
    pipe.set_progress_bar_config(disable=True)

    def sample(seed):
        return pipe(class_labels=["flags", 6], generator=torch.Generator().manual_seed(seed), output_type="np").images

    a, b = sample(0), sample(0)
    assert a.shape == (2, 64, 64, 3) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert np.abs(a[0] - a[1]).max() > 0.1 and a.std() > 0.05  # two different images, not a constant canvas


def test_text_default_offline(monkeypatch, tmp_path, capsys):
    """hf-rq/rq-emoji-64-text: the RQ-VAE of rq-emoji-64, a text prior, its tokenizer; offline, prompt in, image out."""
    from hf_rq import cli

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = "hf-rq/rq-emoji-64-text"
    assert name in hub.list_bundled_models()
    pipe = RQTransformerPipeline.from_pretrained(name)
    pipe.set_progress_bar_config(disable=True)
    folder = hub.bundled_path(name)
    for notice in ("ATTRIBUTION.txt", "LICENSE-Noto-Emoji-Apache-2.0.txt", "LICENSE-emoji-data-MIT.txt"):
        assert (folder / notice).is_file(), notice
    c = pipe.transformer.config
    assert c.is_text_conditional and c.use_null_text and c.text_vocab_size == len(pipe.tokenizer)
    assert all(p.dtype == torch.float32 for p in pipe.transformer.parameters())
    pipe.transformer.check_codebook(RQTransformerPipeline.from_pretrained("hf-rq/rq-emoji-64").vqvae)

    def sample(seed):
        return pipe(prompt=["grinning face", "red apple"], guidance_scale=3.0,
                    generator=torch.Generator().manual_seed(seed), output_type="np").images

    a, b = sample(0), sample(0)
    assert a.shape == (2, 64, 64, 3)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a[0] - a[1]).max() > 0.1
    assert cli.main(["generate", "--model", name, "--prompt", "grinning face", "--quiet",
                     "--output", str(tmp_path / "face.png")]) == 0
    assert (tmp_path / "face.png").is_file()
