"""Choosing and shipping sampling defaults. training/sweep_sampling.py: every combination is evaluated once per
seed, a rerun skips what is stored, keywords the pipeline does not take are refused before sampling.
training/bundle_default.py --sampling_defaults: the values land in the bundled prior's generation config, which
the pipeline then uses; a bad value is refused before the bundled copy is touched."""

import json

import pytest


@pytest.fixture(scope="module")
def sweep(repo_script):
    return repo_script("training/sweep_sampling.py")


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


def test_bundle_default_writes_sampling_defaults(tmp_path, monkeypatch, repo_script):
    from hf_rq import RQTransformerPipeline, hub

    bundle = repo_script("training/bundle_default.py")
    monkeypatch.setattr(bundle, "BUNDLED", tmp_path)
    source = hub.bundled_path("hf-rq/rq-emoji-64")
    argv = [str(source), "--name", "x", "--data_dir", str(source)]
    assert bundle.main(argv + ["--sampling_defaults", '{"guidance_scale": 3.0, "top_k": [8, 16, 16, 16]}']) == 0
    gc = RQTransformerPipeline.from_pretrained(tmp_path / "x").transformer.generation_config
    assert (gc.guidance_scale, gc.top_k, gc.temperature) == (3.0, [8, 16, 16, 16], 0.8)  # temperature: the source's
    saved = (tmp_path / "x" / "transformer" / "generation_config.json").read_text()
    for bad in ('{"guidance_scale": 0.5}', '{"fine_temperature": 1.0}', '{"top_k": [8, 8]}', "[1]"):
        with pytest.raises(SystemExit):
            bundle.main(argv + ["--sampling_defaults", bad])
        assert (tmp_path / "x" / "transformer" / "generation_config.json").read_text() == saved
