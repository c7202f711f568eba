"""The ``hf-rq`` command line: most cases in-process (``cli.main(argv)``), the entry point end to end in three
subprocesses (each pays the ~10 s import of torch/diffusers/transformers)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from evaluation_utils import save_tiny_pipeline, tiny_rqvae
from hf_rq import cli


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("pipe") / "tiny-rq")


@pytest.fixture(scope="module")
def rqvae_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok") / "tiny-rqvae"
    tiny_rqvae().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def emoji_files(fixtures_dir):
    return sorted(str(p) for p in (fixtures_dir / "emoji64" / "test").glob("*/*.png"))


def run_in_process(argv, capsys):
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def hf_rq_command() -> list[str]:
    script = Path(sys.executable).parent / "hf-rq"  # the installed console entry point
    return [str(script)] if script.exists() else [sys.executable, "-m", "hf_rq.cli"]


def run_subprocess(argv, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(hf_rq_command() + [str(a) for a in argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


# --------------------------------------------------------------------------------------------- usage
@pytest.mark.parametrize("argv", [[], ["generate"], ["reconstruct"], ["evaluate"], ["evaluate", "generation"],
                                  ["evaluate", "reconstruction"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv + ["--help"])
    assert exit_info.value.code == 0
    assert f"usage: hf-rq {' '.join(argv)}".strip() in capsys.readouterr().out


def test_convert_delegates(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["convert", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "usage: hf-rq convert" in out and "rqvae" in out
    code, _, err = run_in_process(["convert", "rqvae", "--checkpoint", tmp_path / "missing.safetensors",
                                   "--config", tmp_path / "missing.yaml", "--output", tmp_path / "out"], capsys)
    assert code == 2 and "not found" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv", [["generate"],  # no --output
                                  ["generate", "--output", "x.png", "--num-images", "0"],
                                  ["generate", "--output", "x.png", "--seed", "-1"],
                                  ["reconstruct", "--output", "x.png"]])  # no image
def test_bad_usage_exits_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert "usage: hf-rq" in capsys.readouterr().err


def test_errors_are_one_line(capsys, tmp_path, pipeline_dir, rqvae_dir, emoji_files):
    (tmp_path / "notes.txt").write_text("not an image")
    cases = [
        (["generate", "--model", "nobody/no-such-model", "--output", tmp_path / "a.png"],
         "hf-rq generate: error: unknown model 'nobody/no-such-model'"),
        (["generate", "--model", "hf-rq/no-such-model", "--output", tmp_path / "a.png"], "not a bundled model"),
        (["generate", "--model", pipeline_dir, "--class", "unicorns", "--output", tmp_path / "a.png"],
         "unknown class name 'unicorns'"),
        (["generate", "--model", pipeline_dir, "--class", "42", "--output", tmp_path / "a.png"], "out of range"),
        (["generate", "--model", pipeline_dir, "--output", tmp_path / "notes.txt" / "a.png"], "cannot write the output"),
        (["generate", "--model", pipeline_dir, "--output", tmp_path / "notes.txt"], "not a folder"),
        (["generate", "--model", rqvae_dir, "--output", tmp_path / "a.png"], "is not a pipeline"),
        (["reconstruct", "--model", rqvae_dir, tmp_path / "notes.txt", "--output", tmp_path / "r.png"],
         "hf-rq reconstruct: error: not a readable image file"),
        (["reconstruct", "--model", rqvae_dir, tmp_path / "missing.png", "--output", tmp_path / "r.png"],
         "image file not found"),
        (["reconstruct", "--model", tmp_path, emoji_files[0], "--output", tmp_path / "r.png"],
         "has neither model_index.json nor config.json"),
        (["evaluate", "generation", "--output", tmp_path / "m.json"], "give either --model"),
        (["evaluate", "generation", "--images", tmp_path / "nowhere"], "image folder not found"),
        (["evaluate", "generation", "--images", Path(emoji_files[0]).parents[2], "--features", "inception",
          "--inception-weights", tmp_path / "missing.pth"], "Inception weights file not found"),
    ]
    for argv, expected in cases:
        code, out, err = run_in_process(argv, capsys)
        lines = err.strip().splitlines()
        assert code == 1, (argv, err)
        assert len(lines) == 1 and expected in lines[0], (argv, err)
        assert "Traceback" not in err


def test_generate_writes_pngs_and_grids(capsys, tmp_path, pipeline_dir):
    argv = ["generate", "--model", pipeline_dir, "--class", "flags", "0", "--num-images", "2", "--seed", "3",
            "--top-k", "8", "--temperature", "1.0", "0.9", "0.8", "--quiet"]
    code, out, _ = run_in_process(argv + ["--output", tmp_path / "samples"], capsys)
    assert code == 0 and "wrote 4 images" in out
    files = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert files == ["0000_flags.png", "0001_flags.png", "0002_activities.png", "0003_activities.png"]
    code, _, _ = run_in_process(argv + ["--output", tmp_path / "grid.png"], capsys)
    grid = PIL.Image.open(tmp_path / "grid.png")
    assert code == 0 and grid.size == (2 * 32 + 2, 2 * 32 + 2)  # one row per class, one column per image
    # Same seed, same images: the grid's top-left tile is the first PNG.
    first = np.asarray(PIL.Image.open(tmp_path / "samples" / "0000_flags.png"))
    np.testing.assert_array_equal(np.asarray(grid)[:32, :32], first)
    # Sampling flags the pipeline does not take are refused by name.
    code, _, err = run_in_process(["generate", "--model", pipeline_dir, "--top-p", "1.5", "--output", tmp_path / "x.png"], capsys)
    assert code == 1 and "top_p" in err


def test_evaluate_commands(capsys, tmp_path, pipeline_dir, rqvae_dir, fixtures_dir):
    data = fixtures_dir / "emoji64"
    code, out, _ = run_in_process(["evaluate", "generation", "--images", data, "--split", "test",
                                   "--output", tmp_path / "real.json"], capsys)
    real = json.loads((tmp_path / "real.json").read_text())
    assert code == 0 and "class_consistency" in out and real["num_generated"] == 18
    assert real["feature_space"].startswith("hf-rq/emoji-classifier-64")

    code, out, _ = run_in_process(["evaluate", "generation", "--model", pipeline_dir, "--num-images-per-class", "1",
                                   "--class", "flags", "symbols", "--quiet", "--reference", data,
                                   "--save-images", tmp_path / "saved", "--output", tmp_path / "gen.json"], capsys)
    gen = json.loads((tmp_path / "gen.json").read_text())
    assert code == 0 and gen["num_generated"] == 2 and gen["num_reference"] == 18
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["flags", "symbols"]

    code, out, _ = run_in_process(["evaluate", "reconstruction", "--model", rqvae_dir, "--data", data, "--size", "32",
                                   "--output", tmp_path / "rec.json"], capsys)
    rec = json.loads((tmp_path / "rec.json").read_text())
    assert code == 0 and {"psnr", "ssim", "rfid", "codebook_usage", "codebook_perplexity_depth3"} <= set(rec)


# -------------------------------------------------------------------------------- entry point, end to end
def test_entry_point_reconstruct_and_errors(tmp_path, rqvae_dir, pipeline_dir, emoji_files):
    result = run_subprocess(["reconstruct", "--model", pipeline_dir, emoji_files[0], emoji_files[5],
                             "--output", tmp_path / "strip.png"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    strip = PIL.Image.open(tmp_path / "strip.png")
    # input + one column per code depth (3), two rows, resized to the tokenizer's 32x32, titles on top.
    assert strip.size == (4 * 32 + 3 * 2, 14 + 2 * 32 + 2)
    assert "depth 3 (full)" in result.stdout

    (tmp_path / "notes.txt").write_text("hello")
    result = run_subprocess(["reconstruct", "--model", rqvae_dir, tmp_path / "notes.txt", "--output", tmp_path / "r.png"],
                            cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "not a readable image file" in result.stderr


def test_entry_point_generate(tmp_path, pipeline_dir):
    result = run_subprocess(["generate", "--model", pipeline_dir, "--class", "smileys_emotion", "--num-images", "3",
                             "--output", tmp_path / "out.png"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert PIL.Image.open(tmp_path / "out.png").size == (3 * 32 + 2 * 2, 32)
    assert "batch 1/1" in result.stderr  # the progress bar


def test_entry_point_default_model(tmp_path):
    """The README's promise: one command, offline, a real image from the bundled default model."""
    result = run_subprocess(["generate", "--output", "out.png"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    image = np.asarray(PIL.Image.open(tmp_path / "out.png"))
    assert image.shape[0] >= 64 and image.std() > 10  # 9 class rows of 64x64 samples, not a blank canvas
    shutil.rmtree(tmp_path)


# ------------------------------------------------------------------------------------------- --prompt
@pytest.fixture(scope="module")
def text_pipeline_dir(tmp_path_factory):
    from evaluation_utils import tiny_rq_text_pipeline

    folder = tmp_path_factory.mktemp("pipe") / "tiny-rq-text"
    tiny_rq_text_pipeline().save_pretrained(folder)
    return folder


def test_generate_with_prompts(capsys, tmp_path, text_pipeline_dir):
    argv = ["generate", "--model", text_pipeline_dir, "--prompt", "grinning face", "a red apple!", "--num-images", "2",
            "--seed", "1", "--quiet"]
    code, out, err = run_in_process(argv + ["--output", tmp_path / "samples"], capsys)
    assert code == 0 and "wrote 4 images" in out, err
    files = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert files == ["0000_grinning_face.png", "0001_grinning_face.png", "0002_a_red_apple.png", "0003_a_red_apple.png"]
    code, _, _ = run_in_process(argv + ["--output", tmp_path / "grid.png"], capsys)
    grid = PIL.Image.open(tmp_path / "grid.png")
    assert code == 0 and grid.size == (2 * 32 + 2, 2 * 32 + 2)  # one row per prompt
    np.testing.assert_array_equal(np.asarray(grid)[:32, :32],
                                  np.asarray(PIL.Image.open(tmp_path / "samples" / "0000_grinning_face.png")))
    code, out, err = run_in_process(["generate", "--model", text_pipeline_dir, "--prompt", "cat", "--guidance-scale", "2",
                                     "--negative-prompt", "dog", "--quiet", "--output", tmp_path / "g.png"], capsys)
    assert code == 0, err


def test_generate_prompt_errors(capsys, tmp_path, text_pipeline_dir, pipeline_dir):
    cases = [
        (["--model", text_pipeline_dir], "text-to-image model: pass --prompt"),
        (["--model", text_pipeline_dir, "--class", "flags"], "text-to-image model: pass --prompt"),
        (["--model", text_pipeline_dir, "--prompt", "cat", "--class", "0"], "either --prompt or --class"),
        (["--model", pipeline_dir, "--prompt", "cat"], "not a text-to-image model"),
        (["--model", text_pipeline_dir, "--prompt", "cat", "--negative-prompt", "dog"], "guidance_scale > 1"),
        (["--model", pipeline_dir, "--negative-prompt", "dog"], "--negative-prompt needs --prompt"),
    ]
    for argv, expected in cases:
        code, _, err = run_in_process(["generate", *argv, "--output", tmp_path / "x.png"], capsys)
        assert code == 1 and expected in err and len(err.strip().splitlines()) == 1, (argv, err)
