"""Beyond the paper: which importance estimator finds the parameters that matter most, how much the
estimators agree, and whether the core region is specific to language or just the model's generally
important parameters (the question the paper leaves open).

Every estimator scores the same six languages' windows in one pass (lingregion.estimators); its Top k% is
removed and the damage measured as the mean log-perplexity ratio over the evaluation languages,
mean_L ln(ppl_removed / ppl_base) = mean_L (NLL_removed − NLL_base) / tokens_L, each language's capped where
the model does worse than a uniform guess over its vocabulary, with Random k% as the floor. The Taylor
estimate is recomputed in that pass at the same token budget as the others (the per-window gradients give
the paper's g_L for free), so that every estimator sees the same data.

Specificity controls, each a Top region of the same size as the core region (except the outlier
dimensions, which are whole rows and columns): the core region from a language none of the six (English),
from the six languages' windows with their tokens shuffled within each window (same tokens, no word
order), the magnitude of the weights (no data at all), and the most massive residual dimensions.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import replace

import numpy as np
import torch

from .. import blocks, figures, importance, interventions, slices
from ..corpus import Windows, load_windows
from ..regions import Region, select
from ..store import LingregionError, write_bytes
from .runfolder import Run, digest

NAME = "estimators"
DOC = "Compare importance estimators; specificity of the core region"

RESULTS = "estimators.json"
CORE = "taylor"  # the paper's estimator: its region is the core region the controls are compared with
MIN_EFFECT = 0.1  # ln perplexity ratio (about +10%) the core region must do beyond Random for a comparison


def shuffled(windows: Windows, seed: int) -> Windows:
    """The same windows with their tokens in a random order within each window (a BOS stays first)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(windows.lang.encode()))
    keep = 1 if windows.meta.get("bos") else 0
    ids = [torch.cat([w[:keep], w[keep:][torch.randperm(len(w) - keep, generator=g)]]) for w in windows.input_ids]
    return replace(windows, input_ids=ids, meta=dict(windows.meta, shuffled_within_windows_seed=seed))


def cap(base: dict, vocab: int) -> dict[str, float]:
    """The largest damage counted per language: up to a uniform guess over the vocabulary (ln ppl = ln V)."""
    return {lang: max(math.log(vocab) - b["nll"] / b["tokens"], 0.0) for lang, b in base.items()}


def damage(base: dict, removed: dict, vocab: int) -> dict[str, float]:
    """ln(ppl_removed / ppl_base) per language, from the summed NLLs (finite even when perplexity is not),
    capped where the model does worse than a uniform guess over its vocabulary: past that point a larger
    number says how confidently wrong the model is, not that more of it was destroyed."""
    limit = cap(base, vocab)
    return {lang: min((removed[lang]["nll"] - b["nll"]) / b["tokens"], limit[lang]) for lang, b in base.items()}


def mean(values) -> float:
    """The arithmetic mean of a non-empty iterable."""
    values = list(values)
    return sum(values) / len(values)


def _region_path(run: Run, label: str, ratio: float):
    return run.out / "regions" / f"est-{label}-top-{ratio:g}.safetensors"


def _regions(
    run: Run, labels: list[str], ratios: list[float], made_of: dict[str, str], scopes: dict[str, str], compute
) -> dict[str, dict[float, Region]]:
    """Top regions of each label at each ratio: read back when made from the same inputs, otherwise
    `compute(labels)` yields the missing labels' (label, scores), each selected, saved and dropped in turn."""
    out, missing = {}, []
    for label in labels:
        paths = {r: _region_path(run, label, r) for r in ratios}
        if all(p.is_file() for p in paths.values()):
            loaded = {r: Region.load(p) for r, p in paths.items()}
            if all(reg.meta.get("made_of") == made_of[label] for reg in loaded.values()):
                out[label] = loaded
                continue
        missing.append(label)
    if missing:
        for label, scores in compute(missing):
            meta = {"model": run.info["fingerprint"], "label": label, "made_of": made_of[label]}
            out[label] = {r: select(scores, r, "top", scopes[label], run.cfg.seed, meta) for r in ratios}
            for r, region in out[label].items():
                region.save(_region_path(run, label, r))
            del scores
    return out


def _made_of(run: Run, what: str, windows: list[Windows], scope: str) -> str:
    return digest(
        {
            "fingerprint": run.info["fingerprint"],
            "names": run.names,
            "estimator": what,
            "scope": scope,
            "windows": [w.meta for w in windows],
            "dtype": run.cfg.dtype,
        }
    )


def _score_windows(run: Run, lang: str) -> Windows:
    """A language's scoring windows at the estimators' own budget and window length."""
    cfg = run.cfg
    return load_windows(
        run.tokenizer, lang, "score", cfg.est_seq_len or cfg.seq_len, cfg.est_tokens, cfg.texts.get(lang)
    )


def _outlier_dims(run: Run, windows: list[Windows]) -> tuple[list[int], list[interventions.Edit], Region]:
    """The most massive residual dimensions (first score window of each language), their removal from
    every matrix of every layer, and those entries as a region."""
    firsts = [replace(w, input_ids=w.input_ids[:1], n_bytes=w.n_bytes[:1]) for w in windows]
    scan = slices.scan(run.model, firsts, [], run.cfg.batch_size, run.progress)
    dims = sorted(int(d) for d in slices.ranking(scan.massive())[: run.cfg.est_outlier_dims])
    edits = [e for e in slices.dimension_removal(run.model, dims) if e.name in run.names]
    params = {n: run.model.get_parameter(n) for n in run.names}
    masks = {n: torch.zeros(p.shape, dtype=torch.bool) for n, p in params.items()}
    for e in edits:
        masks[e.name].view(-1)[e.index.cpu()] = True
    return dims, edits, Region.from_masks(masks, {"label": f"outlier-dims-{'-'.join(map(str, dims))}"})


def run(run: Run) -> dict:
    """Damage per estimator and ratio against Random, the estimators' overlap, and the specificity controls."""
    cfg, langs = run.cfg, run.cfg.est_eval_langs
    t = importance.Target(run.model, run.names, run.removed)
    vocab = run.model.get_output_embeddings().weight.shape[0]
    windows = [_score_windows(run, lang) for lang in cfg.score_langs]
    ratios = sorted(set(cfg.est_ratios))
    scopes = {name: importance.get(name).scope or cfg.scope for name in cfg.est_estimators}
    results: dict[str, dict] = {}

    def removed(setting: str, edits) -> dict[str, float]:
        """ln perplexity ratio per evaluation language with `edits` applied (evaluations cached)."""
        results[setting] = run.evaluate(RESULTS, setting, edits, langs, cfg.est_eval_tokens)
        return damage(base, results[setting], vocab)

    made = {name: _made_of(run, name, windows, scopes[name]) for name in cfg.est_estimators}
    regions = _regions(
        run,
        cfg.est_estimators,
        ratios,
        made,
        scopes,
        lambda which: importance.iter_estimates(t, windows, which, run.progress),
    )
    base = results["base"] = run.evaluate(RESULTS, "base", [], langs, cfg.est_eval_tokens)
    shapes = {n: run.model.get_parameter(n) for n in run.names}  # Random needs only the shapes
    regions["random"] = {r: select(shapes, r, "random", cfg.scope, cfg.seed) for r in ratios}

    per_lang, curves, entries = {}, {}, {}
    for name in [*cfg.est_estimators, "random"]:
        for r in ratios:
            setting = f"{name}@{r:g}"
            per_lang[setting] = removed(setting, interventions.removal(regions[name][r], run.removed))
            entries[setting] = regions[name][r].count()
        curves[name] = {f"{r:g}": mean(per_lang[f"{name}@{r:g}"].values()) for r in ratios}
    at = cfg.est_overlap_ratio
    tops = {name: regions[name][at] for name in cfg.est_estimators}
    jaccard = {a: {b: tops[a].jaccard(tops[b]) for b in tops} for a in tops}

    specificity, dims, en_windows = _specificity(run, t, windows, ratios, regions, removed, per_lang)

    result = {
        "experiment": "estimators",
        "estimators": cfg.est_estimators,
        "definitions": {n: " ".join(importance.get(n).doc.split()) for n in cfg.est_estimators},
        "scopes": scopes,
        "ratios": [f"{r:g}" for r in ratios],
        "overlap_ratio": f"{at:g}",
        "score_languages": cfg.score_langs,
        "eval_languages": langs,
        "control_language": cfg.est_control_lang,
        "tokens_per_language": cfg.est_tokens,
        "score_seq_len": cfg.est_seq_len or cfg.seq_len,
        "eval_tokens_per_language": cfg.est_eval_tokens,
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
        "figures": ["figures/estimators-damage.png", "figures/estimators-jaccard.png"],
    }
    result["answer"] = answer(result)
    figs = run.out / "figures"
    write_bytes(figs / "estimators-damage.png", damage_chart(result))
    names = list(jaccard)
    write_bytes(
        figs / "estimators-jaccard.png",
        figures.matrix_heatmap(
            names,
            names,
            [[jaccard[a][b] for b in names] for a in names],
            f"Jaccard overlap of Top {at:g} regions",
            "Jaccard",
            "estimator",
            "estimator",
        ),
    )
    run.save("estimators", result)
    return result


def _specificity(
    run: Run, t: importance.Target, windows: list[Windows], ratios: list[float], regions: dict, removed, per_lang: dict
) -> tuple[dict, list[int], list[Windows]]:
    """At every k, the core region against Taylor regions of its size from the control language alone and
    from the token-shuffled windows, the magnitude region, the outlier dimensions and Random."""
    cfg = run.cfg
    control_windows = {
        f"{cfg.est_control_lang}-only": [_score_windows(run, cfg.est_control_lang)],
        "shuffled": [shuffled(w, cfg.seed) for w in windows],
    }
    made = {label: _made_of(run, CORE, ws, cfg.scope) for label, ws in control_windows.items()}
    controls = _regions(
        run,
        list(control_windows),
        ratios,
        made,
        {label: cfg.scope for label in control_windows},
        lambda which: ((label, importance.score(CORE, t, control_windows[label], run.progress)) for label in which),
    )
    dims, fixed = [], {}
    if cfg.est_outlier_dims:
        dims, edits, region = _outlier_dims(run, windows)
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
        specificity[f"{r:g}"] = _compare(compared, per_lang)
    return specificity, dims, control_windows[f"{cfg.est_control_lang}-only"]


def _compare(compared: dict[str, tuple[Region, str]], per_lang: dict) -> dict:
    """Each region against the core one: overlap, and damage as a share of the core's above Random's."""
    core = compared["core"][0]
    out = {}
    for label, (region, setting) in compared.items():
        out[label] = {
            "setting": setting,
            "entries": region.count(),
            "jaccard_core": region.jaccard(core),
            "share_in_core": (region & core).count() / max(region.count(), 1),
            "damage": mean(per_lang[setting].values()),
        }
    lo, hi = out["random"]["damage"], out["core"]["damage"]
    for s in out.values():
        s["relative_damage"] = (s["damage"] - lo) / (hi - lo) if hi != lo else math.nan
    return out


def damage_chart(result: dict) -> bytes:
    """Damage against the share of parameters removed, one line per estimator, Random dashed."""
    ratios = [float(r) for r in result["ratios"]]
    fig, ax = figures.subplots(figsize=(6.5, 4.2))
    for name, curve in result["damage"].items():
        style = {"color": "#888888", "ls": "--"} if name == "random" else {}
        ax.plot([100 * r for r in ratios], [curve[f"{r:g}"] for r in ratios], marker="o", label=name, **style)
    ax.axhline(mean(result["cap"].values()), color="#bbbbbb", ls=":", label="cap: worse than a uniform guess")
    ax.set_xscale("log")
    ax.set_xticks([100 * r for r in ratios], [_pct(r) for r in ratios])
    ax.minorticks_off()
    ax.set(
        xlabel="Top k% of parameters removed",
        ylabel="mean ln(perplexity ratio), capped",
        title=f"Damage over {', '.join(result['eval_languages'])}",
    )
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return figures.png(fig)


def _pct(r: str | float) -> str:
    """A share as a percentage with two significant digits and no exponent (0.0001%, 0.25%, 1%)."""
    return np.format_float_positional(100 * float(r), precision=2, fractional=False, trim="-") + "%"


def saturated(result: dict) -> dict[str, list[str]]:
    """Per k, the estimators whose removal leaves every language worse than a uniform guess (at the cap),
    where damage can no longer say which region matters more."""
    by_lang, limit = result["damage_by_language"], result["cap"]
    return {
        r: [n for n in result["estimators"] if all(0 < limit[lang] <= by_lang[f"{n}@{r}"][lang] for lang in limit)]
        for r in result["ratios"]
    }


def answer_ratio(result: dict) -> str | None:
    """The smallest k at which the core region does clearly more damage than Random (MIN_EFFECT)."""
    spec = result["specificity"]
    return next(
        (r for r in result["ratios"] if spec[r]["core"]["damage"] - spec[r]["random"]["damage"] >= MIN_EFFECT), None
    )


def answer(result: dict) -> str:
    """The specificity answer, from the numbers, with the rule that decides it stated in the text. It is
    read at the smallest k where the core region clearly does something (`answer_ratio`): the larger k, the
    more likely removal destroys the model whatever was removed."""
    r0, control, spec = answer_ratio(result), f"{result['control_language']}-only", result["specificity"]
    if r0 is None:
        return (
            f"Removing the core region (Taylor over {', '.join(result['score_languages'])}) does less than "
            f"{MIN_EFFECT} ln perplexity beyond Random at every k tried, so the controls cannot be compared with it "
            "on this model and data; try larger k or more evaluation tokens."
        )
    en, sh = spec[r0][control]["relative_damage"] + 0.0, spec[r0]["shuffled"]["relative_damage"] + 0.0
    if en >= 0.5:
        verdict = (
            "mostly the model's generally important parameters: neither the six languages nor word order is "
            "needed to find most of it"
            if sh >= 0.5
            else "not specific to the six languages, but tied to structured text: a language none of the six finds "
            "most of it, their token-shuffled text does not"
        )
    else:
        verdict = (
            "tied to the six languages' tokens rather than their word order: their token-shuffled text finds "
            "most of it, another language does not"
            if sh >= 0.5
            else "specific to the scored languages in large part: neither another language nor shuffled text finds "
            "most of it"
        )
    s = spec[r0]
    parts = [f"At Top {_pct(r0)}, the core region (Taylor over {', '.join(result['score_languages'])}) is {verdict}."]
    if CORE in saturated(result)[r0]:
        parts.append(
            "At this k removing it already leaves every language worse than a uniform guess, so a control "
            "at 100% destroys the model as thoroughly, and smaller k would separate them further."
        )
    parts.append(
        f"A region of the same size found from {result['control_language']} text alone shares "
        f"{s[control]['jaccard_core']:.1%} of entries with it by Jaccard (chance about "
        f"{_pct(float(r0) / (2 - float(r0)))}) and does {en:.0%} of its damage above Random; one from "
        f"token-shuffled windows shares {s['shuffled']['jaccard_core']:.1%} and does {sh:.0%}."
    )
    if "magnitude" in s:
        parts.append(
            f"Weight magnitude, with no data, shares {s['magnitude']['jaccard_core']:.1%} and does "
            f"{s['magnitude']['relative_damage']:.0%}."
        )
    if "outlier-dims" in s:
        od = s["outlier-dims"]
        parts.append(
            f"The outlier dimensions {', '.join(map(str, result['outlier_dims']))} ({od['entries']:,} entries, "
            f"{od['entries'] / result['scored_parameters']:.2%} of the parameters) hold {od['share_in_core']:.1%} "
            f"of their entries in the core region ({_pct(r0)} expected by chance) and removing them does "
            f"{od['relative_damage']:.0%} of its damage."
        )
    others = [r for r in result["ratios"] if r != r0]
    if others:
        parts.append(
            f"At the other k the {result['control_language']}-only and shuffled regions do "
            + ", ".join(
                f"{spec[r][control]['relative_damage'] + 0.0:.0%} and "
                f"{spec[r]['shuffled']['relative_damage'] + 0.0:.0%} "
                f"({_pct(r)})"
                for r in others
            )
            + " of the core region's damage above Random."
        )
    full = [r for r, names in saturated(result).items() if len(names) == len(result["estimators"])]
    if full:
        parts.append(
            f"At {', '.join(map(_pct, full))} every estimator's region leaves the model worse than a uniform "
            f"guess over its {result['vocab']:,} tokens, so those points cannot tell the regions apart."
        )
    parts.append(
        f"Rule: read at the smallest k where the core region does at least {MIN_EFFECT} ln perplexity more "
        "damage than Random; a control that does at least half of the core region's damage above Random "
        "counts as finding it."
    )
    return " ".join(parts)


def leaders(result: dict, r: str) -> list[str]:
    """The estimators whose region does the most damage at k = r (several when they tie, e.g. at the cap)."""
    d = {n: v[r] for n, v in result["damage"].items() if n != "random"}
    top = max(d.values())
    return [n for n, v in d.items() if v >= top - 1e-9]


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
        f"Removing the Top {_pct(r0)} of each importance estimator's scores, {who} "
        f"{'do' if len(tied) > 1 else 'does'} the most damage (mean ln perplexity ratio {blocks.fmt(d[tied[0]][r0])}"
        + (", every language past a uniform guess" if tied[0] in full[r0] else "")
        + f"; then {', '.join(f'{n} {blocks.fmt(d[n][r0])}' for n in rest)}; Random {blocks.fmt(d['random'][r0])})"
        + (f", with ties broken at {_pct(ratios[k])}." if k else ".")
    )
    return [text, result["answer"].split(". ")[0].rstrip(".") + "."]


def section(result: dict) -> list:
    """Report blocks: the damage curves, the estimators' overlap, and the specificity of the core region."""
    fmt, ratios, curves = blocks.fmt, result["ratios"], result["damage"]
    names = [n for n in curves if n != "random"]
    spec, r0 = result["specificity"], answer_ratio(result) or ratios[0]
    labels = list(spec[r0])
    settings = [spec[r0][label]["setting"] for label in labels]
    over = result["overlap_ratio"]
    return [
        blocks.heading("Importance estimators and the specificity of the core region"),
        blocks.text(
            f"Each estimator scores {', '.join(result['score_languages'])} ({result['tokens_per_language']:,} "
            f"tokens each in windows of {result['score_seq_len']}, one pass for all); its Top k% is set to the "
            f"removed value and the damage is the mean ln(perplexity ratio) over "
            f"{', '.join(result['eval_languages'])} ({result['eval_tokens_per_language']:,} tokens each). "
            "Selection scope: " + ", ".join(f"{n} {s}" for n, s in result["scopes"].items()) + "."
        ),
        blocks.bullets([f"**{n}**: {d}" for n, d in result["definitions"].items()]),
        blocks.table(
            ["estimator", *map(_pct, ratios)],
            [[n, *[fmt(curves[n][r]) for r in ratios]] for n in curves],
            caption="Damage (mean ln perplexity ratio) per share removed: the best estimator does the most "
            "damage at the smallest k; Random is the floor. Each language's ratio is capped where the "
            f"model does worse than a uniform guess over its {result['vocab']:,} tokens (mean cap "
            f"{fmt(mean(result['cap'].values()))}): beyond it a model is destroyed either way.",
        ),
        blocks.figure(
            "figures/estimators-damage.png",
            "Damage against the share removed (log x): the higher a line "
            "starts on the left, the better the estimator finds what matters.",
        ),
        blocks.table(
            ["", *names],
            [[a, *[f"{result['jaccard'][a][b]:.3f}" for b in names]] for a in names],
            caption=f"Jaccard overlap of the Top {_pct(over)} regions (chance "
            f"{result['chance_jaccard']:.4f}): which estimators find the same parameters?",
        ),
        blocks.figure("figures/estimators-jaccard.png", "The overlap as a heat map."),
        blocks.heading("Is the core region specific to language?", 3),
        blocks.table(
            ["k", "region", "entries", "Jaccard with core", "share in core", "damage", "of core's damage"],
            [
                [
                    _pct(r),
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
        blocks.table(
            ["language", *labels],
            [
                [lang, *[fmt(result["damage_by_language"][s][lang]) for s in settings]]
                for lang in result["eval_languages"]
            ],
            caption=f"ln perplexity ratio per evaluation language at {_pct(r0)}: does a control hurt some "
            "languages (e.g. its own) more than the core region does?",
        ),
        blocks.text(result["answer"]),
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
