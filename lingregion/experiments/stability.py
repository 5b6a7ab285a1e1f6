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

from .. import figures, markup, models, scoring, uncertainty
from ..corpus import Windows
from ..run import Run
from ..store import LingregionError, write_bytes

NAME = "stability"
FRACTIONS = (1 / 8, 1 / 4, 1 / 2, 1)
TARGET = 0.9
FAR = 100  # a fitted budget this many times beyond the largest measured one is only a sign of scale


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


def _halves_at(run: Run, w: Windows, sizes: list[int]) -> tuple[dict[int, tuple[dict, dict]], dict]:
    """The two halves' importance at each budget, and the full importance at the largest, from one pass over
    the windows in chunks."""
    out, acc, start = {}, None, 0
    for end in sizes:
        a, b = scoring.gradient_sum(run.model, _slice(w, start, end), run.names, progress=run.progress, halves=True)
        tokens = sum(len(ids) - 1 for ids in w.input_ids[start:end])
        # each chunk's sums are means over its own tokens: back to plain sums so that chunks add up
        for half in (a, b):
            for t in half.values():
                t.mul_(tokens)
        acc = (a, b) if acc is None else tuple({n: x[n] + y[n] for n in x} for x, y in zip(acc, (a, b)))
        out[end] = tuple(scoring.taylor_importance(run.model, h, run.removed) for h in acc)
        start = end
    full = scoring.taylor_importance(run.model, {n: acc[0][n] + acc[1][n] for n in acc[0]}, run.removed, inplace=True)
    return out, full


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
    for lang in cfg.stability_langs:
        w = run.windows(lang, "score", cfg.stability_tokens)
        sizes = budgets(len(w.input_ids))
        halves, full = _halves_at(run, w, sizes)
        points = []
        for size in sizes:
            a, b = halves[size]
            points.append(
                {
                    "windows": size,
                    "tokens_per_half": sum(len(ids) for ids in w.input_ids[:size]) // 2,
                    "split_half_jaccard": {f"{r:g}": uncertainty.split_half_jaccard(a, b, r) for r in cfg.ratios},
                    "spearman": uncertainty.spearman(a, b, seed=cfg.seed),
                }
            )
        fit = uncertainty.fit_budget(
            [p["tokens_per_half"] for p in points],
            [p["split_half_jaccard"][f"{min(cfg.ratios):g}"] for p in points],
            TARGET,
        )
        entry = {"points": points, "fit": fit, f"tokens_for_jaccard_{TARGET}": fit["tokens"]}
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
        f"tokens_for_jaccard_{TARGET}": {lang: e["fit"]["tokens"] for lang, e in per_lang.items()},
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


def _need(fit: dict, target: float) -> str:
    x = fit["tokens"]
    if x is None:
        return f"the fit cannot tell what a Jaccard of {target} needs ({fit['reason']})"
    far = fit["extrapolation"] > FAR
    return f"a Jaccard of {target} needs " + (
        f"{x:.1e} tokens per sample by the logit fit, {fit['extrapolation']:.0e}× the largest budget measured: "
        "far out of reach"
        if far
        else f"about {x:,.0f} tokens per sample (logit fit)"
    )


def findings(result: dict) -> list[str]:
    """The budget each language's region needs, beside the budget used, and precision against sampling."""
    out, target = [], result["target"]
    for lang, e in result["per_language"].items():
        last = e["points"][-1]
        r = f"{min(result['ratios']):g}"
        need = e["fit"]["tokens"]
        verdict = (
            "inconclusive at this budget"
            if need is None or need > result["score_tokens"]
            else "resolved at this budget"
        )
        out.append(
            f"{lang}: the Top {r} region of two disjoint samples of {last['tokens_per_half']:,} tokens overlaps "
            f"with Jaccard {last['split_half_jaccard'][r]:.2f} (Spearman {last['spearman']:.2f}); "
            f"{_need(e['fit'], target)}, against {result['score_tokens']:,} used: the region is **{verdict}**."
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


def section(result: dict) -> list:
    """Report blocks: the stability table per language and budget, the figure, every scored language."""
    r = f"{min(result['ratios']):g}"
    rows = [
        [
            lang,
            f"{p['tokens_per_half']:,}",
            *[f"{p['split_half_jaccard'][f'{x:g}']:.3f}" for x in result["ratios"]],
            f"{p['spearman']:.3f}",
        ]
        for lang, e in result["per_language"].items()
        for p in e["points"]
    ]
    head = ["Language", "Tokens per half", *[f"Jaccard Top {x:g}" for x in result["ratios"]], "Spearman"]
    scored = result.get("scored") or {}
    out = [
        markup.heading("Stability: how much text a region needs"),
        markup.text(
            "Each language's windows are split into two interleaved halves (even and odd windows) and both are "
            "scored in the same pass; the Jaccard overlap of the halves' per-matrix Top sets is the overlap of two "
            "independent samples of that many tokens. "
            f"The fit logit(J) = a + b·ln(tokens) gives the budget at which J would reach {result['target']}."
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
                ["Scores", *[f"Jaccard Top {x:g}" for x in result["ratios"]], "Spearman"],
                [
                    [
                        lang,
                        *[
                            f"{scored[lang]['split_half_jaccard'].get(f'{x:g}', math.nan):.3f}"
                            for x in result["ratios"]
                        ],
                        f"{scored[lang].get('spearman', math.nan):.3f}",
                    ]
                    for lang in langs
                ],
                caption="Split-half stability of every score the run made (full budget; core = the summed score).",
            )
        )
    return out
