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


def test_window_sums_give_every_budgets_halves_and_the_full_scores(loaded, tokenizer):
    """Windows scored two at a time: each window's own gradient sum of the halved matrices, whose even and
    odd ones add up to the halves of a direct split, and the full importance of every matrix."""
    from lingregion import corpus

    from conftest import TEXT

    m = loaded()
    w = corpus.make_windows(tokenizer, TEXT, 16, 8 * 16, "ru", "score")
    assert len(w.input_ids) == 8

    class FakeRun:
        model, names, removed, progress = m.module, m.names, m.removed, False

    halved = m.names[::2]
    per_window, full = stability._pass(FakeRun, w, 8, halved)
    assert len(per_window) == 8 and all(list(g) == halved for g in per_window)
    one = stability._slice(w, 3, 4)
    alone = scoring.gradient_sum(m.module, one, halved, progress=False)
    for n in halved:  # a plain sum over the window's tokens
        torch.testing.assert_close(per_window[3][n], alone[n] * one.n_tokens, rtol=1e-5, atol=1e-7)
    a, b = stability._halves(FakeRun, per_window, range(8))
    split = scoring.score(m.module, w, m.names, m.removed, progress=False, halves=halved)
    for got, want in ((a, split.a), (b, split.b)):
        for n in halved:  # plain sums, against means over all tokens: compare up to the common factor
            torch.testing.assert_close(got[n] / w.n_tokens, want[n], rtol=1e-4, atol=1e-7)
    for n in m.names:
        torch.testing.assert_close(full[n] / w.n_tokens, split.full[n], rtol=1e-4, atol=1e-7)
    # a bootstrap resample is a draw of windows; the identity draw is the measured curve
    curve = [uncertainty.split_half_jaccard(*stability._halves(FakeRun, per_window, range(k)), 0.05) for k in (2, 4, 8)]
    replicates = stability._resampled(FakeRun, per_window, [2, 4, 8], 0.05, seed=0)
    assert replicates.shape == (stability.RESAMPLES, 3) and ((0 <= replicates) & (replicates <= 1)).all()
    assert not (replicates == curve).all(1).all()  # resamples differ from the measured curve
    assert (replicates == stability._resampled(FakeRun, per_window, [2, 4, 8], 0.05, seed=0)).all()


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
    lo, hi = st["gain_per_doubling_ci95"]["ru"]
    assert lo <= hi and st["gain_per_doubling"]["ru"] == st["per_language"]["ru"]["gain"]["per_doubling"]
    assert "ru" in st["stable_core_share"] and 0 < st["halved_share"] <= 1
    gain = st["per_language"]["ru"]["gain"]
    assert gain["tokens"] is None or gain["tokens"] <= 10 * st["per_language"]["ru"]["points"][-1]["tokens_per_half"]
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
