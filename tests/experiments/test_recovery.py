"""The recovery experiment (the paper's Table 2) on a tiny model: it matches a hand replay with the library
pieces and resumes without retraining, its summary carries 95% intervals beside the values its findings use,
and its verdicts follow the intervals."""

import json

import pytest
import torch

from lingregion import corpus, evaluation, freezing, interventions, markup, models, reproduce, uncertainty
from lingregion.experiments import recovery, training
from lingregion.regions import Region
from lingregion.run import Run

from conftest import TEXT, TINY_TRAINING, tiny_config


def small_config(tiny_folder, **kw):
    return tiny_config(tiny_folder, **{**TINY_TRAINING, "experiments": ["recovery"], **kw})


def test_recovery_matches_a_hand_replay_with_intervals_and_resumes(tiny_folder, tmp_path, monkeypatch):
    cfg = small_config(tiny_folder)
    out = tmp_path / "run"
    rec = reproduce(cfg, out, progress=False)["recovery"]
    assert rec["samples"] == [0, 2, 6] and rec["history"]["top-freeze"]["frozen_entries"] > 0

    # Replay Top&Freeze by hand on a fresh model with the library pieces.
    m = models.load(str(tiny_folder))
    run = Run(out, cfg, m, progress=False)
    top = Region.load(out / "regions" / "core-top-0.05.safetensors")
    data = run.windows("ru", "score", 6 * 16)
    evals = {lang: run.windows(lang, "eval", 32) for lang in ["ru", "es"]}
    tcfg = training.train_config(cfg)
    assert tcfg.steps == 3 and tcfg.eval_steps == [1, 3]
    before = {n: p.detach().clone() for n, p in m.module.named_parameters()}
    base = {k: evaluation.perplexity(m.module, w, progress=False) for k, w in evals.items()}
    with interventions.applied(m.module, interventions.removal(top, run.removed)):
        start = {k: evaluation.perplexity(m.module, w, progress=False) for k, w in evals.items()}
        h = freezing.train(
            m.module,
            data,
            tcfg,
            models.scored_names(m.module),
            frozen=top,
            frozen_values=run.removed,
            evals=evals,
            progress=False,
        )
        params = dict(m.module.named_parameters())
        for n in top.packed:  # held at the removed value, bit for bit
            mask = top.mask(n)
            assert torch.equal(params[n].detach()[mask], torch.full_like(before[n][mask], run.removed[n]))
    for lang in ["ru", "es"]:
        assert rec["table"]["top-freeze"]["ppl"][lang] == [
            start[lang]["ppl"],
            h["evals"]["1"][lang]["ppl"],
            h["evals"]["3"][lang]["ppl"],
        ]
    assert rec["history"]["top-freeze"]["loss"] == h["loss"]

    # The intervals the findings read: end / start of the trained language, paired on the same text.
    entry = rec["intervals"]["trained_recovers"]["top-freeze"]
    end = h["evals"]["3"]["ru"]
    assert entry["value"] == pytest.approx(end["ppl"] / start["ru"]["ppl"], rel=1e-9)
    assert entry["ci95"] == pytest.approx(list(uncertainty.paired_bootstrap(end, start["ru"], seed=cfg.seed)))
    gap = rec["intervals"]["damage_undone"]["unfreeze_minus_freeze"]
    if base["es"]["ppl"] < start["es"]["ppl"]:
        assert gap["ci95"][0] <= gap["value"] <= gap["ci95"][1]
    else:  # this random tiny model: removing its Top region does not hurt es, so there is no damage to undo
        assert gap["ci95"] is None and "no damage to undo" in gap["reason"]
    frozen = rec["intervals"]["damage_undone"]["top-freeze"]["value"]
    es = rec["table"]["top-freeze"]["ppl"]["es"]
    assert frozen == pytest.approx(recovery._damage_undone(es[0], es[-1], base["es"]["ppl"]), rel=1e-9)
    summary = json.loads((out / "results" / "recovery-summary.json").read_text())
    assert summary["intervals"] == json.loads(json.dumps(rec["intervals"]))
    assert summary["ci95_method"]["resamples"] == uncertainty.RESAMPLES and '"blocks":' not in json.dumps(summary)
    verdicts = recovery.verdicts(summary)
    assert verdicts["trained"]["verdict"] in ("holds", "does not hold", "inconclusive")
    if gap["ci95"]:
        assert verdicts["untrained"]["verdict"] == uncertainty.verdict(tuple(gap["ci95"]), recovery.MARGIN, "above")
    else:
        assert verdicts["untrained"]["verdict"] == "inconclusive" and verdicts["untrained"]["reason"] == gap["reason"]
    assert verdicts["trained"]["parts"] == {
        s: uncertainty.verdict(tuple(e["ci95"]), recovery.RECOVERS, "below")
        for s, e in rec["intervals"]["trained_recovers"].items()
    }

    # A rerun trains nothing and gives the same results, also after a change that does not concern training.
    monkeypatch.setattr(freezing, "train", lambda *a, **k: pytest.fail("retrained a finished setting"))
    again = reproduce(small_config(tiny_folder, mono_ratio=0.2), out, progress=False)["recovery"]
    assert again["table"] == rec["table"] and again["intervals"] == rec["intervals"]
    md = (out / "report.md").read_text()
    assert "Table 2" in md and "paper's second finding" in md and "end / start perplexity" in md
    assert (out / "figures" / "recovery.png").read_bytes().startswith(b"\x89PNG")


def evaluations(loaded, tokens):
    """Base, a slightly worse model and a mildly worse one (final norm × 4 and × 2 sharpen a random model's
    logits: ppl × ~1.05 and × ~1.01), on the first `tokens` of one text."""
    models_ = [loaded("llama") for _ in range(3)]
    with torch.no_grad():
        models_[1].module.model.norm.weight.mul_(4)
        models_[2].module.model.norm.weight.mul_(2)
    w = corpus.make_windows(models_[0].tokenizer, TEXT * 6, 16, tokens, "xx", "eval", "test")
    return tuple(evaluation.perplexity(x.module, w, progress=False, block=8) for x in models_)


def result_of(base, worse, mild):
    """A recovery result on one text for both languages: every removal makes it `worse`; training brings the
    trained language back to `base`, and the untrained one to `mild` only with the region unfrozen."""
    ends = {s: {"x": base, "y": worse} for s in recovery.RECOVERY}
    ends["top-unfreeze"]["y"] = mild
    start = {side: {"x": worse, "y": worse} for side in ("top", "bottom")}
    iv = recovery._intervals({"x": base, "y": base}, start, ends, ["x", "y"], seed=0)
    table = {s: {"ppl": {lang: [start["top"][lang]["ppl"], ends[s][lang]["ppl"]] for lang in "xy"}} for s in ends}
    return {
        "languages": ["x", "y"],
        "samples": [0, 100],
        "epochs": 1.0,
        "base": {"x": base, "y": base},
        "table": table,
        "intervals": iv,
    }


def test_verdicts_turn_inconclusive_when_the_text_is_cut(loaded):
    """1,000 tokens show the trained language's ×0.95 recovery and the untrained one's gap; 64 tokens do not."""
    base, worse, mild = evaluations(loaded, 1000)
    res = result_of(base, worse, mild)
    v = recovery.verdicts(res)
    assert v["trained"]["verdict"] == "holds" and v["untrained"]["verdict"] == "holds"
    first, second = recovery.findings(res)
    assert "**holds**" in first and "**holds**" in second
    assert markup.cell(res["intervals"]["trained_recovers"]["top-freeze"]) in first
    base, worse, mild = evaluations(loaded, 64)
    v = recovery.verdicts(result_of(base, worse, mild))
    assert v["trained"]["verdict"] == "inconclusive" and v["untrained"]["verdict"] == "inconclusive"


def test_a_result_without_blocks_is_inconclusive_with_the_reason():
    def old(ppl):  # cached before per-block NLL was kept
        return {"ppl": ppl, "nll": float(torch.tensor(ppl).log()) * 10, "tokens": 10}

    res = result_of(old(10.0), old(1e4), old(20.0))
    v = recovery.verdicts(res)
    assert v["trained"]["verdict"] == v["untrained"]["verdict"] == "inconclusive"
    assert "per-block NLL" in v["trained"]["reason"] and "per-block NLL" in v["untrained"]["reason"]
    first, second = recovery.findings(res)
    assert "**inconclusive**" in first and "per-block NLL" in second
    del res["intervals"]  # a summary from before intervals were recorded
    assert all("**inconclusive**" in line for line in recovery.findings(res))
