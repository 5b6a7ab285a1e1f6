"""The paper's Table 2: remove the Top (or Bottom) core region, then further pre-train one language with the
removed region frozen at its removed value, or free to train, and see what recovers. The training itself
is shared with the forgetting experiment (`lingregion.experiments.training`)."""

from __future__ import annotations

import math

from .. import interventions, markup, uncertainty
from ..pretraining import curve_figure
from ..run import Run
from ..store import write_bytes
from .training import PAPER_SAMPLES, curves, final, trained, training_record, validate_training

NAME = "recovery"

RECOVERY = {"top-freeze": "Top&Freeze", "bottom-freeze": "Bottom&Freeze", "top-unfreeze": "Top&Unfreeze"}
MARGIN = 0.10  # share of log-perplexity damage: smaller differences are not called a finding
RECOVERS = 1.0  # the trained language recovers when its perplexity after training / before lies below this
validate = validate_training  # the same rules for both training experiments


def _intervals(base: dict, start: dict, ends: dict[str, dict], langs: list[str], seed: int) -> dict:
    """The paired 95% intervals the findings read (every evaluation is on the same text of each language):

    - "trained_recovers": per setting, the trained language's perplexity at the end / at the start;
    - "damage_undone": the untrained language's share of the log-perplexity damage of the Top removal that
      training undid, (ln start − ln end) / (ln start − ln base), with the region frozen and trained, and
      their difference ("unfreeze_minus_freeze"), from one joint bootstrap of the four results' blocks.
    start: {side: results at step 0}; ends: {setting: results at the last sample count}."""
    x, other = langs
    side = {s: s.split("-")[0] for s in RECOVERY}
    out = {"trained_recovers": {s: uncertainty.ratio_entry(ends[s][x], start[side[s]][x], seed) for s in RECOVERY}}
    parts = {"base": base[other], "start": start["top"][other]}
    parts |= {s: ends[s][other] for s in ("top-freeze", "top-unfreeze")}
    point = {k: uncertainty.log_ppl(r) for k, r in parts.items()}
    if point["start"] <= point["base"]:  # nothing to undo: a share of no damage means nothing
        reason = "the Top removal did not raise the untrained language's perplexity, so no damage to undo"
        logs = None
    else:
        logs, reason = uncertainty.joint_log_ppl(parts, seed)

    def share(v, s):
        return (v["start"] - v[s]) / (v["start"] - v["base"])

    undone = {}
    for s in ("top-freeze", "top-unfreeze"):
        undone[s] = {"value": share(point, s), "ci95": uncertainty.percentile(share(logs, s)) if logs else None}
    diff = share(point, "top-unfreeze") - share(point, "top-freeze")
    if logs:
        undone["unfreeze_minus_freeze"] = {
            "value": diff,
            "ci95": uncertainty.percentile(share(logs, "top-unfreeze") - share(logs, "top-freeze")),
        }
    else:
        undone = {k: v | {"reason": reason} for k, v in undone.items()}
        undone["unfreeze_minus_freeze"] = {"value": diff, "ci95": None, "reason": reason}
    out["damage_undone"] = undone
    return out


# --- Table 2: recovery after removal ------------------------------------------------------------------------
def measure(run: Run) -> dict:
    """Remove the Top (or Bottom) train_ratio of the core score, then train on train_lang with the removed
    region frozen at its removed value, or (Top&Unfreeze) free to train."""
    cfg = run.cfg
    langs = [cfg.train_lang, cfg.train_other]
    core = run.core_scores()
    top, bottom = run.region(core, "top", cfg.train_ratio), run.region(core, "bottom", cfg.train_ratio)
    del core
    removal = {"top": interventions.removal(top, run.removed), "bottom": interventions.removal(bottom, run.removed)}
    base = run.evaluate("recovery.json", "base", [], langs, cfg.train_eval_tokens)
    start = {
        side: run.evaluate("recovery.json", f"{side}@{cfg.train_ratio:g}", removal[side], langs, cfg.train_eval_tokens)
        for side in removal
    }
    plan = {"top-freeze": ("top", top), "bottom-freeze": ("bottom", bottom), "top-unfreeze": ("top", None)}
    histories, table = {}, {}
    for setting, (side, frozen) in plan.items():
        histories[setting] = trained(
            run, "recovery", setting, removal[side], frozen, run.removed if frozen is not None else None, langs
        )
        table[setting] = {
            m: curves(run, "recovery", setting, start[side], histories[setting], langs, m) for m in ("ppl", "bpb")
        }
    result = {
        "experiment": "recovery",
        "languages": langs,
        "ratio": cfg.train_ratio,
        "settings": RECOVERY,
        "base": {lang: {k: v for k, v in r.items() if k != "blocks"} for lang, r in base.items()},
        "table": table,
        "region_entries": {"top": top.count(), "bottom": bottom.count()},
        "intervals": _intervals(
            base, start, {s: final(run, start[plan[s][0]], h) for s, h in histories.items()}, langs, cfg.seed
        ),
        "ci95_method": uncertainty.method_record(seed=cfg.seed),
        "verdict_rule": uncertainty.RULE,
        **training_record(run, histories),
        **run.eval_record(langs, cfg.train_eval_tokens),
        "figures": ["figures/recovery.png"],
    }
    write_bytes(run.out / "figures" / "recovery.png", curve_figure(result, RECOVERY))
    run.save("recovery", result)
    return result


def _damage_undone(start: float, end: float, base: float) -> float:
    """Share of the log-perplexity damage of a removal that training undid (1 = back to base)."""
    return (math.log(start) - math.log(end)) / (math.log(start) - math.log(base))


def verdicts(res: dict) -> dict[str, dict]:
    """The paper's two findings as verdicts from 95% intervals (uncertainty.RULE):

    - "trained": the trained language recovers in every setting: for each, the paired interval of its
      perplexity at the end / at the start lies below RECOVERS (all settings must hold);
    - "untrained": the untrained language recovers only with the region unfrozen: the interval of the
      damage share undone under Top&Unfreeze minus under Top&Freeze lies above MARGIN.
    Each is {"verdict", "parts" or "entry", "reason" (when inconclusive for want of an interval)}."""
    iv = res.get("intervals")
    if iv is None:
        reason = "this result has no intervals (made before they were recorded); rerun to compute them"
        return {k: {"verdict": uncertainty.INCONCLUSIVE, "reason": reason} for k in ("trained", "untrained")}
    parts = {s: uncertainty.verdict_of(e, RECOVERS, "below") for s, e in iv["trained_recovers"].items()}
    gap = iv["damage_undone"]["unfreeze_minus_freeze"]
    reasons = {e["reason"] for e in iv["trained_recovers"].values() if e.get("reason")}
    return {
        "trained": {"verdict": uncertainty.all_of(list(parts.values())), "parts": parts}
        | ({"reason": "; ".join(sorted(reasons))} if reasons else {}),
        "untrained": {"verdict": uncertainty.verdict_of(gap, MARGIN, "above"), "entry": gap}
        | ({"reason": gap["reason"]} if gap.get("reason") else {}),
    }


def findings(res: dict) -> list[str]:
    """The paper's two findings tested: the trained language recovers; the other only with the region unfrozen.
    Each verdict is read off 95% intervals (see `verdicts`)."""
    x, other = res["languages"]
    fmt, t, base = markup.fmt, res["table"], res["base"]
    n = res["samples"][-1]
    ppl = {s: {lang: t[s]["ppl"][lang] for lang in (x, other)} for s in RECOVERY}
    v = verdicts(res)
    iv = res.get("intervals", {})
    trained = v["trained"]
    why = f" ({trained['reason']})" if "reason" in trained else ""
    first = (
        f"After {n:,} samples of {x} ({res['epochs']:.1f} passes over the training text; the paper trains up to "
        f"{PAPER_SAMPLES[-1]:,}), {x} perplexity went "
        + "; ".join(f"{fmt(ppl[s][x][0])} → {fmt(ppl[s][x][-1])} under {_with_change(s, iv)}" for s in RECOVERY)
        + f" (base {fmt(base[x]['ppl'])}): the paper's first finding ({x} recovers in every setting: the 95% "
        f"paired interval of end / start perplexity below {RECOVERS:g} in each) **{trained['verdict']}**"
        + (
            f" ({', '.join(RECOVERY[s] for s, p in trained['parts'].items() if p != uncertainty.HOLDS)}: "
            f"not shown to improve)"
            if "parts" in trained and trained["verdict"] != uncertainty.HOLDS
            else ""
        )
        + why
        + "."
    )
    undone = iv.get("damage_undone")
    if undone:
        frozen, free = undone["top-freeze"], undone["top-unfreeze"]
        shares = (
            f"undid {_share(frozen)} of the log-perplexity damage of removing the Top region with it frozen and "
            f"{_share(free)} with it trained"
        )
    else:  # an older result: the point shares, computed from the table
        frozen, free = (
            _damage_undone(ppl[s][other][0], ppl[s][other][-1], base[other]["ppl"])
            for s in ("top-freeze", "top-unfreeze")
        )
        shares = (
            f"undid {frozen:.0%} of the log-perplexity damage of removing the Top region with it frozen and "
            f"{free:.0%} with it trained"
        )
    untrained = v["untrained"]
    second = (
        f"{other} (not trained on) {shares} (Top&Unfreeze; {fmt(ppl['top-unfreeze'][other][0])} → "
        f"{fmt(ppl['top-unfreeze'][other][-1])}, base {fmt(base[other]['ppl'])}): the paper's second finding "
        f"({other} recovers only when the region is not frozen: the 95% interval of the difference in damage "
        f"undone lies above {MARGIN:.0%}) **{untrained['verdict']}**"
        + (f" ({untrained['reason']})" if "reason" in untrained else "")
        + "."
    )
    return [first, second]


def _with_change(setting: str, iv: dict) -> str:
    """A setting's label with its end / start ratio and interval, when the result has them."""
    e = iv.get("trained_recovers", {}).get(setting)
    return RECOVERY[setting] + (f" ({markup.cell(e)})" if e else "")


def _share(entry: dict) -> str:
    """A share and its interval in percent: 42% [30%, 55%]."""
    if entry.get("ci95") is None:
        return f"{entry['value']:.0%} [no interval]"
    lo, hi = entry["ci95"]
    return f"{entry['value']:.0%} [{lo:.0%}, {hi:.0%}]"


def section(res: dict) -> list:
    """Report blocks: perplexity of both languages after each sample count, per setting (the paper's Table 2)."""
    x, other = res["languages"]
    t, samples = res["table"], res["samples"]
    head = ["Samples"] + [f"{RECOVERY[s]} {lang}" for s in RECOVERY for lang in (x, other)]
    rows = [
        ["Base (nothing removed)"] + [markup.fmt(res["base"][lang]["ppl"]) for _ in RECOVERY for lang in (x, other)]
    ]
    rows += [
        [f"{n:,}"] + [markup.fmt(t[s]["ppl"][lang][i]) for s in RECOVERY for lang in (x, other)]
        for i, n in enumerate(samples)
    ]
    h = res["hyperparameters"]
    return [
        markup.heading(f"Further pre-training after removal (the paper's Table 2): train on {x}"),
        markup.text(
            f"Top / Bottom {res['ratio']:g} of the core score removed ({res['region_entries']['top']:,} entries), "
            f"then {h['steps']} AdamW steps of {h['batch_size'] * h['accumulation']} × {res['seq_len']}-token "
            f"windows of {x} (lr {h['lr']:g}, betas {tuple(h['betas'])}, weight decay {h['weight_decay']:g}, "
            f"{h['warmup']} warm-up steps, cosine, clip {h['clip']:g}, {h['dtype']}); only the "
            f"{res['trainable_parameters']:,} transformer-layer parameters are trained. Frozen regions are "
            f"held bit-identical at their removed value. The paper trains up to {PAPER_SAMPLES[-1]:,} samples."
        ),
        markup.table(
            head,
            rows,
            caption=f"Perplexity by training samples. Paper: {x} recovers in every column; "
            f"{other} recovers only under Top&Unfreeze.",
        ),
        _interval_table(res),
        markup.figure(
            "figures/recovery.png",
            f"Perplexity (log scale) against training samples, {x} and {other}; "
            "dashed: the unmodified model. Look for the Top&Freeze line of the untrained language staying high.",
        ),
        markup.bullets(findings(res)),
    ]


def _interval_table(res: dict) -> dict:
    """The intervals the verdicts read: the trained language's end / start perplexity per setting, and the share
    of the untrained language's damage undone under Top&Freeze and Top&Unfreeze (text when there are none)."""
    iv = res.get("intervals")
    if not iv:
        return markup.text("")
    x, other = res["languages"]
    undone = iv["damage_undone"]
    rows = [
        [RECOVERY[s], markup.cell(iv["trained_recovers"][s]), _share(undone[s]) if s in undone else "—"]
        for s in RECOVERY
    ]
    rows.append(["Unfreeze − Freeze", "—", _share(undone["unfreeze_minus_freeze"])])
    return markup.table(
        ["Setting", f"{x}: end / start perplexity", f"{other}: damage undone"],
        rows,
        caption=f"With 95% intervals (paired block bootstrap on the same text). {x} recovers where its interval "
        f"lies below {RECOVERS:g}; {other} recovers only unfrozen where the difference lies above {MARGIN:.0%}. "
        + uncertainty.RULE,
    )
