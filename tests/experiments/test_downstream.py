"""The downstream experiment: multiple-choice accuracy with a region removed matches a direct evaluation
and lm-eval, resumes from its cache, is skipped for a model too short for the items, and its config is
checked before anything runs."""

import json

import numpy as np
import pytest
import torch

from lingregion import interventions, models, tasks, uncertainty
from lingregion.cli import main
from lingregion.experiments import downstream
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


def test_summary_carries_intervals_without_lm_eval(bos_tokenizer, tmp_path, capsys):
    """Accuracy changes with paired item-bootstrap intervals and perplexity ratios with block-bootstrap ones."""
    folder = tmp_path / "tiny-long"
    long_model().save_pretrained(folder)
    bos_tokenizer.save_pretrained(folder)
    out = tmp_path / "run"
    (tmp_path / "cfg.yaml").write_text("down_langs: [ru, en]\ndown_items: 4\ndown_ratio: 0.05\ndown_mono: false\n")
    argv = ["reproduce", "--model", str(folder), "--out", str(out), "--config", str(tmp_path / "cfg.yaml"), *DOWN]
    assert main(argv) == 0, capsys.readouterr().err
    res = json.loads((out / "results" / "downstream-summary.json").read_text())
    cache = json.loads((out / "results" / "downstream.json").read_text())["entries"]
    items = {lang: tasks.load_items(lang, 4) for lang in ("ru", "en")}
    correct = {
        s: {lang: downstream.correct(items[lang], cache[f"{s}/{lang}"]["loglik"]) for lang in items}
        for s in res["settings"]
    }
    for s in res["settings"]:
        for lang in items:
            assert correct[s][lang].mean() == res["accuracy"][s][lang]["acc"]  # as tasks.accuracy counts
    want = downstream.accuracy_intervals(correct, {lang: [it["id"] for it in v] for lang, v in items.items()}, 0)
    assert res["accuracy_change"] == json.loads(json.dumps(want))
    top = res["accuracy_change"]["top@0.05"]
    assert top["mean"]["value"] == pytest.approx(np.mean([top[lang]["value"] for lang in items]))
    assert all(e["ci95"][0] <= e["value"] <= e["ci95"][1] for e in top.values())
    ppl = json.loads((out / "results" / "removal.json").read_text())["entries"]
    assert res["perplexity"]["top@0.05"]["ru"]["ci95"] == pytest.approx(
        list(uncertainty.paired_bootstrap(ppl["top@0.05/ru"], ppl["base/ru"]))
    )
    assert res["accuracy_ci95_method"]["unit"] == "item" and res["verdict_rule"] == uncertainty.RULE
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "Accuracy change from Base with its 95% interval" in md and "pts" in md


def test_accuracy_verdicts_turn_inconclusive_when_the_items_are_cut():
    """Top removal costs 60 points on 400 items: the paired interval lies below −5 points; on 2 items it does not.
    Bottom loses 4 items and gains 4 of 400 (holds: less than 5 points), and loses one of 2 (inconclusive)."""

    def result(n):
        base = np.tile([1.0] * 9 + [0.0], n)[:n]
        top = np.tile([1.0, 0.0, 0.0, 1.0, 0.0], n)[:n]  # 2 of 5 right
        bottom = base.copy()
        bottom[9:49:10], bottom[0:4] = 1.0, 0.0  # gains items 9, 19, 29, 39; loses items 0–3
        bottom = bottom if n > 2 else np.array([1.0, 0.0])
        correct = {"base": {"ru": base}, "top@0.01": {"ru": top}, "bottom@0.01": {"ru": bottom}}
        return {
            "settings": ["base", "top@0.01", "bottom@0.01"],
            "languages": ["ru"],
            "accuracy_change": downstream.accuracy_intervals(correct, {"ru": list(range(n))}, seed=0),
        }

    v = downstream.verdicts(result(400))
    assert v["top@0.01"]["verdict"] == "holds" and v["bottom@0.01"]["verdict"] == "holds"
    v = downstream.verdicts(result(2))
    assert v["top@0.01"]["verdict"] == "inconclusive" and v["bottom@0.01"]["verdict"] == "inconclusive"
    assert downstream.verdicts({"settings": ["base", "top@0.01"]})["top@0.01"]["verdict"] == "inconclusive"
    same = {"base": {"ru": np.ones(50)}, "top@0.01": {"ru": np.ones(50)}}  # no item changed: no spread, no verdict
    res = {
        "settings": ["base", "top@0.01"],
        "accuracy_change": downstream.accuracy_intervals(same, {"ru": list(range(50))}),
    }
    assert downstream.verdicts(res)["top@0.01"]["verdict"] == "inconclusive"
    assert "no item changed" in downstream.verdicts(res)["top@0.01"]["reason"]


def test_accuracy_intervals_resample_the_same_items_in_every_language():
    """The task is parallel: with the same items, one draw serves every language, so a change that is the same
    item by item in two languages has the same interval; a monolingual region's own-minus-others is paired too."""
    g = np.random.default_rng(1)
    base = g.integers(0, 2, 30).astype(float)
    drop = base * (g.random(30) < 0.5)
    correct = {"base": {"ru": base, "en": base}, "mono-ru": {"ru": drop, "en": base}}
    iv = downstream.accuracy_intervals(correct, {"ru": list(range(30)), "en": list(range(30))}, seed=3)
    assert iv["mono-ru"]["en"] == {"value": 0.0, "ci95": [0.0, 0.0]}
    assert iv["mono-ru"]["own_minus_others"]["ci95"] == iv["mono-ru"]["ru"]["ci95"]
    counts = np.random.default_rng(3).multinomial(30, np.full(30, 1 / 30), size=uncertainty.RESAMPLES) / 30
    lo, hi = np.quantile(counts @ (drop - base), [0.025, 0.975])
    assert iv["mono-ru"]["ru"]["ci95"] == pytest.approx([lo, hi])
    v = downstream.verdicts({"settings": ["base", "mono-ru"], "accuracy_change": iv})
    assert v["mono-ru"]["verdict"] == uncertainty.verdict(tuple(iv["mono-ru"]["ru"]["ci95"]), 0.0, "below")


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
