"""The downstream experiment: multiple-choice accuracy with a region removed matches a direct evaluation
and lm-eval, resumes from its cache, is skipped for a model too short for the items, and its config is
checked before anything runs."""

import json

import pytest
import torch

from lingregion import interventions, models, tasks
from lingregion.cli import main
from lingregion.regions import Region, select

from conftest import long_model

DOWN = [
    "--seq-len",
    "16",
    "--score-tokens",
    "32",
    "--eval-tokens",
    "32",
    "--score-langs",
    "ru,es",
    "--eval-langs",
    "ru,en",
    "--ratios",
    "0.05",
    "--batch-size",
    "2",
    "--experiments",
    "downstream",
]


def test_downstream_experiment_matches_a_direct_evaluation_and_resumes(bos_tokenizer, tmp_path, capsys, monkeypatch):
    pytest.importorskip("lm_eval")
    folder = tmp_path / "tiny-long"
    long_model().save_pretrained(folder)
    bos_tokenizer.save_pretrained(folder)
    out = tmp_path / "run"
    m = models.load(str(folder))
    names = models.scored_names(m.module)
    mono = select(
        {
            n: torch.rand(p.shape, generator=torch.Generator().manual_seed(1))
            for n, p in m.module.named_parameters()
            if n in names
        },
        0.03,
        "top",
        meta={"model": m.info["fingerprint"], "label": "monolingual-ru"},
    )
    mono.save(out / "regions" / "monolingual-ru-0.03.safetensors")  # as the monolingual experiment leaves it
    (tmp_path / "cfg.yaml").write_text(
        "down_langs: [ru, en]\ndown_items: 3\ndown_ratio: 0.05\ndown_batch: 5\n"
        "down_lmeval_tasks: [lingregion_udhr_next_ru]\ndown_lmeval_limit: 3\n"
    )
    argv = ["reproduce", "--model", str(folder), "--out", str(out), "--config", str(tmp_path / "cfg.yaml"), *DOWN]
    assert main(argv) == 0, capsys.readouterr().err
    res = json.loads((out / "results" / "downstream-summary.json").read_text())
    assert res["settings"] == ["base", "top@0.05", "bottom@0.05", "random@0.05", "mono-ru"]
    assert res["items"] == {"ru": 3, "en": 3} and res["model"]["fingerprint"] == m.info["fingerprint"]
    removed = models.removed_values(m.module, names)
    for setting, file in [("base", None), ("top@0.05", "core-top-0.05"), ("mono-ru", "monolingual-ru-0.03")]:
        edits = interventions.removal(Region.load(out / "regions" / f"{file}.safetensors"), removed) if file else []
        with interventions.applied(m.module, edits):
            for lang in ("ru", "en"):
                direct = tasks.evaluate(m.module, m.tokenizer, lang, limit=3)
                assert res["accuracy"][setting][lang]["acc"] == direct["acc"], (setting, lang)
                assert res["accuracy"][setting][lang]["acc_norm"] == direct["acc_norm"], (setting, lang)
            lm = res["lmeval"][setting]["lingregion_udhr_next_ru"]
            assert lm["acc"] == res["accuracy"][setting]["ru"]["acc"]  # lm-eval on the same model object agrees
    ppl = json.loads((out / "results" / "removal.json").read_text())["entries"]
    assert res["perplexity"]["top@0.05"]["ru"]["ratio"] == ppl["top@0.05/ru"]["ppl"] / ppl["base/ru"]["ppl"]
    assert "mono-ru/ru" in json.loads((out / "results" / "monolingual.json").read_text())["entries"]
    report_md = (out / "report.md").read_text(encoding="utf-8")
    assert "Downstream: multiple-choice accuracy" in report_md and (out / "figures" / "downstream.png").is_file()
    assert "first_chosen" in report_md

    def fail(*a, **k):
        raise AssertionError("recomputed a cached result")

    monkeypatch.setattr(tasks, "loglikelihoods", fail)
    monkeypatch.setattr(tasks, "lmeval", fail)
    assert main(argv + ["--mono-focus", "uk"]) == 0  # a rerun (other experiments' settings changed) resumes
    assert json.loads((out / "results" / "downstream-summary.json").read_text())["accuracy"] == res["accuracy"]


def test_downstream_is_skipped_for_a_model_too_short_for_the_items(tiny_folder, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["reproduce", "--model", str(tiny_folder), "--out", str(out), *DOWN]
    assert main(argv) == 0, capsys.readouterr().err
    res = json.loads((out / "results" / "downstream-summary.json").read_text())
    assert "128 positions" in res["skipped"] and "Not run: the model takes 128" in (out / "report.md").read_text()


def test_downstream_config_is_checked_before_anything_runs(tiny_folder, tmp_path, capsys):
    (tmp_path / "cfg.yaml").write_text("down_langs: [ru, xx]\n")
    argv = [
        "reproduce",
        "--model",
        str(tiny_folder),
        "--out",
        str(tmp_path / "run"),
        "--config",
        str(tmp_path / "cfg.yaml"),
        *DOWN,
    ]
    assert main(argv) == 2 and "down_langs xx" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
