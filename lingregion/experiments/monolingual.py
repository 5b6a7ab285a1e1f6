"""The paper's Table 5 and beyond: each language's monolingual region S_L* = S_L − ∪ S_L', what removing it
does to every language, how the regions overlap and where they sit, and what generation looks like."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .. import blocks, evaluation, figures, interventions, scoring
from ..regions import Region, matching, monolingual, select
from ..store import LingregionError, write_bytes
from .runfolder import Run

NAME = "monolingual"
DOC = "Table 5: monolingual regions, interaction matrix, generations"

RELATED = {
    "ru": ["uk"],
    "uk": ["ru"],
    "es": ["pt", "it"],
    "pt": ["es", "it"],
    "it": ["es", "pt"],
    "zh": ["ja"],
    "ja": ["zh"],
}
PROMPTS = {  # the paper's generation case, in several languages
    "en": "There are 365 days in a year and 12",
    "ar": "هناك 365 يومًا في السنة و 12",
    "zh": "一年有365天和12",
    "ru": "В году 365 дней и 12",
    "es": "Hay 365 días en un año y 12",
}


def _tops(run: Run, langs: list[str], budget: int | None) -> tuple[dict[str, Region], dict[str, torch.Tensor]]:
    """Each language's per-matrix Top set, and the summed score (for the core region), one language's
    scores in memory at a time."""
    tops, total = {}, {}
    for lang in tqdm(langs, desc="language Top sets", disable=not run.progress):
        s = run.scores(lang, budget)
        tops[lang] = select(
            s,
            run.cfg.mono_ratio,
            "top",
            meta={"model": run.info["fingerprint"], "languages": [lang], "estimator": "taylor", "label": f"top-{lang}"},
        )
        scoring.accumulate(total, s)
    return tops, total


def run(run: Run) -> dict:
    """Table 5 and beyond: each language's monolingual region S_L* = S_L − ∪ S_L', the languages ×
    languages interaction matrix of its removal, a same-size Bottom control, generation cases, and
    where the regions sit (overlaps, layers, matrix types)."""
    cfg, langs, evals = run.cfg, run.cfg.mono_langs, run.cfg.eval_langs
    budget, small = cfg.mono_eval_tokens, max(cfg.score_tokens // 4, cfg.seq_len)
    tops, core_scores = _tops(run, langs, None)
    core = select(core_scores, cfg.mono_ratio, "top", meta={"label": "core", "languages": langs})
    del core_scores
    monos = {lang: monolingual(tops, lang) for lang in langs}
    for lang, region in monos.items():
        region.save(run.out / "regions" / f"monolingual-{lang}-{cfg.mono_ratio:g}.safetensors")

    base = run.evaluate("monolingual.json", "base", [], evals, budget)
    removed = {
        lang: run.evaluate(
            "monolingual.json", f"mono-{lang}", interventions.removal(monos[lang], run.removed), evals, budget
        )
        for lang in langs
    }
    ratio = {lang: {e: removed[lang][e]["ppl"] / base[e]["ppl"] for e in evals} for lang in langs}

    # Table 5 layout for the focus language at two scoring budgets; Bottom of the same size is the control.
    focus, table5 = cfg.mono_focus, {}
    for label, b in (("full", None), ("quarter", small)):
        f_tops = tops if b is None else _tops(run, langs, b)[0]
        f_mono = monos[focus] if b is None else monolingual(f_tops, focus)
        bottom = matching(run.scores(focus, b), f_mono, "bottom", {"label": f"bottom-like-mono-{focus}"})
        table5[label] = {
            "score_tokens": cfg.score_tokens if b is None else b,
            "entries": f_mono.count(),
            "top": run.evaluate(
                "monolingual.json",
                f"mono-{focus}" if b is None else f"mono-{focus}@{b}",
                interventions.removal(f_mono, run.removed),
                evals,
                budget,
            ),
            "bottom": run.evaluate(
                "monolingual.json",
                f"bottom-{focus}@{b or cfg.score_tokens}",
                interventions.removal(bottom, run.removed),
                evals,
                budget,
            ),
        }

    generations = {"base": evaluation.generate(run.model, run.tokenizer, PROMPTS, cfg.gen_tokens)}
    for lang in langs:
        with interventions.applied(run.model, interventions.removal(monos[lang], run.removed)):
            generations[f"mono-{lang}"] = evaluation.generate(run.model, run.tokenizer, PROMPTS, cfg.gen_tokens)

    related = {}
    for lang in langs:
        kin = [r for r in RELATED.get(lang, []) if r in evals]
        rest = sorted(ratio[lang][e] for e in evals if e != lang and e not in kin)
        if kin and rest:
            related[lang] = {
                "related": {r: ratio[lang][r] for r in kin},
                "others_median": rest[len(rest) // 2],
                "own": ratio[lang].get(lang),
            }
    distributions = {
        "core": figures.region_distribution(core),
        **{f"mono-{lang}": figures.region_distribution(monos[lang]) for lang in langs},
    }
    result = {
        "experiment": "monolingual",
        "languages": langs,
        "eval_languages": evals,
        "ratio": cfg.mono_ratio,
        "focus": focus,
        "sizes": {
            lang: {
                "entries": monos[lang].count(),
                "top_entries": tops[lang].count(),
                "share": monos[lang].count() / monos[lang].total(),
            }
            for lang in langs
        },
        "base": base,
        "removed": removed,
        "ppl_ratio": ratio,
        "table5": table5,
        "related": related,
        "jaccard": {a: {b: tops[a].jaccard(tops[b]) for b in langs} for a in langs},
        "distribution": distributions,
        "generations": generations,
        "prompts": PROMPTS,
        "protocol": evaluation.protocol(run.windows(evals[0], "eval", budget), cfg.dtype),
        "eval_windows": {e: run.windows(e, "eval", budget).meta for e in evals},
        "score_windows": {lang: run.windows(lang, "score").meta for lang in langs},
    }
    figs = run.out / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    write_bytes(
        figs / "interaction.png",
        figures.matrix_heatmap(
            langs,
            evals,
            [[ratio[a][e] for e in evals] for a in langs],
            "Perplexity ratio (removed / base)",
            "perplexity ratio",
            "monolingual region removed",
            "evaluation language",
            log=True,
        ),
    )
    write_bytes(
        figs / "jaccard.png",
        figures.matrix_heatmap(
            langs,
            langs,
            [[result["jaccard"][a][b] for b in langs] for a in langs],
            f"Jaccard overlap of Top {cfg.mono_ratio:g} sets",
            "Jaccard",
            "language",
            "language",
        ),
    )
    write_bytes(
        figs / "distribution.png",
        figures.distribution_plot(
            {k: v for k, v in distributions.items() if k == "core" or k in {f"mono-{x}" for x in langs[:4]}}
        ),
    )
    layers = sorted({str(k) for d in distributions.values() for k in d["by_layer"]}, key=int)
    write_bytes(
        figs / "distribution-layers.png",
        figures.matrix_heatmap(  # every region, however many languages
            list(distributions),
            layers,
            [
                [100 * d["by_layer"].get(k, d["by_layer"].get(int(k), 0.0)) for k in layers]
                for d in distributions.values()
            ],
            "Share of each region per layer (%)",
            "share (%)",
            "region",
            "layer",
        ),
    )
    run.save("monolingual", result)
    return result


def validate(cfg) -> None:
    """Refuse a focus language that is not among the monolingual languages."""
    if cfg.mono_focus not in cfg.mono_langs:
        raise LingregionError(
            f"--mono-focus {cfg.mono_focus} is not among the monolingual languages "
            f"{','.join(cfg.mono_langs)}; add it or choose another"
        )


def findings(res: dict) -> list[str]:
    """For how many languages removing their own monolingual region hurts them most."""
    ratio, langs = res["ppl_ratio"], [lang for lang in res["languages"] if lang in res["eval_languages"]]
    own = [lang for lang in langs if ratio[lang][lang] == max(ratio[lang].values())]
    return [
        f"Removing a language's monolingual region (Top {res['ratio']:g} minus the other languages' Top sets) hurts "
        f"that language most for {len(own)} of {len(langs)} languages ({', '.join(own) or 'none'})."
    ]


def _ppl_of(results: dict):
    """A column of the Table 5 layout: perplexity by evaluation language."""
    return lambda e: results[e]["ppl"]


def section(res: dict) -> list:
    """Report blocks: region sizes, the interaction matrix, related languages, Table 5, generations, overlap."""
    fmt, langs, evals, ratio = blocks.fmt, res["languages"], res["eval_languages"], res["ppl_ratio"]
    out = [
        blocks.heading("Monolingual regions (the paper's Table 5, and beyond)"),
        blocks.text(
            f"S_L* = S_L − ∪ S_L', S_L the per-matrix Top {res['ratio']:g} of L's own score, over {', '.join(langs)}."
        ),
        blocks.table(
            ["", *langs],
            [
                ["entries", *[f"{res['sizes'][c]['entries']:,}" for c in langs]],
                ["share of parameters", *[f"{res['sizes'][c]['share']:.3%}" for c in langs]],
            ],
            caption="Size of each monolingual region: a small fraction of the Top set survives the set difference.",
        ),
        blocks.heading("Interaction matrix: perplexity ratio (removed / base)", 3),
        blocks.table(
            ["removed ↓ / eval →", *evals],
            [[r, *[f"{ratio[r][c]:.3f}" for c in evals]] for r in langs],
            caption="Rows: whose region is removed; columns: evaluation language. A language's own column "
            "should stand out.",
        ),
        blocks.figure(
            "figures/interaction.png", "The same matrix as a heat map (log colour scale): look for the diagonal."
        ),
        blocks.heading("Related languages", 3),
    ]
    lines = []
    for lang, rel in res["related"].items():
        kin = ", ".join(f"{k} ×{v:.3f}" for k, v in rel["related"].items())
        verdict = "yes" if all(v > rel["others_median"] for v in rel["related"].values()) else "no"
        own = f"own ×{rel['own']:.3f}, " if rel["own"] is not None else ""
        lines.append(f"remove {lang}: {own}related {kin}; median of the others ×{rel['others_median']:.3f} → {verdict}")
    out += [
        blocks.text("Does removing L's region hurt a related language more than the others?"),
        blocks.bullets(lines),
    ]
    focus, t5 = res["focus"], res["table5"]
    cols = {"Base": lambda e: res["base"][e]["ppl"]}
    for b in t5:
        for side in ("Top", "Bottom"):
            cols[f"{side} ({t5[b]['score_tokens']} tok)"] = _ppl_of(t5[b][side.lower()])
    out += [
        blocks.heading(f"Table 5 layout: the {focus} monolingual region (Top) against Bottom of the same size", 3),
        blocks.table(
            ["Language", *cols],
            [[e, *[fmt(f(e)) for f in cols.values()]] for e in evals],
            caption=f"Perplexity with {focus}'s region removed, at two scoring budgets: {focus} should rise "
            "far more than the others under Top, and nothing should move under Bottom.",
        ),
    ]
    gens = res["generations"]
    out += [
        blocks.heading("Generation cases (greedy)", 3),
        blocks.table(
            ["setting", *res["prompts"]],
            [[g, *[gens[g][c].replace("\n", " ").strip() or "∅" for c in res["prompts"]]] for g in gens],
            caption="Continuations of the paper's prompt: which language's output breaks when each region is removed?",
        ),
        blocks.heading("Overlap and location", 3),
        blocks.table(
            ["", *langs],
            [[a, *[f"{res['jaccard'][a][b]:.3f}" for b in langs]] for a in langs],
            caption=f"Jaccard overlap of the languages' Top {res['ratio']:g} sets: related languages should "
            "overlap more.",
        ),
        blocks.figure("figures/jaccard.png", "The overlap as a heat map."),
    ]
    dist = res["distribution"]
    kinds = list(next(iter(dist.values()))["by_kind"])
    out += [
        blocks.table(
            ["region", *kinds],
            [[r, *[f"{dist[r]['by_kind'][c]:.1%}" for c in kinds]] for r in dist],
            caption="Share of each region by matrix type: where the core and the monolingual regions live.",
        ),
        blocks.figure(
            "figures/distribution.png",
            "Share of the core region and the first four monolingual regions per layer and per matrix type.",
        ),
        blocks.figure(
            "figures/distribution-layers.png",
            "Every region's share per layer: do the monolingual regions sit in the same layers as the core region?",
        ),
    ]
    return out
