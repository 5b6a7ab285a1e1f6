"""Scores → a Region: a set of parameter entries, stored as one packed bit mask per matrix.

Selection is Top / Bottom / Random k%, per matrix (as the paper) or over all scored parameters at once
(`global`). It runs in linear time without sorting: the k-th value is found (quickselect within a matrix;
across matrices, a sampled bracket and one counting pass, with bisection on the bit patterns of the
non-negative scores as the exact fallback), entries strictly past it are taken, and ties at it are filled
in a fixed order (parameter order, then flat index), so a selection is exact in size and reproducible.
Masks are packed matrix by matrix, so the working memory stays about one copy of the largest matrix.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .store import Corrupt, LingregionError, read_tensors, write_tensors

SIDES = ("top", "bottom", "random")
FORMAT = "lingregion-region-v2"  # v1: the same, uncompressed
SCOPES = ("matrix", "global")
MATRIX_THREADS = 4
SAMPLE = 4096  # entries of a matrix that bracket its k-th value (tails)


def map_matrices(fn: Callable, items: Iterable) -> list:
    """[fn(item) for item in items], on torch's threads (at most MATRIX_THREADS). Per-matrix work is a few
    whole-array numpy passes, which release the GIL, so matrices run in parallel; each thread holds one
    matrix's scratch (a 7B model's largest matrix has 45M entries)."""
    workers = max(1, min(MATRIX_THREADS, torch.get_num_threads()))
    if workers == 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


def _pack(mask: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(mask.reshape(-1).cpu().numpy()))


def _unpack(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    n = int(np.prod(shape))
    return torch.from_numpy(np.unpackbits(packed.numpy(), count=n).astype(bool)).reshape(shape)


def _popcount(packed: torch.Tensor) -> int:
    return int(np.bitwise_count(packed.numpy()).sum())


def _inflate(blob: bytes, size: int) -> bytes | None:
    """`blob` decompressed if it is zlib data of exactly `size` bytes, else None. At most size + 1 bytes are ever
    produced, so a crafted file (a few bytes that inflate to gigabytes) cannot exhaust memory."""
    if size < 0:
        return None
    inflater = zlib.decompressobj()
    try:
        data = inflater.decompress(blob, size + 1)
    except zlib.error:
        return None
    return data if len(data) == size and inflater.eof else None


@dataclass
class Region:
    """A set of entries of named parameters: 1 bit per parameter, with how it was made in `meta`."""

    packed: dict[str, torch.Tensor]  # uint8, np.packbits order
    shapes: dict[str, tuple[int, ...]]
    meta: dict = field(default_factory=dict)

    @classmethod
    def from_masks(cls, masks: Mapping[str, torch.Tensor], meta: dict | None = None) -> Region:
        """A region from one boolean mask per parameter (the masks are packed to 1 bit per entry)."""
        return cls(
            {n: _pack(m.bool()) for n, m in masks.items()},
            {n: tuple(m.shape) for n, m in masks.items()},
            dict(meta or {}),
        )

    @classmethod
    def from_ranked(
        cls,
        ranked: Mapping[tuple[str, int], np.ndarray],
        shapes: Mapping[str, tuple[int, ...]],
        ratio: float,
        meta=None,
    ) -> Region:
        """The per-matrix Top `ratio` of scores whose Top entries are given ranked (flat indices by falling score,
        ties by index, per (name, expert): uncertainty.ranked_tops): the entries select(scores, ratio) takes."""
        masks = {}
        for n, shape in shapes.items():
            m = torch.zeros(shape, dtype=torch.bool)
            for e, part in enumerate(m.reshape(-1, *shape[-2:]) if len(shape) == 3 else [m]):
                part.view(-1)[torch.from_numpy(ranked[(n, e)][: round(ratio * part.numel())])] = True
            masks[n] = m
        return cls.from_masks(masks, dict(meta or {}, ratio=ratio, side="top", scope="matrix", seed=None))

    def mask(self, name: str) -> torch.Tensor:
        """The boolean mask of one parameter, unpacked to the parameter's shape."""
        return _unpack(self.packed[name], self.shapes[name])

    def indices(self, name: str) -> torch.Tensor:
        """Flat indices of the selected entries of one parameter."""
        return self.mask(name).reshape(-1).nonzero().squeeze(1)

    def count(self, name: str | None = None) -> int:
        """Selected entries, of one parameter or (by default) of all of them."""
        names = [name] if name else self.packed
        return sum(_popcount(self.packed[n]) for n in names)

    def total(self) -> int:
        """Entries of all the parameters the region covers, selected or not."""
        return sum(int(np.prod(s)) for s in self.shapes.values())

    def _combine(self, other: Region, op, label: str) -> Region:
        if self.shapes != other.shapes:
            raise LingregionError(
                "regions cover different parameters or shapes; they come from different models or patterns"
            )
        packed = {n: torch.from_numpy(op(self.packed[n].numpy(), other.packed[n].numpy())) for n in self.packed}
        return Region(
            packed,
            dict(self.shapes),
            {"operation": label, "left": self.meta, "right": other.meta, "model": self.meta.get("model")},
        )

    def __or__(self, other: Region) -> Region:
        return self._combine(other, np.bitwise_or, "union")

    def __and__(self, other: Region) -> Region:
        return self._combine(other, np.bitwise_and, "intersection")

    def __sub__(self, other: Region) -> Region:
        return self._combine(other, lambda a, b: np.bitwise_and(a, np.bitwise_not(b)), "difference")

    def jaccard(self, other: Region) -> float:
        """|A ∩ B| / |A ∪ B|: how far two regions agree (1.0 when both are empty)."""
        union = (self | other).count()
        return (self & other).count() / union if union else 1.0

    def matrix_jaccards(self, other: Region) -> np.ndarray:
        """|A ∩ B| / |A ∪ B| of each matrix, in parameter order, matrices where both are empty left out."""
        both, either = self & other, self | other
        return np.array([both.count(n) / either.count(n) for n in self.packed if either.count(n)])

    def save(self, path: Path) -> None:
        """Write the masks, shapes and meta to a safetensors file (atomically). Each packed mask is stored
        zlib-compressed: a k% region has far less than 1 bit of information per entry (a 3% mask compresses
        to about 0.3 bits), and the run folders of large models hold dozens of regions."""
        meta = dict(self.meta, shapes={n: list(s) for n, s in self.shapes.items()}, format=FORMAT)
        squeezed = {
            n: torch.frombuffer(bytearray(zlib.compress(p.numpy().tobytes(), 1)), dtype=torch.uint8)
            for n, p in self.packed.items()
        }
        write_tensors(path, squeezed, meta)

    @classmethod
    def load(cls, path: Path) -> Region:
        """Read a region written by `save` (or an uncompressed v1 file of earlier versions), refusing score files and
        masks of the wrong size."""
        tensors, meta = read_tensors(path)
        if meta.get("format") not in (FORMAT, "lingregion-region-v1"):
            raise LingregionError(
                f"{path}: not a region file (it may be a score file); pass a file written by 'lingregion locate'"
            )
        compressed = meta.pop("format") == FORMAT
        try:
            shapes = {n: tuple(int(d) for d in s) for n, s in meta.pop("shapes").items()}
        except (KeyError, TypeError, ValueError, AttributeError):
            raise Corrupt(path, "its shapes record is missing or malformed; the file is corrupt") from None
        packed = {}
        for n, t in tensors.items():
            size = (int(np.prod(shapes[n])) + 7) // 8 if n in shapes else -1
            raw = t.numpy().tobytes()
            data = _inflate(raw, size) if compressed else raw
            if t.dtype != torch.uint8 or data is None or len(data) != size:
                raise Corrupt(path, f"mask for {n} has the wrong size; the file is corrupt")
            packed[n] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return cls(packed, shapes, meta)

    def check_model(self, model, fingerprint: str) -> None:
        """Refuse a region made on another model: different fingerprint or parameter shapes."""
        params = dict(model.named_parameters())
        bad = [n for n, s in self.shapes.items() if n not in params or tuple(params[n].shape) != s]
        if bad:
            raise LingregionError(
                f"region does not fit this model (parameter {bad[0]} missing or of another shape); "
                "locate the region again with this model"
            )
        if self.meta.get("model") and self.meta["model"] != fingerprint:
            raise LingregionError(
                f"region was made on model {self.meta['model']}, this model is {fingerprint}; "
                "locate the region again with this model"
            )


def _float_of(bits: int) -> float:
    return torch.tensor(bits, dtype=torch.int32).view(torch.float32).item()


def _select_group(
    scores: Mapping[str, torch.Tensor], names: list[str], k: int, largest: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, mask) of the k largest (or smallest) entries across `names`, one matrix at a time (so that
    the caller can pack each before the next is made); ties broken by parameter order, then index."""
    if k == 0:
        yield from ((n, torch.zeros(scores[n].shape, dtype=torch.bool)) for n in names)
        return
    if len(names) == 1 and scores[names[0]].device.type == "cpu":  # one matrix: a sampled bracket, one pass
        x = scores[names[0]]
        m = torch.zeros(x.shape, dtype=torch.bool)
        m.view(-1)[torch.from_numpy(tail_indices(x.detach().reshape(-1).float().numpy(), k, largest))] = True
        yield names[0], m
        return
    beyond = torch.gt if largest else torch.lt
    threshold, n_beyond = _kth(scores, names, k, largest)
    need = k - n_beyond
    for n in names:
        x = scores[n]
        m = beyond(x, threshold)
        if need > 0:
            tie = (x.reshape(-1) == threshold).nonzero().squeeze(1)[:need]
            m.view(-1)[tie] = True
            need -= len(tie)
        yield n, m


def _kth(scores: Mapping[str, torch.Tensor], names: list[str], k: int, largest: bool) -> tuple[float, int]:
    """The k-th largest (smallest) value across `names`, and how many values lie strictly beyond it.

    One matrix: quickselect on a copy of it. Several: a seeded sample of s values brackets the k-th
    one (±2√s ranks, four standard deviations); a single pass counts the values beyond the bracket and
    gathers those inside it (about 4·n/√s of the n values; s ≈ (4n)^⅔ balances the two), and the k-th
    is picked among those. Should the bracket miss, or hold more values than the largest matrix (ties),
    bisection finds it exactly instead.
    """
    beyond = torch.gt if largest else torch.lt
    if len(names) == 1:
        x = scores[names[0]].reshape(-1).float()
        kth = _smallest(x, x.numel() - k if largest else k - 1)
        return kth, int(beyond(x, kth).count_nonzero())
    sizes = [scores[n].numel() for n in names]
    total, cap = sum(sizes), max(sizes)
    sample = _sample(scores, names, sizes, min(total, max(1 << 16, round((4 * total) ** (2 / 3)))))
    outer, inner = _bracket(sample, k, total, largest)
    del sample
    within, short_of = (torch.ge, torch.le) if largest else (torch.le, torch.ge)
    n_outer, inside, kept = 0, [], 0
    for n in names:
        x = scores[n].reshape(-1)
        n_outer += int(beyond(x, outer).count_nonzero())
        keep = within(x, inner).logical_and_(short_of(x, outer))  # two boolean masks at a time, at most
        inside.append(x[keep].float())
        kept += len(inside[-1])
        if kept > cap:
            break
    if kept <= cap and n_outer < k <= n_outer + kept:
        values = torch.cat(inside)
        del inside
        j = k - n_outer  # the j-th largest (smallest) inside the bracket
        kth = _smallest(values, len(values) - j if largest else j - 1)
        return kth, n_outer + int(beyond(values, kth).count_nonzero())
    del inside
    kth = _bisect(lambda t: sum(int(beyond(scores[n], t).count_nonzero()) for n in names), k, largest)
    return kth, sum(int(beyond(scores[n], kth).count_nonzero()) for n in names)


def _bracket(sample: torch.Tensor, k: int, total: int, largest: bool) -> tuple[float, float]:
    """Values that lie beyond (outer) and short of (inner) the k-th of `total` values, read off a sample
    of them at ±2√s ranks around where the k-th falls; a miss only costs the fallback."""
    s = len(sample)
    rank, margin = k * s / total, 2 * s**0.5 + 8
    lo, hi = int(rank - margin), int(rank + margin)  # 0-based ranks from the selected end
    far = math.inf if largest else -math.inf
    outer = _smallest(sample, s - 1 - lo if largest else lo) if lo >= 0 else far
    inner = _smallest(sample, s - 1 - hi if largest else hi) if hi < s else -far
    return outer, inner


def _smallest(x: torch.Tensor, i: int) -> float:
    """The value of rank i (0-based, ascending) of a 1-D tensor: on a CPU by quickselect on one copy of
    it (numpy's partition; torch's CPU kthvalue would add an int64 index per entry); on a GPU by a
    radix top-k from the nearer end (kthvalue runs a whole vector in one thread block there)."""
    if x.device.type == "cpu":
        return float(np.partition(x.numpy(), i)[i])
    return _smallest_by_topk(x, i)


def _smallest_by_topk(x: torch.Tensor, i: int) -> float:
    if i < len(x) // 2:
        return float(x.topk(i + 1, largest=False, sorted=False).values.max())
    return float(x.topk(len(x) - i, sorted=False).values.min())


def _sample(scores: Mapping[str, torch.Tensor], names: list[str], sizes: list[int], count: int) -> torch.Tensor:
    """About `count` values, drawn (seeded, with replacement) from each matrix in proportion to its size."""
    g, total = torch.Generator().manual_seed(0), sum(sizes)
    counts = [max(1, count * size // total) for size in sizes]
    out, start = torch.empty(sum(counts)), 0
    for n, size, c in zip(names, sizes, counts):
        out[start : start + c] = scores[n].reshape(-1)[torch.randint(0, size, (c,), generator=g)]
        start += c
    return out


def _bisect(count_beyond, k: int, largest: bool) -> float:
    """The k-th value over several matrices, by bisection over the int32 patterns of non-negative floats
    (whose order is the order of the values), counting one matrix at a time."""
    lo, hi = 0, 0x7F800000  # +0.0 .. +inf
    if largest:  # the smallest t with fewer than k values above it
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if count_beyond(_float_of(mid)) < k else (mid + 1, hi)
    else:  # the largest t with fewer than k values below it
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if count_beyond(_float_of(mid)) < k else (lo, mid - 1)
    return _float_of(lo)


class _Uniform(Mapping):
    """Seeded uniform random scores, made one matrix at a time (Random = Top of these)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], seed: int):
        self.shapes, self.seed = shapes, seed

    def __getitem__(self, name: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        return torch.rand(self.shapes[name], generator=g)

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def select(
    scores: Mapping[str, torch.Tensor],
    ratio: float,
    side: str = "top",
    scope: str = "matrix",
    seed: int = 0,
    meta: dict | None = None,
) -> Region:
    """Top / Bottom / Random `ratio` of the entries, per matrix or over all scored parameters.

    The number taken from a group of n entries is round(ratio · n).
    """
    if not 0 < ratio < 1:
        raise LingregionError(f"ratio {ratio} is outside (0, 1); pass a fraction such as 0.01 for 1%")
    if side not in SIDES:
        raise LingregionError(f"unknown side {side!r}; use one of {', '.join(SIDES)}")
    if scope not in SCOPES:
        raise LingregionError(f"unknown scope {scope!r}; use one of {', '.join(SCOPES)}")
    names = list(scores)
    shapes = {n: tuple(scores[n].shape) for n in names}
    if side == "random":
        scores = _Uniform(shapes, seed)
    else:
        for n in names:
            lo, hi = torch.aminmax(scores[n])
            if not (lo >= 0 and hi < math.inf):  # NaN fails both
                raise LingregionError(f"scores of {n} are negative or not finite; importance scores must be ≥ 0")
    groups = [[n] for n in names] if scope == "matrix" else [names]
    packed: dict[str, torch.Tensor] = {}
    for group in groups:
        if scope == "matrix" and len(shapes[group[0]]) == 3:  # a stack [experts, out, in]: each expert a matrix
            packed[group[0]] = _pack(_select_stack(scores[group[0]], ratio, largest=side != "bottom"))
            continue
        k = round(ratio * sum(int(np.prod(shapes[n])) for n in group))
        for n, mask in _select_group(scores, group, k, largest=side != "bottom"):
            packed[n] = _pack(mask)  # 1 bit per entry before the next matrix's mask exists
    return Region(
        packed, shapes, dict(meta or {}, ratio=ratio, side=side, scope=scope, seed=seed if side == "random" else None)
    )


def _select_stack(x: torch.Tensor, ratio: float, largest: bool) -> torch.Tensor:
    """Mask of the per-matrix selection in each matrix x[e] of a stack (mixture-of-experts experts stored as
    one [experts, out, in] parameter), so that every expert's matrix loses its share like any matrix."""
    picks = [next(_select_group({"m": m}, ["m"], round(ratio * m.numel()), largest))[1] for m in x]
    return torch.stack(picks)


def monolingual(tops: Mapping[str, Region], lang: str) -> Region:
    """S_L* = S_L − ∪_{L' ≠ L} S_L': entries in L's own Top set and in no other language's."""
    if lang not in tops or len(tops) < 2:
        raise LingregionError(f"a monolingual region of {lang!r} needs its Top set and at least one other language's")
    others = [r for other, r in tops.items() if other != lang]
    union = others[0]
    for r in others[1:]:
        union = union | r
    region = tops[lang] - union
    region.meta = dict(
        tops[lang].meta,
        label=f"monolingual-{lang}",
        languages=list(tops),
        definition="S_L − ∪ S_L' (per-matrix Top sets)",
    )
    return region


def matching(
    scores: Mapping[str, torch.Tensor], like: Region, side: str = "bottom", meta: dict | None = None
) -> Region:
    """The `side` entries of `scores` with exactly as many entries per matrix as `like` (a same-size control)."""
    masks = {}
    for n in like.packed:
        masks.update(_select_group(scores, [n], like.count(n), largest=side == "top"))
    return Region.from_masks(masks, dict(meta or {}, side=side, matches=like.meta.get("label")))


# --- Top sets of many subsets, compared matrix by matrix ------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """Where each scored matrix's entries sit in one flat index space, and how many its Top k% takes
    (round(ratio · n), as `select` takes per matrix)."""

    names: tuple[str, ...]
    offsets: tuple[int, ...]  # flat index of each matrix's first entry
    k: tuple[int, ...]

    @classmethod
    def of(cls, shapes: dict[str, tuple[int, ...]], ratio: float) -> Layout:
        """The layout of parameters with these shapes (in this order) at Top `ratio` per matrix."""
        sizes = [int(np.prod(s)) for s in shapes.values()]
        return cls(
            tuple(shapes), tuple(int(o) for o in np.cumsum([0, *sizes[:-1]])), tuple(round(ratio * n) for n in sizes)
        )


def top_set(scores: dict[str, torch.Tensor], layout: Layout) -> np.ndarray:
    """The per-matrix Top set of `scores` as sorted flat indices (int64): the same entries as
    select(scores, ratio, "top") takes, ties at the k-th value filled by lowest index, but about
    ten times faster, because only the entries above a sampled bracket of the k-th value are partitioned."""
    out = []
    for name, offset, k in zip(layout.names, layout.offsets, layout.k):
        if k:
            out.append(tail_indices(scores[name].detach().reshape(-1).float().cpu().numpy(), k) + offset)
    return np.sort(np.concatenate(out)) if out else np.zeros(0, dtype=np.int64)


def tail_indices(v: np.ndarray, k: int, largest: bool = True) -> np.ndarray:
    """Indices of the k largest (smallest) entries of the flat array v, ties at the k-th value by lowest
    index: the entries `select` takes from one matrix, unordered. Only the entries beyond a sampled bracket
    of the k-th value are partitioned, so this costs about one comparison pass over v."""
    return tails(v, k, (largest,))[0]


def tails(v: np.ndarray, k: int, sides: tuple[bool, ...] = (True, False)) -> list[np.ndarray]:
    """`tail_indices(v, k, largest)` for each `largest` of `sides`, bracketed from one sample."""
    n = len(v)
    if k <= 0:
        return [np.zeros(0, dtype=np.int64) for _ in sides]
    # Sampled at random positions: a stride would sample a few columns of a matrix, and columns differ
    # (outlier dimensions), which biases the bracket. Any sample gives the same result; this one is fixed.
    s = v if n <= 2 * SAMPLE else v[np.random.default_rng(n).integers(0, n, SAMPLE)]
    # Sample quantiles a few standard deviations short of the k-th value from either end: every selected
    # entry lies beyond its side's (checked: if fewer than k entries do, that side takes them all).
    m, spread = len(s), 4 * np.sqrt(len(s) * k / n) + 2
    at = {True: int(m * (1 - k / n) - spread), False: int(m * k / n + spread)}
    if all(0 < at[side] < m - 1 for side in sides):
        q = np.partition(s, [at[side] for side in sides])
        cands = [np.flatnonzero(v >= q[at[side]] if side else v <= q[at[side]]) for side in sides]
    else:
        cands = [np.arange(n)] * len(sides)
    return [
        _tail(c, v[c], k, side) if len(c) >= k else _tail(np.arange(n), v, k, side) for c, side in zip(cands, sides)
    ]


def _tail(cand: np.ndarray, w: np.ndarray, k: int, largest: bool) -> np.ndarray:
    """The k largest (smallest) of the candidate entries `cand` (values w, which hold all of v's), ties by
    lowest index (cand is in index order)."""
    j = len(w) - k if largest else k - 1
    kth = np.partition(w, j)[j]
    beyond = cand[w > kth] if largest else cand[w < kth]
    return np.concatenate([beyond, cand[w == kth][: k - len(beyond)]]).astype(np.int64, copy=False)


def top_set_jaccards(a: np.ndarray, b: np.ndarray, layout: Layout) -> np.ndarray:
    """Jaccard of two per-matrix Top sets (from `top_set`), one value per matrix with k > 0: both take k
    entries, so |A ∪ B| = 2k − |A ∩ B|."""
    pos = np.minimum(np.searchsorted(b, a), max(len(b) - 1, 0))
    hit = np.concatenate([[0], np.cumsum(b[pos] == a if len(b) else np.zeros(len(a), bool))])
    k = np.array([x for x in layout.k if x])
    ends = np.cumsum(k)
    inter = hit[ends] - hit[ends - k]
    return inter / (2 * k - inter)
