"""The estimators experiment's stability: within- and between-language overlaps and specificity equal a direct
computation, and the recommendation and ranks follow their rules."""

import numpy as np
import pytest
import torch

from lingregion import importance, uncertainty

from conftest import importance_target


def synthetic_parts(model, names, g, groups=4):
    """Groups of windows with random gradients and squared sums (two windows each, so nothing is derived)."""
    parts = []
    for _ in range(groups):
        p = importance.Part(windows=2, tokens=20)
        for n in names:
            shape = model.get_parameter(n).shape
            p.grad[n] = torch.randn(shape, generator=g)
            p.window_sq[n] = torch.rand(shape, generator=g)
        parts.append(p)
    return parts


def test_within_between_and_specificity_equal_a_direct_computation(tiny):
    from lingregion.experiments import estimator_stability as exp

    model = tiny("llama")
    t = importance_target(model)
    g = torch.Generator().manual_seed(1)
    langs = {lang: synthetic_parts(model, t.names, g) for lang in ("ru", "uk", "zh")}
    ratio = 0.05
    split = exp.SplitHalf(t, ["taylor", "fisher", "magnitude", "lape"], ratio, seed=3)
    assert split.names == ["taylor", "fisher", "magnitude"]  # lape has no per-language score
    for lang, parts in langs.items():
        split.visit(lang, parts)
    res = split.result(resamples=500)
    assert res["splits"] == 3  # 4 groups: three distinct ways to halve them, odd/even first
    assert res["fewest_windows_per_half"] == 4  # two groups of two windows
    for s in res["split_groups"].values():
        assert s[0] == [0, 2] and sorted(map(tuple, s)) == [(0, 1), (0, 2), (0, 3)]

    delta = {n: (model.get_parameter(n).detach().float() - t.removed[n]) for n in t.names}

    def scores(name, ps):  # the estimator written out, on the sum of the groups `ps` (added as subset adds them)
        total = ps[0]
        for p in ps[1:]:
            total = total + p
        if name == "taylor":
            return {n: delta[n].abs() * total.grad[n].abs() for n in t.names}
        return {n: delta[n].square() * total.window_sq[n] * 0.5 for n in t.names}

    def halves(ps, a):
        return [ps[i] for i in a], [ps[i] for i in range(4) if i not in a]

    for name in ("taylor", "fisher"):
        r = res["estimators"][name]
        # at the budget: even windows (groups 0, 2) against odd (1, 3); at half of it: group 0 against 2
        for label, (ga, gb) in {"budget": ([0, 2], [1, 3]), "half": ([0], [2])}.items():
            for lang, ps in langs.items():
                ref = uncertainty.split_half_jaccard(
                    scores(name, [ps[i] for i in ga]), scores(name, [ps[i] for i in gb]), ratio
                )
                assert r["split_half_jaccard"][label]["by_language"][lang] == pytest.approx(ref, abs=1e-12)
        assert "needs at least 8 windows" in r["split_half_jaccard"]["quarter"]["reason"]
        # specificity: over pairs, mean within − mean of the four half-against-half Jaccards
        per_split = []
        for j in range(3):  # each language draws its own order of the three ways to halve 4 groups
            a = res["split_groups"]["ru"][j]
            h = {
                lang: [scores(name, x) for x in halves(ps, res["split_groups"][lang][j])] for lang, ps in langs.items()
            }
            within = {lang: uncertainty.split_half_jaccard(*h[lang], ratio) for lang in langs}
            diffs = {}
            for x, y in [("ru", "uk"), ("ru", "zh"), ("uk", "zh")]:
                cross = np.mean([uncertainty.split_half_jaccard(p, q, ratio) for p in h[x] for q in h[y]])
                diffs[f"{x}-{y}"] = (within[x] + within[y]) / 2 - cross
                if a == [0, 2]:
                    assert r["between_language_jaccard"]["by_pair"][f"{x}-{y}"] == pytest.approx(cross, abs=1e-12)
            per_split.append(np.mean(list(diffs.values())))
            if a == [0, 2]:
                assert r["specificity"]["value"] == pytest.approx(per_split[-1], abs=1e-12)
                assert r["specificity"]["by_pair"] == pytest.approx(diffs, abs=1e-12)
        assert r["specificity"]["by_split"] == pytest.approx(per_split, abs=1e-12)
        lo, hi = r["specificity"]["ci95"]
        assert min(per_split) - 1 <= lo <= hi <= max(per_split) + 1 and lo < hi
    # the interval is seeded
    assert (
        split.result(resamples=500)["estimators"]["taylor"]["specificity"] == res["estimators"]["taylor"]["specificity"]
    )

    # magnitude reads no text: every half and every language picks the same entries
    m = res["estimators"]["magnitude"]
    assert m["split_half_jaccard"]["budget"]["mean"] == 1.0 and m["split_half_jaccard"]["half"]["mean"] == 1.0
    assert m["between_language_jaccard"]["mean"] == 1.0
    assert m["specificity"]["value"] == 0.0 and m["specificity"]["ci95"] == [0.0, 0.0]


def test_recommendation_follows_its_rule():
    from lingregion.experiments import estimator_stability as exp

    def entry(stab, ci, damage=1.0):
        spec = {"value": sum(ci) / 2, "ci95": list(ci)}
        return {
            "split_half_jaccard": {"budget": {"mean": stab}},
            "specificity": spec,
            "damage_at_overlap_ratio": damage,
        }

    table = {
        "taylor": entry(0.3, (0.01, 0.05)),
        "fisher": entry(0.6, (0.02, 0.04)),
        "taylor-window": entry(0.7, (-0.01, 0.05)),  # most stable, but its interval reaches 0
        "magnitude": entry(1.0, (0.0, 0.0)),
    }
    rec = exp.recommend(table)
    assert rec["estimator"] == "fisher" and rec["qualifying"] == ["taylor", "fisher"]
    assert rec["verdicts"]["taylor-window"] == "inconclusive" and rec["verdicts"]["magnitude"] == "inconclusive"
    table["fisher"] = entry(0.6, (-0.04, -0.02))
    table["taylor"] = entry(0.3, (-0.01, 0.01))
    rec = exp.recommend(table)
    assert rec["estimator"] is None and rec["verdicts"]["fisher"] == "does not hold"
    assert exp.recommendation_text({"recommendation": rec, "by_estimator": table}).startswith("No estimator qualifies")


def test_ranks_share_ties_and_compare_damage_curves_in_order():
    from lingregion.experiments import estimator_stability as exp

    assert exp.ranks({"a": 0.2, "b": 0.5, "c": 0.2, "d": None}) == {"a": 2, "b": 1, "c": 2, "d": None}
    # damage at the cap for all at the smallest k: the next k decides
    assert exp.ranks({"a": (9.5, 1.0), "b": (9.5, 2.0), "c": (9.5, 2.0)}) == {"a": 3, "b": 1, "c": 1}
