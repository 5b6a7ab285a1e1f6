"""Score files: per-language importance on disk, compact by default, with every region the run makes exact.

A run selects from scores only at a few shares of each matrix (the paper's Top / Bottom 1% and 3%, each
language's Top 3% and a Bottom control no larger), and sums languages into the core score. So the
compact format keeps exactly what selection reads and little else:

- the **exact tails**: the Top and the Bottom `exact_share` of each matrix, chosen by `regions.select`'s
  own rule (ties: lower flat index first), with their fp32 values;
- the **body** (everything between): a 4-bit code per entry, decoded to the mean of the fp32 scores that
  fell into that code's bin, and clamped strictly between the tails' inner values.

Any per-matrix Top or Bottom selection of k ≤ round(exact_share · n) entries (ratio ≤ exact_share, or a
matching control no larger) is then the same set as from the fp32 scores, ties included: the entries it
takes all lie in the tail, which holds their exact values, and every body entry decodes strictly short
of the tail (argued in `_decode`). Sums over languages of decoded scores are approximate in the body; a
run therefore keeps the core sum in a score file of its own (written from the fp32 sum) rather than
re-summing compact files. Sizes: 0.5 byte per entry for the codes and 4 bytes per tail entry, so
0.5 + 8 · exact_share bytes per scored parameter (0.74 at 3%), against 4 for float32.

`precision="bfloat16"` keeps every score rounded to bf16 (2 bytes, no exactness guarantee: for sums of
arbitrary language subsets), `"float32"` keeps them as computed. Files are safetensors (no code runs when
one is read) with the provenance record under the 'lingregion' metadata key; `load` also reads the
fp32 `lingregion-scores-v1` files of earlier versions.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from .regions import map_matrices, tails
from .store import LingregionError, read_tensors, write_tensors

FORMAT = "lingregion-scores-v2"
OLD_FORMATS = ("lingregion-scores-v1",)
PRECISIONS = ("compact", "bfloat16", "float32")
EXACT_SHARE = 0.03  # the paper's largest region share (core 3%, each language's Top 3%)
BODY_BITS = 4
_EXACT_CODE = (1 << BODY_BITS) - 1  # the code of a tail entry; body codes are 0 .. _EXACT_CODE - 1
_LEVELS = _EXACT_CODE


class Inexact(UserWarning):
    """A region selected from compact score files may differ slightly from the one fp32 scores give."""


def is_score_file(meta: dict) -> bool:
    """Whether a file's metadata says it holds scores (this format or an earlier one)."""
    return meta.get("format") in (FORMAT, *OLD_FORMATS)


def exact_share(meta: dict) -> float:
    """The share of each matrix up to which Top / Bottom selections from a file's scores are exactly those
    of the fp32 scores: 1 for float32 (and v1) files, the tails' share for compact files, 0 for bfloat16."""
    precision = meta.get("precision", "float32")
    return {"float32": 1.0, "bfloat16": 0.0}.get(precision, meta.get("exact_share", 0.0))


def save(
    path: Path,
    scores: dict[str, torch.Tensor],
    meta: dict,
    precision: str = "compact",
    exact_share: float = EXACT_SHARE,
) -> None:
    """Write `scores` (name → non-negative fp32 tensor, in parameter order) to `path` with the provenance
    record `meta`, at `precision` ("compact": exact Top / Bottom `exact_share` tails and a 4-bit body;
    "bfloat16"; "float32")."""
    if precision not in PRECISIONS:
        raise LingregionError(f"unknown score precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    record = dict(meta, format=FORMAT, precision=precision, score_dtype="float32")
    record["shapes"] = {n: list(t.shape) for n, t in scores.items()}
    if precision == "float32":
        write_tensors(path, {n: t.float() for n, t in scores.items()}, record)
        return
    if precision == "bfloat16":
        write_tensors(path, {n: t.to(torch.bfloat16) for n, t in scores.items()}, record)
        return
    if not 0 < exact_share < 0.5:
        raise LingregionError(
            f"exact share {exact_share} is outside (0, 0.5); pass the largest region share, e.g. 0.03"
        )
    record.update(exact_share=exact_share, body_bits=BODY_BITS)
    tensors: dict[str, torch.Tensor] = {}
    # about 19 bytes of scratch per entry of the matrix being encoded, on each thread
    parts = map_matrices(lambda item: _encode_matrix(*item, exact_share), scores.items())
    for n, (codes, exact, levels) in zip(scores, parts):
        tensors[f"{n}/codes"], tensors[f"{n}/exact"], tensors[f"{n}/levels"] = codes, exact, levels
    write_tensors(path, tensors, record)


def _encode_matrix(name: str, x: torch.Tensor, exact_share: float):
    v = x.detach().float().cpu().reshape(-1).numpy()
    # regions.select's own rule (ties: lower flat index first) picks the tails, so ties at their edges fall
    # exactly as a later selection's
    top, bottom = _tails(v, tuple(x.shape), exact_share)
    smallest = v[bottom].min() if bottom.size else v.min()  # the Bottom tail holds the smallest value
    if not (smallest >= 0 and np.isfinite(v.max())):  # max() is NaN if any entry is
        raise LingregionError(f"scores of {name} are negative or not finite; importance scores must be ≥ 0")
    return _encode(v, top, bottom)


def _tails(v: np.ndarray, shape: tuple[int, ...], share: float) -> list[np.ndarray]:
    """Flat indices of the Top and the Bottom `share` of each matrix of a parameter, as `regions.select` takes
    them: round(share · entries) per matrix, each expert of an [experts, out, in] stack a matrix of its own."""
    if len(shape) != 3:
        return tails(v, round(share * len(v)))
    size = len(v) // shape[0]
    parts = [tails(v[e * size : (e + 1) * size], round(share * size)) for e in range(shape[0])]
    return [np.concatenate([p[side] + e * size for e, p in enumerate(parts)]) for side in (0, 1)]


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The scores of a file (fp32 tensors in parameter order, whatever the precision on disk) and its
    provenance record. Compact files decode to values whose per-matrix Top / Bottom selections up to the
    file's exact share equal those of the original scores."""
    path = Path(path)
    tensors, meta = read_tensors(path)
    if not is_score_file(meta):
        raise LingregionError(f"{path}: not a score file; pass files written by 'lingregion score' or a run's scores/")
    precision = meta.get("precision", "float32")
    if meta["format"] in OLD_FORMATS or precision == "float32":
        return {n: t.float() for n, t in tensors.items()}, meta
    if precision == "bfloat16":
        return {n: t.float() for n, t in tensors.items()}, meta
    if precision != "compact":
        raise LingregionError(f"{path}: unknown score precision {precision!r}; a newer lingregion wrote it")
    out = {}
    for n, shape in meta["shapes"].items():
        try:
            codes, exact, levels = (tensors[f"{n}/{part}"] for part in ("codes", "exact", "levels"))
            out[n] = _decode(codes, exact, levels, math.prod(shape)).reshape(shape)
        except (KeyError, RuntimeError, ValueError, IndexError):
            raise LingregionError(
                f"{path}: scores of {n} are missing or malformed; the file is corrupt, recreate it"
            ) from None
    return out, meta


def load_meta(path: Path) -> dict:
    """A score file's provenance record alone (its header), without reading the scores."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("lingregion", "null"))
    except (SafetensorError, OSError, ValueError) as e:
        raise LingregionError(f"{path}: not a readable safetensors file ({e}); it is corrupt or truncated") from None
    if not isinstance(meta, dict) or not is_score_file(meta):
        raise LingregionError(f"{path}: not a score file; pass files written by 'lingregion score' or a run's scores/")
    return meta


def bytes_per_parameter(precision: str, exact_share: float = EXACT_SHARE) -> float:
    """Bytes a score file takes per scored parameter (headers aside), from the format."""
    if precision == "compact":
        return BODY_BITS / 8 + 2 * exact_share * 4
    return {"bfloat16": 2.0, "float32": 4.0}[precision]


# --- the compact encoding, one matrix at a time -------------------------------------------------------------


def _encode(v: np.ndarray, top: np.ndarray, bottom: np.ndarray):
    """(packed codes, tail values in flat order, [lo, hi, level_0 .. level_14]) of one flat fp32 matrix, its Top
    and Bottom tails given as flat indices.

    lo / hi are the tails' inner values (the largest of the Bottom tail, the smallest of the Top tail);
    with an empty tail they are the body's own extreme. The body's bins are equally wide on [lo, hi] (a
    sum over languages is thrown off by absolute errors, and equal widths bound those), and each level is
    the mean of the body values in its bin, so that sums of decoded scores are unbiased per bin. Whole-array
    numpy passes (a code for every entry, the tails then overwritten) rather than masked copies of the body:
    this runs after every language's gradient pass, and must cost a small part of it."""
    tails = np.sort(np.concatenate([top, bottom]))  # the tail values are stored in flat order
    if np.any(tails[1:] == tails[:-1]):  # only a near-constant matrix has an entry in both tails
        tails = np.unique(tails)
    n_body = len(v) - len(tails)
    if top.size and bottom.size:
        hi, lo = v[top].min(), v[bottom].max()
    else:  # a tail is empty (a matrix too small for one entry): the body's own extreme stands in for it
        body = np.delete(v, tails)
        hi = v[top].min() if top.size else (body.max() if n_body else v.max())
        lo = v[bottom].max() if bottom.size else (body.min() if n_body else v.min())
    codes = np.zeros(len(v), dtype=np.uint8)
    levels = np.zeros(_LEVELS, dtype=np.float32)
    width = (float(hi) - float(lo)) / _LEVELS  # bins need not be exact: decoding clamps to the tails
    if n_body and width > 0:
        # float32 arithmetic as torch's x.sub(lo).mul_(1 / width): the same codes as earlier versions wrote
        y = np.subtract(v, np.float32(lo), dtype=np.float32)
        np.multiply(y, np.float32(1 / width), out=y)
        # The body's y lie in [0, 15] (a hair above 15 at hi by rounding), so its codes are min(floor(y), 14),
        # the minimum taken on the bytes; the tails' codes are overwritten next, whatever the cast made of theirs.
        with np.errstate(invalid="ignore"):
            codes = y.astype(np.uint8)
        del y
        np.minimum(codes, _LEVELS - 1, out=codes)
    codes[tails] = _EXACT_CODE
    packed = _pack_nibbles(codes)
    if n_body:
        # Per-bin sums in float64, added in flat order. torch counts straight from the uint8 codes (numpy's
        # bincount first converts every entry to intp), and the counts come from the packed bytes, half as
        # many: a byte's count goes to both of its codes, and an odd matrix's padding nibble is taken back.
        sums = torch.bincount(torch.from_numpy(codes), torch.from_numpy(v).double(), _EXACT_CODE + 1)
        pairs = torch.bincount(torch.from_numpy(packed), minlength=256).reshape(16, 16)
        counts = (pairs.sum(0) + pairs.sum(1)).numpy()
        counts[0] -= len(v) % 2
        counts, sums = counts[:_LEVELS], sums.numpy()[:_LEVELS]
        centres = float(lo) + (np.arange(_LEVELS, dtype=np.float64) + 0.5) * max(width, 0.0)
        levels = np.where(counts > 0, sums / np.maximum(counts, 1), centres).astype(np.float32)
    edges = torch.tensor([float(lo), float(hi)], dtype=torch.float32)
    return torch.from_numpy(packed), torch.from_numpy(v[tails]), torch.cat([edges, torch.from_numpy(levels)])


def _decode(packed: torch.Tensor, exact: torch.Tensor, levels: torch.Tensor, n: int) -> torch.Tensor:
    """One flat matrix back from `_encode`'s parts.

    Why selections up to the tails' size are exact: the Top tail holds every entry above hi and the
    lowest-index entries equal to hi (select's tie rule), with exact values; every body entry is ≤ hi
    and decodes below hi. A Top-k with k ≤ the tail's size therefore finds the same k-th value, the
    same entries beyond it, and the same lowest-index ties at it, all inside the tail. Likewise for
    Bottom with lo. Decoded body values are clamped into [next float above lo, next float below hi]
    for that; where no float lies strictly between lo and hi, the body's values are lo or hi themselves
    and each bin's mean is then exactly one of them."""
    codes = torch.from_numpy(_unpack_nibbles(packed.numpy(), n))
    is_exact = codes == _EXACT_CODE
    if int(is_exact.sum()) != exact.numel():
        raise ValueError("tail size does not match its codes")
    lo, hi, table = levels[0], levels[1], levels[2:]
    out = table[codes.clamp(max=_LEVELS - 1).long()]
    above_lo = torch.nextafter(lo, torch.tensor(math.inf))
    below_hi = torch.nextafter(hi, torch.tensor(-math.inf))
    if above_lo <= below_hi:
        out.clamp_(above_lo, below_hi)
    out[is_exact] = exact
    return out


def _pack_nibbles(codes: np.ndarray) -> np.ndarray:
    if len(codes) % 2:
        codes = np.append(codes, np.uint8(0))
    out = np.left_shift(codes[0::2], 4)
    return np.bitwise_or(out, codes[1::2], out=out)


def _unpack_nibbles(packed: np.ndarray, n: int) -> np.ndarray:
    out = np.empty(2 * len(packed), dtype=np.uint8)
    out[0::2], out[1::2] = packed >> 4, packed & 0x0F
    return out[:n]
