"""The stability experiment and the split-half statistics every score carries (tiny model)."""

import json
import math

import pytest
import torch

from lingregion import models, reproduce, scoring, uncertainty
from lingregion.experiments import stability
from lingregion.run import Run

from conftest import tiny_config


def _config(tiny_folder, **kw):
    base = {
        "score_tokens": 64,
        "eval_langs": ["ru", "es"],
        "ratios": [0.05],
        "random_seeds": 2,
        "batch_size": 2,
        "stability_langs": ["ru"],
        "stability_tokens": 128,
        "experiments": ["removal", "stability"],
    }
    return tiny_config(tiny_folder, **{**base, **kw})


def test_budgets_are_even_prefixes():
    assert stability.budgets(8) == [2, 4, 8]
    assert stability.budgets(16) == [2, 4, 8, 16]
    assert stability.budgets(5) == [2, 4]


def test_chunked_halves_equal_a_direct_split(loaded, tokenizer):
    """The prefix sums of chunk halves are the halves of the whole prefix (up to scale)."""
    from lingregion import corpus

    from conftest import TEXT

    m = loaded()
    w = corpus.make_windows(tokenizer, TEXT, 16, 8 * 16, "ru", "score")

    class FakeRun:
        model, names, removed, progress = m.module, m.names, m.removed, False

    halves, full = stability._halves_at(FakeRun, w, [2, 4, 8])
    a, b = scoring.gradient_sum(m.module, w, m.names, progress=False, halves=True)
    want_a = scoring.taylor_importance(m.module, a, m.removed)
    for n in m.names:  # chunk sums are rescaled to plain sums: compare up to the common factor
        got = halves[8][0][n] / w.n_tokens
        assert torch.allclose(got, want_a[n], rtol=1e-4, atol=1e-7)
    assert uncertainty.split_half_jaccard(halves[8][0], want_a, 0.05) == pytest.approx(1.0, abs=0.02)
    direct = scoring.score(m.module, w, m.names, m.removed, progress=False)
    for n in m.names:
        assert torch.allclose(full[n] / w.n_tokens, direct[n], rtol=1e-4, atol=1e-7)


def test_removal_intervals_random_draws_and_stability_end_to_end(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(models, "bfloat16_slowdown", lambda device: 1.0)  # the precision pass runs on any CPU
    out = tmp_path / "run"
    res = reproduce(_config(tiny_folder), out, progress=False)
    removal = json.loads((out / "results" / "removal-summary.json").read_text())
    for s, by_lang in removal["ratio"].items():
        for lang, e in by_lang.items():
            lo, hi = e["ci95"]
            assert lo <= e["value"] <= hi, (s, lang)
            assert e["value"] == pytest.approx(removal["table"][s][lang]["ppl"] / removal["table"]["base"][lang]["ppl"])
    assert set(removal["random_draws"]["random@0.05"]) == {"0", "1"}
    draws = [d["ru"] for d in removal["random_draws"]["random@0.05"].values()]
    assert removal["table"]["random@0.05"]["ru"]["ppl"] == pytest.approx(math.exp(sum(map(math.log, draws)) / 2))
    assert removal["ci95_method"]["resamples"] == uncertainty.RESAMPLES
    st = json.loads((out / "results" / "stability-summary.json").read_text())
    assert set(st["split_half_jaccard"]) == {"ru"} and "tokens_for_jaccard_0.9" in st
    assert {"ru", "es", "core"} <= set(st["scored"])  # every scored language, and the core score
    assert 0 <= st["scored"]["ru"]["split_half_jaccard"]["0.05"] <= 1
    precision = st["per_language"]["ru"]["precision"]
    assert precision["other_dtype"] == "bfloat16" and 0 <= precision["jaccard"]["0.05"] <= 1
    md = (out / "report.md").read_text()
    assert "Stability: how much text a region needs" in md and " [" in md
    assert any(v in md for v in ("**holds**", "**does not hold**", "**inconclusive**"))
    assert res["stability"]["languages"] == ["ru"]


def test_the_precision_pass_is_skipped_with_its_reason_where_bfloat16_is_emulated(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(models, "bfloat16_slowdown", lambda device: 145.0)
    out = tmp_path / "run"
    reproduce(_config(tiny_folder, experiments=["stability"]), out, progress=False)
    st = json.loads((out / "results" / "stability-summary.json").read_text())
    assert "145× slower" in st["per_language"]["ru"]["precision"]["skipped"]
    assert "precision against sampling not measured" in (out / "report.md").read_text()
    monkeypatch.undo()
    assert models.bfloat16_slowdown("cuda") == 1.0 and models.bfloat16_slowdown("cpu") > 0


def test_stability_needs_four_windows(tiny_folder):
    from lingregion.experiments.registry import validate
    from lingregion.store import LingregionError

    with pytest.raises(LingregionError, match="fewer than 4 windows"):
        validate(_config(tiny_folder, stability_tokens=48))


def test_split_halves_off_stores_no_statistics(tiny_folder, tmp_path):
    from lingregion import models

    cfg = _config(tiny_folder, split_halves=False)
    run = Run(tmp_path / "r", cfg, models.load(str(tiny_folder)), progress=False)
    run.scores("ru")
    assert run.stability_of_scores() == {}


def test_stability_command_for_one_language(tiny_folder, tmp_path, capsys):
    from lingregion.cli import main

    argv = [
        "stability",
        "--model",
        str(tiny_folder),
        "--lang",
        "ru",
        "--seq-len",
        "16",
        "--stability-tokens",
        "64",
        "--no-stability-other-dtype",
        "--ratios",
        "0.05",
        "--out",
        str(tmp_path / "st"),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("ru: the Top 0.05 region of two disjoint samples")
    summary = json.loads((tmp_path / "st" / "results" / "stability-summary.json").read_text())
    assert [p["windows"] for p in summary["per_language"]["ru"]["points"]] == [2, 4]
