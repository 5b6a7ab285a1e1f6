"""The paper's Table 1: remove the Top / Bottom / Random k% of the core score and measure every language."""

from __future__ import annotations

from .. import blocks, evaluation, figures, interventions
from ..store import write_bytes
from .runfolder import Run

NAME = "removal"
DOC = "Table 1: remove Top/Bottom/Random k% of the core region"


def run(run: Run) -> dict:
    """Perplexity of every evaluation language with the Top / Bottom / Random k% of the core score
    removed, against the unmodified model, and what the removed entries were before removal."""
    cfg, langs = run.cfg, run.cfg.eval_langs
    core = run.core_scores()
    params = dict(run.model.named_parameters())
    table = {"base": run.evaluate("removal.json", "base", [], langs)}
    regions, figs = {}, run.out / "figures"
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
            already = sum(
                int((params[n].detach().reshape(-1)[region.indices(n)] == run.removed[n]).sum()) for n in region.packed
            )
            regions[setting] = {
                "entries": region.count(),
                "of": region.total(),
                "already_at_removed_value": already / max(region.count(), 1),
            }
    zero = sum(int((params[n] == run.removed[n]).sum()) for n in run.names)
    result = {
        "experiment": "removal",
        "settings": list(table),
        "languages": langs,
        "table": table,
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


def table(result: dict, metric: str = "ppl") -> tuple[list[str], list[list[str]]]:
    settings, t = result["settings"], result["table"]
    head = ["Language"] + [s.replace("@", " ") if s != "base" else "Base" for s in settings]
    return head, [[lang] + [blocks.fmt(t[s][lang][metric]) for s in settings] for lang in result["languages"]]


def _ratios(result: dict, setting: str) -> list[float]:
    t = result["table"]
    return [t[setting][lang]["ppl"] / t["base"][lang]["ppl"] for lang in result["languages"]]


def findings(result: dict) -> list[str]:
    """Headline sentences computed from the numbers."""
    fmt, out = blocks.fmt, []
    for setting in result["settings"]:
        if setting == "base":
            continue
        r = _ratios(result, setting)
        out.append(
            f"Removing {setting.replace('@', ' ')} of the core score multiplies perplexity by "
            f"{fmt(min(r))}–{fmt(max(r))} (median {fmt(sorted(r)[len(r) // 2])}) across {len(r)} languages."
        )
    return out


def section(result: dict) -> list:
    """(head, rows) of one metric per language and setting, Base first: the paper's Table 1 layout."""
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
        blocks.heading(f"Removal (the paper's Table 1): core region of {langs}"),
        blocks.text(
            f"Per-{scope} Top / Bottom / Random (seed {result.get('seed', 0)}) k% of the summed importance, over "
            f"{result['scored_parameters']:,} transformer-layer parameters, set to their removed value."
        ),
        blocks.table(
            *table(result, "ppl"),
            caption="Perplexity. Top should wipe out every language; Bottom and Random should stay near Base.",
        ),
        blocks.figure(
            "figures/removal.png",
    """Report blocks: Table 1 in perplexity and in bits per byte, the chart, notes, and where the region lies."""
            "Perplexity and bits per byte per language and setting (log scale): "
            "the Top bars tower over Base, Bottom and Random.",
        ),
        blocks.table(
            *table(result, "bpb"),
            caption="Bits per byte: comparable across languages and tokenizers, unlike per-token perplexity.",
        ),
        blocks.bullets(notes),
        blocks.figure(
            "figures/core-grid.png",
            "Where the largest Top region sits: share of region members in each "
            "3×3 neighbourhood, layers × matrix types (rows are outputs, columns inputs). Look for whole "
            "rows, columns and heads rather than a uniform spread.",
        ),
        blocks.figure("figures/core-q_proj.png", "The first layer's q_proj at full detail, head boundaries marked."),
    ]
