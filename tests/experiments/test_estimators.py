"""The estimators experiment end to end on a tiny model: it resumes, refuses a bad config in one line, keeps
its stability per estimator, and gives monolingual regions from another estimator beside the paper's."""

import math

import pytest

from lingregion import Config, importance, models, reproduce
from lingregion.experiments import estimator_stability
from lingregion.experiments.registry import validate
from lingregion.regions import select
from lingregion.run import Run
from lingregion.store import LingregionError

from conftest import tiny_config


def test_experiment_end_to_end_on_a_tiny_model_and_resume(tiny_folder, tmp_path, monkeypatch):
    from lingregion import evaluation, interventions
    from lingregion.regions import Region

    cfg = Config(
        model=str(tiny_folder),
        seq_len=16,
        score_tokens=32,
        score_langs=["ru", "es", "zh"],
        est_tokens=32,
        est_seq_len=8,
        est_eval_tokens=32,
        est_eval_langs=["ru", "en"],
        est_ratios=[0.01, 0.1],
        est_overlap_ratio=0.1,
        est_outlier_dims=1,
        experiments=["estimators"],
    )
    out = tmp_path / "run"
    res = reproduce(cfg, out, progress=False)["estimators"]
    assert set(res["damage"]) == set(cfg.est_estimators) | {"random"}
    assert res["scopes"]["lape"] == "global" and res["scopes"]["fisher"] == "matrix"
    for r in ("0.01", "0.1"):
        spec = res["specificity"][r]
        assert set(spec) == {"core", "en-only", "shuffled", "magnitude", "outlier-dims", "random"}
        assert spec["core"]["jaccard_core"] == 1.0 and spec["core"]["relative_damage"] == 1.0
        assert spec["random"]["relative_damage"] == 0.0
        assert spec["core"]["damage"] == res["damage"]["taylor"][r]
    for a in res["jaccard"]:
        assert res["jaccard"][a][a] == 1.0
    # a damage entry equals the evaluation redone by hand with the saved region removed
    m = models.load(str(tiny_folder))
    run = Run(out, cfg, m, progress=False)
    region = Region.load(out / "regions" / "est-fisher-top-0.1.safetensors")
    assert region.count() == sum(round(0.1 * region.mask(n).numel()) for n in region.packed)  # per matrix
    with interventions.applied(m.module, interventions.removal(region, run.removed)):
        nll = evaluation.perplexity(m.module, run.windows("en", "eval", 32), cfg.batch_size, False)["nll"]
    b = res["base"]["en"]["nll"] / res["base"]["en"]["tokens"]
    assert res["damage_by_language"]["fisher@0.1"]["en"] == pytest.approx(
        min(nll / res["base"]["en"]["tokens"], max(b, math.log(300))) - b, rel=1e-9, abs=1e-12
    )
    assert (out / "figures" / "estimators-damage.png").read_bytes().startswith(b"\x89PNG")
    assert "Is the core region specific to language?" in (out / "report.md").read_text()

    # a second run reads the regions back instead of scoring again
    monkeypatch.setattr(importance, "estimate", lambda *a, **k: pytest.fail("scored again"))
    monkeypatch.setattr(importance, "score", lambda *a, **k: pytest.fail("scored again"))
    again = reproduce(cfg, out, progress=False)["estimators"]
    assert again["damage"] == res["damage"] and again["specificity"] == res["specificity"]


def test_bad_config_is_a_one_line_error(tiny_folder):

    for bad, match in [
        ({"est_estimators": ["fisher"]}, "must include taylor"),
        ({"est_estimators": ["taylor", "nope"]}, "unknown estimator"),
        ({"est_overlap_ratio": 0.02}, "must be one of the estimator ratios"),
        ({"est_control_lang": "xx"}, "unknown language 'xx'"),
    ]:
        with pytest.raises(LingregionError, match=match):
            validate(Config(experiments=["estimators"], **bad))


def test_stability_is_saved_per_estimator_and_read_back(tiny_folder, tmp_path, monkeypatch):
    cfg = Config(
        model=str(tiny_folder),
        seq_len=16,
        score_tokens=32,
        score_langs=["ru", "es", "zh"],
        est_estimators=["taylor", "fisher", "magnitude", "lape"],
        est_tokens=64,
        est_seq_len=8,
        est_eval_tokens=16,
        est_eval_langs=["ru"],
        est_ratios=[0.1],
        est_overlap_ratio=0.1,
        est_outlier_dims=0,
        experiments=["estimators"],
    )
    out = tmp_path / "run"
    res = reproduce(cfg, out, progress=False)["estimators"]
    saved = __import__("json").loads((out / "results" / "estimators-summary.json").read_text())
    table = saved["by_estimator"]
    assert set(table) == {"taylor", "fisher", "magnitude", "lape"}
    for name in ("taylor", "fisher", "magnitude"):
        e = table[name]
        assert set(e["split_half_jaccard"]) == {"budget", "half", "quarter"}
        assert e["split_half_jaccard"]["quarter"]["tokens_per_half"] > 0  # 8 windows per language: every level
        lo, hi = e["specificity"]["ci95"]
        assert (
            lo <= hi
            and e["damage"] == res["damage"][name]
            and e["damage_at_overlap_ratio"] == res["damage"][name]["0.1"]
        )
    assert table["lape"]["specificity"] is None and "compares the languages" in table["lape"]["note"]
    assert table["magnitude"]["specificity"]["value"] == 0.0
    assert res["stability"]["splits"] == estimator_stability.SPLITS and res["recommendation"]["rule"]
    assert (out / "figures" / "estimators-stability.png").read_bytes().startswith(b"\x89PNG")
    report = (out / "report.md").read_text()
    assert "Stable and language-specific?" in report and "Rule: An estimator qualifies" in report

    # a rerun needs no pass: regions and split-half results are both read back
    monkeypatch.setattr(importance, "iter_estimates", lambda *a, **k: pytest.fail("a pass ran again"))
    again = reproduce(cfg, out, progress=False)["estimators"]
    assert again["by_estimator"] == res["by_estimator"]


def test_monolingual_regions_from_another_estimator_beside_the_papers(tiny_folder, tmp_path):
    from lingregion.regions import Region, monolingual

    base = dict(
        mono_eval_tokens=32,
        eval_langs=["ru", "uk", "es"],
        mono_langs=["ru", "uk", "es"],
        mono_ratio=0.1,
        experiments=["monolingual"],
        gen_tokens=2,
    )
    out = tmp_path / "run"
    cfg = tiny_config(tiny_folder, **base, mono_estimator="fisher")
    res = reproduce(cfg, out, progress=False)["monolingual"]
    # the regions are built from fisher scores of each language's own scoring windows
    m = models.load(str(tiny_folder))
    run = Run(out, cfg, m, progress=False)
    t = importance.Target(m.module, run.names, run.removed)
    tops = {
        lang: select(importance.score("fisher", t, [run.windows(lang, "score")], progress=False), 0.1, "top")
        for lang in cfg.mono_langs
    }
    for lang in cfg.mono_langs:
        saved = Region.load(out / "regions" / f"monolingual-{lang}-0.1-fisher.safetensors")
        assert saved.meta["estimator"] == "fisher"
        assert (saved - monolingual(tops, lang)).count() == 0 and (monolingual(tops, lang) - saved).count() == 0
    assert not (out / "regions" / "monolingual-ru-0.1.safetensors").exists()  # taylor's names stay taylor's
    assert res["estimator"] == "fisher" and res["paper_estimator"]["estimator"] == "taylor"
    assert "The same matrix with the paper's estimator (taylor) instead of fisher" in (out / "report.md").read_text()

    # the paper's matrix shown beside it is the one a taylor run makes, from the same cached evaluations
    paper = reproduce(tiny_config(tiny_folder, **base), out, progress=False)["monolingual"]
    assert paper["ppl_ratio"] == res["paper_estimator"]["ppl_ratio"]
    assert "estimator" not in paper and "paper_estimator" not in paper  # the taylor summary is as before
    assert Region.load(out / "regions" / "monolingual-ru-0.1.safetensors").meta["estimator"] == "taylor"
    names = {p.name for p in (out / "scores").glob("ru*.safetensors")}
    assert {"ru.safetensors", "ru.fisher.safetensors", "ru-16.fisher.safetensors"} <= names
