"""How far a number would move with other text: bootstrap intervals, split-half stability of a region,
the token budget a stable region needs, and verdicts read off intervals.

Perplexity intervals resample blocks of consecutive predicted tokens (evaluation.perplexity's `blocks`),
not windows, so that a single window still gives an interval. A ratio of two settings evaluated on the
same text resamples the same blocks for both (paired): a block of hard text raises both perplexities,
and pairing cancels it. Intervals are percentile intervals, seeded.

Region stability compares the regions of the two halves of a language's scoring windows (scoring.Split).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import numpy as np
import torch
from scipy import stats

from .regions import map_matrices, tail_indices
from .store import LingregionError

RESAMPLES = 2000
LEVEL = 0.95
SPEARMAN_SAMPLE = 20_000  # entries per matrix: ρ's standard error ≤ 0.007 per matrix, far less over the mean
HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold", "inconclusive"
RULE = (
    "A finding holds when its whole 95% interval lies beyond the threshold in the hypothesised direction, "
    "does not hold when the whole interval lies on the other side of the threshold, and is inconclusive "
    "at this budget when the interval contains the threshold. No verdict rests on a point estimate."
)
_CHUNK = 1 << 22  # resamples × blocks per matrix of resampling counts (32 MB of int64)


def _columns(result: Mapping) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(NLL, tokens, bytes) per block, from a perplexity result or its "blocks"."""
    b = result.get("blocks", result)
    if not len(b["nll"]):
        raise LingregionError("no blocks to resample: the evaluation covered no tokens")
    return tuple(np.asarray(b[k], dtype=np.float64) for k in ("nll", "tokens", "bytes"))


def _counts(m: int, n: int, rng: np.random.Generator):
    """n bootstrap resamples of m blocks, as how often each block is drawn: chunks of (resamples, m)."""
    step = max(1, _CHUNK // m)
    for i in range(0, n, step):
        yield rng.multinomial(m, np.full(m, 1 / m), size=min(step, n - i))


def _interval(values: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def ratio(num: Mapping, den: Mapping) -> float:
    """Perplexity ratio num / den = exp(ΣNLL_num/Σtok_num − ΣNLL_den/Σtok_den), from their blocks."""
    (a, ta, _), (b, tb, _) = _columns(num), _columns(den)
    return math.exp(a.sum() / ta.sum() - b.sum() / tb.sum())


def paired_bootstrap(
    num: Mapping, den: Mapping, n: int = RESAMPLES, seed: int = 0, level: float = LEVEL, paired: bool = True
) -> tuple[float, float]:
    """`level` percentile interval of the perplexity ratio num / den (perplexity results or their blocks).

    paired: resample the same block indices for both, which must then be blocks of the same text (equal
    token counts block by block). paired=False resamples each side on its own (texts that differ)."""
    (a, ta, _), (b, tb, _) = _columns(num), _columns(den)
    rng = np.random.default_rng(seed)
    if paired:
        if not np.array_equal(ta, tb):
            raise LingregionError("a paired interval needs blocks of the same text on both sides; pass paired=False")
        log_ratio = np.concatenate([(c @ a - c @ b) / (c @ ta) for c in _counts(len(a), n, rng)])
    else:
        num_rate = np.concatenate([(c @ a) / (c @ ta) for c in _counts(len(a), n, rng)])
        den_rate = np.concatenate([(c @ b) / (c @ tb) for c in _counts(len(b), n, rng)])
        log_ratio = num_rate - den_rate
    lo, hi = _interval(log_ratio, level)
    return math.exp(lo), math.exp(hi)


def bootstrap_ppl(
    result: Mapping, n: int = RESAMPLES, seed: int = 0, level: float = LEVEL
) -> dict[str, tuple[float, float]]:
    """`level` percentile intervals of one setting's perplexity and bits per byte: {"ppl": (lo, hi),
    "bpb": (lo, hi)}, both from the same resamples of its blocks."""
    nll, tokens, n_bytes = _columns(result)
    rng = np.random.default_rng(seed)
    per_token, per_byte = [], []
    for c in _counts(len(nll), n, rng):
        total = c @ nll
        per_token.append(total / (c @ tokens))
        per_byte.append(total / (c @ n_bytes) / math.log(2))
    lo, hi = _interval(np.concatenate(per_token), level)
    return {"ppl": (math.exp(lo), math.exp(hi)), "bpb": _interval(np.concatenate(per_byte), level)}


def method_record(n: int = RESAMPLES, block: int = 64, level: float = LEVEL, seed: int = 0) -> dict:
    """How the intervals were made, stored beside them (e.g. in a summary's "ci95_method")."""
    return {
        "method": "percentile bootstrap; a ratio's numerator and denominator resample the same blocks (paired)",
        "unit": f"block of {block} consecutive predicted tokens of one window (a window's last block may be shorter)",
        "resamples": n,
        "level": level,
        "seed": seed,
    }


def verdict(interval: tuple[float, float], threshold: float, direction: str) -> str:
    """HOLDS, FAILS or INCONCLUSIVE for the hypothesis "the value is `direction` ('above' or 'below')
    `threshold`", by RULE."""
    lo, hi = interval
    if direction == "above":
        return HOLDS if lo > threshold else FAILS if hi < threshold else INCONCLUSIVE
    if direction == "below":
        return HOLDS if hi < threshold else FAILS if lo > threshold else INCONCLUSIVE
    raise LingregionError(f"unknown direction {direction!r}; use 'above' or 'below'")


STABLE_SHARES = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)  # the grid `stable_share` searches
STABLE_JACCARD = 0.9


def matrix_sample(names: list[str], share: float, seed: int = 0) -> list[str]:
    """The scored parameters that keep split halves: from each kind of parameter (the same name but for the
    layer number, e.g. every layer's mlp.up_proj.weight) a seeded sample of round(share · count), at least
    one, in parameter order. Every role and a spread of depths is represented, and the halves cost `share`
    of the accumulator memory instead of all of it."""
    if not 0 < share <= 1:
        raise LingregionError(f"split-half share {share} is outside (0, 1]; pass e.g. 0.125")
    kinds: dict[str, list[str]] = {}
    for n in names:
        kinds.setdefault(re.sub(r"\.\d+\.", ".#.", n), []).append(n)
    rng, keep = np.random.default_rng(seed), set()
    for members in kinds.values():
        k = max(1, round(share * len(members)))
        keep.update(members[i] for i in rng.choice(len(members), k, replace=False))
    return [n for n in names if n in keep]


def ranked_tops(scores: Mapping[str, torch.Tensor], share: float) -> dict[tuple[str, int], np.ndarray]:
    """Per matrix (each expert of an [experts, out, in] stack its own, keyed (name, expert)), the flat indices
    of its Top `share` ranked by score, ties by lowest index: the first round(r · n) of them are exactly the
    entries `select(scores, r, "top")` takes, for every r ≤ share. One selection serves every smaller share."""
    matrices = [
        ((name, e), m.reshape(-1).numpy())
        for name, x in scores.items()
        for e, m in enumerate(_matrices(x.detach().float().cpu()))
    ]

    def ranked(item):
        _, v = item
        idx = tail_indices(v, round(share * len(v)))
        return idx[np.lexsort((idx, -v[idx]))]

    return dict(zip((key for key, _ in matrices), map_matrices(ranked, matrices)))


def _matrices(x: torch.Tensor) -> list[torch.Tensor]:
    """The matrices a selection treats on their own: each expert of an [experts, out, in] stack, else x."""
    return list(x.reshape(-1, *x.shape[-2:])) if x.dim() == 3 else [x]


def _sizes(scores: Mapping[str, torch.Tensor]) -> dict[tuple[str, int], int]:
    return {(n, e): m.numel() for n, x in scores.items() for e, m in enumerate(_matrices(x))}


def top_jaccards(ranked_a: dict, ranked_b: dict, sizes: dict[tuple[str, int], int], ratio: float) -> np.ndarray:
    """Jaccard of two per-matrix Top `ratio` sets (from `ranked_tops` of a share ≥ ratio), one value per matrix
    whose Top set is not empty (round(ratio · entries) > 0: an empty one would count as a perfect overlap)."""
    out = []
    for key, n in sizes.items():
        k = round(ratio * n)
        if k:
            inter = len(np.intersect1d(ranked_a[key][:k], ranked_b[key][:k], assume_unique=True))
            out.append(inter / (2 * k - inter))
    return np.asarray(out, dtype=np.float64)


def mean_interval(values: np.ndarray, seed: int = 0, n: int = RESAMPLES, level: float = LEVEL) -> dict:
    """{"value": the mean, "ci95": its percentile bootstrap interval over the values (here: matrices)}."""
    if not len(values):
        return {"value": math.nan, "ci95": None}
    means = values[np.random.default_rng(seed).integers(0, len(values), (n, len(values)))].mean(1)
    return {"value": float(values.mean()), "ci95": list(_interval(means, level))}


def split_half(
    half_a: Mapping[str, torch.Tensor], half_b: Mapping[str, torch.Tensor], ratios: list[float], seed: int = 0
) -> tuple[dict, dict]:
    """Split-half stability of a score from its two halves' importance: per ratio the mean over matrices of the
    Jaccard of the halves' per-matrix Top sets, with a bootstrap interval over matrices; the same over the
    grid of STABLE_SHARES, and the **stable share**: the largest share of the grid whose Jaccard interval lies
    wholly at or above STABLE_JACCARD (None: none does). Returns (statistics, ranked Top sets of each half)."""
    shares = sorted({*ratios, *STABLE_SHARES})
    ranked = [ranked_tops(h, max(shares)) for h in (half_a, half_b)]
    sizes = _sizes(half_a)
    at = {r: mean_interval(top_jaccards(*ranked, sizes, r), seed) for r in shares}
    stable = [r for r in STABLE_SHARES if at[r]["ci95"] and at[r]["ci95"][0] >= STABLE_JACCARD]
    stats_ = {
        "split_half_jaccard": {f"{r:g}": at[r]["value"] for r in sorted(ratios)},
        "split_half_jaccard_ci95": {f"{r:g}": at[r]["ci95"] for r in sorted(ratios)},
        "jaccard_by_share": {f"{r:g}": at[r] for r in STABLE_SHARES},
        "stable_core_share": max(stable, default=None),
        "matrices": len(sizes),
        "spearman": spearman(half_a, half_b, seed=seed),
    }
    return stats_, {"a": ranked[0], "b": ranked[1]}


def split_half_jaccard(half_a: Mapping[str, torch.Tensor], half_b: Mapping[str, torch.Tensor], ratio: float) -> float:
    """Mean over matrices of the Jaccard overlap of the two halves' per-matrix Top `ratio` sets.

    Matrices whose Top set is empty (round(ratio · entries) = 0) are left out: they would count as a
    perfect overlap of nothing."""
    ranked = [ranked_tops(h, ratio) for h in (half_a, half_b)]
    values = top_jaccards(*ranked, _sizes(half_a), ratio)
    return float(values.mean()) if len(values) else math.nan


def spearman(
    half_a: Mapping[str, torch.Tensor],
    half_b: Mapping[str, torch.Tensor],
    sample: int = SPEARMAN_SAMPLE,
    seed: int = 0,
) -> float:
    """Mean over matrices of Spearman's ρ between the two halves' scores of the matrix's entries.

    Per matrix, because regions are chosen per matrix: a correlation over all entries at once would be
    dominated by the differences of scale between matrices, which both halves share. A matrix of more
    than `sample` entries is represented by a seeded uniform sample of that many (the same positions in
    both halves), which bounds time and memory. Matrices constant in either half (ρ undefined) are left out."""
    rng, pairs = np.random.default_rng(seed), []
    for n in half_a:  # the samples are drawn in parameter order, so ρ does not depend on the threads
        x = half_a[n].reshape(-1).float().cpu().numpy()
        y = half_b[n].reshape(-1).float().cpu().numpy()
        if len(x) > sample:
            at = rng.choice(len(x), sample, replace=False)
            x, y = x[at], y[at]
        pairs.append((x, y))

    def rho(pair):
        x, y = pair
        return stats.spearmanr(x, y).statistic if x.min() < x.max() and y.min() < y.max() else None

    rhos = [r for r in map_matrices(rho, pairs) if r is not None]
    return float(np.mean(rhos)) if rhos else math.nan


FAR = 10  # no budget is ever stated beyond this many times the largest one measured


def fit_budget(tokens: list[int], jaccards: list[float], target: float = 0.9, far: float = FAR) -> dict:
    """The scoring budget at which a region would overlap an independent sample's with Jaccard `target`.

    tokens[i]: the tokens of EACH of the two compared samples (for split halves, half the scoring budget
    used), jaccards[i] their overlap. A split-half Jaccard at n tokens per half is the overlap of two
    independent samples of n tokens, so the answer, n*, is the budget a run needs for its region to agree
    with that of another run on other text of the same size. Model: logit(J) = a + b · ln(tokens),
    least squares over the points with 0 < J < 1; n* = exp((logit(target) − a) / b). The model is only a
    local description (measured curves also accelerate), so n* is given only within `far` times the
    largest budget measured.

    Returns {"tokens": n* or None, "reason": why None (else None), "model", "intercept": a, "slope": b,
    "extrapolation": n* / largest tokens given}."""
    if not 0 < target < 1:
        raise LingregionError(f"target Jaccard {target} must lie strictly between 0 and 1")
    t, j = np.asarray(tokens, dtype=np.float64), np.asarray(jaccards, dtype=np.float64)
    ok = (j > 0) & (j < 1) & (t > 0)
    out = {"tokens": None, "reason": None, "model": "logit(J) = a + b·ln(tokens per sample)"}
    if len(np.unique(t[ok])) < 2:
        return dict(out, reason="needs Jaccards strictly between 0 and 1 at two or more budgets")
    x, y = np.log(t[ok]), np.log(j[ok] / (1 - j[ok]))
    slope, intercept = np.polyfit(x, y, 1)
    out.update(intercept=float(intercept), slope=float(slope))
    if slope <= 0:
        return dict(out, reason="the split-half Jaccard does not grow with tokens at these budgets")
    needed = math.exp((math.log(target / (1 - target)) - intercept) / slope)
    extrapolation = needed / t[ok].max()
    if extrapolation > far:
        return dict(out, extrapolation=extrapolation, reason=f"not reached within {far:g}× the largest budget measured")
    return dict(out, tokens=needed, extrapolation=extrapolation)


def _slopes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least-squares slope of each row of y against x."""
    dx = x - x.mean()
    return (y - y.mean(-1, keepdims=True)) @ dx / (dx @ dx)


def doubling_gain(
    tokens: list[int], jaccards: list[float], replicates: np.ndarray, target: float = 0.9, far: float = FAR
) -> dict:
    """How much the split-half Jaccard gains per doubling of the budget, and what that says about `target`.

    tokens[i] (growing) and jaccards[i]: the measured curve; replicates: an array (resamples × budgets) of the
    same curve from bootstrap resamples of the windows. The gain is the least-squares slope of J against
    log2(tokens), with the replicates' percentile interval. The doublings still needed are (target − J_last) /
    gain, with the interval the gain's interval gives (None: unbounded); a budget is stated only when it lies
    within `far` times the largest measured one, otherwise "reason" says so in words."""
    x = np.log2(np.asarray(tokens, dtype=np.float64))
    j = np.asarray(jaccards, dtype=np.float64)
    if len(x) < 2:
        return {"per_doubling": None, "ci95": None, "tokens": None, "reason": "needs two or more budgets"}
    gain = float(_slopes(x, j[None])[0])
    lo, hi = _interval(_slopes(x, np.asarray(replicates, dtype=np.float64)), LEVEL)
    gap = target - float(j[-1])
    out = {"per_doubling": gain, "ci95": [lo, hi], "resamples": len(replicates), "unit": "window", "target": target}
    if gap <= 0:
        return dict(out, doublings=0.0, doublings_ci95=[0.0, 0.0], tokens=float(tokens[-1]), reason=None)

    def doublings(g):
        return gap / g if g > 0 else None

    n = doublings(gain)
    out.update(doublings=n, doublings_ci95=[doublings(hi), doublings(lo)])
    if n is not None and n <= math.log2(far):
        return dict(out, tokens=float(tokens[-1]) * 2**n, reason=None)
    about = (
        f"at the measured slope, about {n:.1f} doublings "
        + (f"[{gap / hi:.1f}, " if hi > 0 else "[unbounded, ")
        + (f"{gap / lo:.1f}]" if lo > 0 else "unbounded]")
        if n is not None
        else "the Jaccard does not grow with the budget at these budgets"
    )
    return dict(out, tokens=None, reason=f"not reached within {far:g}× the measured budget; {about}")


# --- intervals and verdicts of saved results, shared by the experiments whose findings are perplexity ratios ---
NO_BLOCKS = (
    "no per-block NLL in a cached result (made before intervals were kept); "
    "delete that results file and rerun to get an interval"
)


def has_blocks(result: dict) -> bool:
    """Whether a perplexity result carries the per-block NLL a bootstrap resamples."""
    return bool(result.get("blocks", {}).get("nll"))


def ratio_entry(num: dict, den: dict, seed: int = 0) -> dict:
    """The perplexity ratio num / den of two results on the same text, with its paired block-bootstrap 95%
    interval: {"value", "ci95": [lo, hi]}. Without blocks on either side (or blocks of different text) the
    interval is None and "reason" says why, so that a verdict reads inconclusive instead of failing."""
    if not (has_blocks(num) and has_blocks(den)):
        return {"value": num["ppl"] / den["ppl"], "ci95": None, "reason": NO_BLOCKS}
    try:
        ci = paired_bootstrap(num, den, seed=seed)
    except LingregionError as e:  # not the same text block for block: no paired interval
        return {"value": num["ppl"] / den["ppl"], "ci95": None, "reason": str(e)}
    return {"value": ratio(num, den), "ci95": list(ci)}


def joint_log_ppl(results: dict[str, dict], seed: int = 0, n: int = RESAMPLES):
    """Log perplexity of several results on the same text under the same n block resamples, so that any
    statistic of them (a difference of differences, a share of damage undone) gets a paired interval.

    Returns ({name: array of n log perplexities}, None), or (None, reason) when a result lacks blocks or
    the results are not block for block the same text."""
    if not all(has_blocks(r) for r in results.values()):
        return None, NO_BLOCKS
    first = next(iter(results.values()))["blocks"]["tokens"]
    if any(r["blocks"]["tokens"] != first for r in results.values()):
        return None, "the results are not evaluated on the same blocks of text"
    tokens = np.asarray(first, dtype=np.float64)
    nll = np.stack([np.asarray(r["blocks"]["nll"], dtype=np.float64) for r in results.values()])
    counts = np.random.default_rng(seed).multinomial(len(tokens), np.full(len(tokens), 1 / len(tokens)), size=n)
    logs = (counts @ nll.T) / (counts @ tokens)[:, None]  # (resamples, results)
    return {name: logs[:, i] for i, name in enumerate(results)}, None


def log_ppl(result: dict) -> float:
    """ln perplexity = Σ NLL / Σ tokens of one result (its point estimate)."""
    return result["nll"] / result["tokens"] if "nll" in result else math.log(result["ppl"])


def percentile(values: np.ndarray) -> list[float]:
    """The 95% percentile interval of bootstrap values, as [lo, hi]."""
    lo, hi = np.quantile(values, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return [float(lo), float(hi)]


def verdict_of(entry: dict | None, threshold: float, direction: str) -> str:
    """verdict of an entry's ci95; inconclusive when it has none (see its "reason")."""
    if not entry or entry.get("ci95") is None:
        return INCONCLUSIVE
    return verdict(tuple(entry["ci95"]), threshold, direction)


def all_of(verdicts: list[str]) -> str:
    """A conjunction of claims: holds when every part holds, does not hold when any part does not, else
    inconclusive (also when there is no part at all)."""
    if verdicts and all(v == HOLDS for v in verdicts):
        return HOLDS
    return FAILS if FAILS in verdicts else INCONCLUSIVE


def grouped(verdicts: dict[str, str]) -> str:
    """{language: verdict} as "**holds** for ru, zh; **inconclusive** for en"."""
    by: dict[str, list[str]] = {}
    for lang, v in verdicts.items():
        by.setdefault(v, []).append(lang)
    return "; ".join(f"**{v}** for {', '.join(langs)}" for v, langs in sorted(by.items()))


def without_blocks(result: dict, seed: int = 0) -> dict:
    """A perplexity result for a summary: its blocks dropped, its perplexity and bits per byte intervals
    ("ci95": {"ppl": [lo, hi], "bpb": [lo, hi]}, None without blocks) kept instead."""
    ci = {k: list(v) for k, v in bootstrap_ppl(result, seed=seed).items()} if has_blocks(result) else None
    return {k: v for k, v in result.items() if k != "blocks"} | {"ci95": ci}
