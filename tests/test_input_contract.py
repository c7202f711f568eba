"""One input contract for every family (issue 15): the same table of bad sampling arguments goes through the RQ,
DQ, LlamaGen and CTF pipelines and priors, and every entry must raise ``ValueError`` / ``TypeError`` naming the
argument *before any model code runs* (a global forward pre-hook turns any module call into ``ModelCodeRan``).
Also: lists of generators (one per image) are accepted and each image is reproducible on its own, and the
tokenizers refuse non-finite images and warn once about values outside [-1, 1].

``python tests/test_input_contract.py`` runs the same table as an audit and prints how many inputs got a clear
error (run it with ``PYTHONPATH`` pointing at another checkout to compare).
"""

from __future__ import annotations

import functools
import json
import sys
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file

FIXTURES = Path(__file__).parent / "fixtures"
FAMILIES = ("rq", "dq", "llamagen", "ctf")


class ModelCodeRan(Exception):
    """Raised by the forward pre-hook: a module ran before the bad argument was refused."""


@contextmanager
def no_model_code():
    def hook(module, args):
        raise ModelCodeRan(f"{type(module).__name__}.forward ran before the argument was checked")

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# --------------------------------------------------------------------------------------------- tiny models
def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _json(path: Path):
    return json.loads(path.read_text())


def tiny_rq_config(**overrides):
    """A small RQ prior on the reference RQ-VAE's code grid (8x8x4, K=64, C=16)."""
    from hf_rq import RQTransformerConfig

    kw = dict(codebook_size=64, grid_height=8, grid_width=8, code_depth=4, code_embed_dim=16, hidden_size=32,
              num_spatial_layers=1, num_depth_layers=1, num_attention_heads=2, num_classes=10)
    return RQTransformerConfig(**{**kw, **overrides})


@functools.lru_cache(maxsize=None)
def rq_pipeline(null_class: bool = False):
    from hf_rq import RQTransformerForImageGeneration, RQTransformerPipeline
    from hf_rq.rq.conversion import convert_rqtransformer, convert_rqvae

    d = FIXTURES / "rq"
    vqvae = convert_rqvae(load_file(d / "rqvae.safetensors"), _json(d / "rqvae_config.json"))
    if null_class:  # a small random prior with a null class, so that guidance runs
        torch.manual_seed(0)
        prior = RQTransformerForImageGeneration.from_tokenizer(tiny_rq_config(use_null_class=True), vqvae).eval()
    else:
        prior = convert_rqtransformer(load_file(d / "rqtransformer.safetensors"), _json(d / "rqtransformer_config.json"),
                                      vqvae)
    return _quiet(RQTransformerPipeline(vqvae=vqvae, transformer=prior))


@functools.lru_cache(maxsize=None)
def dq_pipeline():
    from hf_rq import DQTransformerPipeline
    from hf_rq.dq.conversion import convert_dqtransformer, convert_dqvae

    d = FIXTURES / "dq"
    configs = _json(d / "configs.json")
    vqvae = convert_dqvae(load_file(d / "vae_weights.safetensors"), configs["vae_entropy"],
                          entropy_threshold=1.6777750253677368)
    prior = convert_dqtransformer(load_file(d / "transformer_weights.safetensors"), configs["dualformer"])
    return _quiet(DQTransformerPipeline(vqvae=vqvae, transformer=prior))


@functools.lru_cache(maxsize=None)
def _llamagen_vq():
    from hf_rq.ctf.conversion import convert_llamagen_vq

    d = FIXTURES / "llamagen"
    return convert_llamagen_vq(load_file(d / "vq.safetensors"), _json(d / "vq_config.json"))


@functools.lru_cache(maxsize=None)
def llamagen_pipeline():
    from hf_rq import LlamaGenPipeline
    from hf_rq.ctf.conversion import convert_llamagen_gpt

    d = FIXTURES / "llamagen"
    gpt = convert_llamagen_gpt(load_file(d / "gpt.safetensors"), _json(d / "gpt_config.json"))
    return _quiet(LlamaGenPipeline(vqvae=_llamagen_vq(), transformer=gpt.eval()))


@functools.lru_cache(maxsize=None)
def ctf_pipeline():
    from hf_rq import CTFPipeline
    from hf_rq.ctf.prior import CTFConfig, CTFForImageGeneration

    tiny = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    torch.manual_seed(0)
    prior = CTFForImageGeneration(CTFConfig(coarse_config=tiny, fine_config=tiny, num_clusters=16, codebook_size=256,
                                            codebook_dim=8, num_classes=10, grid_size=4)).eval()
    with torch.no_grad():  # sharper than the 0.02 init, so that different generators give different images
        for p in prior.parameters():
            p.normal_(0, 0.5)
    prior.set_coarse_labels(torch.arange(256) % 16)
    return _quiet(CTFPipeline(vqvae=_llamagen_vq(), transformer=prior))


PIPELINES = dict(rq=rq_pipeline, dq=dq_pipeline, llamagen=llamagen_pipeline, ctf=ctf_pipeline)

# --------------------------------------------------------------------------------------------- the table
NON_FINITE = [float("nan"), float("inf"), float("-inf")]
WRONG_TYPE_NUMBER = ["1.0", True, 1j, torch.tensor(1.0)]
BAD = {
    "temperature": NON_FINITE + [0.0, -1.0] + WRONG_TYPE_NUMBER,
    "top_k": [-1, -100, 1.5, float("nan"), float("inf"), "5", True],
    "top_p": NON_FINITE + [0.0, -0.1, 1.5] + ["0.9", True],
    "guidance_scale": NON_FINITE + [-1.0, 0.0, 0.5, 0.999] + ["2", True],
    "cfg_interval": [-2, 1.5, float("nan"), "3", True],
    "do_sample": ["yes", 1, 0.0],
    "in_cluster_mask": ["yes", 1],
    "fix_fine_position": ["no", 0],
}
for _stage2 in ("temperature", "top_k", "top_p", "guidance_scale"):
    BAD["fine_" + _stage2] = BAD[_stage2]
for _position in ("top_k", "top_p"):
    BAD["position_" + _position] = BAD[_position]
ARGUMENTS = {
    "rq": ["temperature", "top_k", "top_p", "guidance_scale", "do_sample"],
    "dq": ["temperature", "top_k", "top_p", "position_top_k", "position_top_p", "do_sample", "fix_fine_position"],
    "llamagen": ["temperature", "top_k", "top_p", "guidance_scale", "cfg_interval", "do_sample"],
    "ctf": ["temperature", "top_k", "top_p", "guidance_scale", "cfg_interval", "fine_temperature", "fine_top_k",
            "fine_top_p", "fine_guidance_scale", "in_cluster_mask", "do_sample"],
}
# Per-depth lists: RQ takes one value per code depth (4 here); the other families take numbers only.
PER_DEPTH_BAD = {
    "rq": [("temperature", [1.0, 1.0]), ("temperature", [1.0, float("nan"), 1.0, 1.0]), ("top_k", [5, -1, 5, 5]),
           ("top_p", [0.9, 0.9, 0.9, 2.0]), ("top_k", [1, 1, 1, 1.5])],
    "dq": [("temperature", [1.0]), ("top_k", [5])],
    "llamagen": [("temperature", [1.0]), ("top_p", [0.9])],
    "ctf": [("temperature", [1.0]), ("fine_temperature", [1.0])],
}
# DQ has no classifier-free guidance at all: its prior refuses any scale but 1 (its pipeline has no such argument);
# RQ's reference prior has no null class.
# The priors' compile switch (RQ, LlamaGen, CTF): a bool or a dict of torch.compile arguments.
BAD_COMPILE = [("compile", "max-autotune"), ("compile", 1), ("compile", {1: "x"})]
EXTRA = {("dq", "prior"): [("guidance_scale", 2.0), ("guidance_scale", float("nan")), ("guidance_scale", -1.0)],
         ("rq", "pipeline"): [("guidance_scale", 3.0)], ("rq", "prior"): [("guidance_scale", 3.0)] + BAD_COMPILE,
         ("llamagen", "prior"): BAD_COMPILE, ("ctf", "prior"): BAD_COMPILE}
GENERATORS = ["seed", 0, 1.5, np.random.default_rng(0), [torch.Generator()] * 3, [torch.Generator()],
              [torch.Generator(), "x"], []]


def _cases():
    for family in FAMILIES:
        rows = [(name, value) for name in ARGUMENTS[family] for value in BAD[name]]
        rows += PER_DEPTH_BAD[family] + [("generator", g) for g in GENERATORS]
        for entry in ("pipeline", "prior"):
            for name, value in rows + EXTRA.get((family, entry), []):
                yield family, entry, name, value


CASES = list(_cases())


def _case_id(case):
    family, entry, name, value = case
    text = repr(value) if not isinstance(value, list) else f"list{len(value)}"
    if isinstance(value, np.random.Generator):
        text = "numpy-rng"
    return f"{family}-{entry}-{name}={text}"


def call(family: str, entry: str, name: str, value):
    """Call the pipeline or its prior on two class ids with ``name=value``."""
    pipe = PIPELINES[family]()
    kwargs = {name: value}
    if entry == "pipeline":
        return pipe([1, 2], output_type="latent", **kwargs)
    return pipe.transformer.generate([1, 2], **kwargs)


def classify(family, entry, name, value) -> tuple[bool, str]:
    """(clear, description): clear = ValueError / TypeError naming the argument, raised before any module ran,
    from hf_rq code."""
    try:
        with no_model_code():
            call(family, entry, name, value)
    except (ValueError, TypeError) as e:
        origin = traceback.extract_tb(e.__traceback__)[-1].filename
        if name.split("[")[0] not in str(e):
            return False, f"{type(e).__name__} not naming {name}: {e}"
        if "hf_rq" not in origin:
            return False, f"{type(e).__name__} from {origin}: {e}"
        return True, f"{type(e).__name__}: {e}"
    except ModelCodeRan:
        pass
    except Exception as e:  # noqa: BLE001 - an audit: any other error is "not clear"
        return False, f"{type(e).__name__}: {e}"
    try:  # accepted at the boundary: what happens when the model runs?
        call(family, entry, name, value)
    except Exception as e:  # noqa: BLE001
        return False, f"model code ran, then {type(e).__name__}: {str(e)[:80]}"
    return False, "accepted silently"


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_bad_sampling_argument_is_refused_before_model_code(case):
    family, entry, name, value = case
    with no_model_code(), pytest.raises((ValueError, TypeError), match=name) as info:
        call(family, entry, name, value)
    # Raised by hf_rq's own checks (not deep inside torch).
    assert "hf_rq" in traceback.extract_tb(info.tb)[-1].filename


def test_generator_errors_say_what_is_expected():
    pipe = rq_pipeline()
    with no_model_code():
        with pytest.raises(TypeError, match="generator must be a torch.Generator or a list of them"):
            pipe([1], generator="seed")
        with pytest.raises(ValueError, match="list of 3 generators, but 2 images"):
            pipe([1], num_images_per_prompt=2, generator=[torch.Generator()] * 3)
        with pytest.raises(TypeError, match=r"generator\[1\] must be a torch.Generator"):
            pipe.transformer.generate([1, 2], generator=[torch.Generator(), 7])


def test_misspelled_sampling_keyword_is_refused_by_name_in_every_family():
    """One rule (hf_rq.sampling_args.prepare_generation_config): an unknown keyword is a TypeError naming it, not
    silently ignored, and the stored generation config is left untouched."""
    for family in FAMILIES:
        prior = PIPELINES[family]().transformer
        before = prior.generation_config.to_dict()
        with no_model_code(), pytest.raises(TypeError, match=r"generate\(\) got unexpected keyword arguments: \['top_kk'\]"):
            prior.generate([1, 2], top_kk=5)
        assert prior.generation_config.to_dict() == before


def test_one_guidance_rule_for_every_family():
    """guidance_scale: 1 (and None) = off everywhere; below 1 refused everywhere with the same message."""
    for family in FAMILIES:
        prior = PIPELINES[family]().transformer
        with no_model_code():
            with pytest.raises(ValueError, match=r"guidance_scale=0.5: must be a finite number >= 1 \(1 = no guidance"):
                prior.generate([1], guidance_scale=0.5)
    gpt = llamagen_pipeline().transformer
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731 - a fresh generator per call
    assert torch.equal(gpt.generate([3], guidance_scale=1.0, generator=g(0)),
                       gpt.generate([3], guidance_scale=None, generator=g(0)))


def test_top_k_zero_means_off_in_every_family():
    rq = rq_pipeline().transformer
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731 - a fresh generator per call
    assert torch.equal(rq.generate([1], top_k=0, generator=g(0)), rq.generate([1], top_k=None, generator=g(0)))
    dq = dq_pipeline().transformer
    a = dq.generate([1], top_k=0, position_top_k=0, generator=g(0))
    b = dq.generate([1], top_k=None, position_top_k=None, generator=g(0))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# --------------------------------------------------------------------------------------------- generator lists
def _assert_per_image(generate, labels, first=lambda out: out):
    """Image i of a batch sampled with [g_0, g_1, ...] equals image i sampled alone with g_i (and with g_i in a
    batch of one given as a single generator); swapping the batch swaps the images."""
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    seeds = [11, 22, 33][: len(labels)]
    batch = first(generate(labels, [g(s) for s in seeds]))
    for i, (label, seed) in enumerate(zip(labels, seeds)):
        alone = first(generate([label], [g(seed)]))
        single = first(generate([label], g(seed)))
        assert torch.equal(batch[i:i + 1], alone) and torch.equal(alone, single), f"image {i} depends on the batch"
    swapped = first(generate(labels[::-1], [g(s) for s in seeds[::-1]]))
    assert torch.equal(swapped, batch.flip(0))
    assert not torch.equal(batch[0], batch[1])  # the generators matter


@pytest.mark.parametrize("top_p", [None, 0.9], ids=["multinomial", "nucleus"])
def test_generator_list_rq_per_image(top_p):
    prior = rq_pipeline(null_class=True).transformer
    _assert_per_image(lambda lab, gen: prior.generate(lab, generator=gen, top_p=top_p, guidance_scale=2.0), [1, 1])


def test_generator_list_llamagen_per_image():
    gpt = llamagen_pipeline().transformer
    _assert_per_image(lambda lab, gen: gpt.generate(lab, generator=gen, guidance_scale=2.0, cfg_interval=4), [3, 3])


@pytest.mark.parametrize("in_cluster", [False, True])
def test_generator_list_ctf_per_image(monkeypatch, in_cluster):
    prior = ctf_pipeline().transformer
    monkeypatch.setattr(prior, "_FINE_CHUNK_ELEMENTS", 1)  # one image per stage-2 chunk: slices the generator list
    _assert_per_image(lambda lab, gen: prior.generate(lab, generator=gen, in_cluster_mask=in_cluster,
                                                      fine_guidance_scale=1.5), [4, 4, 4])


def test_generator_list_dq_per_image():
    prior = dq_pipeline().transformer
    _assert_per_image(lambda lab, gen: prior.generate(lab, generator=gen)[0], [2, 2, 5])
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731 - a fresh generator per call
    out = prior.generate([2, 5], generator=[g(1), g(2)], return_dict_in_generate=True)
    alone = prior.generate([5], generator=g(2), return_dict_in_generate=True)
    n = alone.tokens.fine_position.shape[1]
    assert torch.equal(out.tokens.fine_position[1, :n], alone.tokens.fine_position[0])
    with pytest.raises(ValueError, match="output_scores"):
        prior.generate([2, 5], generator=[g(1), g(2)], output_scores=True)


def test_generator_list_unconditional_priors():
    """batch_size images of an unconditional prior with one generator each (DQ: the per-image path)."""
    from hf_rq import DQTransformerConfig, DQTransformerForImageGeneration, RQTransformerForImageGeneration

    torch.manual_seed(0)
    dq = DQTransformerForImageGeneration(DQTransformerConfig(
        codebook_size=16, coarse_grid_size=4, num_classes=0, hidden_size=32, num_position_layers=1,
        num_content_layers=1, num_attention_heads=2, max_position_embeddings=90)).eval()
    rq = RQTransformerForImageGeneration.from_tokenizer(tiny_rq_config(num_classes=0), rq_pipeline().vqvae).eval()
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731 - a fresh generator per call
    codes, granularity = dq.generate(batch_size=2, generator=[g(1), g(2)])
    alone = dq.generate(batch_size=1, generator=g(2))
    assert torch.equal(codes[1:], alone[0]) and torch.equal(granularity[1:], alone[1])
    assert torch.equal(rq.generate(batch_size=2, generator=[g(1), g(2)])[1:], rq.generate(generator=g(2)))
    with no_model_code(), pytest.raises(ValueError, match="list of 2 generators, but 3 images"):
        dq.generate(batch_size=3, generator=[g(1), g(2)])


def test_generator_list_through_pipelines():
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731 - a fresh generator per call
    for family in FAMILIES:
        pipe = PIPELINES[family]()
        images = pipe([3], num_images_per_prompt=2, generator=[g(5), g(6)], output_type="latent").images
        second = pipe([3], generator=g(6), output_type="latent").images
        assert torch.equal(images[1:], second), family


# --------------------------------------------------------------------------------------------- images into tokenizers
def _tokenizers():
    return dict(rq=rq_pipeline().vqvae, dq=dq_pipeline().vqvae, llamagen=_llamagen_vq())


TOKENIZERS = ("rq", "dq", "llamagen")


def bad_images(family: str):
    """-> (tokenizer, {case: (images, expected error, message pattern)})."""
    vq = _tokenizers()[family]
    size = vq.config.sample_size if family == "dq" else 2 * vq.downsample_factor
    good = torch.zeros(1, 3, size, size)
    return vq, {
        "nan": (good.clone().fill_(float("nan")), ValueError, "NaN or inf"),
        "inf": (good.clone().index_fill_(2, torch.tensor([0]), float("inf")), ValueError, "NaN or inf"),
        "pil": (PIL.Image.new("RGB", (size, size)), TypeError, "preprocess_images"),
        "numpy": (np.zeros((size, size, 3), np.float32), TypeError, "preprocess_images"),
        "uint8": (good.to(torch.uint8), TypeError, "float tensor"),
        "shape": (good[0], ValueError, "must have shape"),
    }


@pytest.mark.parametrize("family", TOKENIZERS)
def test_tokenizers_refuse_bad_images(family):
    vq, bad = bad_images(family)
    for key, (images, error, message) in bad.items():
        with no_model_code(), pytest.raises(error, match=message):
            vq.encode(images, return_codes=True)


def test_out_of_range_images_warn_once():
    from hf_rq.ctf.tokenizer import LlamaGenVQModel

    vq = LlamaGenVQModel.from_config(_llamagen_vq().config)  # a fresh instance: nothing warned yet
    size = 2 * vq.downsample_factor
    images = torch.rand(1, 3, size, size) * 255
    with pytest.warns(UserWarning, match=r"outside the \[-1, 1\] range"):
        vq.encode(images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vq.encode(images)  # once per model
        vq.encode(torch.rand(1, 3, size, size) * 2.005 - 1.0)  # within the tolerance: no warning anyway


def test_preprocess_images_refuses_non_finite_and_takes_pil_numpy():
    from hf_rq.image_processing import preprocess_images

    with pytest.raises(ValueError, match="mask_image contain NaN or inf"):
        preprocess_images(np.full((8, 8, 3), np.nan, np.float32), name="mask_image")
    with pytest.raises(TypeError, match="image: unsupported image type str"):
        preprocess_images("cat.png", name="image")
    pil = PIL.Image.new("RGB", (8, 8), (255, 0, 0))
    from_pil = preprocess_images(pil)
    assert from_pil.shape == (1, 3, 8, 8) and from_pil[0, 0].eq(1).all() and from_pil[0, 1].eq(-1).all()
    assert torch.equal(preprocess_images(np.asarray(pil)), from_pil)


# --------------------------------------------------------------------------------------------- audit
def audit() -> int:
    """Run the table and print how many bad inputs got a clear error (for the issue's before / after count)."""
    rows = [(c, *classify(*c)) for c in CASES]
    clear = sum(ok for _, ok, _ in rows)
    by_family = {}
    for (family, entry, name, value), ok, _ in rows:
        tried, good = by_family.get((family, entry), (0, 0))
        by_family[(family, entry)] = (tried + 1, good + ok)
    print(f"{'family':10s} {'entry':9s} {'tried':>6s} {'clear':>6s}")
    for (family, entry), (tried, good) in by_family.items():
        print(f"{family:10s} {entry:9s} {tried:6d} {good:6d}")
    print(f"{'total':20s} {len(rows):6d} {clear:6d}")
    # Images into the tokenizers' encode: clear = ValueError / TypeError from hf_rq naming the images, no module ran.
    image_rows = []
    for family in TOKENIZERS:
        vq, bad = bad_images(family)
        for key, (images, _, _) in bad.items():
            try:
                with no_model_code():
                    vq.encode(images, return_codes=True)
                outcome = (False, "accepted silently")
            except (ValueError, TypeError) as e:
                outcome = ("hf_rq" in traceback.extract_tb(e.__traceback__)[-1].filename and "images" in str(e),
                           f"{type(e).__name__}: {e}")
            except Exception as e:  # noqa: BLE001
                outcome = (False, f"{type(e).__name__}: {e}")
            image_rows.append((f"{family}-encode-{key}", *outcome))
    print(f"{'tokenizer images':20s} {len(image_rows):6d} {sum(ok for _, ok, _ in image_rows):6d}")
    rows += [((name,), ok, what) for name, ok, what in image_rows]
    if "-v" in sys.argv:
        for case, ok, what in rows:
            if not ok:
                print(f"  NOT CLEAR {_case_id(case) if len(case) == 4 else case[0]}: {what[:150]}")
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(audit())
