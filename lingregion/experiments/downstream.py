"""Downstream: multiple-choice accuracy with a region removed, beside perplexity.

Settings are the unmodified model, the Top / Bottom / Random `down_ratio` of the core score, and (with
`down_mono`) the monolingual regions that the monolingual experiment saved in regions/, for the languages
evaluated here. Every setting is scored on the built-in parallel task (`udhr_next`) in each of
`down_langs`, and on any lm-eval tasks named in `down_lmeval_tasks`, run in process on the same model object.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import figures, interventions, markup, tasks, uncertainty
from ..regions import Region
from ..run import Run, digest, edits_digest
from ..store import LingregionError, read_cached, read_json, write_bytes, write_json

NAME = "downstream"

RESULTS = "downstream.json"
DROP = 0.05  # accuracy points (as a share): a change smaller than this is not called a drop
ACC_METHOD = {
    "method": "percentile bootstrap over items: base and the setting resample the same items (paired), and every "
    "language the same item indices when their items are the same (the task is parallel)",
    "unit": "item",
    "resamples": uncertainty.RESAMPLES,
    "level": uncertainty.LEVEL,
}


def _settings(run: Run) -> list[tuple[str, Region | None, Path | None]]:
    """(name, region, its file) for base, the core sides at down_ratio, and saved monolingual regions."""
    cfg, core = run.cfg, run.core_scores()
    out = [("base", None, None)]
    for side in cfg.sides:
        out.append(
            (
                f"{side}@{cfg.down_ratio:g}",
                run.region(core, side, cfg.down_ratio),
                run.out / "regions" / f"core-{side}-{cfg.down_ratio:g}.safetensors",
            )
        )
    for lang in cfg.down_langs if cfg.down_mono else []:
        path = run.out / "regions" / f"monolingual-{lang}-{cfg.mono_ratio:g}.safetensors"
        if (region := read_cached(path, Region.load)) is not None:
            region.check_model(run.model, run.info["fingerprint"])
            out.append((f"mono-{lang}", region, path))
    return out


class _Cache:
    """results/downstream.json: one entry per setting and language (or lm-eval run), each kept while what
    it depends on (model, dtype, the exact edits, the items) is unchanged, and written after every entry
    so that an interrupted run resumes."""

    def __init__(self, run: Run):
        self.path = run.out / "results" / RESULTS
        self.data = read_cached(self.path, read_json) or {}
        self.data.setdefault("entries", {})
        self.data.setdefault("keys", {})
        self.base = {"fingerprint": run.info["fingerprint"], "dtype": run.cfg.dtype}

    def get(self, name: str, made_of: dict, compute):
        """The cached entry `name`, computed (and saved at once) when missing or made from other inputs."""
        key = digest({**self.base, **made_of})
        if self.data["keys"].get(name) != key:
            self.data["entries"][name] = compute()
            self.data["keys"][name] = key
            write_json(self.path, self.data)
        return self.data["entries"][name]


def measure(run: Run) -> dict:
    """Multiple-choice accuracy (and perplexity) of each setting in each language."""
    cfg, m = run.cfg, run.lm
    langs = cfg.down_langs
    items = {lang: tasks.load_items(lang, cfg.down_items) for lang in langs}
    limit, need = tasks.max_length(m.module), max(tasks.longest_candidate(m.tokenizer, v) for v in items.values())
    if limit and need > limit:  # a model with a short context (e.g. a tiny test model) cannot take the items
        result = {
            "experiment": "downstream",
            "skipped": f"the model takes {limit} positions and the task's longest candidate alone is {need} tokens",
        }
        run.save("downstream", result)
        return result
    cache = _Cache(run)
    settings = _settings(run)
    mc, ppl, lmeval, regions = {}, {}, {}, {}
    task = tasks.manifest()
    for name, region, path in settings:
        edits = interventions.removal(region, run.removed) if region else []
        regions[name] = {
            "file": str(path.relative_to(run.out)) if path else None,
            "edits": edits_digest(edits),
            "entries": region.count() if region else 0,
        }
        with interventions.applied(m.module, edits):
            mc[name] = {
                lang: cache.get(
                    f"{name}/{lang}",
                    {
                        "edits": regions[name]["edits"],
                        "items": task["languages"][lang]["sha256"],
                        "n": len(items[lang]),
                    },
                    lambda lang=lang: tasks.evaluate(
                        m.module, m.tokenizer, lang, items[lang], batch_size=cfg.down_batch, progress=run.progress
                    ),
                )
                for lang in langs
            }
            if cfg.down_lmeval_tasks:
                lmeval[name] = cache.get(
                    f"{name}/lm-eval",
                    {"edits": regions[name]["edits"], "tasks": cfg.down_lmeval_tasks, "limit": cfg.down_lmeval_limit},
                    lambda: tasks.lmeval(
                        m.module, m.tokenizer, cfg.down_lmeval_tasks, limit=cfg.down_lmeval_limit, samples=True
                    ),
                )
        ppl[name] = _perplexity(run, name, edits)
    result = {
        "experiment": "downstream",
        "task": tasks.TASK,
        "task_version": task["version"],
        "settings": [s for s, _, _ in settings],
        "languages": langs,
        "items": {lang: len(v) for lang, v in items.items()},
        "ratio": cfg.down_ratio,
        "regions": regions,
        "accuracy": {
            s: {lang: {k: v for k, v in r.items() if k != "loglik"} for lang, r in by.items()} for s, by in mc.items()
        },
        "perplexity": ppl,
        "accuracy_change": accuracy_intervals(
            {s: {lang: correct(items[lang], r["loglik"]) for lang, r in by.items()} for s, by in mc.items()},
            {lang: [it.get("id", i) for i, it in enumerate(v)] for lang, v in items.items()},
            cfg.seed,
        ),
        "accuracy_ci95_method": ACC_METHOD | {"seed": cfg.seed},
        "verdict_rule": uncertainty.RULE,
        "lmeval": {s: _lmeval_summary(r) for s, r in lmeval.items()},
        "scoring": "summed log-probability of each candidate given the context (fp32 logits, fp64 sums), "
        "lm-eval's multiple_choice; acc_norm divides by the candidate's characters",
    }
    figs = run.out / "figures"
    write_bytes(figs / "downstream.png", accuracy_chart(result))
    result["figures"] = ["figures/downstream.png"]
    run.save("downstream", result)
    return result


def _perplexity(run: Run, name: str, edits: list) -> dict:
    """Perplexity beside accuracy, from the caches of the removal and monolingual experiments (the same
    settings, so nothing is evaluated twice): core settings at eval_tokens, monolingual at mono_eval_tokens,
    each with the base model at the same budget."""
    langs, cfg = run.cfg.down_langs, run.cfg
    if name.startswith("mono-"):
        base = run.evaluate("monolingual.json", "base", [], langs, cfg.mono_eval_tokens)
        removed = run.evaluate("monolingual.json", name, edits, langs, cfg.mono_eval_tokens)
    else:
        base = run.evaluate("removal.json", "base", [], langs)
        removed = run.evaluate("removal.json", name, edits, langs)
    return {
        lang: {
            "ppl": removed[lang]["ppl"],
            "ratio": removed[lang]["ppl"] / base[lang]["ppl"],
            "ci95": uncertainty.ratio_entry(removed[lang], base[lang], cfg.seed)["ci95"],  # paired: the same text
            "tokens": removed[lang]["tokens"],
        }
        for lang in langs
    }


def correct(items: list[dict], logliks: list[list[float]]) -> np.ndarray:
    """1.0 where the highest summed log-probability picks the item's answer (ties to the first, as tasks.accuracy)."""
    return np.array(
        [max(range(len(ll)), key=lambda k: (ll[k], -k)) == it["label"] for it, ll in zip(items, logliks)], dtype=float
    )


def accuracy_intervals(correct: dict[str, dict[str, np.ndarray]], ids: dict[str, list], seed: int = 0) -> dict:
    """Accuracy change from base of every other setting, per language and as the mean over languages, and for a
    monolingual region mono-L the change in L minus the mean change in the others ("own_minus_others"), each
    {"value", "ci95"} from a paired uncertainty.percentile bootstrap over items (ACC_METHOD); seeded.

    correct: {setting: {lang: 0/1 per item}} with "base" among the settings; ids: each language's item ids,
    resampled with one draw for all languages when they are the same items."""
    langs = list(correct["base"])
    rng = np.random.default_rng(seed)
    shared = all(ids[lang] == ids[langs[0]] for lang in langs)
    draws, one = {}, None
    for lang in langs:  # one draw of item indices per language, or one for all
        m = len(ids[lang])
        if not shared or one is None:
            one = rng.multinomial(m, np.full(m, 1 / m), size=uncertainty.RESAMPLES) / m
        draws[lang] = one

    def entry(value: float, boot: np.ndarray) -> dict:
        return {"value": float(value), "ci95": uncertainty.percentile(boot)}

    out = {}
    for s in correct:
        if s == "base":
            continue
        delta = {lang: correct[s][lang] - correct["base"][lang] for lang in langs}
        boot = {lang: draws[lang] @ delta[lang] for lang in langs}
        out[s] = {lang: entry(delta[lang].mean(), boot[lang]) for lang in langs}
        out[s]["mean"] = entry(np.mean([delta[lang].mean() for lang in langs]), np.mean(list(boot.values()), axis=0))
        lang = s[len("mono-") :]
        others = [x for x in langs if x != lang]
        if s.startswith("mono-") and lang in langs and others:
            own = delta[lang].mean() - np.mean([delta[x].mean() for x in others])
            out[s]["own_minus_others"] = entry(own, boot[lang] - np.mean([boot[x] for x in others], axis=0))
    return out


def verdicts(result: dict) -> dict[str, dict]:
    """Each setting's accuracy finding as a verdict from its 95% interval (uncertainty.RULE):

    - Top: removing it lowers mean accuracy by more than DROP (interval of the mean change below −DROP);
    - Bottom and Random: removing them lowers mean accuracy by less than DROP (interval above −DROP);
    - mono-L: removing L's monolingual region lowers L's accuracy more than the others' (interval of
      own − others below 0).
    A result without intervals (made before they were recorded), or whose interval has no width because no
    item changed its answer, is inconclusive, with the reason. With few items a uncertainty.percentile bootstrap still
    understates the uncertainty; the item count is shown beside every interval."""
    change, out = result.get("accuracy_change"), {}
    for s in result["settings"][1:]:
        if s.startswith("mono-"):
            claim, key, threshold, direction = (
                f"lowers {s[5:]} accuracy more than the others'",
                "own_minus_others",
                0.0,
                "below",
            )
        elif s.startswith("top"):
            claim, key, threshold, direction = f"lowers mean accuracy by more than {DROP:.0%}", "mean", -DROP, "below"
        else:
            claim, key, threshold, direction = f"lowers mean accuracy by less than {DROP:.0%}", "mean", -DROP, "above"
        e = (change or {}).get(s, {}).get(key)
        out[s] = {"claim": claim, "verdict": uncertainty.verdict_of(e, threshold, direction), "entry": e}
        if e and e["ci95"][0] == e["ci95"][1]:  # no item changed its answer: resampling items shows no spread,
            # which is ignorance (a few items), not certainty; so no verdict
            out[s] |= {
                "verdict": uncertainty.INCONCLUSIVE,
                "reason": "no item changed its answer, so the bootstrap over items has no spread to measure",
            }
        if e is None:
            out[s]["reason"] = (
                "no interval for this claim (a result from before intervals were recorded, or no other language)"
            )
    return out


def _lmeval_summary(results: dict) -> dict:
    """Each task's metrics, and for multiple-choice tasks the accuracy on the documents whose answer is not
    the first choice (the paper's MMLU observation: a damaged model that always answers "A")."""
    out = {}
    for task, r in results.items():
        out[task] = {k: v for k, v in r.items() if k not in ("loglik", "target")}
        if "loglik" in r:
            pairs = [(int(np.argmax(ll)), t) for ll, t in zip(r["loglik"], r["target"]) if isinstance(t, int)]
            rest = [p == t for p, t in pairs if t != 0]
            out[task]["acc_not_first"] = sum(rest) / len(rest) if rest else None
            out[task]["first_chosen"] = sum(p == 0 for p, _ in pairs) / len(pairs) if pairs else None
    return out


def _mean(result: dict, setting: str, metric: str = "acc") -> float:
    vals = [result["accuracy"][setting][lang][metric] for lang in result["languages"]]
    return sum(vals) / len(vals)


def _chance(result: dict) -> float:
    return result["accuracy"]["base"][result["languages"][0]]["chance"]


def _colours(settings: list[str]) -> dict[str, tuple]:
    """The removal chart's colours for base and the core sides; shades of purple for monolingual regions."""
    core = [s for s in settings if not s.startswith("mono-")]
    colours = figures._setting_colours(core)
    mono = [s for s in settings if s.startswith("mono-")]
    for i, s in enumerate(mono):
        colours[s] = figures.colormap("Purples")(0.45 + 0.5 * i / max(1, len(mono) - 1))[:3]
    return colours


def accuracy_chart(result: dict) -> bytes:
    """Accuracy per language and setting, with standard errors and the chance level."""
    settings, langs = result["settings"], result["languages"]
    fig, ax = figures.subplots(figsize=(max(7.0, 0.22 * len(settings) * len(langs) + 2.5), 4.5))
    series = {_label(s): {lang: 100 * result["accuracy"][s][lang]["acc"] for lang in langs} for s in settings}
    colours = {_label(s): c for s, c in _colours(settings).items()}
    offsets = figures._grouped_bars(ax, langs, series, colours)
    for off, s in zip(offsets, settings):
        ax.errorbar(
            np.arange(len(langs)) + off,
            [series[_label(s)][lang] for lang in langs],
            yerr=[100 * result["accuracy"][s][lang]["acc_stderr"] for lang in langs],
            fmt="none",
            ecolor="black",
            elinewidth=0.8,
            capsize=2,
        )
    ax.axhline(100 * _chance(result), color="black", ls="--", lw=1, label="chance")
    ax.set(
        ylim=(0, 100),
        ylabel="accuracy (%)",
        xlabel="language",
        title=f"{result['task']}: which ending completes the paragraph ({result['items'][langs[0]]} items each)",
    )
    fig.legend(
        *ax.get_legend_handles_labels(),
        loc="lower center",
        bbox_to_anchor=(0.5, 1.0),
        frameon=False,
        ncol=min(len(settings) + 1, 5),
        title="setting (side and share of parameters removed)",
    )
    fig.tight_layout()
    return figures.png(fig)


def _label(setting: str) -> str:
    return "Base" if setting == "base" else setting.replace("@", " ")


def _points(entry: dict | None) -> str:
    """An accuracy change and its interval in points: −12 [−25, 0] pts."""
    if not entry:
        return "—"
    lo, hi = entry["ci95"]
    return f"{100 * entry['value']:+.0f} [{100 * lo:+.0f}, {100 * hi:+.0f}] pts"


def findings(result: dict) -> list[str]:
    """Headline sentences computed from the numbers, each accuracy change with its verdict from a paired
    bootstrap over items (see `verdicts`)."""
    if "skipped" in result:
        return []
    out, chance, n = [], _chance(result), len(result["languages"])
    base = _mean(result, "base")
    v = verdicts(result)
    change = result.get("accuracy_change", {})
    for s in result["settings"][1:]:
        ppl = [result["perplexity"][s][lang]["ratio"] for lang in result["languages"]]
        e = change.get(s, {}).get("mean")
        out.append(
            f"Removing {_label(s)} changes mean multiple-choice accuracy over {n} languages from {base:.0%} "
            f"to {_mean(result, s):.0%}" + (f" ({_points(e)}, 95% interval)" if e else "") + f" (chance "
            f"{chance:.0%}), while perplexity is multiplied by {markup.fmt(min(ppl))}–{markup.fmt(max(ppl))}"
            + ("" if s.startswith("mono-") else f": removing it {v[s]['claim']} **{v[s]['verdict']}**")
            + (f" ({v[s]['reason']})" if "reason" in v[s] else "")
            + "."
        )
    for s in [s for s in result["settings"] if s.startswith("mono-")]:
        lang = s[len("mono-") :]
        own = result["accuracy"][s][lang]["acc"] - result["accuracy"]["base"][lang]["acc"]
        others = [
            result["accuracy"][s][x]["acc"] - result["accuracy"]["base"][x]["acc"]
            for x in result["languages"]
            if x != lang
        ]
        if others:
            e = change.get(s, {}).get("own_minus_others")
            out.append(
                f"Removing {lang}'s monolingual region changes {lang} accuracy by {100 * own:+.0f} points, "
                f"the other languages' by {100 * sum(others) / len(others):+.0f} points on average"
                + (f" (difference {_points(e)})" if e else "")
                + f": it {v[s]['claim']} **{v[s]['verdict']}**"
                + (f" ({v[s]['reason']})" if "reason" in v[s] else "")
                + "."
            )
    return out


def section(result: dict) -> list:
    """Report blocks: accuracy ± standard error per language and setting, beside the perplexity ratio."""
    if "skipped" in result:
        return [
            markup.heading("Downstream: multiple-choice accuracy with a region removed"),
            markup.text(f"Not run: {result['skipped']}."),
        ]
    settings, langs, acc = result["settings"], result["languages"], result["accuracy"]
    head = ["Language"] + [_label(s) for s in settings]

    def cells(metric):
        return [
            [lang] + [f"{acc[s][lang][metric]:.0%} ± {acc[s][lang][metric + '_stderr']:.0%}" for s in settings]
            for lang in langs
        ]

    def ppl_cell(entry):
        return markup.cell({"value": entry["ratio"], "ci95": entry.get("ci95")})

    both = [
        [lang] + [f"{acc[s][lang]['acc']:.0%} · {ppl_cell(result['perplexity'][s][lang])}" for s in settings]
        for lang in langs
    ]
    n = result["items"][langs[0]]
    out = [
        markup.heading("Downstream: multiple-choice accuracy with a region removed"),
        markup.text(
            f"Built-in task `{result['task']}` (v{result['task_version']}): the first ~60% of a paragraph of "
            f"the Universal Declaration of Human Rights and four endings, one true, the others from other "
            f"articles; the same {n} items in every language. Scoring: {result['scoring']}. Regions: the core "
            f"Top / Bottom / Random {result['ratio']:g} of the summed importance"
            + (
                ", and the monolingual regions saved by the monolingual experiment"
                if any(s.startswith("mono-") for s in settings)
                else ""
            )
            + "."
        ),
        markup.table(
            head,
            both,
            caption="Accuracy · perplexity relative to Base with its 95% interval (paired block bootstrap). "
            f"Top should fall towards chance "
            f"({_chance(result):.0%}) as perplexity explodes; Bottom and Random should stay near Base.",
        ),
        _change_table(result),
        markup.figure(
            "figures/downstream.png",
            "Accuracy per language and setting with standard errors; the dashed "
            "line is chance. Look for the Top bars at the line and the others level with Base.",
        ),
        markup.table(
            head,
            cells("acc_norm"),
            caption="Accuracy per character of the candidate (acc_norm) ± "
            f"standard error over {n} items: the same picture without any length preference.",
        ),
    ]
    if result["lmeval"]:
        rows = []
        for task in next(iter(result["lmeval"].values())):
            for metric in ("acc", "acc_norm", "acc_not_first", "first_chosen"):
                vals = [result["lmeval"][s].get(task, {}).get(metric) for s in settings]
                if any(isinstance(v, (int, float)) for v in vals):
                    rows.append([task, metric] + [markup.fmt(v) if isinstance(v, (int, float)) else "—" for v in vals])
        out.append(
            markup.table(
                ["Task", "Metric"] + [_label(s) for s in settings],
                rows,
                caption="lm-eval tasks run in process on the same model object. acc_not_first: "
                "accuracy on documents whose answer is not the first choice; "
                "first_chosen: how often the first choice wins (near 1 = collapse).",
            )
        )
    return out


def _change_table(result: dict) -> dict:
    """Accuracy change from Base per language and setting, and its mean, with 95% intervals (text when none)."""
    change = result.get("accuracy_change")
    if not change:
        return markup.text("")
    settings = result["settings"][1:]
    rows = [[lang] + [_points(change[s][lang]) for s in settings] for lang in result["languages"]]
    rows.append(["mean"] + [_points(change[s]["mean"]) for s in settings])
    return markup.table(
        ["Language"] + [_label(s) for s in settings],
        rows,
        caption="Accuracy change from Base with its 95% interval (paired bootstrap over items, seeded; the same "
        f"items resampled for Base and the setting). Top is called a drop where the mean's interval lies below "
        f"−{100 * DROP:.0f} points; Bottom and Random harmless where it lies above. " + uncertainty.RULE,
    )


def validate(cfg) -> None:
    """Refuse task languages the built-in task lacks, a ratio outside (0, 1), and unknown lm-eval tasks."""
    known = set(tasks.languages())
    bad = [lang for lang in cfg.down_langs if lang not in known]
    if bad or not cfg.down_langs:
        raise LingregionError(
            f"down_langs {', '.join(bad) or '(empty)'}: the {tasks.TASK} task has {', '.join(sorted(known))}"
        )
    if not 0 < cfg.down_ratio < 1:
        raise LingregionError(f"down_ratio {cfg.down_ratio} is outside (0, 1); pass a fraction such as 0.01")
    if cfg.down_items is not None and cfg.down_items < 1 or cfg.down_batch < 1:
        raise LingregionError("down_items (or null for all) and down_batch must be ≥ 1")
    if cfg.down_lmeval_tasks:
        tasks.check_lmeval_tasks(cfg.down_lmeval_tasks)
