"""The estimators experiment's stability and language specificity of each estimator's per-language regions,
and the estimator recommended from them.

From the same pass as the regions (its sums kept per group of windows, `SplitHalf`): the split-half Jaccard
of a language's per-matrix Top k% (odd against even windows) at the budget, at half and at a quarter of it
(nested halves of the same windows), and the specificity, the mean over language pairs of the
within-language split-half Jaccard minus the Jaccard between the two languages' halves (the same number of
tokens on both sides), with a 95% interval from random half-splits of the windows and resampled languages."""

from __future__ import annotations

import itertools
import zlib

import numpy as np

from .. import figures, importance, markup, regions, uncertainty
from ..store import LingregionError
from .estimator_damage import mean, pct

GROUPS = 8  # window groups kept per language: halves at the budget, half and a quarter of it, random splits
LEVELS = ("budget", "half", "quarter")  # the budget's halves, then the halves of its even half, and so on
SPLITS = 6  # half-splits of each language's window groups for the interval (odd/even first), when it has them
ONE_WINDOW = (
    "Some halves hold a single window: within one window Σ_w |δ·g_w| = |δ·Σ_w g_w| and (δ·g)² ranks entries as "
    "|δ·g| does, so taylor, taylor-window and fisher pick the same Top sets there and their stability and "
    "specificity coincide. Score at least 4 windows per language (est_tokens / est_seq_len) to tell them apart."
)
RECOMMEND_RULE = (
    "An estimator qualifies for locating language-specific regions at this budget when the whole 95% interval "
    "of its specificity lies above 0; among those, the report recommends the one with the highest split-half "
    "Jaccard at the budget. If none qualifies, it recommends none."
)


class SplitHalf:
    """Per-language Top sets of halves of each language's windows, read off the groups' sums during the
    estimators' one pass (`importance.collect`'s visit): no forward or backward pass of its own.

    Keys of `sets`: (estimator, language, (level, half)) for the nested halves of LEVELS, level 0 being the
    odd/even split of all windows, and (estimator, language, ("split", j, half)) for the j-th random
    half-split (j ≥ 1; split 0 is level 0). A data-free estimator (no statistics, e.g. magnitude) has one
    Top set, whatever the text."""

    def __init__(self, t: importance.Target, names: list[str], ratio: float, seed: int):
        self.t, self.seed, self.ratio = t, seed, ratio
        self.names = [n for n in names if importance.per_language(n)]
        shapes = {n: tuple(t.model.get_parameter(n).shape) for n in t.names}
        self.layout = regions.Layout.of(shapes, ratio)
        self.sets: dict[tuple, np.ndarray] = {}
        self.tokens: dict[str, dict[int, float]] = {}  # language → level → mean tokens of its two halves
        self.splits: dict[str, list[list[int]]] = {}  # language → its half-splits (the groups of half a)
        self.groups: dict[str, int] = {}
        self.fewest = 1 << 62  # the fewest windows a half holds at the budget
        self.fixed = {
            n: regions.top_set(importance.get(n).fn(importance.Stats(), t), self.layout)
            for n in self.names
            if not importance.get(n).needs
        }

    def visit(self, lang: str, parts: list[importance.Part]) -> None:
        """Top sets of every half this language's groups allow, for every per-language estimator."""
        g = len(parts)
        self.groups[lang], self.tokens[lang] = g, {}
        halves = {}
        for level in range(len(LEVELS)):
            m = 2 ** (level + 1)
            if m <= g:
                halves[(level, "a")] = lambda m=m: importance.subset(parts, 0, m)
                halves[(level, "b")] = lambda m=m, r=m // 2: importance.subset(parts, r, m)
        splits = half_splits(g, SPLITS, self.seed * 1_000_003 + zlib.crc32(lang.encode()))
        self.splits[lang] = splits
        for j, a in enumerate(splits[1:], 1):
            b = [i for i in range(g) if i not in a]
            halves[("split", j, "a")] = lambda a=a: importance.combine([parts[i] for i in a])
            halves[("split", j, "b")] = lambda b=b: importance.combine([parts[i] for i in b])
        data = [n for n in self.names if n not in self.fixed]
        for key, make in halves.items():
            part = make()
            if key[0] != "split":
                self.tokens[lang][key[0]] = self.tokens[lang].get(key[0], 0) + part.tokens / 2
                self.fewest = min(self.fewest, part.windows) if key[0] == 0 else self.fewest
            if data:
                stats = importance.part_stats(lang, part)
                del part
                for name in data:
                    scores = importance.get(name).fn(stats, self.t)
                    self.sets[(name, lang, key)] = regions.top_set(scores, self.layout)
                    del scores
                del stats

    def top(self, name: str, lang: str, key: tuple) -> np.ndarray:
        """One Top set; split 0 is the odd/even split of level 0."""
        if name in self.fixed:
            return self.fixed[name]
        return self.sets[(name, lang, (0, key[2]) if key[:2] == ("split", 0) else key)]

    def result(self, resamples: int = uncertainty.RESAMPLES) -> dict:
        """Split-half Jaccards, between-language Jaccards and specificity with its interval, per estimator."""
        langs = list(self.groups)
        if len(langs) < 2:
            raise LingregionError("specificity compares languages: score at least two languages")
        n_splits = min(len(s) for s in self.splits.values())
        levels = [lv for lv in range(len(LEVELS)) if all(lv in self.tokens[lang] for lang in langs)]
        out = {}
        for name in self.names:
            stability = self._stability(name, langs, levels)
            d, between = self._differences(name, langs, n_splits)
            pairs = {f"{a}-{b}": float(d[0, x, y]) for x, a in enumerate(langs) for y, b in enumerate(langs) if x < y}
            out[name] = {
                "split_half_jaccard": stability,
                "between_language_jaccard": {"mean": mean(between.values()), "by_pair": between},
                "specificity": {
                    "value": mean(pairs.values()),
                    "ci95": list(specificity_interval(d, resamples, self.seed)),
                    "by_pair": pairs,
                    "by_split": [float(np.nanmean(d[s][np.triu_indices(len(langs), 1)])) for s in range(n_splits)],
                },
            }
        return {
            "ratio": f"{self.ratio:g}",
            "languages": langs,
            "groups": self.groups,
            "splits": n_splits,
            "fewest_windows_per_half": self.fewest,
            "split_groups": {lang: s[:n_splits] for lang, s in self.splits.items()},
            "estimators": out,
            "method": _method(resamples, n_splits, self.seed),
        }

    def _jaccard(self, a: np.ndarray, b: np.ndarray) -> float:
        """Mean over matrices of the Jaccard of two Top sets."""
        return float(regions.top_set_jaccards(a, b, self.layout).mean())

    def _stability(self, name: str, langs: list[str], levels: list[int]) -> dict:
        """One estimator's split-half Jaccard at each level of LEVELS, or why a level was not measured."""
        j, stability = self._jaccard, {}
        for lv, label in enumerate(LEVELS):
            if lv not in levels:
                stability[label] = {
                    "reason": f"needs at least {2 ** (lv + 1)} windows per language "
                    f"(est_tokens / est_seq_len); the fewest here is {min(self.groups.values())}"
                }
                continue
            by = {lang: j(self.top(name, lang, (lv, "a")), self.top(name, lang, (lv, "b"))) for lang in langs}
            stability[label] = {
                "tokens_per_half": mean(self.tokens[lang][lv] for lang in langs),
                "mean": mean(by.values()),
                "by_language": by,
            }
        return stability

    def _differences(self, name: str, langs: list[str], n_splits: int) -> tuple[np.ndarray, dict[str, float]]:
        """d[split, L, L']: one estimator's within-language split-half Jaccard of L and L' (their mean) minus the
        mean Jaccard between their halves, per half-split (NaN on the diagonal); and those between-language
        Jaccards of the odd/even split, per pair."""
        j = self._jaccard
        d = np.full((n_splits, len(langs), len(langs)), np.nan)
        between = {}
        for s in range(n_splits):
            key = lambda lang, h, name=name, s=s: self.top(name, lang, ("split", s, h))  # noqa: E731
            w = {lang: j(key(lang, "a"), key(lang, "b")) for lang in langs}
            for x, a in enumerate(langs):
                for y in range(x + 1, len(langs)):
                    b = langs[y]
                    cross = mean(j(key(a, h), key(b, k)) for h in "ab" for k in "ab")
                    d[s, x, y] = d[s, y, x] = (w[a] + w[b]) / 2 - cross
                    if s == 0:
                        between[f"{a}-{b}"] = cross
        return d, between


def _method(resamples: int, n_splits: int, seed: int) -> dict:
    """How the split-half Jaccard, the specificity and its interval are computed, in words, for the summary."""
    return {
        "split_half_jaccard": "mean over matrices (those whose Top k% is not empty) of the Jaccard of the "
        "per-matrix Top k% of two halves of a language's scoring windows: odd against even windows at "
        "the budget; at half the budget the even windows' own halves (0 and 2 mod 4), at a quarter "
        "0 and 4 mod 8. Each half is scored as if it were all the language had.",
        "specificity": "mean over language pairs (L, L') of (J_L + J_L')/2 − mean of the four Jaccards "
        "between a half of L and a half of L' (the same tokens per half as within)",
        "ci95": f"percentile interval over {resamples} seeded resamples, each drawing one of "
        f"{n_splits} half-split(s) of each language's window groups (odd/even, then random ones) and the "
        "languages with replacement (pairs of a language with itself are left out)",
        "seed": seed,
    }


def half_splits(groups: int, most: int, seed: int) -> list[list[int]]:
    """Up to `most` distinct ways to split `groups` window groups into two equal halves, as the groups of
    the half holding group 0: the odd/even split first, then seeded random ones (none for one group)."""
    if groups < 2:
        return []
    even = list(range(0, groups, 2))
    rest = [list(c) for c in itertools.combinations(range(groups), groups // 2) if 0 in c and list(c) != even]
    order = np.random.default_rng(seed).permutation(len(rest))
    return [even] + [rest[i] for i in order[: most - 1]]


def specificity_interval(d: np.ndarray, resamples: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of the mean pairwise (within − between) difference d[split, L, L']: each
    resample draws one split and the languages with replacement, and averages d over the drawn pairs of
    two different languages."""
    n_splits, n = d.shape[0], d.shape[1]
    rng = np.random.default_rng(seed)
    split = rng.integers(n_splits, size=resamples)
    idx = rng.integers(n, size=(resamples, n))
    vals = d[split[:, None, None], idx[:, :, None], idx[:, None, :]]  # diagonal (same language) is NaN
    upper = np.triu(np.ones((n, n), bool), 1)
    vals = np.where(upper, vals, np.nan).reshape(resamples, -1)
    keep = ~np.isnan(vals).all(axis=1)  # a draw of one language only has no pair
    means = np.nanmean(vals[keep], axis=1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return float(lo), float(hi)


def by_estimator(stability: dict, curves: dict, at: str) -> dict:
    """Per estimator: split-half Jaccard, specificity with its interval, and damage (the summary's table)."""
    out = {}
    for name, curve in curves.items():
        if name == "random":
            continue
        s = stability["estimators"].get(name)
        out[name] = {
            "split_half_jaccard": s["split_half_jaccard"] if s else None,
            "between_language_jaccard": s["between_language_jaccard"] if s else None,
            "specificity": s["specificity"] if s else None,
            "damage": curve,
            "damage_at_overlap_ratio": curve[at],
            "note": None if s else "its score compares the languages with each other: no per-language region",
        }
    return out


def stability_of(entry: dict) -> float | None:
    """The split-half Jaccard at the budget (the stability axis), None if not measured."""
    s = entry["split_half_jaccard"]
    return s["budget"]["mean"] if s and "mean" in s["budget"] else None


def recommend(table: dict) -> dict:
    """RECOMMEND_RULE applied to `by_estimator`'s table: the verdict on "specificity above 0" for each
    estimator, those that qualify, and the recommended one (None if none qualifies)."""
    verdicts = {
        n: uncertainty.verdict(tuple(e["specificity"]["ci95"]), 0.0, "above")
        for n, e in table.items()
        if e["specificity"] and stability_of(e) is not None
    }
    ok = [n for n, v in verdicts.items() if v == uncertainty.HOLDS]
    best = max(ok, key=lambda n: stability_of(table[n])) if ok else None
    return {"estimator": best, "qualifying": ok, "verdicts": verdicts, "rule": RECOMMEND_RULE}


def ranks(values: dict) -> dict[str, int | None]:
    """1 = largest (values are numbers, or tuples compared in order); ties share a rank; None stays None."""
    known = [v for v in values.values() if v is not None]
    return {n: (1 + sum(u > v for u in known) if v is not None else None) for n, v in values.items()}


def stability_chart(result: dict) -> bytes:
    """Estimators as points: specificity (with its interval) on x, split-half Jaccard on y, damage as size."""
    table, at, k0 = result["by_estimator"], result["overlap_ratio"], result["ratios"][0]
    fig, ax = figures.subplots(figsize=(6.5, 4.5))
    shown = {n: e for n, e in table.items() if e["specificity"] and stability_of(e) is not None}
    top = max([max(e["damage"][k0], 0.0) for e in shown.values()] + [1e-12])
    for n, e in shown.items():
        x, y, (lo, hi) = e["specificity"]["value"], stability_of(e), e["specificity"]["ci95"]
        size = 30 + 400 * max(e["damage"][k0], 0.0) / top
        ax.errorbar([x], [y], xerr=[[x - lo], [hi - x]], fmt="none", ecolor="#999999", capsize=3, lw=1)
        ax.scatter([x], [y], s=size, alpha=0.7, label=f"{n} (damage @{pct(k0)} {markup.fmt(e['damage'][k0])})")
        ax.annotate(n, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.axvline(0, color="#bbbbbb", ls=":")
    stab = result["stability"]
    ax.set(
        xlabel="specificity: within − between-language Jaccard (95% interval)",
        ylabel="split-half Jaccard at the budget",
        title=f"Per-language Top {pct(at)}: stability, specificity and damage (marker size)",
    )
    ax.legend(frameon=False, fontsize=7, loc="best")
    ax.text(
        0.01,
        0.01,
        f"{len(stab['languages'])} languages, {stab['splits']} half-split(s)",
        transform=ax.transAxes,
        fontsize=7,
        color="#666666",
    )
    fig.tight_layout()
    return figures.png(fig)


def recommendation_text(result: dict) -> str:
    """The recommendation in words, with the numbers it rests on."""
    rec, table = result["recommendation"], result["by_estimator"]
    if rec["estimator"] is None:
        head = "No estimator qualifies at this budget: no specificity interval lies wholly above 0"
        undecided = [n for n, v in rec["verdicts"].items() if v == uncertainty.INCONCLUSIVE]
        if undecided:
            head += f" ({', '.join(undecided)} inconclusive)"
        return head + "."
    e = table[rec["estimator"]]
    spec = e["specificity"]
    return (
        f"Recommended for locating language-specific regions at this budget: {rec['estimator']} (split-half "
        f"Jaccard {stability_of(e):.3f}, specificity {spec['value']:+.3f} [{spec['ci95'][0]:+.3f}, "
        f"{spec['ci95'][1]:+.3f}]); qualifying: {', '.join(rec['qualifying'])}."
    )


def stability_section(result: dict) -> list:
    """The three rankings side by side, the figure, and the recommendation with its rule."""
    if "by_estimator" not in result:  # a summary saved before stability was measured
        return []
    table, at, stab = result["by_estimator"], result["overlap_ratio"], result["stability"]
    head, rows = _stability_table(result)
    skipped = [f"{n}: {e['note']}" for n, e in table.items() if not e["specificity"]]
    return [
        markup.heading("Stable and language-specific? Each estimator's per-language regions", 3),
        markup.text(
            f"Each estimator's per-matrix Top {pct(at)} of one language's score, from two halves of that "
            f"language's scoring windows (kept apart in the same pass, no extra forward or backward pass). "
            f"Stability: the split-half Jaccard, mean over matrices and over {', '.join(stab['languages'])}, at the "
            "budget and at half and a quarter of it (halves of the same windows). Specificity: the mean over "
            "language pairs of the within-language split-half Jaccard minus the Jaccard between the two "
            f"languages' halves. Interval: {stab['method']['ci95']}."
        ),
        markup.table(
            head,
            rows,
            caption="Damage (mean ln perplexity ratio of the estimator's core region at the smallest k, rank 1 = "
            "most, ties broken at the next k, equal ranks for a tie throughout), "
            "stability (split-half Jaccard) and specificity side by side. Magnitude reads no text: its halves "
            "and its languages pick the same entries (stability 1, specificity 0).",
        ),
        markup.figure(
            "figures/estimators-stability.png",
            "Estimators as points: specificity (x, with its 95% interval), stability (y), damage (marker size). "
            "Right and high is a stable, language-specific region.",
        ),
        *([markup.bullets(skipped)] if skipped else []),
        *([markup.text(ONE_WINDOW)] if stab.get("fewest_windows_per_half") == 1 else []),
        markup.text(recommendation_text(result) + " Rule: " + result["recommendation"]["rule"]),
    ]


def _stability_table(result: dict) -> tuple[list[str], list[list[str]]]:
    """The three rankings side by side, one row per estimator: damage at the smallest k with its rank, the
    split-half Jaccard at each level, the stability rank, the specificity with its interval and rank, and the
    verdict on "specificity above 0"."""
    table = result["by_estimator"]
    measured = {n: e for n, e in table.items() if e["specificity"]}
    k0 = result["ratios"][0]  # as in the findings: the smallest k decides, the next ones break ties
    damage_rank = ranks({n: tuple(e["damage"][r] for r in result["ratios"]) for n, e in table.items()})
    stab_rank = ranks({n: stability_of(e) for n, e in measured.items()})
    spec_rank = ranks({n: e["specificity"]["value"] for n, e in measured.items()})
    verdicts = result["recommendation"]["verdicts"]

    def level(e, label):
        s = e["split_half_jaccard"][label]
        return f"{s['mean']:.3f}" if "mean" in s else "n/a"

    labels = list(LEVELS)
    tokens = {
        lv: next((e["split_half_jaccard"][lv].get("tokens_per_half") for e in measured.values()), None) for lv in labels
    }
    rows = []
    for n, e in table.items():
        if n not in measured:
            rows.append([n, f"{markup.fmt(e['damage'][k0])} (#{damage_rank[n]})", *["n/a"] * 6])
            continue
        sp = e["specificity"]
        rows.append(
            [
                n,
                f"{markup.fmt(e['damage'][k0])} (#{damage_rank[n]})",
                *[level(e, lv) for lv in labels],
                f"#{stab_rank[n]}",
                f"{sp['value']:+.3f} [{sp['ci95'][0]:+.3f}, {sp['ci95'][1]:+.3f}] (#{spec_rank[n]})",
                verdicts.get(n, "n/a"),
            ]
        )
    levels = [f"J {lv}" + (f" ({tokens[lv]:,.0f} tok/half)" if tokens[lv] else "") for lv in labels]
    return ["estimator", f"damage @{pct(k0)}", *levels, "stability rank", "specificity [95%]", "specificity > 0"], rows
