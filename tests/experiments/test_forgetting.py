"""The forgetting experiment on a tiny model: it matches a hand replay with the library pieces, resumes from
its training checkpoint, carries 95% intervals beside the values its finding uses, and its verdict follows the
intervals."""

import json
import math

import pytest
import torch

from lingregion import corpus, evaluation, freezing, markup, models, pretraining, reproduce, uncertainty
from lingregion.experiments import forgetting, training
from lingregion.regions import Region
from lingregion.run import Run

from conftest import TEXT, TINY_TRAINING, tiny_config


def small_config(tiny_folder, **kw):
    return tiny_config(tiny_folder, **{**TINY_TRAINING, "experiments": ["forgetting"], **kw})


def test_forgetting_matches_a_hand_replay_with_intervals_and_resumes(tiny_folder, tmp_path, monkeypatch):
    cfg = small_config(tiny_folder)
    out = tmp_path / "run"
    forg = reproduce(cfg, out, progress=False)["forgetting"]

    # Core frozen, replayed by hand on a fresh model with the library pieces.
    m = models.load(str(tiny_folder))
    run = Run(out, cfg, m, progress=False)
    top = Region.load(out / "regions" / "core-top-0.05.safetensors")
    evals = {lang: run.windows(lang, "eval", 32) for lang in ["ru", "es", "zh"]}
    start = {lang: evaluation.perplexity(m.module, w, progress=False) for lang, w in evals.items()}
    h = freezing.train(
        m.module,
        run.windows("ru", "score", 6 * 16),
        training.train_config(cfg),
        models.scored_names(m.module),
        frozen=top,
        evals=evals,
        progress=False,
    )
    assert forg["table"]["core"]["ppl"]["zh"][-1] == h["evals"]["3"]["zh"]["ppl"]

    # Random frozen region: same size per matrix as the core region.
    rnd = Region.load(out / "regions" / "core-random-0.05.safetensors")
    assert all(rnd.count(n) == top.count(n) for n in top.packed)

    # Intervals: the core setting's forgetting is the geometric mean of end / start over es and zh.
    core = forg["intervals"]["core"]
    want = math.exp(sum(math.log(h["evals"]["3"][x]["ppl"] / start[x]["ppl"]) for x in ("es", "zh")) / 2)
    assert core["value"] == pytest.approx(want, rel=1e-9) == pytest.approx(forgetting.forgetting(forg, "core"))
    for key in ("none", "core", "random", "core_vs_none", "core_vs_random"):
        lo, hi = forg["intervals"][key]["ci95"]
        assert lo <= forg["intervals"][key]["value"] <= hi, key
    summary = json.loads((out / "results" / "forgetting-summary.json").read_text())
    assert summary["intervals"] == json.loads(json.dumps(forg["intervals"])) and summary["verdict_rule"]
    assert forgetting.verdicts(summary)["verdict"] in ("holds", "does not hold", "inconclusive")

    # The experiment leaves the model as it found it.
    run2 = Run(tmp_path / "again", cfg, m2 := models.load(str(tiny_folder)), progress=False)
    pristine = {n: p.detach().clone() for n, p in m2.module.named_parameters()}
    forgetting.measure(run2)
    assert all(torch.equal(p, pristine[n]) for n, p in m2.module.named_parameters())

    # A rerun trains nothing and gives the same results, also after a change that does not concern freezing.
    monkeypatch.setattr(freezing, "train", lambda *a, **k: pytest.fail("retrained a finished setting"))
    again = reproduce(small_config(tiny_folder, mono_ratio=0.2), out, progress=False)["forgetting"]
    assert again["table"] == forg["table"] and again["intervals"] == forg["intervals"]
    md = (out / "report.md").read_text()
    assert "Catastrophic forgetting" in md and markup.cell(forg["intervals"]["core"]) in md
    assert (out / "figures" / "forgetting.png").read_bytes().startswith(b"\x89PNG")


def test_interrupted_experiment_resumes_from_its_training_checkpoint(tiny_folder, tmp_path, monkeypatch):
    cfg = small_config(tiny_folder, train_checkpoint_every=1, train_samples=[0, 8])
    ref = reproduce(cfg, tmp_path / "straight", progress=False)["forgetting"]
    real_step, calls = freezing._step, {"n": 0}

    def dies(*a, **k):
        calls["n"] += 1
        if calls["n"] == 7:  # in the second setting, after its checkpoint at step 2
            raise KeyboardInterrupt
        return real_step(*a, **k)

    monkeypatch.setattr(freezing, "_step", dies)
    with pytest.raises(KeyboardInterrupt):
        reproduce(cfg, tmp_path / "cut", progress=False)
    monkeypatch.setattr(freezing, "_step", real_step)
    assert (tmp_path / "cut" / "checkpoints" / "forgetting-core.safetensors").is_file()
    res = reproduce(cfg, tmp_path / "cut", progress=False)["forgetting"]
    assert res["table"] == ref["table"] and res["intervals"] == ref["intervals"]
    assert res["history"] == {s: {**h, "seconds": res["history"][s]["seconds"]} for s, h in ref["history"].items()}
    assert not list((tmp_path / "cut" / "checkpoints").iterdir())  # removed once each setting is saved


def evaluations(loaded, tokens):
    """Base and a slightly worse model (final norm × 4 sharpens a random model's logits: ppl × ~1.05), on the
    first `tokens` of one text."""
    m, worse = loaded("llama"), loaded("llama")
    with torch.no_grad():
        worse.module.model.norm.weight.mul_(4)
    w = corpus.make_windows(m.tokenizer, TEXT * 6, 16, tokens, "xx", "eval", "test")
    return tuple(evaluation.perplexity(x.module, w, progress=False, block=8) for x in (m, worse))


def result_of(start: dict, ends: dict) -> dict:
    """A forgetting result: trained language "t" (not resampled), untrained languages of `start`, and each
    setting's final results `ends` {setting: {lang: result}}."""
    langs = ["t", *start]
    table = {
        s: {"ppl": {"t": [10.0, 9.0]} | {x: [start[x]["ppl"], e[x]["ppl"]] for x in start}} for s, e in ends.items()
    }
    return {
        "languages": langs,
        "samples": [0, 10],
        "hyperparameters": {"lr": 5e-5},
        "table": table,
        "intervals": pretraining.forgetting_intervals(start, ends, list(start), seed=0),
    }


def test_verdict_turns_inconclusive_when_the_text_is_cut(loaded):
    """Nothing or a random region frozen: ppl × ~1.05; the core frozen: unchanged. 1,000 tokens show less
    forgetting with the core frozen; 64 tokens do not even show forgetting."""
    for tokens, want in ((1000, "holds"), (64, "inconclusive")):
        base, worse = evaluations(loaded, tokens)
        res = result_of({"xx": base}, {"none": {"xx": worse}, "core": {"xx": base}, "random": {"xx": worse}})
        v = forgetting.verdicts(res)
        assert v["verdict"] == want, tokens
        assert f"**{want}**" in forgetting.findings(res)[0]
    assert (
        "no forgetting to reduce at 10 samples and lr 5e-05; the default preset's 8 samples at lr 0.0001" in v["reason"]
    )
    # with enough text, a random region frozen that forgets as little as the core: the finding does not hold
    base, worse = evaluations(loaded, 1000)
    res = result_of({"xx": base}, {"none": {"xx": worse}, "core": {"xx": worse}, "random": {"xx": base}})
    assert forgetting.verdicts(res)["verdict"] == "does not hold"


def test_geometric_mean_and_results_without_blocks():
    def old(ppl):  # cached before per-block NLL was kept
        return {"ppl": ppl, "nll": math.log(ppl) * 10, "tokens": 10}

    start = {"en": old(10.0), "ru": old(10.0)}
    ends = {
        "none": {"en": old(20.0), "ru": old(40.0)},
        "core": {"en": old(11.0), "ru": old(11.0)},
        "random": {"en": old(20.0), "ru": old(20.0)},
    }
    res = result_of(start, ends)
    assert forgetting.forgetting(res, "none") == pytest.approx(math.sqrt(2 * 4))
    assert res["intervals"]["none"]["value"] == pytest.approx(math.sqrt(2 * 4))
    assert res["intervals"]["none"]["ci95"] is None
    v = forgetting.verdicts(res)
    assert v["verdict"] == "inconclusive" and "per-block NLL" in v["reason"]
    assert "**inconclusive**" in forgetting.findings(res)[0] and "[no interval]" in forgetting.findings(res)[0]
    del res["intervals"]  # a summary from before intervals were recorded
    assert "**inconclusive**" in forgetting.findings(res)[0]
    assert uncertainty.INCONCLUSIVE == "inconclusive"
