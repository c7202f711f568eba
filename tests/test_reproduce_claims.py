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


DQ_TINY_ARCH = {"block_out_channels": [8, 8, 16, 16], "layers_per_block": 1, "attn_resolutions": [],
                "decoder_block_out_channels": [8, 8, 16], "latent_channels": 8, "embed_dim": 8, "codebook_size": 16,
                "norm_num_groups": 4, "router_norm_num_groups": 4}


def test_dq_claim_measures_budgets_and_writes_table_json_and_plot(claims, emoji_splits, tmp_path, capsys):
    out = tmp_path / "dq"
    argv = ["dq", "--data", str(emoji_splits), "--ratios", "0.5", "--seeds", "1", "--steps", "1", "--batch_size", "2",
            "--model_config", json.dumps(DQ_TINY_ARCH), "--device", "cpu", "--output_dir", str(out)]
    result = claims.main(argv)
    printed = capsys.readouterr().out

    saved = json.loads((out / "results.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(result["summary"]))
    runs = {r["config"]: r for r in saved["runs"]}
    assert list(runs) == ["coarse-only", "fine-only", "entropy-0.5", "feature-0.5"]
    # 64x64 at strides 8 / 4: an 8x8 coarse and a 16x16 fine grid. The fixed-grain models must spend exactly
    # one grid's tokens on every image, and every budget must be one token per coarse and four per fine region.
    coarse, fine = runs["coarse-only"], runs["fine-only"]
    assert (coarse["coarse_grid"], coarse["fine_grid"]) == (8, 16)
    assert coarse["tokens_min"] == coarse["tokens_max"] == 64 and coarse["metrics"]["fine_share"] == 0
    assert fine["tokens_min"] == fine["tokens_max"] == 256 and fine["metrics"]["fine_share"] == 1
    for run in saved["runs"]:
        assert run["metrics"]["tokens_per_image"] == pytest.approx(64 * (1 + 3 * run["metrics"]["fine_share"]))
        assert run["test_images"] == 18 and all(math.isfinite(run["metrics"][k]) for k in ("psnr", "ssim", "rfid"))
    # The entropy router's threshold was chosen on the training images (a real patch entropy, in [0, ln 32]).
    assert 0 <= runs["entropy-0.5"]["entropy_threshold"] <= math.log(32)
    assert coarse["parameters"] == fine["parameters"] == runs["entropy-0.5"]["parameters"]
    assert runs["feature-0.5"]["parameters"] > coarse["parameters"]  # the router MLP

    rows = {r["config"]: r for r in saved["summary"]}
    lo, hi = rows["coarse-only"]["psnr_mean"], rows["fine-only"]["psnr_mean"]
    table = (out / "table.txt").read_text()
    for name in ("entropy-0.5", "feature-0.5"):
        row = rows[name]
        share = math.log(row["tokens_per_image_mean"] / 64) / math.log(4)
        assert row["psnr_vs_fixed"] == pytest.approx(row["psnr_mean"] - (lo + share * (hi - lo)))
        line = next(l for l in table.splitlines() if l.startswith(name + " "))
        assert f"{row['psnr_mean']:.2f} +- 0.00" in line and f"{row['psnr_vs_fixed']:+.2f}" in line
        assert f"{row['tokens_per_image_mean']:.1f} +- 0.0" in line
    assert "psnr_vs_fixed" not in rows["coarse-only"]
    assert table.splitlines()[-1] in printed
    with Image.open(out / "psnr_vs_tokens.png") as image:
        assert image.size == (720, 480) and len(image.getcolors(1 << 16)) > 2

    claims.main(argv)
    assert capsys.readouterr().out.count("reused") == 4


@pytest.mark.parametrize("bad, message", [(["--ratios", "0.5,1"], "strictly between 0 and 1"),
                                          (["--ratios", "half"], "comma-separated list"),
                                          (["--routers", "entropy,random"], "--routers takes")])
def test_dq_claim_bad_arguments(claims, bad, message, capsys):
    with pytest.raises(SystemExit):
        claims.main(["dq", *bad])
    assert message in capsys.readouterr().err


# An 8x8 code grid at 64x64 (short sequences keep sampling fast), 64 codes clustered into 4 or 8 labels.
TINY_VQ = {"block_out_channels": [8, 8, 8, 8], "layers_per_block": 1, "latent_channels": 8, "embed_dim": 4,
           "norm_num_groups": 4}
TINY_GPT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "multiple_of": 32}


def ctf_argv(data, out, *extra):
    return ["ctf", "--data", str(data), "--codebook_size", "64", "--clusters", "4,8", "--seeds", "2", "--steps", "1",
            "--batch_size", "2", "--tokenizer_steps", "1", "--tokenizer_batch_size", "2",
            "--tokenizer_config", json.dumps(TINY_VQ), "--ar_config", json.dumps(TINY_GPT), "--images_per_class", "1",
            "--device", "cpu", "--output_dir", str(out), *extra]


def test_ctf_claim_writes_table_json_and_plot(claims, emoji_splits, tmp_path, capsys):
    out = tmp_path / "ctf"
    argv = ctf_argv(emoji_splits, out)
    result = claims.main(argv)
    printed = capsys.readouterr().out

    saved = json.loads((out / "results.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(result["summary"]))
    assert [(r["config"], r["seed"]) for r in saved["runs"]] == [
        ("gpt", 0), ("gpt", 1), ("ctf-4", 0), ("ctf-4", 1), ("ctf-8", 0), ("ctf-8", 1)]
    # One tokenizer for every prior: the same codes, the GPT and CTF stage 1 of the same architecture.
    tokenizer_dir = saved["tokenizer"]["path"]
    assert all(r["train_argv"][r["train_argv"].index("--tokenizer_name_or_path") + 1] == tokenizer_dir
               for r in saved["runs"])
    tm = saved["tokenizer"]["metrics"]
    assert 0 < tm["codebook_usage"] <= 1 and math.isfinite(tm["recon_fid"]) and 0 <= tm["recon_class_consistency"] <= 1
    by_config = {r["config"]: r for r in saved["summary"]}
    gpt, ctf4, ctf8 = by_config["gpt"], by_config["ctf-4"], by_config["ctf-8"]
    assert gpt["aux_parameters"] == 0 and ctf4["aux_parameters"] > 0
    # Same body; only the token table and the head differ (64 codes for the GPT, 4 or 8 labels for CTF).
    assert gpt["ar_parameters"] - ctf4["ar_parameters"] == 2 * (64 - 4) * TINY_GPT["hidden_size"]
    assert ctf8["ar_parameters"] - ctf4["ar_parameters"] == 2 * 4 * TINY_GPT["hidden_size"]
    for run in saved["runs"]:
        m = run["metrics"]
        assert run["test_images"] == 18 and m["num_generated"] == 9  # one per class of the 9 in the split
        assert all(math.isfinite(m[k]) for k in ("fid", "kid_mean", "precision", "recall", "class_consistency"))
        assert m["images_per_second"] > 0 and 0 <= m["class_consistency"] <= 1
    assert all(r["metrics"]["speed_vs_gpt"] == 1.0 for r in saved["runs"] if r["config"] == "gpt")
    fids = [r["metrics"]["fid"] for r in saved["runs"] if r["config"] == "ctf-4"]
    assert fids[0] != fids[1] and ctf4["fid_mean"] == pytest.approx(sum(fids) / 2)

    table = (out / "table.txt").read_text()
    for row in saved["summary"]:
        line = next(l for l in table.splitlines() if l.startswith(row["config"] + " "))
        assert f"{row['fid_mean']:.2f} +- {row['fid_std']:.2f}" in line
        assert f"{row['class_consistency_mean']:.3f} +- {row['class_consistency_std']:.3f}" in line
    assert table.splitlines()[-1] in printed
    assert table.splitlines()[-1].startswith("(tokenizer recon.)") and f"{tm['recon_fid']:.2f}" in table
    with Image.open(out / "fid_vs_clusters.png") as image:
        assert image.size == (720, 480) and len(image.getcolors(1 << 16)) > 2

    # Asked again: the tokenizer and every prior are reused; another sampling seed re-evaluates without retraining.
    claims.main(argv)
    assert capsys.readouterr().out.count("reused") == 7
    again = claims.main(ctf_argv(emoji_splits, out, "--sample_seed", "1"))
    printed = capsys.readouterr().out
    assert printed.count("reused") == 1 and printed.count("re-evaluating") == 6 and "training 1 steps" not in printed
    assert [r["metrics"]["fid"] for r in again["runs"]] != [r["metrics"]["fid"] for r in saved["runs"]]
    # A retrained tokenizer (same folder, other codes) retrains the priors on it.
    claims.main(ctf_argv(emoji_splits, out, "--tokenizer_steps", "2", "--clusters", "4", "--seeds", "1"))
    printed = capsys.readouterr().out
    assert "training LlamaGen VQ" in printed and "reused" not in printed and printed.count("training 1 steps") == 2


@pytest.mark.parametrize("bad, message", [(["--clusters", "4,x"], "comma-separated list of integers"),
                                          (["--clusters", "32,32"], "distinct cluster counts"),
                                          (["--clusters", "4096"], "must be below --codebook_size"),
                                          (["--ar_config", "[1, 2]"], "expected a JSON object"),
                                          (["--classifier", "none"], "scored by the classifier"),
                                          (["--data", "/nonexistent/emoji"], "image folder not found")])
def test_ctf_claim_bad_arguments(claims, bad, message, capsys):
    with pytest.raises(SystemExit):
        claims.main(["ctf", *bad])
    assert message in capsys.readouterr().err
