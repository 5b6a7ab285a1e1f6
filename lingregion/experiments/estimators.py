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

Stability and language specificity of each estimator's per-language regions, from the same pass (its
sums kept per group of windows, `SplitHalf`): the split-half Jaccard of a language's per-matrix Top k%
(odd against even windows) at the budget, at half and at a quarter of it (nested halves of the same
windows), and the specificity, the mean over language pairs of the within-language split-half Jaccard
minus the Jaccard between the two languages' halves (the same number of tokens on both sides), with a
95% interval from random half-splits of the windows and resampled languages.
"""

from __future__ import annotations

import itertools
import math
import zlib
from dataclasses import replace

import numpy as np
import torch

from .. import figures, importance, interventions, markup, regions, slices, uncertainty
from ..corpus import Windows, load_windows
from ..regions import Region, select
from ..run import Run, digest
from ..store import LingregionError, read_json, write_bytes, write_json

NAME = "estimators"

RESULTS = "estimators.json"
CORE = "taylor"  # the paper's estimator: its region is the core region the controls are compared with
MIN_EFFECT = 0.1  # ln perplexity ratio (about +10%) the core region must do beyond Random for a comparison
STABILITY = "estimators-stability.json"  # the split-half Top sets' Jaccards, kept so that a rerun needs no pass
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
        j = lambda a, b: float(regions.top_set_jaccards(a, b, self.layout).mean())  # noqa: E731
        out = {}
        for name in self.names:
            stability = {}
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
            "method": {
                "split_half_jaccard": "mean over matrices (those whose Top k% is not empty) of the Jaccard of the "
                "per-matrix Top k% of two halves of a language's scoring windows: odd against even windows at "
                "the budget; at half the budget the even windows' own halves (0 and 2 mod 4), at a quarter "
                "0 and 4 mod 8. Each half is scored as if it were all the language had.",
                "specificity": "mean over language pairs (L, L') of (J_L + J_L')/2 − mean of the four Jaccards "
                "between a half of L and a half of L' (the same tokens per half as within)",
                "ci95": f"percentile interval over {resamples} seeded resamples, each drawing one of "
                f"{n_splits} half-split(s) of each language's window groups (odd/even, then random ones) and the "
                "languages with replacement (pairs of a language with itself are left out)",
                "seed": self.seed,
            },
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


def stability_key(run: Run, windows: list[Windows], names: list[str]) -> str:
    """What the split-half results depend on: each estimator's inputs and how the halves are made."""
    cfg = run.cfg
    return digest(
        {
            "made_of": [_made_of(run, n, windows, "matrix") for n in names],
            "ratio": cfg.est_overlap_ratio,
            "groups": GROUPS,
            "splits": SPLITS,
            "seed": cfg.seed,
            "resamples": uncertainty.RESAMPLES,
        }
    )


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
        ax.scatter([x], [y], s=size, alpha=0.7, label=f"{n} (damage @{_pct(k0)} {markup.fmt(e['damage'][k0])})")
        ax.annotate(n, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.axvline(0, color="#bbbbbb", ls=":")
    stab = result["stability"]
    ax.set(
        xlabel="specificity: within − between-language Jaccard (95% interval)",
        ylabel="split-half Jaccard at the budget",
        title=f"Per-language Top {_pct(at)}: stability, specificity and damage (marker size)",
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


def measure(run: Run) -> dict:
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
    # The split-half Top sets come from the same pass as the regions: its sums are kept per group of
    # windows while it runs. Both are cached; a pass runs only for what is missing.
    split_names = [n for n in cfg.est_estimators if importance.per_language(n)]
    key, cache = stability_key(run, windows, split_names), run.out / "results" / STABILITY
    cached = read_json(cache) if cache.is_file() else {}
    stability = cached.get("stability") if cached.get("key") == key else None
    splitter = None if stability else SplitHalf(t, split_names, cfg.est_overlap_ratio, cfg.seed)

    def compute(which):
        which = list(which)
        extra = [n for n in split_names if n not in which] if splitter else []
        groups, visit = (GROUPS, splitter.visit) if splitter else (1, None)
        for name, scores in importance.iter_estimates(t, windows, which + extra, run.progress, groups, visit):
            if name in which:
                yield name, scores

    regions = _regions(run, cfg.est_estimators, ratios, made, scopes, compute)
    if splitter:
        if not splitter.groups:  # every region was read back: a pass for the halves alone
            for _ in compute([]):
                pass
        stability = splitter.result()
        write_json(cache, {"key": key, "stability": stability})
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
    table = by_estimator(stability, curves, f"{at:g}")

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
    figs = run.out / "figures"
    write_bytes(figs / "estimators-damage.png", damage_chart(result))
    write_bytes(figs / "estimators-stability.png", stability_chart(result))
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
        f"{'do' if len(tied) > 1 else 'does'} the most damage (mean ln perplexity ratio {markup.fmt(d[tied[0]][r0])}"
        + (", every language past a uniform guess" if tied[0] in full[r0] else "")
        + f"; then {', '.join(f'{n} {markup.fmt(d[n][r0])}' for n in rest)}; Random {markup.fmt(d['random'][r0])})"
        + (f", with ties broken at {_pct(ratios[k])}." if k else ".")
    )
    out = [text, result["answer"].split(". ")[0].rstrip(".") + "."]
    if "recommendation" in result:
        out.append(recommendation_text(result))
    return out


def section(result: dict) -> list:
    """Report blocks: the damage curves, the estimators' overlap, and the specificity of the core region."""
    fmt, ratios, curves = markup.fmt, result["ratios"], result["damage"]
    names = [n for n in curves if n != "random"]
    spec, r0 = result["specificity"], answer_ratio(result) or ratios[0]
    labels = list(spec[r0])
    settings = [spec[r0][label]["setting"] for label in labels]
    over = result["overlap_ratio"]
    return [
        markup.heading("Importance estimators and the specificity of the core region"),
        markup.text(
            f"Each estimator scores {', '.join(result['score_languages'])} ({result['tokens_per_language']:,} "
            f"tokens each in windows of {result['score_seq_len']}, one pass for all); its Top k% is set to the "
            f"removed value and the damage is the mean ln(perplexity ratio) over "
            f"{', '.join(result['eval_languages'])} ({result['eval_tokens_per_language']:,} tokens each). "
            "Selection scope: " + ", ".join(f"{n} {s}" for n, s in result["scopes"].items()) + "."
        ),
        markup.bullets([f"**{n}**: {d}" for n, d in result["definitions"].items()]),
        markup.table(
            ["estimator", *map(_pct, ratios)],
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
        markup.table(
            ["", *names],
            [[a, *[f"{result['jaccard'][a][b]:.3f}" for b in names]] for a in names],
            caption=f"Jaccard overlap of the Top {_pct(over)} regions (chance "
            f"{result['chance_jaccard']:.4f}): which estimators find the same parameters?",
        ),
        markup.figure("figures/estimators-jaccard.png", "The overlap as a heat map."),
        *stability_section(result),
        markup.heading("Is the core region specific to language?", 3),
        markup.table(
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
        markup.table(
            ["language", *labels],
            [
                [lang, *[fmt(result["damage_by_language"][s][lang]) for s in settings]]
                for lang in result["eval_languages"]
            ],
            caption=f"ln perplexity ratio per evaluation language at {_pct(r0)}: does a control hurt some "
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


def stability_section(result: dict) -> list:
    """The three rankings side by side, the figure, and the recommendation with its rule."""
    if "by_estimator" not in result:  # a summary saved before stability was measured
        return []
    table, at, stab = result["by_estimator"], result["overlap_ratio"], result["stability"]
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
    head = [f"J {lv}" + (f" ({tokens[lv]:,.0f} tok/half)" if tokens[lv] else "") for lv in labels]
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
    skipped = [f"{n}: {e['note']}" for n, e in table.items() if n not in measured]
    return [
        markup.heading("Stable and language-specific? Each estimator's per-language regions", 3),
        markup.text(
            f"Each estimator's per-matrix Top {_pct(at)} of one language's score, from two halves of that "
            f"language's scoring windows (kept apart in the same pass, no extra forward or backward pass). "
            f"Stability: the split-half Jaccard, mean over matrices and over {', '.join(stab['languages'])}, at the "
            "budget and at half and a quarter of it (halves of the same windows). Specificity: the mean over "
            "language pairs of the within-language split-half Jaccard minus the Jaccard between the two "
            f"languages' halves. Interval: {stab['method']['ci95']}."
        ),
        markup.table(
            ["estimator", f"damage @{_pct(k0)}", *head, "stability rank", "specificity [95%]", "specificity > 0"],
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
