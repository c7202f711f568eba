"""``hf-rq edit``: the strip it writes, the family options, one-line errors (in-process, bundled models)."""

import numpy as np
import PIL.Image
import pytest

from hf_rq import cli


@pytest.fixture(scope="module")
def files(fixtures_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("edit")
    image = sorted((fixtures_dir / "emoji64" / "test").glob("*/*.png"))[0]
    mask = np.zeros((32, 32), np.uint8)  # half the image's size: masks are mapped at their own resolution
    mask[8:24, 8:24] = 255
    PIL.Image.fromarray(mask).save(folder / "mask.png")
    PIL.Image.open(image).convert("RGB").resize((48, 48)).save(folder / "small.png")
    return dict(image=str(image), mask=str(folder / "mask.png"), small=str(folder / "small.png"), out=folder)


def run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_edit_writes_input_mask_and_edits(files, capsys):
    out = files["out"] / "strip.png"
    code, stdout, _ = run(["edit", "--model", "hf-rq/rq-emoji-64", "--image", files["image"], "--mask", files["mask"],
                           "--class", "animals_nature", "--num-images", 2, "--output", out, "--quiet"], capsys)
    assert code == 0 and "2 edits" in stdout
    strip = PIL.Image.open(out)
    assert strip.width == 4 * 64 + 3 * 2  # input, mask, two edits


def test_edit_family_options_and_outpainting(files, capsys):
    out = files["out"] / "ctf.png"
    code, _, err = run(["edit", "--model", "hf-rq/ctf-emoji-64", "--image", files["image"], "--keep-coarse-labels",
                        "--class", "animals_nature", "--num-images", 1, "--output", out, "--quiet"], capsys)
    assert code == 0, err
    code, _, err = run(["edit", "--model", "hf-rq/dq-emoji-64", "--image", files["image"], "--outpaint", 16, 0,
                        "--class", "animals_nature", "--num-images", 1, "--output", out, "--quiet"], capsys)
    assert code == 0, err


@pytest.mark.parametrize("args, message", [
    (["--model", "hf-rq/dq-emoji-64", "--keep-depth", 1], "--keep-depth is not supported by DQTransformerPipeline"),
    (["--model", "hf-rq/rq-emoji-64", "--keep-depth", 9], "keep_depth must be an integer in 0..4"),
    (["--model", "hf-rq/rq-emoji-64"], "give --mask"),
    (["--model", "hf-rq/rq-emoji-64", "--mask", "missing.png"], "mask file not found"),
])
def test_edit_errors_are_one_line(files, capsys, args, message):
    code, _, err = run(["edit", "--image", files["image"], "--class", "animals_nature", "--output",
                        files["out"] / "x.png", "--quiet", *args], capsys)
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1


def test_edit_wrong_size_needs_resize(files, capsys):
    argv = ["edit", "--model", "hf-rq/rq-emoji-64", "--image", files["small"], "--mask", files["mask"], "--class",
            "animals_nature", "--num-images", 1, "--output", files["out"] / "r.png", "--quiet"]
    code, _, err = run(argv, capsys)
    assert code == 1 and "48x48" in err and "--resize" in err
    code, _, err = run(argv + ["--resize"], capsys)
    assert code == 0, err
