"""Editing with every family (hf_rq.editing and the pipelines' image / mask_image / keep_depth / keep_coarse_labels):
kept tokens are the encoded input's bit for bit, masked ones are sampled, all-black = reconstruction, all-white =
unconditional sampling under the same generator, batches, best-of-n, and clear errors for bad input."""

import numpy as np
import PIL.Image
import pytest
import torch

from hf_rq import CTFPipeline, DQTransformerPipeline, RQTransformerPipeline
from hf_rq.editing import best_of_candidates, load_mask, mask_to_token_grid, outpaint_inputs, prepare_edit_inputs
from hf_rq.image_processing import preprocess_images

FAMILIES = {"rq": (RQTransformerPipeline, "hf-rq/rq-emoji-64"), "dq": (DQTransformerPipeline, "hf-rq/dq-emoji-64"),
            "ctf": (CTFPipeline, "hf-rq/ctf-emoji-64")}
LABEL = "animals_nature"


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def images(fixtures_dir):
    paths = sorted((fixtures_dir / "emoji64" / "test").glob("*/*.png"))[:2]
    return [PIL.Image.open(p).convert("RGB") for p in paths]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    cls, name = FAMILIES[request.param]
    pipe = cls.from_pretrained(name)
    pipe.set_progress_bar_config(disable=True)
    return request.param, pipe


def centre_mask(size=64, lo=16, hi=48):
    m = np.zeros((size, size), np.float32)
    m[lo:hi, lo:hi] = 1
    return m


def encode(name, pipe, images):
    """Codes of the images at the token grid plus the grid of the mask: rq (N, h, w, D), dq (N, hf, hf), ctf (N, h, w)."""
    pixels = preprocess_images(images)
    if name == "rq":
        return pipe.vqvae.encode(pixels, return_codes=True).codes, None
    if name == "dq":
        enc = pipe.vqvae.encode(pixels)
        return enc.codes, enc.granularity
    return pipe.vqvae.encode(pixels, return_codes=True).codes, None


def code_mask(name, pipe, token_mask):
    """Token mask on the grid of the mask -> mask on the code grid (DQ: regions -> fine cells)."""
    if name == "dq":
        return token_mask.repeat_interleave(2, -1).repeat_interleave(2, -2)
    return token_mask


def edit(pipe, images, mask, seed=0, **kwargs):
    return pipe(LABEL, image=images, mask_image=mask, generator=seeded(seed), output_type="latent", **kwargs).images


# ------------------------------------------------------------------------------------ mask -> tokens
def test_mask_to_token_grid_touch_rule_and_threshold():
    mask = torch.zeros(1, 64, 64, dtype=torch.bool)
    mask[0, 9, 17] = True  # one pixel in token (1, 2) of an 8x8 grid (8-pixel cells)
    grid = mask_to_token_grid(mask, 8, 8)
    assert grid.sum() == 1 and grid[0, 1, 2]
    # a mask of another size with the same aspect ratio maps onto the same cells
    small = torch.zeros(1, 16, 16, dtype=torch.bool)
    small[0, 2, 4] = True
    assert torch.equal(mask_to_token_grid(small, 8, 8), grid)
    values = np.full((64, 64), 0.49, np.float32)
    values[0, 0] = 0.5
    _, thresholded = load_mask(values, 64, 64)
    assert thresholded.sum() == 1  # >= 0.5 is white, below is black


def test_outpaint_inputs_shift_and_zoom_out(images):
    canvas, mask = outpaint_inputs(images[0], offset=(16, 0))
    m = np.asarray(mask)
    assert canvas.size == (64, 64) and (m[:, :16] == 255).all() and (m[:, 16:] == 0).all()
    assert np.array_equal(np.asarray(canvas)[:, 16:], np.asarray(images[0])[:, :48])
    canvas, mask = outpaint_inputs(images[0], scale=0.5, offset=(16, 16))
    m = np.asarray(mask)
    assert (m[16:48, 16:48] == 0).all() and m.sum() == 255 * (64 * 64 - 32 * 32)
    with pytest.raises(ValueError, match="nothing of it"):
        outpaint_inputs(images[0], offset=(64, 0))


def test_best_of_candidates_picks_highest_score_per_group():
    scores = torch.tensor([0.0, 2.0, 1.0, 5.0, -1.0, 4.0])
    assert best_of_candidates(scores, 3).tolist() == [1, 3]


# ------------------------------------------------------------------------------------ every family
def test_kept_tokens_identical_masked_sampled_and_reproducible(family, images):
    name, pipe = family
    codes, granularity = encode(name, pipe, images[:1])
    mask = centre_mask()
    first = edit(pipe, images[0], mask, num_images_per_prompt=2)
    grid = pipe.transformer.config
    size = grid.coarse_grid_size if name == "dq" else (grid.grid_height if name == "rq" else grid.grid_size)
    token_mask = mask_to_token_grid(torch.from_numpy(mask)[None] >= 0.5, size, size)[0]
    cm = code_mask(name, pipe, token_mask)
    assert torch.equal(first[:, ~cm], codes[:, ~cm].expand_as(first[:, ~cm]))
    assert (first[:, cm] != codes[:, cm]).any()  # the masked part is sampled
    assert torch.equal(edit(pipe, images[0], mask, num_images_per_prompt=2), first)  # same generator, same edit
    assert not torch.equal(edit(pipe, images[0], mask, seed=1, num_images_per_prompt=2), first)
    if name == "dq":
        out = pipe(LABEL, image=images[0], mask_image=mask, generator=seeded(), output_type="latent",
                   return_granularity=True)
        assert torch.equal(out.granularity[:, ~token_mask], granularity[:, ~token_mask])


def test_all_black_mask_returns_the_reconstruction(family, images):
    name, pipe = family
    codes, _ = encode(name, pipe, images)
    black = np.zeros((64, 64), np.float32)
    assert torch.equal(edit(pipe, images, black), codes)
    pixels = pipe(LABEL, image=images, mask_image=black, generator=seeded(), output_type="pt").images
    expected = pipe.vqvae.decode_codes(*encode(name, pipe, images)[: 2 if name == "dq" else 1]).sample
    torch.testing.assert_close(pixels, (expected * 0.5 + 0.5).clamp(0, 1))


def test_all_white_mask_equals_unconditional_sampling(family, images):
    name, pipe = family
    white = np.ones((64, 64), np.float32)
    edited = edit(pipe, images, white, num_images_per_prompt=2)
    sampled = pipe([LABEL, LABEL], num_images_per_prompt=2, generator=seeded(), output_type="latent").images
    assert torch.equal(edited, sampled)


def test_batch_of_images_and_masks(family, images):
    name, pipe = family
    codes, _ = encode(name, pipe, images)
    masks = np.zeros((2, 64, 64), np.float32)
    masks[0, :32] = 1  # top half
    masks[1, :, 32:] = 1  # right half
    out = pipe([LABEL, "objects"], image=images, mask_image=masks, generator=seeded(), output_type="latent").images
    g = 4 if name == "dq" else 8
    for i in range(2):
        cm = code_mask(name, pipe, mask_to_token_grid(torch.from_numpy(masks[i:i + 1]) >= 0.5, g, g)[0])
        assert torch.equal(out[i][~cm], codes[i][~cm])
        assert not torch.equal(out[i][cm], codes[i][cm])


def test_best_of_n_keeps_known_tokens(family, images):
    name, pipe = family
    codes, _ = encode(name, pipe, images[:1])
    mask = centre_mask()
    out = edit(pipe, images[0], mask, num_images_per_prompt=2, num_candidates=3)
    g = 4 if name == "dq" else 8
    cm = code_mask(name, pipe, mask_to_token_grid(torch.from_numpy(mask)[None] >= 0.5, g, g)[0])
    assert out.shape[0] == 2 and torch.equal(out[:, ~cm], codes[:, ~cm].expand_as(out[:, ~cm]))
    with pytest.raises(ValueError, match="num_candidates"):
        edit(pipe, images[0], mask, num_candidates=0)



@pytest.mark.parametrize("num_candidates", [1, 2])
def test_generator_list_gives_each_edit_its_own_draws(family, images, num_candidates):
    """One generator per output image (as in sampling): image i's edit depends on generator[i] only, with or
    without best-of-n (its candidates draw from its own generator)."""
    name, pipe = family
    mask = centre_mask()[None]
    both = pipe([LABEL, "objects"], image=images, mask_image=mask.repeat(2, 0), generator=[seeded(3), seeded(4)],
                num_candidates=num_candidates, output_type="latent").images
    alone = pipe(["objects"], image=images[1:], mask_image=mask, generator=[seeded(4)],
                 num_candidates=num_candidates, output_type="latent").images
    assert torch.equal(both[1], alone[0])
    codes, _ = encode(name, pipe, images)
    g = 4 if name == "dq" else 8
    cm = code_mask(name, pipe, mask_to_token_grid(torch.from_numpy(mask) >= 0.5, g, g)[0])
    assert torch.equal(both[:, ~cm], codes[:, ~cm])  # the edit is still an edit: kept tokens are the input's
    with pytest.raises(ValueError, match="generator"):
        pipe([LABEL, "objects"], image=images, mask_image=mask.repeat(2, 0), generator=[seeded(3)],
             num_candidates=num_candidates, output_type="latent")

def test_bad_inputs(family, images):
    name, pipe = family
    mask = centre_mask()
    with pytest.raises(ValueError, match="3 channels that differ"):
        edit(pipe, images[0], np.random.rand(64, 64, 3).astype(np.float32))
    with pytest.raises(ValueError, match="1 channel"):
        edit(pipe, images[0], np.zeros((64, 64, 2), np.float32))
    with pytest.raises(ValueError, match="aspect"):
        edit(pipe, images[0], np.ones((64, 32), np.float32))
    with pytest.raises(ValueError, match="touches no token"):
        edit(pipe, images[0], np.full((64, 64), 0.3, np.float32))
    with pytest.raises(ValueError, match="must lie in"):
        edit(pipe, images[0], mask * 2)
    with pytest.raises(ValueError, match="resize or crop"):
        edit(pipe, images[0].resize((48, 48)), mask)
    with pytest.raises(ValueError, match="batch sizes disagree"):
        edit(pipe, images, np.stack([mask] * 3))
    with pytest.raises(ValueError, match="without image"):
        pipe(LABEL, mask_image=mask)
    if name != "rq":
        with pytest.raises(ValueError, match="mask_image"):
            pipe(LABEL, image=images[0])


# ------------------------------------------------------------------------------------ family-specific
def test_rq_keep_depth(images):
    pipe = RQTransformerPipeline.from_pretrained("hf-rq/rq-emoji-64")
    pipe.set_progress_bar_config(disable=True)
    codes, _ = encode("rq", pipe, images[:1])
    out = pipe(LABEL, image=images[0], keep_depth=2, generator=seeded(), output_type="latent").images
    assert torch.equal(out[..., :2], codes[..., :2]) and (out[..., 2:] != codes[..., 2:]).any()
    mask = centre_mask()
    both = pipe(LABEL, image=images[0], mask_image=mask, keep_depth=1, generator=seeded(), output_type="latent").images
    tm = mask_to_token_grid(torch.from_numpy(mask)[None] >= 0.5, 8, 8)[0]
    assert torch.equal(both[:, ~tm], codes[:, ~tm])  # outside the mask: every depth kept
    assert torch.equal(both[:, tm, :1], codes[:, tm, :1]) and (both[:, tm, 1:] != codes[:, tm, 1:]).any()
    full = pipe(LABEL, image=images[0], keep_depth=4, generator=seeded(), output_type="latent").images
    assert torch.equal(full, codes)
    for bad in (-1, 5, True, 1.5):
        with pytest.raises(ValueError, match="keep_depth"):
            pipe(LABEL, image=images[0], keep_depth=bad)
    with pytest.raises(ValueError, match="mask_image .*or keep_depth"):
        pipe(LABEL, image=images[0])


def test_ctf_keep_coarse_labels(images):
    pipe = CTFPipeline.from_pretrained("hf-rq/ctf-emoji-64")
    pipe.set_progress_bar_config(disable=True)
    codes, _ = encode("ctf", pipe, images[:1])
    table = pipe.transformer.fine_to_coarse
    out = pipe(LABEL, image=images[0], keep_coarse_labels=True, generator=seeded(), output_type="latent",
               return_coarse_labels=True, num_images_per_prompt=2)
    assert torch.equal(out.coarse_labels, table[codes].expand_as(out.coarse_labels))
    assert (out.images != codes).any()  # every fine code redrawn from the kept labels
    mask = centre_mask()
    tm = mask_to_token_grid(torch.from_numpy(mask)[None] >= 0.5, 8, 8)[0]
    both = pipe(LABEL, image=images[0], mask_image=mask, keep_coarse_labels=True, generator=seeded(),
                output_type="latent", return_coarse_labels=True)
    assert torch.equal(both.coarse_labels[:, ~tm], table[codes][:, ~tm])
    assert (both.coarse_labels[:, tm] != table[codes][:, tm]).any()
    with pytest.raises(TypeError, match="keep_coarse_labels"):
        pipe(LABEL, image=images[0], keep_coarse_labels=1)


def test_priors_teacher_force_identically_with_and_without_cache(images):
    """The known tokens go through the same path as sampled ones: the uncached reference path agrees."""
    pipe = RQTransformerPipeline.from_pretrained("hf-rq/rq-emoji-64")
    codes, _ = encode("rq", pipe, images[:1])
    known = torch.zeros_like(codes, dtype=torch.bool)
    known[:, 4:, :, :] = True
    known[:, :4, :, :2] = True
    a = pipe.transformer.generate([1], known_codes=codes, known_mask=known, generator=seeded())
    b = pipe.transformer.generate([1], known_codes=codes, known_mask=known, generator=seeded(), use_cache=False)
    assert torch.equal(a, b) and torch.equal(a[known], codes[known])
    with pytest.raises(ValueError, match="known_mask"):
        pipe.transformer.generate([1], known_codes=codes, known_mask=known.long())
    dq = DQTransformerPipeline.from_pretrained("hf-rq/dq-emoji-64")
    enc = dq.vqvae.encode(preprocess_images(images[:1]))
    regions = torch.ones(1, 4, 4, dtype=torch.bool)
    regions[:, 1:3, 1:3] = False
    kw = dict(known_codes=enc.codes, known_granularity=enc.granularity, known_regions=regions)
    cached = dq.transformer.generate([1], generator=seeded(), **kw)
    uncached = dq.transformer.generate([1], generator=seeded(), use_cache=False, **kw)
    assert all(torch.equal(x, y) for x, y in zip(cached, uncached))


def test_prepare_edit_inputs_broadcasts_one_image_over_labels():
    image = np.zeros((64, 64, 3), np.float32)
    mask = centre_mask()
    edit_inputs = prepare_edit_inputs(image, mask, 64, 64, 8, 8, torch.tensor([1, 2]), repeats=3)
    assert edit_inputs.pixels.shape == (6, 3, 64, 64) and edit_inputs.class_labels.tolist() == [1, 1, 1, 2, 2, 2]
    assert edit_inputs.token_mask.shape == (6, 8, 8) and edit_inputs.token_mask[:, 2:6, 2:6].all()


def test_llamagen_pipeline_edits(fixtures_dir):
    """LlamaGen's pipeline (CTF's baseline) edits the same way, on the reference fixtures' tiny models."""
    import json

    from safetensors.torch import load_file

    from hf_rq import LlamaGenPipeline
    from hf_rq.ctf.conversion import convert_llamagen_gpt, convert_llamagen_vq

    d = fixtures_dir / "llamagen"
    vq = convert_llamagen_vq(load_file(d / "vq.safetensors"), json.loads((d / "vq_config.json").read_text()))
    gpt = convert_llamagen_gpt(load_file(d / "gpt.safetensors"), json.loads((d / "gpt_config.json").read_text()))
    pipe = LlamaGenPipeline(vqvae=vq, transformer=gpt)
    pipe.set_progress_bar_config(disable=True)
    H, W = pipe.edit_image_size
    grid = gpt.config.grid_size
    image = torch.rand(2, 3, H, W, generator=seeded(5))
    codes = vq.encode(image * 2 - 1, return_codes=True).codes
    mask = torch.zeros(H, W)
    mask[: H // 2] = 1
    out = pipe([3, 7], image=image, mask_image=mask, generator=seeded(), output_type="latent").images
    assert torch.equal(out[:, grid // 2:], codes[:, grid // 2:]) and not torch.equal(out[:, : grid // 2], codes[:, : grid // 2])
    white = pipe([3, 7], image=image, mask_image=torch.ones(H, W), generator=seeded(), output_type="latent").images
    assert torch.equal(white, pipe([3, 7], generator=seeded(), output_type="latent").images)
    assert torch.equal(pipe([3, 7], image=image, mask_image=torch.zeros(H, W), output_type="latent").images, codes)
