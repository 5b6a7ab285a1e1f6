"""Catastrophic forgetting: further pre-train one language from the unmodified model with the core region
frozen, a random region of the same size frozen, or nothing frozen, and track the untrained languages.
The training machinery is shared with the recovery experiment (`lingregion.experiments.training`)."""

from __future__ import annotations

import math

from .. import markup, uncertainty
from ..config import Config
from ..pretraining import curve_figure, forgetting_intervals, forgetting_verdict
from ..run import Run
from ..store import write_bytes
from .training import PAPER_SAMPLES, change, curves, final, trained, training_record, validate_training

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
        "intervals": forgetting_intervals(
            start, {s: final(run, start, h) for s, h in histories.items()}, langs[1:], cfg.seed
        ),
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


def verdicts(res: dict) -> dict:
    """The paper's finding (less forgetting with the core frozen) from 95% intervals (`forgetting_verdict`):
    inconclusive when nothing measurably was forgotten, then naming the budget that would decide."""
    iv = res.get("intervals")
    if iv is None:
        return {"verdict": uncertainty.INCONCLUSIVE, "reason": "this result has no intervals; rerun to compute them"}
    return forgetting_verdict(iv, _budget(res))


def _budget(res: dict) -> str:
    """What would decide an inconclusive result: the default preset's training, sized so that the built-in
    model forgets measurably with nothing frozen, when this result trained less; else the paper's budget."""
    default = Config()
    lr, samples = res["hyperparameters"]["lr"], res["samples"][-1]
    if samples < default.train_samples[-1] or lr < default.train_lr:
        return (
            f" at {samples:,} samples and lr {lr:g}; the default preset's {default.train_samples[-1]:,} samples at "
            f"lr {default.train_lr:g} are the budget at which the built-in model forgets measurably"
        )
    return f" (the paper trains up to {PAPER_SAMPLES[-1]:,} samples)"


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
