"""The structural experiment (the paper's Tables 3 and 4) on a tiny model: its numbers match a direct evaluation,
its summary carries 95% intervals beside every ratio, and its verdicts follow the intervals."""

import json

import pytest
import torch

from lingregion import corpus, evaluation, interventions, markup, models, reproduce, slices, uncertainty
from lingregion.experiments import structural
from lingregion.run import Run

from conftest import TEXT, tiny_config


def config(tiny_folder, **kw):
    base = {"eval_langs": ["ru"], "struct_langs": ["ru", "zh"], "struct_dims": [1, 4], "experiments": ["structural"]}
    return tiny_config(tiny_folder, **{**base, **kw})


def test_structural_experiment_matches_direct_evaluation_with_intervals(tiny_folder, tmp_path):
    cfg = config(tiny_folder)
    out = tmp_path / "run"
    s = reproduce(cfg, out, progress=False)["structural"]
    m = models.load(str(tiny_folder))
    run = Run(out, cfg, m, progress=False)
    region = run.region(run.core_scores(), "top", cfg.struct_ratio)

    def result(edits, lang):
        with interventions.applied(m.module, edits):
            return evaluation.perplexity(m.module, run.windows(lang, "eval", 32), cfg.batch_size, False)

    assert set(s["families"]) == set(slices.FAMILIES)
    edits, picks = slices.removal(m.module, region, "feature+ffn", 4, "top")
    cells = s["families"]["feature+ffn"]["cells"]
    cell = cells["4/top"]
    assert cell["picks"] == picks
    top, base = result(edits, "zh"), result([], "zh")
    assert cell["ppl"]["zh"]["ppl"] == pytest.approx(top["ppl"], rel=1e-9)
    assert cell["removed"] == sum(len(e.index) for e in edits)

    # Intervals beside every value the findings use: the ratio to Base and Top against each other pick,
    # paired block-bootstrap intervals of the same text, equal to a direct computation.
    assert cell["ratio"]["zh"]["ci95"] == pytest.approx(list(uncertainty.paired_bootstrap(top, base, seed=cfg.seed)))
    random_edits, _ = slices.removal(m.module, region, "feature+ffn", 4, "random", seed=cfg.seed)
    random = result(random_edits, "zh")
    assert cell["vs"]["random"]["zh"]["value"] == pytest.approx(top["ppl"] / random["ppl"], rel=1e-9)
    assert cell["vs"]["random"]["zh"]["ci95"] == pytest.approx(list(uncertainty.paired_bootstrap(top, random)))
    lo, hi = cell["vs"]["random"]["zh"]["ci95"]
    assert lo <= cell["vs"]["random"]["zh"]["value"] <= hi
    assert set(cell["vs"]) == {"middle", "bottom", "random"}

    summary = json.loads((out / "results" / "structural-summary.json").read_text())
    assert '"blocks":' not in json.dumps(summary["families"])  # intervals are kept instead of the blocks
    assert summary["base"]["zh"]["ci95"]["ppl"] == pytest.approx(list(uncertainty.bootstrap_ppl(base)["ppl"]))
    assert summary["ci95_method"]["resamples"] == uncertainty.RESAMPLES and summary["verdict_rule"] == uncertainty.RULE
    assert all(c["ratio"][lang]["ci95"] for c in cells.values() for lang in ("ru", "zh"))
    assert {v["verdict"] for v in summary["verdicts"]} <= {"holds", "does not hold", "inconclusive"}
    assert len(summary["verdicts"]) == len(slices.FAMILIES) * 3 * 2  # families × other picks × languages
    for v in summary["verdicts"]:
        got = uncertainty.verdict(tuple(v["ci95"]), structural.FACTOR, "above")
        assert v["verdict"] == got

    md = (out / "report.md").read_text()
    assert "Structural removal (the paper's Tables 3 and 4)" in md
    assert "| Model | Score tokens | N_d | Language | Base | Top | Middle | Bottom | Random |" in md
    assert "| Family | N_d | Language | Top / Base | Top / Middle | Top / Bottom | Top / Random |" in md
    assert markup.interval_cell(cell["vs"]["random"]["zh"]) in md
    assert "95% paired bootstrap interval" in md and uncertainty.RULE in md
    assert (out / "figures" / "structural.png").read_bytes().startswith(b"\x89PNG")


def evaluations(loaded, tokens):
    """Base and a slightly worse model (final norm × 4 sharpens a random model's logits: ppl × ~1.05), on the
    first `tokens` of one text."""
    m, worse = loaded("llama"), loaded("llama")
    with torch.no_grad():
        worse.module.model.norm.weight.mul_(4)
    w = corpus.make_windows(m.tokenizer, TEXT * 6, 16, tokens, "xx", "eval", "test")
    return tuple(evaluation.perplexity(x.module, w, progress=False, block=8) for x in (m, worse))


def result_of(base, top, other):
    """A structural result of one family at N_d = 1 whose Top evaluated as `top` and every other pick as `other`."""
    cells = {"1/top": {"ppl": {"xx": top}}} | {f"1/{h}": {"ppl": {"xx": other}} for h in ("middle", "bottom", "random")}
    families = {"feature": {"cells": cells, "spaces": 1}}
    base = structural._with_intervals({"xx": base}, families, ["xx"], seed=0)
    return {"dims": [1], "languages": ["xx"], "families": families, "base": base, "mode": "common"}


def test_top_verdict_turns_inconclusive_when_the_text_is_cut(loaded, monkeypatch):
    """Top ×1.05 worse than the other picks: 1,000 tokens show it above a threshold of 1, 64 tokens do not."""
    monkeypatch.setattr(structural, "FACTOR", 1.0)  # the tiny model's effect is far below the real ×2
    for tokens, want in ((1000, "holds"), (64, "inconclusive")):
        base, worse = evaluations(loaded, tokens)
        verdicts = structural.verdicts(result_of(base, worse, base))
        assert {v["verdict"] for v in verdicts} == {want}, tokens
        assert "**" + want in structural.findings(result_of(base, worse, base))[0]


def test_a_result_without_blocks_is_inconclusive_with_the_reason():
    old = {"ppl": 10.0, "nll": 23.0, "tokens": 10}  # cached before per-block NLL was kept
    res = result_of(old, {**old, "ppl": 100.0}, old)
    assert res["families"]["feature"]["cells"]["1/top"]["vs"]["random"]["xx"]["ci95"] is None
    verdicts = structural.verdicts(res)
    assert {v["verdict"] for v in verdicts} == {"inconclusive"} and "per-block NLL" in verdicts[0]["reason"]
    assert "**inconclusive**" in structural.findings(res)[0]
    assert "no interval" in structural.ratio_table(res)[1][0][3]
    # a summary from before intervals were recorded: no "vs" at all
    del res["families"]["feature"]["cells"]["1/top"]["vs"]
    assert "**inconclusive**" in structural.findings(res)[0]
