"""`reproduce`: the selected experiments run in order into one folder, which records them and repeats itself."""

import json

from lingregion import Config, reproduce

from conftest import tiny_config


def test_reproduce_runs_what_is_selected_and_records_it(tiny_folder, tmp_path):
    cfg = tiny_config(tiny_folder, eval_langs=["ru"], ratios=[0.05], random_seeds=1, experiments=["removal"])
    out = tmp_path / "run"
    results = reproduce(cfg, out, progress=False)
    assert list(results) == ["removal"]
    record = json.loads((out / "run.json").read_text())
    assert record["experiments"] == ["removal"] and set(record["experiment_seconds"]) == {"removal"}
    assert record["model"]["fingerprint"] and record["environment"]["lingregion"]
    assert Config.from_dict(Config.read(out / "config.yaml")) == cfg  # the saved config repeats the run
    assert (out / "report.md").is_file() and (out / "results" / "removal-summary.json").is_file()
    summary = (out / "results" / "removal-summary.json").read_text()
    assert reproduce(cfg, out, progress=False)["removal"]["table"] == results["removal"]["table"]
    assert (out / "results" / "removal-summary.json").read_text() == summary  # resumed: nothing recomputed
