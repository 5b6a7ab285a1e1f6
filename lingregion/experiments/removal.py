"""The paper's Table 1: remove the Top / Bottom / Random k% of the core score and measure every language."""

from __future__ import annotations

import math

from .. import evaluation, figures, interventions, markup, uncertainty
from ..run import Run
from ..store import write_bytes

NAME = "removal"


def measure(run: Run) -> dict:
    """Perplexity of every evaluation language with the Top / Bottom / Random k% of the core score
    removed, against the unmodified model, and what the removed entries were before removal."""
    cfg, langs = run.cfg, run.cfg.eval_langs
    core = run.core_scores()
    params = dict(run.model.named_parameters())
    table = {"base": run.evaluate("removal.json", "base", [], langs)}
    regions, figs = {}, run.out / "figures"
    draws: dict[str, dict[int, dict]] = {}
    for ratio in cfg.ratios:
        for side in cfg.sides:
            region = run.region(core, side, ratio)
            if side == "top" and ratio == max(cfg.ratios):  # the paper's Figure 2 / 9 for the largest Top
                write_bytes(figs / "core-grid.png", figures.region_grid(region))
                q = next((n for n in region.packed if "q_proj" in n), None)
                if q:
                    head_dim = getattr(run.model.config, "head_dim", None)
                    write_bytes(figs / "core-q_proj.png", figures.region_heatmap(region, q, head_dim))
            setting = f"{side}@{ratio:g}"
            table[setting] = run.evaluate("removal.json", setting, interventions.removal(region, run.removed), langs)
            if side == "random":  # further seeds: one draw is not a control (the paper's Random row is one)
                draws[setting] = {cfg.seed: table[setting]}
                for k in range(1, cfg.random_seeds):
                    other = run.region(core, side, ratio, draw=k)
                    edits = interventions.removal(other, run.removed)
                    draws[setting][cfg.seed + k] = run.evaluate(
                        "removal.json", f"{setting}/seed{cfg.seed + k}", edits, langs
                    )
                table[setting] = {lang: geometric_mean([d[lang] for d in draws[setting].values()]) for lang in langs}
            already = sum(
                int((params[n].detach().reshape(-1)[region.indices(n)] == run.removed[n]).sum()) for n in region.packed
            )
            regions[setting] = {
                "entries": region.count(),
                "of": region.total(),
                "already_at_removed_value": already / max(region.count(), 1),
            }
    ratios, intervals = _intervals(table, langs, cfg.seed)
    zero = sum(int((params[n] == run.removed[n]).sum()) for n in run.names)
    result = {
        "experiment": "removal",
        "settings": list(table),
        "languages": langs,
        "table": {
            s: {
                lang: {k: v for k, v in r.items() if k != "blocks"} | {"ci95": intervals[s][lang]}
                for lang, r in by_lang.items()
            }
            for s, by_lang in table.items()
        },
        "ratio": ratios,
        "ci95_method": uncertainty.method_record(seed=cfg.seed),
        "verdict_rule": uncertainty.RULE,
        "random_draws": {
            s: {str(seed): {lang: d[lang]["ppl"] for lang in langs} for seed, d in by_seed.items()}
            for s, by_seed in draws.items()
        },
        "regions": regions,
        "scope": cfg.scope,
        "seed": cfg.seed,
        "scored_parameters": sum(params[n].numel() for n in run.names),
        "share_already_at_removed_value": zero / sum(params[n].numel() for n in run.names),
        "protocol": evaluation.protocol(run.windows(langs[0], "eval"), cfg.dtype),
        "eval_windows": {lang: run.windows(lang, "eval").meta for lang in langs},
        "score_windows": {lang: run.windows(lang, "score").meta for lang in cfg.score_langs},
        "figures": ["figures/removal.png", "figures/core-grid.png", "figures/core-q_proj.png"],
    }
    write_bytes(figs / "removal.png", figures.removal_chart(result))
    run.save("removal", result)
    return result


def _intervals(table: dict, langs: list[str], seed: int) -> tuple[dict, dict]:
    """Each setting's perplexity ratio to Base with its paired 95% interval, and each setting's own
    intervals of perplexity and bits per byte (block bootstrap over the same text)."""
    ratios, own = {}, {}
    for s, by_lang in table.items():
        own[s] = {
            lang: {k: list(v) for k, v in uncertainty.bootstrap_ppl(by_lang[lang], seed=seed).items()} for lang in langs
        }
        if s != "base":
            ratios[s] = {
                lang: {
                    "value": uncertainty.ratio(by_lang[lang], table["base"][lang]),
                    "ci95": list(uncertainty.paired_bootstrap(by_lang[lang], table["base"][lang], seed=seed)),
                }
                for lang in langs
            }
            random = table.get(s.replace("top@", "random@"))
            if s.startswith("top@") and random:  # the paper's comparison, on the same text: paired
                for lang in langs:
                    ratios[s][lang]["vs_random"] = {
                        "value": uncertainty.ratio(by_lang[lang], random[lang]),
                        "ci95": list(uncertainty.paired_bootstrap(by_lang[lang], random[lang], seed=seed)),
                    }
    return ratios, own


def _pattern(result: dict) -> list[tuple[str, str, str, str]]:
    """Table 1's pattern as verdicts: (ratio, "Top" or "Bottom", language, verdict). Top hurts more than Random
    when the paired interval of ppl(Top) / ppl(Random) (geometric mean of the draws) lies above 2; Bottom is
    harmless when the interval of ppl(Bottom) / ppl(Base) lies below 1.1."""
    out, ratio = [], result.get("ratio", {})
    for r in sorted({s.split("@")[1] for s in ratio}, key=float):
        top, bottom = ratio.get(f"top@{r}"), ratio.get(f"bottom@{r}")
        for lang in result["languages"]:
            if top and "vs_random" in top[lang]:
                out.append((r, "Top", lang, uncertainty.verdict(tuple(top[lang]["vs_random"]["ci95"]), 2, "above")))
            if bottom:
                out.append((r, "Bottom", lang, uncertainty.verdict(tuple(bottom[lang]["ci95"]), 1.1, "below")))
    return out


def geometric_mean(results: list[dict]) -> dict:
    """One evaluation standing for several Random draws on the same text: NLL averaged over draws (block by
    block), so its perplexity and bits per byte are the geometric means of the draws'."""
    first, n = results[0], len(results)
    nll = sum(r["nll"] for r in results) / n
    out = {
        **first,
        "nll": nll,
        "ppl": math.exp(nll / first["tokens"]) if nll / first["tokens"] < 700 else math.inf,
        "bpb": nll / math.log(2) / first["bytes"],
        "draws": n,
    }
    if "blocks" in first:
        out["blocks"] = {**first["blocks"], "nll": [sum(v) / n for v in zip(*(r["blocks"]["nll"] for r in results))]}
    return out


def _ratios(result: dict, setting: str) -> list[float]:
    t = result["table"]
    return [t[setting][lang]["ppl"] / t["base"][lang]["ppl"] for lang in result["languages"]]


def findings(result: dict) -> list[str]:
    """Headline sentences computed from the numbers, each finding with its verdict."""
    fmt, out = markup.fmt, []
    for setting in result["settings"]:
        if setting == "base":
            continue
        r = _ratios(result, setting)
        out.append(
            f"Removing {setting.replace('@', ' ')} of the core score multiplies perplexity by "
            f"{fmt(min(r))}–{fmt(max(r))} (median {fmt(sorted(r)[len(r) // 2])}) across {len(r)} languages."
        )
    for s, by_seed in result.get("random_draws", {}).items():
        if len(by_seed) > 1:
            spread = [
                max(d[lang] for d in by_seed.values()) / min(d[lang] for d in by_seed.values())
                for lang in result["languages"]
            ]
            out.append(
                f"The {len(by_seed)} Random draws at {s.split('@')[1]} differ in perplexity by up to "
                f"×{fmt(max(spread))} per language (max / min over seeds)."
            )
    verdicts: dict[tuple[str, str], dict[str, list[str]]] = {}
    for r, kind, lang, v in _pattern(result):
        verdicts.setdefault((r, kind), {}).setdefault(v, []).append(lang)
    for (r, kind), by_verdict in verdicts.items():
        claim = (
            f"Top {r} removal at least doubles perplexity relative to Random {r}"
            if kind == "Top"
            else f"Bottom {r} removal leaves perplexity within 10% of Base"
        )
        parts = [f"**{v}** for {', '.join(langs)}" for v, langs in sorted(by_verdict.items())]
        out.append(f"{claim}: " + "; ".join(parts) + " (95% paired bootstrap intervals).")
    return out


def ratio_table(result: dict) -> tuple[list[str], list[list[str]]]:
    """Perplexity ratio to Base per language and setting, with its 95% interval: ×3.91 [2.8, 5.6]."""
    settings = [s for s in result["settings"] if s != "base"]
    head = ["Language"] + [s.replace("@", " ") for s in settings]
    return head, [
        [lang] + [markup.interval_cell(result["ratio"][s][lang]) for s in settings] for lang in result["languages"]
    ]


def section(result: dict) -> list:
    """Report blocks: Table 1 in perplexity and in bits per byte, the chart, notes, and where the region lies."""
    langs = ", ".join(result["score_windows"])
    notes = [
        f"{result['share_already_at_removed_value']:.2%} of the scored parameters already sit at their removed "
        "value (exactly-zero weights from the 4-bit source, or norm weights at −1), so their importance is 0: "
        "a Bottom region is drawn from them first, and removing them changes nothing."
    ]
    notes += [
        f"Of the {s.replace('@', ' ')} region's {info['entries']:,} entries, {info['already_at_removed_value']:.1%} "
        "were already at their removed value."
        for s, info in result["regions"].items()
        if s.startswith("bottom")
    ]
    scope = result.get("scope", "matrix")
    return [
        markup.heading(f"Removal (the paper's Table 1): core region of {langs}"),
        markup.text(
            f"Per-{scope} Top / Bottom / Random (seed {result.get('seed', 0)}) k% of the summed importance, over "
            f"{result['scored_parameters']:,} transformer-layer parameters, set to their removed value."
        ),
        markup.table(
            *markup.perplexity_table(result["table"], result["languages"], "ppl", result["settings"]),
            caption="Perplexity. Top should wipe out every language; Bottom and Random should stay near Base.",
        ),
        markup.table(
            *ratio_table(result),
            caption="Perplexity ratio to Base with its 95% interval (paired block bootstrap: Base and the setting "
            "resample the same blocks of text). Random is the geometric mean of "
            f"{max((len(d) for d in result.get('random_draws', {}).values()), default=1)} seeded draws.",
        )
        if "ratio" in result
        else markup.text(""),
        markup.text(uncertainty.RULE),
        markup.figure(
            "figures/removal.png",
            "Perplexity and bits per byte per language and setting (log scale): "
            "the Top bars tower over Base, Bottom and Random.",
        ),
        markup.table(
            *markup.perplexity_table(result["table"], result["languages"], "bpb", result["settings"]),
            caption="Bits per byte: comparable across languages and tokenizers, unlike per-token perplexity.",
        ),
        markup.bullets(notes),
        markup.figure(
            "figures/core-grid.png",
            "Where the largest Top region sits: share of region members in each "
            "3×3 neighbourhood, layers × matrix types (rows are outputs, columns inputs). Look for whole "
            "rows, columns and heads rather than a uniform spread.",
        ),
        markup.figure("figures/core-q_proj.png", "The first layer's q_proj at full detail, head boundaries marked."),
    ]
