"""training/sweep_sampling.py: every combination is evaluated once per seed, a rerun skips what is stored, and
keywords the pipeline does not take are refused before sampling."""

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("_sweep_sampling", REPO / "training" / "sweep_sampling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_combinations(sweep):
    assert sweep.combinations({}) == [{}]
    assert sweep.combinations({"guidance_scale": [1, 2], "top_k": 64, "temperature": [[0.8, 1.0]]}) == [
        {"guidance_scale": 1, "top_k": 64, "temperature": [0.8, 1.0]},
        {"guidance_scale": 2, "top_k": 64, "temperature": [0.8, 1.0]}]


def test_sweep_resumes_and_tabulates(sweep, tmp_path, capsys):
    out = tmp_path / "sweep.json"
    argv = ["--model", "hf-rq/ctf-emoji-64", "--grid", '{"guidance_scale": [1, 3]}', "--seeds", "0", "1",
            "--num_images_per_class", "2", "--output", str(out)]
    assert sweep.main(argv) == 0
    rows = json.loads(out.read_text())
    assert [(r["settings"]["guidance_scale"], r["seed"]) for r in rows] == [(1, 0), (1, 1), (3, 0), (3, 1)]
    assert all(0 <= r["class_consistency"] <= 1 and r["fid"] > 0 for r in rows)
    assert rows[0]["fid"] != rows[2]["fid"]  # the setting reached the pipeline
    before = out.read_text()
    assert sweep.main(argv) == 0 and out.read_text() == before  # nothing re-measured
    capsys.readouterr()
    assert sweep.main(["--model", "x", "--output", str(out), "--table"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 4 and "| ctf-emoji-64 | guidance_scale=3 | 0/1 |" in table[3]


def test_unknown_keyword_is_refused(sweep, tmp_path):
    with pytest.raises(SystemExit):
        sweep.main(["--model", "hf-rq/rq-emoji-64", "--grid", '{"fine_temperature": 1.0}', "--output",
                    str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()
