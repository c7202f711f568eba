"""benchmarks/reproduce_claims.py end to end on the fixture emoji with a tiny model and 1 training step: the
table, the JSON and the plot are written and agree (the real benchmark is not run here)."""

import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TINY_ARCH = {"block_out_channels": [8, 16], "layers_per_block": 1, "attn_resolutions": [], "latent_channels": 8,
             "embed_dim": 8, "norm_num_groups": 4}


@pytest.fixture(scope="module")
def claims():
    spec = importlib.util.spec_from_file_location("_reproduce_claims", REPO / "benchmarks" / "reproduce_claims.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def emoji_splits(tmp_path, fixtures_dir):
    """The 18 fixture emoji (test split only) as both the train and the test split of an imagefolder."""
    data = tmp_path / "emoji"
    for split in ("train", "test"):
        shutil.copytree(fixtures_dir / "emoji64" / "test", data / split)
    return data


def test_rq_claim_writes_table_json_and_plot(claims, emoji_splits, tmp_path, capsys):
    out = tmp_path / "rq"
    argv = ["rq", "--data", str(emoji_splits), "--configs", "1x16,2x16", "--seeds", "2", "--steps", "1",
            "--batch_size", "2", "--model_config", json.dumps(TINY_ARCH), "--device", "cpu",
            "--output_dir", str(out)]
    result = claims.main(argv)
    printed = capsys.readouterr().out

    saved = json.loads((out / "results.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(result["summary"]))
    assert [(r["config"], r["seed"]) for r in saved["runs"]] == [("1x16", 0), ("1x16", 1), ("2x16", 0), ("2x16", 1)]
    for run in saved["runs"]:
        assert run["grid"] == [32, 32] and run["test_images"] == 18
        assert run["bits_per_image"] == 32 * 32 * run["depth"] * 4
        assert all(math.isfinite(run["metrics"][k]) for k in ("psnr", "ssim", "rfid"))
    # Two seeds give two different models, and the summary is their mean.
    one = [r["metrics"]["psnr"] for r in saved["runs"] if r["config"] == "1x16"]
    assert one[0] != one[1]
    assert saved["summary"][0]["psnr_mean"] == pytest.approx(sum(one) / 2)
    assert saved["summary"][0]["psnr_std"] > 0

    table = (out / "table.txt").read_text()
    for row in saved["summary"]:
        line = next(l for l in table.splitlines() if l.startswith(row["config"] + " "))
        assert f"{row['psnr_mean']:.2f} +- {row['psnr_std']:.2f}" in line and str(row["bits_per_image"]) in line
    assert table.splitlines()[-1] in printed
    with Image.open(out / "rate_distortion.png") as image:
        assert image.size == (720, 480) and len(image.getcolors(1 << 16)) > 2

    # Asked again with the same arguments, every run is reused rather than retrained.
    claims.main(argv)
    assert capsys.readouterr().out.count("reused") == 4


@pytest.mark.parametrize("bad, message", [(["--configs", "4-256"], "DEPTHxCODEBOOK"),
                                          (["--configs", "0x256"], "depth must be"),
                                          (["--data", "/nonexistent/emoji"], "image folder not found")])
def test_rq_claim_bad_arguments(claims, bad, message, capsys):
    with pytest.raises(SystemExit):
        claims.main(["rq", *bad])
    assert message in capsys.readouterr().err
