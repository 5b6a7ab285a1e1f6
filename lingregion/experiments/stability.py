"""How much text a region needs: split-half stability at growing budgets, and precision against sampling.

A language's windows are scored once, in chunks of an even number of windows; each chunk's gradient sums
are kept per half (even- and odd-numbered windows), so the prefix sums give both halves at every budget
(1/8, 1/4, 1/2 and all of the windows) from a single pass. The split-half Jaccard of the per-matrix Top k%
at n tokens per half is the overlap of two independent samples of n tokens; fitting how it grows with n
tells the budget at which a region would agree with another sample's at Jaccard 0.9. The same windows
scored in the other precision (bfloat16 for a float32 run, and vice versa) show whether numeric precision
or the choice of text moves the region more.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
from tqdm.auto import tqdm

from .. import figures, markup, models, scoring, uncertainty
from ..corpus import Windows
from ..run import Run
from ..store import LingregionError, write_bytes

NAME = "stability"
FRACTIONS = (1 / 8, 1 / 4, 1 / 2, 1)
TARGET = 0.9
RESAMPLES = 64  # bootstrap resamples of the windows for the gain per doubling (each redoes every budget's halves)


def validate(cfg) -> None:
    """At least four windows, so that two budgets of two or more windows each exist."""
    if cfg.stability_tokens // cfg.seq_len < 4:
        raise LingregionError(
            f"stability_tokens {cfg.stability_tokens} gives fewer than 4 windows of {cfg.seq_len}; "
            f"pass at least {4 * cfg.seq_len}"
        )
    if not cfg.stability_langs:
        raise LingregionError("stability_langs is empty; name at least one language")


def _slice(w: Windows, start: int, end: int) -> Windows:
    cut = {"input_ids": w.input_ids[start:end], "n_bytes": w.n_bytes[start:end]}
    if w.token_bytes is not None:
        cut["token_bytes"] = w.token_bytes[start:end]
    return dataclasses.replace(w, **cut)


def budgets(n_windows: int) -> list[int]:
    """Window counts at the configured fractions, each even (so both halves are equal) and at least 2."""
    return sorted(
        {max(2, 2 * round(f * n_windows / 2)) for f in FRACTIONS if 2 * round(f * n_windows / 2) <= n_windows}
    )


def _pass(run: Run, w: Windows, windows: int, halved: list[str]) -> tuple[list[dict], dict]:
    """One pass over the first `windows` windows, two at a time: each window's gradient sum (a plain sum over
    its tokens) of the halved matrices, on the CPU, and the full importance of every scored matrix."""
    per_window, full = [], None
    for start in tqdm(range(0, windows, 2), desc=f"stability {w.lang}", disable=not run.progress, leave=False):
        pair = _slice(w, start, start + 2)
        sums = scoring.gradient_sum(run.model, pair, run.names, progress=False, halves=halved)
        for t in (*sums.full.values(), *sums.a.values(), *sums.b.values()):
            t.mul_(pair.n_tokens)  # each call's sums are means over its own tokens: back to plain sums
        per_window += [sums.a, sums.b]
        full = sums.full if full is None else {n: full[n].add_(sums.full[n]) for n in full}
    return per_window, scoring.taylor_importance(run.model, full, run.removed, inplace=True)


def _halves(run: Run, per_window: list[dict], order) -> tuple[dict, dict]:
    """The two halves' importance over the windows `order` (positions alternate between the halves)."""
    a, b = ({n: sum(per_window[i][n] for i in order[parity::2]) for n in per_window[0]} for parity in (0, 1))
    return (scoring.taylor_importance(run.model, h, run.removed, inplace=True) for h in (a, b))


def _resampled(run: Run, per_window: list[dict], sizes: list[int], ratio: float, seed: int) -> np.ndarray:
    """The split-half Jaccard curve (Top `ratio`) at every budget, for RESAMPLES bootstrap resamples of the
    windows: each resample draws the windows with replacement, and every budget takes a prefix of the draw."""
    rng = np.random.default_rng(seed)
    out = np.empty((RESAMPLES, len(sizes)))
    for r in range(RESAMPLES):
        draw = rng.integers(0, sizes[-1], sizes[-1])
        for i, size in enumerate(sizes):
            out[r, i] = uncertainty.split_half_jaccard(*_halves(run, per_window, draw[:size]), ratio)
    return out


def _other_precision(run: Run, w: Windows) -> tuple[str, dict]:
    """The same windows scored with the weights in the other precision."""
    other = "bfloat16" if run.cfg.dtype == "float32" else "float32"
    twin = copy.deepcopy(run.model).to(models.DTYPES[other])
    try:
        return other, scoring.score(twin, w, run.names, run.removed, progress=run.progress)
    finally:
        del twin


def measure(run: Run) -> dict:
    """Split-half Jaccard and Spearman at growing budgets per language, the fitted budget for Jaccard 0.9,
    the precision comparison, and the split-half stability of every language the run scored."""
    cfg = run.cfg
    per_lang = {}
    halved = uncertainty.matrix_sample(run.names, cfg.split_half_share, cfg.seed)
    for lang in cfg.stability_langs:
        w = run.windows(lang, "score", cfg.stability_tokens)
        sizes = budgets(len(w.input_ids))
        per_window, full = _pass(run, w, sizes[-1], halved)
        points = []
        for size in sizes:
            stats, _ = uncertainty.split_half(*_halves(run, per_window, range(size)), cfg.ratios, cfg.seed)
            points.append(
                {"windows": size, "tokens_per_half": sum(len(ids) for ids in w.input_ids[:size]) // 2, **stats}
            )
        curve = (
            [p["tokens_per_half"] for p in points],
            [p["split_half_jaccard"][f"{min(cfg.ratios):g}"] for p in points],
        )
        fit = uncertainty.fit_budget(*curve, TARGET)
        gain = uncertainty.doubling_gain(*curve, _resampled(run, per_window, sizes, min(cfg.ratios), cfg.seed), TARGET)
        del per_window
        entry = {
            "points": points,
            "fit": fit,
            "gain": gain,
            "stable_core_share": points[-1]["stable_core_share"],
            f"tokens_for_jaccard_{TARGET}": gain["tokens"],
        }
        if cfg.stability_other_dtype and lang == cfg.stability_langs[0]:
            slowdown = models.bfloat16_slowdown(cfg.device) if cfg.dtype == "float32" else 1.0
            if slowdown > models.EMULATED_BF16:  # an emulated bf16 pass would take longer than the rest of the run
                entry["precision"] = {
                    "skipped": f"bfloat16 is {slowdown:.0f}× slower than float32 on this CPU (no AVX512-BF16 or "
                    "AMX instructions); run the stability experiment on a CPU with them or a GPU to compare"
                }
            else:
                other, twin = _other_precision(run, _slice(w, 0, sizes[-1]))
                entry["precision"] = {
                    "other_dtype": other,
                    "jaccard": {f"{r:g}": uncertainty.split_half_jaccard(full, twin, r) for r in cfg.ratios},
                }
        per_lang[lang] = entry
    result = {
        "experiment": NAME,
        "languages": cfg.stability_langs,
        "ratios": cfg.ratios,
        "target": TARGET,
        "score_tokens": cfg.score_tokens,
        "per_language": per_lang,
        "split_half_jaccard": {lang: e["points"][-1]["split_half_jaccard"] for lang, e in per_lang.items()},
        f"tokens_for_jaccard_{TARGET}": {lang: e["gain"]["tokens"] for lang, e in per_lang.items()},
        "gain_per_doubling": {lang: e["gain"]["per_doubling"] for lang, e in per_lang.items()},
        "gain_per_doubling_ci95": {lang: e["gain"]["ci95"] for lang, e in per_lang.items()},
        "stable_core_share": {lang: e["stable_core_share"] for lang, e in per_lang.items()},
        "halved_matrices": len(halved),
        "halved_share": sum(run.model.get_parameter(n).numel() for n in halved)
        / sum(run.model.get_parameter(n).numel() for n in run.names),
        "scored": run.stability_of_scores(),
        "figures": ["figures/stability.png"],
    }
    write_bytes(run.out / "figures" / "stability.png", chart(result))
    run.save(NAME, result)
    return result


def chart(result: dict) -> bytes:
    """Split-half Jaccard of the Top region against tokens per half (log x), one line per language."""
    r = f"{min(result['ratios']):g}"
    fig, ax = figures.subplots(figsize=(6.5, 4.2))
    for lang, e in result["per_language"].items():
        xs = [p["tokens_per_half"] for p in e["points"]]
        ax.plot(xs, [p["split_half_jaccard"][r] for p in e["points"]], marker="o", label=lang)
        fit = e["fit"]
        if fit.get("slope"):
            grid = [min(xs) * (1.25**k) for k in range(60) if min(xs) * (1.25**k) <= 4 * (fit["tokens"] or max(xs))]
            logit = [fit["intercept"] + fit["slope"] * math.log(x) for x in grid]
            ax.plot(grid, [1 / (1 + math.exp(-v)) for v in logit], linestyle=":", linewidth=1, color="grey")
    ax.axhline(result["target"], color="grey", linestyle="--", linewidth=1)
    ax.axvline(result["score_tokens"], color="black", linestyle="-.", linewidth=1, label="score budget used")
    ax.set(xscale="log", xlabel="tokens per sample (split half)", ylabel=f"split-half Jaccard, Top {r}", ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return figures.png(fig)


def _need(gain: dict, target: float) -> str:
    """What the gain per doubling says about reaching `target`, in words."""
    if gain.get("per_doubling") is None:
        return f"the budget a Jaccard of {target} needs cannot be told ({gain['reason']})"
    lo, hi = gain["ci95"]
    slope = f"the Jaccard gains {gain['per_doubling']:+.3f} [{lo:+.3f}, {hi:+.3f}] per doubling of the budget"
    if gain["tokens"] is None:
        return f"{slope}; a Jaccard of {target} is {gain['reason']}"
    return f"{slope}; a Jaccard of {target} needs about {gain['tokens']:,.0f} tokens per sample"


def _stable(share: float | None) -> str:
    grid = uncertainty.STABLE_SHARES
    return f"{share:g}" if share else f"none of {grid[0]:g} … {grid[-1]:g}"


def findings(result: dict) -> list[str]:
    """The budget each language's region needs, beside the budget used; the stable core share; precision
    against sampling."""
    out, target = [], result["target"]
    for lang, e in result["per_language"].items():
        last = e["points"][-1]
        r = f"{min(result['ratios']):g}"
        need = e["gain"]["tokens"]
        verdict = (
            "inconclusive at this budget"
            if need is None or need > result["score_tokens"]
            else "resolved at this budget"
        )
        out.append(
            f"{lang}: the Top {r} region of two disjoint samples of {last['tokens_per_half']:,} tokens overlaps "
            f"with Jaccard {last['split_half_jaccard'][r]:.2f} (Spearman {last['spearman']:.2f}); "
            f"{_need(e['gain'], target)}, against {result['score_tokens']:,} used: the region is **{verdict}**. "
            f"Stable core (the largest Top share whose split-half Jaccard is ≥ {uncertainty.STABLE_JACCARD} at the "
            f"lower end of its interval): {_stable(e['stable_core_share'])}."
        )
        p = e.get("precision")
        if p and "skipped" in p:
            out.append(f"{lang}: precision against sampling not measured: {p['skipped']}.")
        elif p:
            out.append(
                f"{lang} scored in {p['other_dtype']} on the same windows: Top {r} Jaccard {p['jaccard'][r]:.3f} "
                f"against the run's precision, beside {last['split_half_jaccard'][r]:.3f} between two halves of "
                "the text: "
                + ("the choice of text" if p["jaccard"][r] > last["split_half_jaccard"][r] else "numeric precision")
                + " moves the region more."
            )
    return out


def _jaccard_cell(stats: dict, ratio: float) -> str:
    value = stats["split_half_jaccard"].get(f"{ratio:g}", math.nan)
    ci = (stats.get("split_half_jaccard_ci95") or {}).get(f"{ratio:g}")
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{value:.3f}"


def section(result: dict) -> list:
    """Report blocks: the stability table per language and budget, the figure, every scored language."""
    r = f"{min(result['ratios']):g}"
    rows = [
        [
            lang,
            f"{p['tokens_per_half']:,}",
            *[_jaccard_cell(p, x) for x in result["ratios"]],
            f"{p['spearman']:.3f}",
            _stable(p.get("stable_core_share")),
        ]
        for lang, e in result["per_language"].items()
        for p in e["points"]
    ]
    head = ["Language", "Tokens per half", *[f"Jaccard Top {x:g}" for x in result["ratios"]], "Spearman", "Stable core"]
    scored = result.get("scored") or {}
    out = [
        markup.heading("Stability: how much text a region needs"),
        markup.text(
            "Each language's windows are split into two interleaved halves (even and odd windows) and both are "
            "scored in the same pass; the Jaccard overlap of the halves' per-matrix Top sets is the overlap of two "
            "independent samples of that many tokens. Jaccards are means over a seeded sample of "
            f"{result.get('halved_matrices', 'the')} matrices (every kind of matrix, a spread of layers), with a "
            "bootstrap interval over matrices. The gain per doubling is the slope of J against log2(tokens), its "
            f"interval from {RESAMPLES} bootstrap resamples of the windows; no budget is stated beyond "
            f"{uncertainty.FAR}× the largest measured. The stable core is the largest Top share whose Jaccard "
            f"interval lies at or above {uncertainty.STABLE_JACCARD}."
        ),
        markup.table(head, rows, caption="Split-half overlap at growing budgets (prefixes of the same windows)."),
        markup.figure(
            "figures/stability.png",
            f"Split-half Jaccard of the Top {r} region against tokens per sample (log scale), dotted: the fit; "
            "the dashed line is the target, the dash-dotted one the scoring budget the run used.",
        ),
        markup.bullets(findings(result)),
    ]
    if scored:
        langs = [lang for lang in scored if lang != "core"] + (["core"] if "core" in scored else [])
        out.append(
            markup.table(
                ["Scores", *[f"Jaccard Top {x:g}" for x in result["ratios"]], "Spearman", "Stable core"],
                [
                    [
                        lang,
                        *[_jaccard_cell(scored[lang], x) for x in result["ratios"]],
                        f"{scored[lang].get('spearman', math.nan):.3f}",
                        _stable(scored[lang].get("stable_core_share")),
                    ]
                    for lang in langs
                ],
                caption="Split-half stability of every score the run made (full budget; core = the summed score).",
            )
        )
    return out
