"""The estimators experiment's damage and its answer: capped log-perplexity ratios, the specificity answer's
rule, and findings that break ties at the next share."""

import math

import pytest


def synthetic(core: dict, en: dict, shuffled: dict, random: dict, limit: float = 5.0) -> dict:
    """A saved result with only what the specificity answer reads: one language, damage per k per region."""
    ratios = list(core)
    spec = {}
    for r in ratios:
        lo, hi = random[r], core[r]
        spec[r] = {
            label: {
                "damage": d[r],
                "jaccard_core": 0.1,
                "entries": 10,
                "share_in_core": 0.1,
                "relative_damage": (d[r] - lo) / (hi - lo),
            }
            for label, d in (("core", core), ("en-only", en), ("shuffled", shuffled), ("random", random))
        }
    return {
        "ratios": ratios,
        "specificity": spec,
        "score_languages": ["ru", "es"],
        "control_language": "en",
        "estimators": ["taylor"],
        "vocab": 1000,
        "scored_parameters": 1000,
        "cap": {"ru": limit},
        "damage_by_language": {f"taylor@{r}": {"ru": core[r]} for r in ratios},
    }


def test_damage_is_the_log_perplexity_ratio_capped_at_a_uniform_guess():
    from lingregion.experiments import estimator_damage as exp

    base = {"ru": {"nll": 100.0, "tokens": 50, "ppl": math.exp(2.0)}, "en": {"nll": 50.0, "tokens": 50}}
    removed = {"ru": {"nll": 150.0, "tokens": 50, "ppl": math.exp(3.0)}, "en": {"nll": 5000.0, "tokens": 50}}
    d = exp.damage(base, removed, vocab=1000)
    assert d["ru"] == pytest.approx(math.log(removed["ru"]["ppl"] / base["ru"]["ppl"]))
    assert d["en"] == pytest.approx(math.log(1000) - 1.0)  # ln ppl 100 is past ln 1000: counted up to the cap


def test_specificity_answer_follows_its_rule():
    from lingregion.experiments import estimator_damage as exp

    # at 0.001 the core does nothing beyond Random: the answer is read at 0.01
    res = synthetic(
        core={"0.001": 0.05, "0.01": 3.0},
        en={"0.001": 0.0, "0.01": 2.0},
        shuffled={"0.001": 0.0, "0.01": 0.5},
        random={"0.001": 0.0, "0.01": 0.2},
    )
    assert exp.answer_ratio(res) == "0.01"
    text = exp.answer(res)
    assert text.startswith("At Top 1%") and "tied to structured text" in text
    assert "does 64% of its damage" in text  # (2.0 − 0.2) / (3.0 − 0.2)
    assert "uniform guess" not in text
    res = synthetic(core={"0.01": 3.0}, en={"0.01": 0.5}, shuffled={"0.01": 0.6}, random={"0.01": 0.2})
    assert "specific to the scored languages" in exp.answer(res)
    res = synthetic(core={"0.01": 3.0}, en={"0.01": 2.9}, shuffled={"0.01": 2.0}, random={"0.01": 0.2})
    assert "generally important" in exp.answer(res)
    res = synthetic(core={"0.01": 0.05}, en={"0.01": 0.0}, shuffled={"0.01": 0.0}, random={"0.01": 0.0})
    assert exp.answer_ratio(res) is None and "cannot be compared" in exp.answer(res)
    # a core region at the cap (every language past a uniform guess) is called out
    res = synthetic(core={"0.01": 5.0}, en={"0.01": 5.0}, shuffled={"0.01": 4.0}, random={"0.01": 0.2})
    assert "worse than a uniform guess" in exp.answer(res) and exp.saturated(res) == {"0.01": ["taylor"]}


def test_findings_break_ties_at_the_next_k():
    from lingregion.experiments import estimators as exp
    from lingregion.experiments.estimator_damage import answer

    res = synthetic(
        core={"0.001": 5.0, "0.01": 5.0},
        en={"0.001": 1, "0.01": 1},
        shuffled={"0.001": 1, "0.01": 1},
        random={"0.001": 0.0, "0.01": 0.1},
    )
    res["estimators"] = ["taylor", "fisher", "wanda"]
    res["damage"] = {
        "taylor": {"0.001": 5.0, "0.01": 5.0},
        "fisher": {"0.001": 5.0, "0.01": 4.0},
        "wanda": {"0.001": 1.0, "0.01": 5.0},
        "random": {"0.001": 0.0, "0.01": 0.1},
    }
    res["damage_by_language"] = {f"{n}@{r}": {"ru": v} for n, c in res["damage"].items() for r, v in c.items()}
    res["answer"] = answer(res)
    first = exp.findings(res)[0]
    assert "0.1% of each importance estimator's scores, taylor does the most damage" in first
    assert "every language past a uniform guess" in first  # 5.0 is this language's cap
    assert "then fisher 5.000, wanda 1.000" in first and "ties broken at 1%" in first
