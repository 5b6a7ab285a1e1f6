"""Catastrophic forgetting: further pre-train one language from the unmodified model with the core region
frozen, a random region of the same size frozen, or nothing frozen, and track the untrained languages.
The training machinery is shared with the recovery experiment (`lingregion.experiments.recovery`)."""

from __future__ import annotations

import math

from .. import blocks
from ..store import write_bytes
from .recovery import (
    PAPER_SAMPLES,
    _change,
    _curve_figure,
    _training_record,
    curves,
    trained,
    validate,  # noqa: F401  (the same rules: the registry reads it here)
)
from .runfolder import Run

NAME = "forgetting"
DOC = "Forgetting: further pre-train one language with the core region frozen vs none vs random"
FORGETTING = {"none": "No freezing", "core": "Core frozen", "random": "Random frozen"}


def run(run: Run) -> dict:
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
        "base": start,
        "table": table,
        "region_entries": {s: (r.count() if r is not None else 0) for s, r in regions.items()},
        **_training_record(run, histories),
        **run.eval_record(langs, cfg.train_eval_tokens),
        "figures": ["figures/forgetting.png"],
    }
    write_bytes(run.out / "figures" / "forgetting.png", _curve_figure(result, FORGETTING))
    run.save("forgetting", result)
    return result


def forgetting(res: dict, setting: str) -> float:
    """Geometric mean over the untrained languages of final / initial perplexity (1 = nothing forgotten)."""
    langs = res["languages"][1:]
    ppl = res["table"][setting]["ppl"]
    return math.exp(sum(math.log(ppl[lang][-1] / ppl[lang][0]) for lang in langs) / len(langs))


def findings(res: dict) -> list[str]:
    """Whether freezing the core region reduced the forgetting of the untrained languages (or could not be tested)."""
    x, n = res["languages"][0], res["samples"][-1]
    f = {s: forgetting(res, s) for s in FORGETTING}
    learned = {s: res["table"][s]["ppl"][x][-1] / res["table"][s]["ppl"][x][0] for s in FORGETTING}
    if f["none"] <= 1:
        verdict = (
            "cannot be tested at this budget: with nothing frozen the untrained languages did not get worse, "
            f"so there was no forgetting to reduce (the paper trains up to {PAPER_SAMPLES[-1]:,} samples)."
        )
    elif f["core"] < f["none"] and f["core"] < f["random"]:
        verdict = "holds here."
    else:
        verdict = "does not hold here."
    return [
        f"After {n:,} samples of {x}, the untrained languages' perplexity changed ×{f['none']:.3f} with nothing "
        f"frozen, ×{f['core']:.3f} with the core region frozen and ×{f['random']:.3f} with a random region of the "
        f"same size frozen (geometric means; {x} itself ×{learned['none']:.3f}, ×{learned['core']:.3f}, "
        f"×{learned['random']:.3f}): the paper's finding (less forgetting with the core frozen) " + verdict
    ]


def section(res: dict) -> list:
    """Report blocks: each untrained language's perplexity before → after training, per frozen region."""
    x, others = res["languages"][0], res["languages"][1:]
    t = res["table"]
    head = ["Setting", f"{x} (trained)"] + others + ["forgetting (geo. mean)"]
    rows = [
        [FORGETTING[s], _change(t[s]["ppl"][x])]
        + [_change(t[s]["ppl"][lang]) for lang in others]
        + [f"×{forgetting(res, s):.3f}"]
        for s in FORGETTING
    ]
    return [
        blocks.heading(f"Catastrophic forgetting: train on {x} with the core region frozen"),
        blocks.text(
            f"Training from the unmodified model as in the Table 2 section ({res['samples'][-1]:,} samples); the "
            f"core region (Top {res['ratio']:g}, {res['region_entries']['core']:,} entries) or a random region "
            "of exactly the same size per matrix is held bit-identical; perplexity of the untrained languages "
            f"({', '.join(others)}) is tracked."
        ),
        blocks.table(
            head,
            rows,
            caption="Perplexity before → after training, and its ratio. Paper: the untrained "
            "languages' perplexity grows least with the core region frozen.",
        ),
        blocks.figure(
            "figures/forgetting.png",
            "Perplexity (log scale) against training samples for each language; "
            "look for the Core frozen line of the untrained languages staying lowest.",
        ),
        blocks.bullets(findings(res)),
    ]
