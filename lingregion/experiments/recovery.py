"""Further pre-training with regions removed or frozen: the paper's Table 2 (recovery after removal) and
its catastrophic-forgetting result (freezing the core region while training on one language).

Only the transformer-layer parameters are trained (the embedding and the LM head tied to it, 170M of
Gemma 3 270M's 268M parameters, stay fixed), which keeps a CPU step affordable; the paper trained
everything. Each setting starts from the unmodified model and leaves it unmodified: the trained
parameters are copied before and written back after, whatever happens in between. Finished settings
are cached in results/, and a setting interrupted mid-training resumes from checkpoints/ (every
`train_checkpoint_every` steps), so rerunning the same command continues.
"""

from __future__ import annotations

import math
from dataclasses import asdict

import torch

from .. import blocks, figures, freezing, interventions, models, uncertainty
from ..regions import Region
from ..store import LingregionError, read_json, write_bytes, write_json
from .runfolder import Run, digest, edits_digest

NAME = "recovery"
DOC = "Table 2: remove Top/Bottom core region, further pre-train one language frozen or not"

RECOVERY = {"top-freeze": "Top&Freeze", "bottom-freeze": "Bottom&Freeze", "top-unfreeze": "Top&Unfreeze"}
PAPER_SAMPLES = [0, 2000, 5000, 10000, 20000, 50000, 200000]
MARGIN = 0.10  # share of log-perplexity damage: smaller differences are not called a finding
RECOVERS = 1.0  # the trained language recovers when its perplexity after training / before lies below this


# --- configuration ----------------------------------------------------------------------------------------
def validate(cfg) -> None:
    """Refuse sample counts that are not increasing or share a step, a bad ratio, or a trained tracked language."""
    samples = cfg.train_samples
    if not samples or min(samples) < 0 or max(samples) < 1 or sorted(set(samples)) != list(samples):
        raise LingregionError(
            f"train_samples {samples} must be increasing sample counts ≥ 0 with one ≥ 1, e.g. 0,2000,5000,10000"
        )
    if not 0 < cfg.train_ratio < 1:
        raise LingregionError(f"train_ratio {cfg.train_ratio} is outside (0, 1); pass a fraction such as 0.01")
    if cfg.train_lang == cfg.train_other or cfg.train_lang in cfg.train_track:
        raise LingregionError(
            f"the training language {cfg.train_lang} cannot also be an untrained language; "
            "choose other train_other / train_track languages (config keys)"
        )
    if not cfg.train_track:
        raise LingregionError("train_track needs at least one untrained language to measure forgetting")
    if cfg.train_eval_tokens < 1:
        raise LingregionError("train_eval_tokens must be ≥ 1")
    train_config(cfg).validate()
    if len(set(eval_steps(cfg))) != len(cfg.train_samples):
        raise LingregionError(
            f"train_samples {samples} fall on the same training step at "
            f"{cfg.train_batch * cfg.train_accum} samples per step; space them further apart"
        )


def eval_steps(cfg) -> list[int]:
    """The training step after which each requested sample count is reached (rounded up)."""
    per_step = cfg.train_batch * cfg.train_accum
    return [math.ceil(s / per_step) for s in cfg.train_samples]


def train_config(cfg) -> freezing.TrainConfig:
    """The training run the config asks for, evaluated after each requested sample count."""
    steps = eval_steps(cfg)
    return freezing.TrainConfig(
        steps=max(steps),
        lr=cfg.train_lr,
        warmup=cfg.train_warmup,
        batch_size=cfg.train_batch,
        accumulation=cfg.train_accum,
        precision=cfg.train_precision,
        seed=cfg.seed,
        eval_steps=[s for s in steps if s > 0],
        eval_batch_size=cfg.batch_size,
        checkpoint_every=cfg.train_checkpoint_every,
    )


# --- one training setting -----------------------------------------------------------------------------------
def trained(
    run: Run, name: str, setting: str, edits: list[interventions.Edit], frozen: Region | None, values, langs: list[str]
) -> dict:
    """Train on cfg.train_lang from the model with `edits` applied and `frozen` held (at `values`), and
    return the history with the perplexity of `langs` at each evaluation step. Cached in
    results/NAME-train.json; the model is restored exactly afterwards."""
    cfg, model = run.cfg, run.model
    trainable = models.scored_names(model)
    data = run.windows(cfg.train_lang, "score", max(cfg.train_samples) * cfg.seq_len)
    evals = {lang: run.windows(lang, "eval", cfg.train_eval_tokens) for lang in langs}
    # Keyed on what the result depends on, so that unrelated config changes keep finished settings.
    key = digest(
        {
            "fingerprint": run.info["fingerprint"],
            "train": asdict(train_config(cfg)),
            "data": data.meta,
            "evals": {lang: w.meta for lang, w in evals.items()},
            "trainable": digest(trainable),
            "edits": edits_digest(edits),
            "frozen": edits_digest(_hold(frozen, values)),
        }
    )
    path = run.out / "results" / f"{name}-train.json"
    cache = read_json(path) if path.is_file() else {}
    if cache.get(setting, {}).get("key") == key:
        return cache[setting]["history"]
    params = dict(model.named_parameters())
    saved = {n: params[n].detach().clone() for n in dict.fromkeys(trainable + run.names)}
    checkpoint = run.out / "checkpoints" / f"{name}-{setting}.safetensors"
    try:
        interventions.apply(model, edits)  # undone below by writing back every parameter it can touch
        history = freezing.train(
            model,
            data,
            train_config(cfg),
            trainable,
            frozen=frozen,
            frozen_values=values,
            evals=evals,
            checkpoint=checkpoint,
            progress=run.progress,
            desc=f"{name} {setting}",
        )
    finally:
        with torch.no_grad():
            for n, t in saved.items():
                params[n].copy_(t)
    cache[setting] = {"key": key, "history": history}
    write_json(path, cache)
    checkpoint.unlink(missing_ok=True)  # the result is kept; the 12-bytes-per-parameter state is not
    return history


def _hold(frozen: Region | None, values) -> list[interventions.Edit]:
    """The frozen region as edits (value None: held at whatever it is), for the cache key."""
    if frozen is None:
        return []
    return [interventions.Edit(n, frozen.indices(n), None if values is None else values[n]) for n in frozen.packed]


def curves(run: Run, name: str, setting: str, start: dict, history: dict, langs: list[str], metric: str) -> dict:
    """{lang: [metric at each requested sample count]}: the step-0 evaluation, then the history's."""
    steps = eval_steps(run.cfg)
    return {
        lang: [start[lang][metric] if s == 0 else history["evals"][str(s)][lang][metric] for s in steps]
        for lang in langs
    }


def final(run: Run, start: dict, history: dict) -> dict:
    """Each language's perplexity result (with its blocks, if the history kept them) at the last sample count."""
    last = eval_steps(run.cfg)[-1]
    return start if last == 0 else history["evals"][str(last)]


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


def _training_record(run: Run, histories: dict[str, dict]) -> dict:
    cfg, first = run.cfg, next(iter(histories.values()))
    return {
        "train_lang": cfg.train_lang,
        "samples": [s * first["samples_per_step"] for s in eval_steps(cfg)],
        "requested_samples": cfg.train_samples,
        "hyperparameters": {
            **asdict(train_config(cfg)),
            "optimizer": "AdamW, no weight decay on 1-D parameters",
            "schedule": "linear warm-up, then half cosine",
            "trained": "transformer-layer parameters",
        },
        "trainable_parameters": first["trainable_parameters"],
        "seq_len": cfg.seq_len,
        "tokens_per_step": first["tokens_per_step"],
        "train_windows": run.windows(cfg.train_lang, "score", max(cfg.train_samples) * cfg.seq_len).meta,
        "epochs": first["epochs"],
        "history": {
            s: {k: h[k] for k in ("loss", "grad_norm", "lr", "seconds", "frozen_entries", "frozen_bytes")}
            for s, h in histories.items()
        },
    }


# --- Table 2: recovery after removal ------------------------------------------------------------------------
def run(run: Run) -> dict:
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
        **_training_record(run, histories),
        **run.eval_record(langs, cfg.train_eval_tokens),
        "figures": ["figures/recovery.png"],
    }
    write_bytes(run.out / "figures" / "recovery.png", _curve_figure(result, RECOVERY))
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
    fmt, t, base = blocks.fmt, res["table"], res["base"]
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
    return RECOVERY[setting] + (f" ({blocks.cell(e)})" if e else "")


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
        ["Base (nothing removed)"] + [blocks.fmt(res["base"][lang]["ppl"]) for _ in RECOVERY for lang in (x, other)]
    ]
    rows += [
        [f"{n:,}"] + [blocks.fmt(t[s]["ppl"][lang][i]) for s in RECOVERY for lang in (x, other)]
        for i, n in enumerate(samples)
    ]
    h = res["hyperparameters"]
    return [
        blocks.heading(f"Further pre-training after removal (the paper's Table 2): train on {x}"),
        blocks.text(
            f"Top / Bottom {res['ratio']:g} of the core score removed ({res['region_entries']['top']:,} entries), "
            f"then {h['steps']} AdamW steps of {h['batch_size'] * h['accumulation']} × {res['seq_len']}-token "
            f"windows of {x} (lr {h['lr']:g}, betas {tuple(h['betas'])}, weight decay {h['weight_decay']:g}, "
            f"{h['warmup']} warm-up steps, cosine, clip {h['clip']:g}, {h['precision']}); only the "
            f"{res['trainable_parameters']:,} transformer-layer parameters are trained. Frozen regions are "
            f"held bit-identical at their removed value. The paper trains up to {PAPER_SAMPLES[-1]:,} samples."
        ),
        blocks.table(
            head,
            rows,
            caption=f"Perplexity by training samples. Paper: {x} recovers in every column; "
            f"{other} recovers only under Top&Unfreeze.",
        ),
        _interval_table(res),
        blocks.figure(
            "figures/recovery.png",
            f"Perplexity (log scale) against training samples, {x} and {other}; "
            "dashed: the unmodified model. Look for the Top&Freeze line of the untrained language staying high.",
        ),
        blocks.bullets(findings(res)),
    ]


def _interval_table(res: dict) -> dict:
    """The intervals the verdicts read: the trained language's end / start perplexity per setting, and the share
    of the untrained language's damage undone under Top&Freeze and Top&Unfreeze (text when there are none)."""
    iv = res.get("intervals")
    if not iv:
        return blocks.text("")
    x, other = res["languages"]
    undone = iv["damage_undone"]
    rows = [
        [RECOVERY[s], blocks.cell(iv["trained_recovers"][s]), _share(undone[s]) if s in undone else "—"]
        for s in RECOVERY
    ]
    rows.append(["Unfreeze − Freeze", "—", _share(undone["unfreeze_minus_freeze"])])
    return blocks.table(
        ["Setting", f"{x}: end / start perplexity", f"{other}: damage undone"],
        rows,
        caption=f"With 95% intervals (paired block bootstrap on the same text). {x} recovers where its interval "
        f"lies below {RECOVERS:g}; {other} recovers only unfrozen where the difference lies above {MARGIN:.0%}. "
        + uncertainty.RULE,
    )


def _change(values: list[float]) -> str:
    return f"{blocks.fmt(values[0])} → {blocks.fmt(values[-1])} (×{values[-1] / values[0]:.3f})"


# --- figure ---------------------------------------------------------------------------------------------
def _curve_figure(res: dict, labels: dict[str, str]) -> bytes:
    """One panel per language: perplexity against training samples, one line per setting."""
    langs, samples = res["languages"], res["samples"]
    fig, axes = figures.subplots(1, len(langs), figsize=(4.2 * len(langs), 3.6), squeeze=False)
    for ax, lang in zip(axes[0], langs):
        for setting, label in labels.items():
            ax.plot(samples, res["table"][setting]["ppl"][lang], marker="o", label=label)
        ax.axhline(res["base"][lang]["ppl"], color="grey", linestyle="--", linewidth=1, label="unmodified")
        ax.set_xscale("symlog", linthresh=max(1, min(s for s in samples if s > 0)))
        ax.set_yscale("log")
        ax.set_title(lang + (" (trained)" if lang == res["train_lang"] else ""))
        ax.set_xlabel("training samples")
        ax.set_ylabel("perplexity")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return figures.png(fig)
