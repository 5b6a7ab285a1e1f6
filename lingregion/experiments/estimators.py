"""Beyond the paper: which importance estimator finds the parameters that matter most, how much the
estimators agree, and whether the core region is specific to language or just the model's generally
important parameters (the question the paper leaves open).

Every estimator scores the same six languages' windows in one pass (`lingregion.importance`); its Top k% is
removed and the damage measured as the mean log-perplexity ratio over the evaluation languages,
mean_L ln(ppl_removed / ppl_base) = mean_L (NLL_removed − NLL_base) / tokens_L, each language's capped where
the model does worse than a uniform guess over its vocabulary, with Random k% as the floor. The Taylor
estimate is recomputed in that pass at the same token budget as the others (the per-window gradients give
the paper's g_L for free), so that every estimator sees the same data.

Specificity controls, each a Top region of the same size as the core region (except the outlier
dimensions, which are whole rows and columns): the core region from a language none of the six (English),
from the six languages' windows with their tokens shuffled within each window (same tokens, no word
order), the magnitude of the weights (no data at all), and the most massive residual dimensions.

Stability and language specificity of each estimator's per-language regions come from the same pass: the
split-half Jaccard of a language's Top k%, and how much more a language's halves overlap than two
languages' halves do.

The pass and the regions cached from it live in `estimator_regions`, the damage and the specificity answer
in `estimator_damage`, the split-half stability and the recommendation in `estimator_stability`.
"""

from __future__ import annotations

from .. import figures, importance, interventions, markup
from ..corpus import Windows
from ..regions import select
from ..run import Run
from ..store import LingregionError, write_bytes
from .estimator_damage import (
    CORE,
    answer,
    answer_ratio,
    cap,
    compare,
    damage,
    damage_chart,
    leaders,
    mean,
    pct,
    saturated,
)
from .estimator_regions import made_of, outlier_dims, regions_and_stability, score_windows, shuffled, top_regions
from .estimator_stability import by_estimator, recommend, recommendation_text, stability_chart, stability_section

NAME = "estimators"

RESULTS = "estimators.json"


def measure(run: Run) -> dict:
    """Damage per estimator and ratio against Random, the estimators' overlap, and the specificity controls."""
    cfg, langs = run.cfg, run.cfg.est_eval_langs
    t = importance.Target(run.model, run.names, run.removed)
    vocab = run.model.get_output_embeddings().weight.shape[0]
    windows = [score_windows(run, lang) for lang in cfg.score_langs]
    ratios = sorted(set(cfg.est_ratios))
    scopes = {name: importance.get(name).scope or cfg.scope for name in cfg.est_estimators}
    regions, stability = regions_and_stability(run, t, windows, ratios, scopes)
    results: dict[str, dict] = {}
    base = results["base"] = run.evaluate(RESULTS, "base", [], langs, cfg.est_eval_tokens)

    def removed(setting: str, edits) -> dict[str, float]:
        """ln perplexity ratio per evaluation language with `edits` applied (evaluations cached)."""
        results[setting] = run.evaluate(RESULTS, setting, edits, langs, cfg.est_eval_tokens)
        return damage(base, results[setting], vocab)

    shapes = {n: run.model.get_parameter(n) for n in run.names}  # Random needs only the shapes
    regions["random"] = {r: select(shapes, r, "random", cfg.scope, cfg.seed) for r in ratios}
    per_lang, curves, entries = _curves(run, regions, ratios, removed)
    at = cfg.est_overlap_ratio
    tops = {name: regions[name][at] for name in cfg.est_estimators}
    jaccard = {a: {b: tops[a].jaccard(tops[b]) for b in tops} for a in tops}
    specificity, dims, en_windows = _specificity(run, t, windows, ratios, regions, removed, per_lang)
    table = by_estimator(stability, curves, f"{at:g}")
    result = {
        **_settings(run, scopes, ratios),
        "scored_parameters": sum(p.numel() for p in shapes.values()),
        "vocab": vocab,
        "base": base,
        "results": results,
        "damage": curves,
        "damage_by_language": per_lang,
        "entries": entries,
        "cap": cap(base, vocab),
        "jaccard": jaccard,
        "chance_jaccard": at / (2 - at),
        "specificity": specificity,
        "outlier_dims": dims,
        **run.eval_record(langs, cfg.est_eval_tokens),
        "score_windows": {w.lang: w.meta for w in windows + en_windows},
        "stability": stability,
        "by_estimator": table,
        "recommendation": recommend(table),
        "figures": [
            "figures/estimators-damage.png",
            "figures/estimators-jaccard.png",
            "figures/estimators-stability.png",
        ],
    }
    result["answer"] = answer(result)
    _write_figures(run, result)
    run.save("estimators", result)
    return result


def _curves(run: Run, regions: dict, ratios: list[float], removed) -> tuple[dict, dict, dict]:
    """Each estimator's and Random's Top k% removed at every k: the damage per evaluation language and
    setting, each estimator's damage curve (its mean over languages per k), and each region's entries."""
    per_lang, curves, entries = {}, {}, {}
    for name in [*run.cfg.est_estimators, "random"]:
        for r in ratios:
            setting = f"{name}@{r:g}"
            per_lang[setting] = removed(setting, interventions.removal(regions[name][r], run.removed))
            entries[setting] = regions[name][r].count()
        curves[name] = {f"{r:g}": mean(per_lang[f"{name}@{r:g}"].values()) for r in ratios}
    return per_lang, curves, entries


def _settings(run: Run, scopes: dict[str, str], ratios: list[float]) -> dict:
    """The summary's opening: the estimators with their definitions and scopes, the ratios, and the
    languages and token budgets of scoring and evaluation."""
    cfg = run.cfg
    return {
        "experiment": "estimators",
        "estimators": cfg.est_estimators,
        "definitions": {n: " ".join(importance.get(n).doc.split()) for n in cfg.est_estimators},
        "scopes": scopes,
        "ratios": [f"{r:g}" for r in ratios],
        "overlap_ratio": f"{cfg.est_overlap_ratio:g}",
        "score_languages": cfg.score_langs,
        "eval_languages": cfg.est_eval_langs,
        "control_language": cfg.est_control_lang,
        "tokens_per_language": cfg.est_tokens,
        "score_seq_len": cfg.est_seq_len or cfg.seq_len,
        "eval_tokens_per_language": cfg.est_eval_tokens,
    }


def _write_figures(run: Run, result: dict) -> None:
    """figures/: the damage curves, the estimators as points of stability and specificity, and their overlap."""
    figs, jaccard = run.out / "figures", result["jaccard"]
    write_bytes(figs / "estimators-damage.png", damage_chart(result))
    write_bytes(figs / "estimators-stability.png", stability_chart(result))
    names = list(jaccard)
    write_bytes(
        figs / "estimators-jaccard.png",
        figures.matrix_heatmap(
            names,
            names,
            [[jaccard[a][b] for b in names] for a in names],
            f"Jaccard overlap of Top {run.cfg.est_overlap_ratio:g} regions",
            "Jaccard",
            "estimator",
            "estimator",
        ),
    )


def _specificity(
    run: Run, t: importance.Target, windows: list[Windows], ratios: list[float], regions: dict, removed, per_lang: dict
) -> tuple[dict, list[int], list[Windows]]:
    """At every k, the core region against Taylor regions of its size from the control language alone and
    from the token-shuffled windows, the magnitude region, the outlier dimensions and Random."""
    cfg = run.cfg
    control_windows = {
        f"{cfg.est_control_lang}-only": [score_windows(run, cfg.est_control_lang)],
        "shuffled": [shuffled(w, cfg.seed) for w in windows],
    }
    made = {label: made_of(run, CORE, ws, cfg.scope) for label, ws in control_windows.items()}
    controls = top_regions(
        run,
        list(control_windows),
        ratios,
        made,
        {label: cfg.scope for label in control_windows},
        lambda which: ((label, importance.score(CORE, t, control_windows[label], run.progress)) for label in which),
    )
    dims, fixed = [], {}
    if cfg.est_outlier_dims:
        dims, edits, region = outlier_dims(run, windows)
        setting = f"outlier-dims-{'-'.join(map(str, dims))}"
        per_lang[setting] = removed(setting, edits)
        fixed["outlier-dims"] = (region, setting)
    specificity = {}
    for r in ratios:
        compared = {"core": (regions[CORE][r], f"{CORE}@{r:g}")}
        for label, by_ratio in controls.items():
            setting = f"control-{label}@{r:g}"
            per_lang[setting] = removed(setting, interventions.removal(by_ratio[r], run.removed))
            compared[label] = (by_ratio[r], setting)
        if "magnitude" in regions:
            compared["magnitude"] = (regions["magnitude"][r], f"magnitude@{r:g}")
        compared.update(fixed)
        compared["random"] = (regions["random"][r], f"random@{r:g}")
        specificity[f"{r:g}"] = compare(compared, per_lang)
    return specificity, dims, control_windows[f"{cfg.est_control_lang}-only"]


def findings(result: dict) -> list[str]:
    """Which estimator does the most damage with the fewest parameters: the smallest k decides, the next
    k breaks ties; and the specificity answer's first sentence."""
    d, ratios = result["damage"], result["ratios"]
    tied, k = leaders(result, ratios[0]), 0
    while len(tied) > 1 and k + 1 < len(ratios):
        k += 1
        tied = [n for n in leaders(result, ratios[k]) if n in tied] or tied
    r0, full = ratios[0], saturated(result)
    rest = sorted((n for n in d if n not in ("random", *tied)), key=lambda n: -d[n][r0])
    who = " and ".join(tied) + (" tie" if len(tied) > 1 else "")
    text = (
        f"Removing the Top {pct(r0)} of each importance estimator's scores, {who} "
        f"{'do' if len(tied) > 1 else 'does'} the most damage (mean ln perplexity ratio {markup.fmt(d[tied[0]][r0])}"
        + (", every language past a uniform guess" if tied[0] in full[r0] else "")
        + f"; then {', '.join(f'{n} {markup.fmt(d[n][r0])}' for n in rest)}; Random {markup.fmt(d['random'][r0])})"
        + (f", with ties broken at {pct(ratios[k])}." if k else ".")
    )
    out = [text, result["answer"].split(". ")[0].rstrip(".") + "."]
    if "recommendation" in result:
        out.append(recommendation_text(result))
    return out


def section(result: dict) -> list:
    """Report blocks: the damage curves, the estimators' overlap, and the specificity of the core region."""
    return [
        markup.heading("Importance estimators and the specificity of the core region"),
        *_damage_blocks(result),
        *_overlap_blocks(result),
        *stability_section(result),
        *_specificity_blocks(result),
    ]


def _damage_blocks(result: dict) -> list:
    """How the estimators are compared, what each one is, and their damage curves as a table and a figure."""
    fmt, ratios, curves = markup.fmt, result["ratios"], result["damage"]
    return [
        markup.text(
            f"Each estimator scores {', '.join(result['score_languages'])} ({result['tokens_per_language']:,} "
            f"tokens each in windows of {result['score_seq_len']}, one pass for all); its Top k% is set to the "
            f"removed value and the damage is the mean ln(perplexity ratio) over "
            f"{', '.join(result['eval_languages'])} ({result['eval_tokens_per_language']:,} tokens each). "
            "Selection scope: " + ", ".join(f"{n} {s}" for n, s in result["scopes"].items()) + "."
        ),
        markup.bullets([f"**{n}**: {d}" for n, d in result["definitions"].items()]),
        markup.table(
            ["estimator", *map(pct, ratios)],
            [[n, *[fmt(curves[n][r]) for r in ratios]] for n in curves],
            caption="Damage (mean ln perplexity ratio) per share removed: the best estimator does the most "
            "damage at the smallest k; Random is the floor. Each language's ratio is capped where the "
            f"model does worse than a uniform guess over its {result['vocab']:,} tokens (mean cap "
            f"{fmt(mean(result['cap'].values()))}): beyond it a model is destroyed either way.",
        ),
        markup.figure(
            "figures/estimators-damage.png",
            "Damage against the share removed (log x): the higher a line "
            "starts on the left, the better the estimator finds what matters.",
        ),
    ]


def _overlap_blocks(result: dict) -> list:
    """The Jaccard overlap of the estimators' Top regions, as a table and a heat map."""
    names = [n for n in result["damage"] if n != "random"]
    return [
        markup.table(
            ["", *names],
            [[a, *[f"{result['jaccard'][a][b]:.3f}" for b in names]] for a in names],
            caption=f"Jaccard overlap of the Top {pct(result['overlap_ratio'])} regions (chance "
            f"{result['chance_jaccard']:.4f}): which estimators find the same parameters?",
        ),
        markup.figure("figures/estimators-jaccard.png", "The overlap as a heat map."),
    ]


def _specificity_blocks(result: dict) -> list:
    """The controls against the core region at every k, their damage per language at the k the answer is read
    at, and the answer."""
    fmt, ratios, spec = markup.fmt, result["ratios"], result["specificity"]
    r0 = answer_ratio(result) or ratios[0]
    labels = list(spec[r0])
    settings = [spec[r0][label]["setting"] for label in labels]
    return [
        markup.heading("Is the core region specific to language?", 3),
        markup.table(
            ["k", "region", "entries", "Jaccard with core", "share in core", "damage", "of core's damage"],
            [
                [
                    pct(r),
                    label,
                    f"{s['entries']:,}",
                    f"{s['jaccard_core']:.3f}",
                    f"{s['share_in_core']:.1%}",
                    fmt(s["damage"]),
                    f"{s['relative_damage'] + 0.0:.0%}",
                ]
                for r in ratios
                for label, s in spec[r].items()
            ],
            caption="Controls against the core region of the same k (the outlier dimensions are whole rows "
            "and columns, of fixed size): a control that overlaps it and does as much damage above "
            "Random means the core region is not about the six languages.",
        ),
        markup.table(
            ["language", *labels],
            [
                [lang, *[fmt(result["damage_by_language"][s][lang]) for s in settings]]
                for lang in result["eval_languages"]
            ],
            caption=f"ln perplexity ratio per evaluation language at {pct(r0)}: does a control hurt some "
            "languages (e.g. its own) more than the core region does?",
        ),
        markup.text(result["answer"]),
    ]


def validate(cfg) -> None:
    """Refuse unknown estimators, a list without the core's, lape with one language, and bad ratios or budgets."""
    for name in cfg.est_estimators:
        importance.get(name)
    if CORE not in cfg.est_estimators:
        raise LingregionError(
            f"--est-estimators must include {CORE}: its region is the core region the controls are compared with"
        )
    if "lape" in cfg.est_estimators and len(cfg.score_langs) < 2:
        raise LingregionError("the lape estimator compares languages: pass at least two --score-langs or drop lape")
    for r in cfg.est_ratios:
        if not 0 < r < 1:
            raise LingregionError(f"estimator ratio {r} is outside (0, 1); pass a fraction such as 0.01 for 1%")
    if cfg.est_overlap_ratio not in cfg.est_ratios:
        raise LingregionError(
            f"the overlap ratio {cfg.est_overlap_ratio} must be one of the estimator ratios {cfg.est_ratios}; add it"
        )
    if (
        cfg.est_tokens < 1
        or cfg.est_eval_tokens < 1
        or cfg.est_outlier_dims < 0
        or not cfg.est_eval_langs
        or (cfg.est_seq_len is not None and cfg.est_seq_len < 2)
    ):
        raise LingregionError(
            "estimator token budgets must be ≥ 1, est_seq_len ≥ 2, outlier dimensions ≥ 0, and at "
            "least one evaluation language given"
        )
