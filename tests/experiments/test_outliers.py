"""The outliers experiment (the paper's Table 8 and the outlier scan) on a tiny model: its numbers match a direct
evaluation, its summary carries 95% intervals beside every ratio, and its verdicts follow the intervals."""

import json

import pytest
import torch

from lingregion import Config, architectures, corpus, evaluation, interventions, models, reproduce, slices, uncertainty
from lingregion.experiments import outliers
from lingregion.run import Run

from conftest import TEXT, make_model, tiny_config


def test_outliers_experiment_matches_direct_evaluation_with_intervals(tiny_folder, tmp_path):
    cfg = tiny_config(
        tiny_folder,
        eval_langs=["ru"],
        struct_langs=["ru", "zh"],
        outlier_layers=2,
        outlier_scan_tokens=32,
        outlier_confirm=2,
        outlier_controls=1,
        outlier_dims=1,
        experiments=["outliers"],
    )
    out = tmp_path / "run"
    o = reproduce(cfg, out, progress=False)["outliers"]
    m = models.load(str(tiny_folder))
    run = Run(out, cfg, m, progress=False)

    def result(edits, lang):
        with interventions.applied(m.module, edits):
            return evaluation.perplexity(m.module, run.windows(lang, "eval", 32), cfg.batch_size, False)

    scan = slices.scan(m.module, [run.windows(lang, "score", 32) for lang in ["ru", "zh"]], [0, 1], 4, False)
    assert [(c["layer"], c["dim"]) for c in o["candidates"]] == scan.top(2)
    first = o["candidates"][0]
    norm = architectures.input_norms(m.module)[first["layer"]]
    w = m.module.get_parameter(norm).detach()[first["dim"]].item()
    by_hand = [interventions.Edit(norm, torch.tensor([first["dim"]]), 10 * (1 + w) - 1)]  # Gemma: (1 + w) × 10
    perturbed, base = result(by_hand, "ru"), result([], "ru")
    assert first["ppl"]["x10"]["ru"]["ppl"] == pytest.approx(perturbed["ppl"], rel=1e-6)
    assert first["ratio"]["x10"]["ru"]["ci95"] == pytest.approx(list(uncertainty.paired_bootstrap(perturbed, base)))
    massive = next(d for d in o["dimensions"] if d["kind"] == "massive")
    assert massive["dim"] == int(scan.massive().argmax())
    removed = result(slices.dimension_removal(m.module, [massive["dim"]]), "ru")
    assert massive["ppl"]["ru"]["ppl"] == pytest.approx(removed["ppl"], rel=1e-9)
    assert massive["ratio"]["ru"]["ci95"] == pytest.approx(list(uncertainty.paired_bootstrap(removed, base)))
    control = next(d for d in o["dimensions"] if d["kind"] == "control")
    vs = o["comparisons"]["massive"][str(massive["dim"])]["ru"]
    assert [c["control"] for c in vs] == [control["dim"]]
    control_result = result(slices.dimension_removal(m.module, [control["dim"]]), "ru")
    assert vs[0]["ci95"] == pytest.approx(list(uncertainty.paired_bootstrap(removed, control_result)))
    worst = o["comparisons"]["worst"]
    assert len(worst["vs_controls"]["zh"]) == len(slices.PERTURBATIONS)  # one control, both perturbations

    summary = json.loads((out / "results" / "outliers-summary.json").read_text())
    assert summary["model"]["fingerprint"] and summary["protocol"]["seq_len"] == 16
    assert '"blocks":' not in json.dumps(summary)  # intervals are kept instead of the blocks
    assert summary["base"]["ru"]["ci95"]["ppl"] == pytest.approx(list(uncertainty.bootstrap_ppl(base)["ppl"]))
    claims = {v["claim"] for v in summary["verdicts"]}
    assert {"worst perturbation", "worst vs controls", f"massive dimension {massive['dim']}"} <= claims
    for v in summary["verdicts"]:
        if v["claim"] in ("worst perturbation", f"massive dimension {massive['dim']}"):
            assert v["verdict"] == uncertainty.verdict(tuple(v["ci95"]), outliers.FACTOR, "above")
    md = (out / "report.md").read_text()
    assert "Table 8" in md
    assert "| Perturbation | Parameter | Chosen as | ratio ru | ratio zh |" in md and "95% paired" in md
    assert (out / "figures" / "outliers.png").read_bytes().startswith(b"\x89PNG")


def evaluations(loaded, tokens):
    """Base and a slightly worse model (final norm × 4 sharpens a random model's logits: ppl × ~1.05), on the
    first `tokens` of one text."""
    m, worse = loaded("llama"), loaded("llama")
    with torch.no_grad():
        worse.module.model.norm.weight.mul_(4)
    w = corpus.make_windows(m.tokenizer, TEXT * 6, 16, tokens, "xx", "eval", "test")
    return tuple(evaluation.perplexity(x.module, w, progress=False, block=8) for x in (m, worse))


def result_of(base, bad, fine):
    """An outliers result: one candidate and one massive dimension evaluated as `bad`, one random control entry
    and one random dimension as `fine`."""
    langs = ["xx"]

    def entry(label, r):
        return {"label": label, "ppl": {k: {"xx": r} for k in slices.PERTURBATIONS}}

    cands, ctrls = [entry("L1-N3", bad)], [entry("L2-N5", fine)]
    dims = [
        {"dim": 3, "kind": "massive", "ppl": {"xx": bad}, "massive": 50.0, "core_rank": 1},
        {"dim": 7, "kind": "control", "ppl": {"xx": fine}, "massive": 1.0, "core_rank": 9},
    ]
    comparisons = outliers._comparisons({"xx": base}, cands, ctrls, dims, langs, seed=0)
    return {
        "languages": langs,
        "base": {"xx": base},
        "candidates": cands,
        "controls": ctrls,
        "dimensions": dims,
        "comparisons": comparisons,
        "hidden": 32,
    }


def test_verdicts_turn_inconclusive_when_the_text_is_cut(loaded, monkeypatch):
    """The perturbation ×1.05 worse than Base and the controls: 1,000 tokens show it above a threshold of 1,
    64 tokens do not."""
    monkeypatch.setattr(outliers, "FACTOR", 1.0)  # the tiny model's effect is far below the real ×2
    for tokens, want in ((1000, "holds"), (64, "inconclusive")):
        base, worse = evaluations(loaded, tokens)
        res = result_of(base, worse, base)
        assert {v["verdict"] for v in outliers.verdicts(res)} == {want}, tokens
        assert f"**{want}** for xx" in outliers.findings(res)[1]


def test_a_result_without_blocks_is_inconclusive_with_the_reason():
    old = {"ppl": 10.0, "nll": 23.0, "tokens": 10}  # cached before per-block NLL was kept
    res = result_of(old, {**old, "ppl": 1000.0}, old)
    verdicts = outliers.verdicts(res)
    assert {v["verdict"] for v in verdicts} == {"inconclusive"}
    assert "per-block NLL" in verdicts[0]["reason"]
    assert "**inconclusive**" in outliers.findings(res)[1]
    del res["comparisons"]  # a summary from before intervals were recorded
    assert "**inconclusive**" in outliers.findings(res)[1]


def test_a_post_norm_model_records_outliers_as_not_applicable(tokenizer, tmp_path):
    folder = tmp_path / "tiny-olmo2"
    make_model("olmo2").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    cfg = Config(
        model=str(folder),
        seq_len=16,
        score_tokens=32,
        eval_tokens=32,
        score_langs=["ru"],
        eval_langs=["ru"],
        struct_langs=["ru"],
        experiments=["outliers"],
    )
    out = tmp_path / "run"
    o = reproduce(cfg, out, progress=False)["outliers"]
    assert "post-norm" in o["not_applicable"]
    saved = json.loads((out / "results" / "outliers-summary.json").read_text())
    assert saved["not_applicable"] == o["not_applicable"] and saved["verdicts"] == []
    assert "Not applicable to this model" in (out / "report.md").read_text()
