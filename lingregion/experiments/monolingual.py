"""The paper's Table 5 and beyond: each language's monolingual region S_L* = S_L − ∪ S_L', what removing it
does to every language, how the regions overlap and where they sit, and what generation looks like."""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import evaluation, figures, interventions, markup, scoring, uncertainty
from ..regions import Region, matching, monolingual, select
from ..run import Run
from ..store import LingregionError, read_json, write_bytes

NAME = "monolingual"

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


def _tops(
    run: Run, langs: list[str], budget: int | None, estimator: str = "taylor"
) -> tuple[dict[str, Region], dict[str, torch.Tensor]]:
    """Each language's per-matrix Top set, and the summed score (for the core region), one language's
    scores in memory at a time."""
    tops, total = {}, {}
    for lang in tqdm(langs, desc="language Top sets", disable=not run.progress):
        s = run.scores(lang, budget, estimator)
        tops[lang] = select(
            s,
            run.cfg.mono_ratio,
            "top",
            meta={
                "model": run.info["fingerprint"],
                "languages": [lang],
                "estimator": estimator,
                "label": f"top-{lang}",
            },
        )
        scoring.accumulate(total, s)
    return tops, total


def _tag(estimator: str) -> str:
    """Suffix of region files and evaluation settings made with another estimator than the paper's."""
    return "" if estimator == "taylor" else f"-{estimator}"


def _paper_matrix(run: Run, langs: list[str], evals: list[str], budget: int, base: dict) -> dict:
    """The interaction matrix with the paper's taylor regions, beside another estimator's (its evaluations
    are the ones a taylor run makes, so they are shared through the cache)."""
    tops = _tops(run, langs, None)[0]
    monos = {lang: monolingual(tops, lang) for lang in langs}
    ratio = {}
    for lang in langs:
        r = run.evaluate(
            "monolingual.json", f"mono-{lang}", interventions.removal(monos[lang], run.removed), evals, budget
        )
        ratio[lang] = {e: r[e]["ppl"] / base[e]["ppl"] for e in evals}
    return {
        "estimator": "taylor",
        "ppl_ratio": ratio,
        "sizes": {lang: monos[lang].count() for lang in langs},
        "jaccard": {a: {b: tops[a].jaccard(tops[b]) for b in langs} for a in langs},
    }


def own_most(ratio: dict, langs: list[str]) -> list[str]:
    """The languages whose own column is the largest in their row of an interaction matrix."""
    return [lang for lang in langs if lang in ratio[lang] and ratio[lang][lang] == max(ratio[lang].values())]


def _comparison_blocks(res: dict) -> list:
    """The paper's interaction matrix beside this run's estimator's, when they differ."""
    if "paper_estimator" not in res:
        return []
    paper, est, langs, evals = res["paper_estimator"], res["estimator"], res["languages"], res["eval_languages"]
    mine, theirs = own_most(res["ppl_ratio"], langs), own_most(paper["ppl_ratio"], langs)
    n = len([lang for lang in langs if lang in evals])
    return [
        markup.heading(f"The same matrix with the paper's estimator (taylor) instead of {est}", 3),
        markup.table(
            ["removed ↓ / eval →", *evals],
            [[r, *[f"{paper['ppl_ratio'][r][c]:.3f}" for c in evals]] for r in langs],
            caption=f"Perplexity ratio with the monolingual regions from taylor scores (Top {res['ratio']:g} sets "
            "of the same scoring windows).",
        ),
        markup.text(
            f"A language's own column is the largest of its row for {len(mine)} of {n} languages with {est} "
            f"({', '.join(mine) or 'none'}) and for {len(theirs)} of {n} with taylor ({', '.join(theirs) or 'none'}). "
            "Region sizes (entries), "
            + ", ".join(f"{lang} {res['sizes'][lang]['entries']:,} vs {paper['sizes'][lang]:,}" for lang in langs)
            + f" ({est} vs taylor)."
        ),
    ]


def measure(run: Run) -> dict:
    """Table 5 and beyond: each language's monolingual region S_L* = S_L − ∪ S_L', the languages ×
    languages interaction matrix of its removal, a same-size Bottom control, generation cases, and
    where the regions sit (overlaps, layers, matrix types)."""
    cfg, langs, evals = run.cfg, run.cfg.mono_langs, interaction_langs(run.cfg)
    budget = cfg.mono_eval_tokens
    est, tag = cfg.mono_estimator, _tag(cfg.mono_estimator)  # the paper's taylor keeps its names (no tag)
    tops, core, monos = _regions(run, langs, est, tag)
    base, removed, ratio, ratio_ci = _interaction(run, monos, evals, budget, tag)
    table5 = _table5(run, tops, monos, est, tag)
    generations = _generations(run, monos)
    related = _related(ratio, ratio_ci, langs, evals)
    distributions = {
        "core": figures.region_distribution(core),
        **{f"mono-{lang}": figures.region_distribution(monos[lang]) for lang in langs},
    }
    result = {
        "experiment": "monolingual",
        "languages": langs,
        "eval_languages": evals,
        "ratio": cfg.mono_ratio,
        "focus": cfg.mono_focus,
        "sizes": _sizes(tops, monos),
        "base": base,
        "removed": removed,
        "ppl_ratio": ratio,
        "ppl_ratio_ci95": ratio_ci,
        "ci95_method": uncertainty.method_record(seed=cfg.seed),
        "resolution": resolution(run, langs),
        "tokens_for_jaccard_0.9": _needed_budget(run),
        "table5": table5,
        **({"estimator": est, "paper_estimator": _paper_matrix(run, langs, evals, budget, base)} if tag else {}),
        "related": related,
        "jaccard": {a: {b: tops[a].jaccard(tops[b]) for b in langs} for a in langs},
        "distribution": distributions,
        "generations": generations,
        "prompts": PROMPTS,
        "protocol": evaluation.protocol(run.windows(evals[0], "eval", budget), cfg.dtype),
        "eval_windows": {e: run.windows(e, "eval", budget).meta for e in evals},
        "score_windows": {lang: run.windows(lang, "score").meta for lang in langs},
    }
    _write_figures(run, result)
    run.save("monolingual", result)
    return result


def _regions(run: Run, langs: list[str], est: str, tag: str) -> tuple[dict[str, Region], Region, dict[str, Region]]:
    """Each language's Top set, the core region (Top of the summed score) and the monolingual regions
    S_L* = S_L − ∪ S_L', the latter saved under regions/."""
    cfg = run.cfg
    tops, core_scores = _tops(run, langs, None, est)
    core = select(core_scores, cfg.mono_ratio, "top", meta={"label": "core", "languages": langs})
    del core_scores
    monos = {lang: monolingual(tops, lang) for lang in langs}
    for lang, region in monos.items():
        region.save(run.out / "regions" / f"monolingual-{lang}-{cfg.mono_ratio:g}{tag}.safetensors")
    return tops, core, monos


def _interaction(
    run: Run, monos: dict[str, Region], evals: list[str], budget: int, tag: str
) -> tuple[dict, dict, dict, dict]:
    """The interaction matrix: Base, each monolingual region removed in turn evaluated on every evaluation
    language, the perplexity ratio to Base and its paired 95% interval."""
    seed = run.cfg.seed
    base = run.evaluate("monolingual.json", "base", [], evals, budget)
    removed = {
        lang: run.evaluate(
            "monolingual.json", f"mono-{lang}{tag}", interventions.removal(monos[lang], run.removed), evals, budget
        )
        for lang in monos
    }
    ratio = {lang: {e: removed[lang][e]["ppl"] / base[e]["ppl"] for e in evals} for lang in monos}
    ratio_ci = {
        lang: {e: list(uncertainty.paired_bootstrap(removed[lang][e], base[e], seed=seed)) for e in evals}
        for lang in monos
    }
    return base, removed, ratio, ratio_ci


def _table5(run: Run, tops: dict[str, Region], monos: dict[str, Region], est: str, tag: str) -> dict:
    """Table 5's layout for the focus language at two scoring budgets (the full one and a quarter of it):
    its monolingual region removed (Top) against Bottom of the same size, the control."""
    cfg = run.cfg
    langs, evals, budget, focus = cfg.mono_langs, interaction_langs(cfg), cfg.mono_eval_tokens, cfg.mono_focus
    small, table5 = max(cfg.score_tokens // 4, cfg.seq_len), {}
    for label, b in (("full", None), ("quarter", small)):
        f_tops = tops if b is None else _tops(run, langs, b, est)[0]
        f_mono = monos[focus] if b is None else monolingual(f_tops, focus)
        bottom = matching(run.scores(focus, b, est), f_mono, "bottom", {"label": f"bottom-like-mono-{focus}"})
        table5[label] = {
            "score_tokens": cfg.score_tokens if b is None else b,
            "entries": f_mono.count(),
            "top": run.evaluate(
                "monolingual.json",
                f"mono-{focus}{tag}" if b is None else f"mono-{focus}{tag}@{b}",
                interventions.removal(f_mono, run.removed),
                evals,
                budget,
            ),
            "bottom": run.evaluate(
                "monolingual.json",
                f"bottom-{focus}{tag}@{b or cfg.score_tokens}",
                interventions.removal(bottom, run.removed),
                evals,
                budget,
            ),
        }
    return table5


def _generations(run: Run, monos: dict[str, Region]) -> dict[str, dict[str, str]]:
    """Greedy continuations of PROMPTS by the model as it is and with each monolingual region removed."""
    gen_tokens = run.cfg.gen_tokens
    generations = {"base": evaluation.generate(run.model, run.tokenizer, PROMPTS, gen_tokens)}
    for lang, region in monos.items():
        with interventions.applied(run.model, interventions.removal(region, run.removed)):
            generations[f"mono-{lang}"] = evaluation.generate(run.model, run.tokenizer, PROMPTS, gen_tokens)
    return generations


def _related(ratio: dict, ratio_ci: dict, langs: list[str], evals: list[str]) -> dict:
    """For each language with related languages (RELATED) among the evaluated ones: what removing its region
    does to them, to itself and to the median other language, and the verdict from the intervals."""
    related = {}
    for lang in langs:
        kin = [r for r in RELATED.get(lang, []) if r in evals]
        rest = sorted(ratio[lang][e] for e in evals if e != lang and e not in kin)
        if kin and rest:
            others = [e for e in evals if e != lang and e not in kin]
            related[lang] = {
                "related": {r: ratio[lang][r] for r in kin},
                "others_median": rest[len(rest) // 2],
                "own": ratio[lang].get(lang),
                "verdict": {r: related_verdict(ratio_ci[lang][r], [ratio_ci[lang][e] for e in others]) for r in kin},
            }
    return related


def _sizes(tops: dict[str, Region], monos: dict[str, Region]) -> dict[str, dict]:
    """Each monolingual region's entries, its language's Top set's, and its share of the scored parameters."""
    return {
        lang: {
            "entries": monos[lang].count(),
            "top_entries": tops[lang].count(),
            "share": monos[lang].count() / monos[lang].total(),
        }
        for lang in monos
    }


def _write_figures(run: Run, result: dict) -> None:
    """figures/: the interaction matrix and the Top sets' overlap as heat maps, and where the regions sit
    (per layer and matrix type)."""
    langs, evals = result["languages"], result["eval_languages"]
    ratio, distributions = result["ppl_ratio"], result["distribution"]
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
            f"Jaccard overlap of Top {run.cfg.mono_ratio:g} sets",
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


def related_verdict(related: list[float], others: list[list[float]]) -> str:
    """Does removing L's region hurt a related language more than the others? Holds when the related
    language's 95% interval lies above the median of the others' upper bounds, does not hold when it lies
    below the median of their lower bounds, inconclusive otherwise: both sides' noise counts."""
    uppers, lowers = sorted(hi for _, hi in others), sorted(lo for lo, _ in others)
    if related[0] > uppers[len(uppers) // 2]:
        return uncertainty.HOLDS
    return uncertainty.FAILS if related[1] < lowers[len(lowers) // 2] else uncertainty.INCONCLUSIVE


def resolution(run: Run, langs: list[str]) -> dict:
    """Is each monolingual region more than sampling noise? L's own split-half overlap J(S_L^a, S_L^b) against
    its overlap with every other language at the same budget, J(S_L^a, S_L'^a), matrix by matrix: resolved
    when the 95% interval (bootstrap over matrices) of the mean within − max-between difference lies above 0."""
    halves = {lang: (run.half_region(lang, "a"), run.half_region(lang, "b")) for lang in langs}
    if any(a is None or b is None for a, b in halves.values()):
        return {}  # scored without split halves (split_halves off, or scores from an earlier run)
    rng, out = np.random.default_rng(run.cfg.seed), {}
    for lang in langs:
        within = halves[lang][0].matrix_jaccards(halves[lang][1])
        between = {o: halves[lang][0].matrix_jaccards(halves[o][0]) for o in langs if o != lang}
        closest = max(between, key=lambda o: between[o].mean())
        diff = within - between[closest]
        means = diff[rng.integers(0, len(diff), (uncertainty.RESAMPLES, len(diff)))].mean(1)
        lo, hi = np.quantile(means, [0.025, 0.975])
        out[lang] = {
            "within": float(within.mean()),
            "between": {o: float(v.mean()) for o, v in between.items()},
            "closest": closest,
            "difference": float(diff.mean()),
            "ci95": [float(lo), float(hi)],
            "verdict": uncertainty.verdict((float(lo), float(hi)), 0.0, "above"),
        }
    return out


def _needed_budget(run: Run) -> float | None:
    """The largest budget the stability experiment fitted for Jaccard 0.9, when it ran first."""
    path = run.out / "results" / "stability-summary.json"
    fitted = read_json(path).get("tokens_for_jaccard_0.9", {}) if path.is_file() else {}
    return max((v for v in fitted.values() if v), default=None)


def interaction_langs(cfg) -> list[str]:
    """The languages the interaction matrix evaluates: eval_langs, those among mono_eval_langs."""
    return [lang for lang in cfg.eval_langs if lang in cfg.mono_eval_langs]


def validate(cfg) -> None:
    """Refuse a focus language that is not among the monolingual languages, and an interaction matrix
    without languages."""
    if not interaction_langs(cfg):
        raise LingregionError(
            f"none of eval_langs ({','.join(cfg.eval_langs)}) is among mono_eval_langs "
            f"({','.join(cfg.mono_eval_langs)}); add one to --mono-eval-langs"
        )
    if cfg.mono_focus not in cfg.mono_langs:
        raise LingregionError(
            f"--mono-focus {cfg.mono_focus} is not among the monolingual languages "
            f"{','.join(cfg.mono_langs)}; add it or choose another"
        )


def findings(res: dict) -> list[str]:
    """For how many languages removing their own monolingual region hurts them most; whether related
    languages suffer more; whether the regions are resolved above sampling noise. Each with its verdict."""
    ratio, langs = res["ppl_ratio"], [lang for lang in res["languages"] if lang in res["eval_languages"]]
    own = [lang for lang in langs if ratio[lang][lang] == max(ratio[lang].values())]
    out = [
        f"Removing a language's monolingual region (Top {res['ratio']:g} minus the other languages' Top sets) hurts "
        f"that language most for {len(own)} of {len(langs)} languages ({', '.join(own) or 'none'}), by point "
        "estimate; the interaction table gives each ratio's interval."
    ]
    for lang, r in res.get("related", {}).items():
        for kin, v in r.get("verdict", {}).items():
            out.append(
                f"Removing {lang}'s region hurts the related {kin} more than the median other language: **{v}**."
            )
    res_ = res.get("resolution") or {}
    if res_:
        unresolved = [lang for lang, e in res_.items() if e["verdict"] != uncertainty.HOLDS]
        need = res.get("tokens_for_jaccard_0.9")
        out.append(
            f"Monolingual regions resolved above sampling noise (own split-half overlap clearly above the closest "
            f"other language's): **{uncertainty.HOLDS}** for "
            f"{', '.join(lang for lang in res_ if lang not in unresolved) or 'none'}"
            + (f"; **not resolved at this budget** for {', '.join(unresolved)}" if unresolved else "")
            + (
                f" (the stability fit asks for about {need:.1e} tokens per language)."
                if need
                else " (the stability section gives the budget a region needs)."
            )
        )
    return out


def _cell(res: dict, removed: str, evaluated: str) -> str:
    value, ci = res["ppl_ratio"][removed][evaluated], res.get("ppl_ratio_ci95", {}).get(removed, {}).get(evaluated)
    return f"×{value:.3g} [{ci[0]:.3g}, {ci[1]:.3g}]" if ci else f"{value:.3f}"


def _resolution_blocks(res: dict) -> list:
    rows = [
        [
            lang,
            f"{e['within']:.3f}",
            f"{e['closest']} {e['between'][e['closest']]:.3f}",
            f"{e['difference']:+.3f} [{e['ci95'][0]:+.3f}, {e['ci95'][1]:+.3f}]",
            e["verdict"],
        ]
        for lang, e in (res.get("resolution") or {}).items()
    ]
    if not rows:
        return []
    return [
        markup.table(
            ["Language", "own split-half J", "closest other (half vs half)", "difference [95%]", "resolved"],
            rows,
            caption=f"Is each language's Top {res['ratio']:g} set more than sampling noise? Its two halves must "
            "overlap clearly more than a half of it overlaps the closest other language's half "
            "(interval over matrices).",
        )
    ]


def _ppl_of(results: dict):
    """A column of the Table 5 layout: perplexity by evaluation language."""
    return lambda e: results[e]["ppl"]


def section(res: dict) -> list:
    """Report blocks: region sizes, the interaction matrix, related languages, Table 5, generations, overlap."""
    return [
        markup.heading("Monolingual regions (the paper's Table 5, and beyond)"),
        *_size_blocks(res),
        *_resolution_blocks(res),
        *_interaction_blocks(res),
        *_comparison_blocks(res),
        *_related_blocks(res),
        *_table5_blocks(res),
        *_generation_blocks(res),
        *_overlap_blocks(res),
    ]


def _size_blocks(res: dict) -> list:
    """What a monolingual region is, and how large each one came out."""
    langs = res["languages"]
    return [
        markup.text(
            f"S_L* = S_L − ∪ S_L', S_L the per-matrix Top {res['ratio']:g} of L's own score, over {', '.join(langs)}."
        ),
        markup.table(
            ["", *langs],
            [
                ["entries", *[f"{res['sizes'][c]['entries']:,}" for c in langs]],
                ["share of parameters", *[f"{res['sizes'][c]['share']:.3%}" for c in langs]],
            ],
            caption="Size of each monolingual region: a small fraction of the Top set survives the set difference.",
        ),
    ]


def _interaction_blocks(res: dict) -> list:
    """The interaction matrix with its intervals, and as a heat map."""
    langs, evals = res["languages"], res["eval_languages"]
    return [
        markup.heading("Interaction matrix: perplexity ratio (removed / base)", 3),
        markup.table(
            ["removed ↓ / eval →", *evals],
            [[r, *[_cell(res, r, c) for c in evals]] for r in langs],
            caption="Rows: whose region is removed; columns: evaluation language. A language's own column "
            "should stand out.",
        ),
        markup.figure(
            "figures/interaction.png", "The same matrix as a heat map (log colour scale): look for the diagonal."
        ),
    ]


def _related_blocks(res: dict) -> list:
    """Per language, what removing its region does to its related languages against the median other one."""
    lines = []
    for lang, rel in res["related"].items():
        kin = ", ".join(f"{k} ×{v:.3f}" for k, v in rel["related"].items())
        verdict = "yes" if all(v > rel["others_median"] for v in rel["related"].values()) else "no"
        own = f"own ×{rel['own']:.3f}, " if rel["own"] is not None else ""
        lines.append(f"remove {lang}: {own}related {kin}; median of the others ×{rel['others_median']:.3f} → {verdict}")
    return [
        markup.heading("Related languages", 3),
        markup.text("Does removing L's region hurt a related language more than the others?"),
        markup.bullets(lines),
    ]


def _table5_blocks(res: dict) -> list:
    """Table 5's layout: perplexity with the focus language's region (Top) or Bottom removed, at two budgets."""
    fmt, evals, focus, t5 = markup.fmt, res["eval_languages"], res["focus"], res["table5"]
    cols = {"Base": lambda e: res["base"][e]["ppl"]}
    for b in t5:
        for side in ("Top", "Bottom"):
            cols[f"{side} ({t5[b]['score_tokens']} tok)"] = _ppl_of(t5[b][side.lower()])
    return [
        markup.heading(f"Table 5 layout: the {focus} monolingual region (Top) against Bottom of the same size", 3),
        markup.table(
            ["Language", *cols],
            [[e, *[fmt(f(e)) for f in cols.values()]] for e in evals],
            caption=f"Perplexity with {focus}'s region removed, at two scoring budgets: {focus} should rise "
            "far more than the others under Top, and nothing should move under Bottom.",
        ),
    ]


def _generation_blocks(res: dict) -> list:
    """The greedy continuations of each prompt, with and without each region."""
    gens = res["generations"]
    return [
        markup.heading("Generation cases (greedy)", 3),
        markup.table(
            ["setting", *res["prompts"]],
            [[g, *[gens[g][c].replace("\n", " ").strip() or "∅" for c in res["prompts"]]] for g in gens],
            caption="Continuations of the paper's prompt: which language's output breaks when each region is removed?",
        ),
    ]


def _overlap_blocks(res: dict) -> list:
    """The Top sets' overlap, and where the core and monolingual regions sit by matrix type and layer."""
    langs, dist = res["languages"], res["distribution"]
    kinds = list(next(iter(dist.values()))["by_kind"])
    return [
        markup.heading("Overlap and location", 3),
        markup.table(
            ["", *langs],
            [[a, *[f"{res['jaccard'][a][b]:.3f}" for b in langs]] for a in langs],
            caption=f"Jaccard overlap of the languages' Top {res['ratio']:g} sets: related languages should "
            "overlap more.",
        ),
        markup.figure("figures/jaccard.png", "The overlap as a heat map."),
        markup.table(
            ["region", *kinds],
            [[r, *[f"{dist[r]['by_kind'][c]:.1%}" for c in kinds]] for r in dist],
            caption="Share of each region by matrix type: where the core and the monolingual regions live.",
        ),
        markup.figure(
            "figures/distribution.png",
            "Share of the core region and the first four monolingual regions per layer and per matrix type.",
        ),
        markup.figure(
            "figures/distribution-layers.png",
            "Every region's share per layer: do the monolingual regions sit in the same layers as the core region?",
        ),
    ]
