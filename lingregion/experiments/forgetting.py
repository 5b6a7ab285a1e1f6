"""Catastrophic forgetting: further pre-train one language from the unmodified model with the core region
frozen, a random region of the same size frozen, or nothing frozen, and track the untrained languages.
The training machinery is shared with the recovery experiment (`lingregion.experiments.training`)."""

from __future__ import annotations

import math

import numpy as np

from .. import markup, uncertainty
from ..run import Run
from ..store import write_bytes
from .training import PAPER_SAMPLES, change, curve_figure, curves, final, trained, training_record, validate_training

NAME = "forgetting"
FORGETTING = {"none": "No freezing", "core": "Core frozen", "random": "Random frozen"}
validate = validate_training  # the same rules for both training experiments


def measure(run: Run) -> dict:
    """Train on train_lang from the unmodified model with nothing frozen, the core region (Top
    train_ratio) frozen, or a random region of exactly the same size per matrix frozen; track the
    untrained languages' perplexity."""
    cfg = run.cfg
    langs = [cfg.train_lang] + list(cfg.train_track)
    core = run.core_scores()
    regions = {
        "none": None,
        "core": run.region(core, "top", cfg.train_ratio),
        "random": run.region(core, "random", cfg.train_ratio),
    }
    del core
    start = run.evaluate("forgetting.json", "base", [], langs, cfg.train_eval_tokens)
    histories, table = {}, {}
    for setting, region in regions.items():
        histories[setting] = trained(run, "forgetting", setting, [], region, None, langs)
        table[setting] = {
            m: curves(run, "forgetting", setting, start, histories[setting], langs, m) for m in ("ppl", "bpb")
        }
    result = {
        "experiment": "forgetting",
        "languages": langs,
        "ratio": cfg.train_ratio,
        "settings": FORGETTING,
        "base": {lang: {k: v for k, v in r.items() if k != "blocks"} for lang, r in start.items()},
        "table": table,
        "region_entries": {s: (r.count() if r is not None else 0) for s, r in regions.items()},
        "intervals": _intervals(start, {s: final(run, start, h) for s, h in histories.items()}, langs[1:], cfg.seed),
        "ci95_method": uncertainty.method_record(seed=cfg.seed)
        | {"languages": "each untrained language's blocks resampled on their own, the same draw for every setting"},
        "verdict_rule": uncertainty.RULE,
        **training_record(run, histories),
        **run.eval_record(langs, cfg.train_eval_tokens),
        "figures": ["figures/forgetting.png"],
    }
    write_bytes(run.out / "figures" / "forgetting.png", curve_figure(result, FORGETTING))
    run.save("forgetting", result)
    return result


def forgetting(res: dict, setting: str) -> float:
    """Geometric mean over the untrained languages of final / initial perplexity (1 = nothing forgotten)."""
    langs = res["languages"][1:]
    ppl = res["table"][setting]["ppl"]
    return math.exp(sum(math.log(ppl[lang][-1] / ppl[lang][0]) for lang in langs) / len(langs))


def _intervals(start: dict, ends: dict[str, dict], untrained: list[str], seed: int) -> dict:
    """95% intervals of the forgetting of each setting (geometric mean over the untrained languages of end / start
    perplexity) and of the ratios the finding compares (core / none, core / random). Each language's blocks
    are resampled once for all settings (they share the text), languages independently (their texts differ);
    without blocks the intervals are None, with the reason."""
    draws, reason = {}, None
    for lang in untrained:
        logs, why = uncertainty.joint_log_ppl({"start": start[lang]} | {s: ends[s][lang] for s in FORGETTING}, seed)
        if logs is None:
            reason = reason or f"{lang}: {why}"
        draws[lang] = logs
    point = {
        s: float(np.mean([uncertainty.log_ppl(ends[s][lang]) - uncertainty.log_ppl(start[lang]) for lang in untrained]))
        for s in FORGETTING
    }
    boot = None
    if reason is None:
        boot = {s: np.mean([draws[lang][s] - draws[lang]["start"] for lang in untrained], axis=0) for s in FORGETTING}

    def entry(log_value: float, log_draws) -> dict:
        if log_draws is None:
            return {"value": math.exp(log_value), "ci95": None, "reason": reason}
        return {"value": math.exp(log_value), "ci95": [math.exp(v) for v in uncertainty.percentile(log_draws)]}

    out = {s: entry(point[s], boot and boot[s]) for s in FORGETTING}
    for other in ("none", "random"):
        out[f"core_vs_{other}"] = entry(point["core"] - point[other], boot and boot["core"] - boot[other])
    return out


def verdicts(res: dict) -> dict:
    """The paper's finding (less forgetting with the core frozen) from 95% intervals (uncertainty.RULE):

    - it can be tested only when there is forgetting to reduce: the interval of the forgetting with nothing
      frozen lies above 1; otherwise the verdict is inconclusive at this budget, with the reason;
    - it holds when the intervals of forgetting(core) / forgetting(none) and forgetting(core) / forgetting(random)
      both lie below 1, does not hold when either lies above 1, and is inconclusive otherwise."""
    iv = res.get("intervals")
    if iv is None:
        return {"verdict": uncertainty.INCONCLUSIVE, "reason": "this result has no intervals; rerun to compute them"}
    if iv["none"].get("ci95") is None:
        return {"verdict": uncertainty.INCONCLUSIVE, "reason": iv["none"].get("reason")}
    parts = {k: uncertainty.verdict_of(iv[k], 1.0, "below") for k in ("core_vs_none", "core_vs_random")}
    forgot = uncertainty.verdict_of(iv["none"], 1.0, "above")
    if forgot != uncertainty.HOLDS:
        return {
            "verdict": uncertainty.INCONCLUSIVE,
            "parts": parts,
            "reason": "with nothing frozen the untrained languages did not measurably get worse (95% interval "
            f"{markup.cell(iv['none'])} does not lie above 1), so there was no forgetting to reduce "
            f"(the paper trains up to {PAPER_SAMPLES[-1]:,} samples)",
        }
    return {"verdict": uncertainty.all_of(list(parts.values())), "parts": parts}


def findings(res: dict) -> list[str]:
    """Whether freezing the core region reduced the forgetting of the untrained languages (or could not be tested),
    as a verdict from 95% intervals (see `verdicts`)."""
    x, n = res["languages"][0], res["samples"][-1]
    iv = res.get("intervals", {})
    f = {s: (markup.cell(iv[s]) if s in iv else f"×{forgetting(res, s):.3f}") for s in FORGETTING}
    learned = {s: res["table"][s]["ppl"][x][-1] / res["table"][s]["ppl"][x][0] for s in FORGETTING}
    v = verdicts(res)
    compared = (
        f" (forgetting core / none {markup.cell(iv['core_vs_none'])}, "
        f"core / random {markup.cell(iv['core_vs_random'])})"
        if "core_vs_none" in iv
        else ""
    )
    return [
        f"After {n:,} samples of {x}, the untrained languages' perplexity changed {f['none']} with nothing "
        f"frozen, {f['core']} with the core region frozen and {f['random']} with a random region of the "
        f"same size frozen (geometric means with 95% intervals; {x} itself ×{learned['none']:.3f}, "
        f"×{learned['core']:.3f}, ×{learned['random']:.3f}){compared}: the paper's finding (less forgetting with "
        f"the core frozen than with nothing or a random region frozen: both intervals below 1) "
        f"**{v['verdict']}**" + (f" ({v['reason']})" if v.get("reason") else "") + "."
    ]


def section(res: dict) -> list:
    """Report blocks: each untrained language's perplexity before → after training, per frozen region."""
    x, others = res["languages"][0], res["languages"][1:]
    t = res["table"]
    head = ["Setting", f"{x} (trained)"] + others + ["forgetting (geo. mean)"]
    rows = [
        [FORGETTING[s], change(t[s]["ppl"][x])]
        + [change(t[s]["ppl"][lang]) for lang in others]
        + [markup.cell(res["intervals"][s]) if "intervals" in res else f"×{forgetting(res, s):.3f}"]
        for s in FORGETTING
    ]
    return [
        markup.heading(f"Catastrophic forgetting: train on {x} with the core region frozen"),
        markup.text(
            f"Training from the unmodified model as in the Table 2 section ({res['samples'][-1]:,} samples); the "
            f"core region (Top {res['ratio']:g}, {res['region_entries']['core']:,} entries) or a random region "
            "of exactly the same size per matrix is held bit-identical; perplexity of the untrained languages "
            f"({', '.join(others)}) is tracked."
        ),
        markup.table(
            head,
            rows,
            caption="Perplexity before → after training, and its ratio; forgetting with its 95% interval "
            "(block bootstrap, the same draw for every setting). Paper: the untrained "
            "languages' perplexity grows least with the core region frozen. " + uncertainty.RULE,
        ),
        markup.figure(
            "figures/forgetting.png",
            "Perplexity (log scale) against training samples for each language; "
            "look for the Core frozen line of the untrained languages staying lowest.",
        ),
        markup.bullets(findings(res)),
    ]
