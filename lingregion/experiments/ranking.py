"""What the structural (Tables 3–4) and outliers (Table 8) experiments share: the evaluation budget and the
results file (so that the base perplexity is measured once for both), the rule a Top pick must beat, the
geometric-mean ratio of a setting to base, and the config rules of both."""

from __future__ import annotations

import math

from .. import slices
from ..store import LingregionError

RESULTS = "structure.json"  # both experiments share it, so the base perplexity is measured once
FACTOR = 2.0  # Top "stands out" when its perplexity is at least twice the other pick's (as removal's Top vs Random)


def validate_structure(cfg) -> None:
    """Refuse unknown families or modes, dimension counts below 1, a bad ratio, and empty language lists."""
    bad = [f for f in cfg.struct_families if f not in slices.FAMILIES]
    if bad:
        raise LingregionError(f"unknown structural family {bad[0]!r}; use some of {', '.join(slices.FAMILIES)}")
    if cfg.struct_mode not in slices.MODES:
        raise LingregionError(f"unknown struct_mode {cfg.struct_mode!r}; use one of {', '.join(slices.MODES)}")
    if not cfg.struct_dims or any(not isinstance(n, int) or n < 1 for n in cfg.struct_dims):
        raise LingregionError(f"struct_dims {cfg.struct_dims} must be whole numbers ≥ 1, such as 1,3,5,10")
    if not 0 < cfg.struct_ratio < 1:
        raise LingregionError(f"struct_ratio {cfg.struct_ratio} is outside (0, 1); pass a fraction such as 0.03")
    if not cfg.struct_langs:
        raise LingregionError("struct_langs is empty; name at least one language to evaluate")
    if (
        min(cfg.struct_eval_tokens, cfg.outlier_scan_tokens, cfg.outlier_layers, cfg.outlier_confirm, cfg.outlier_dims)
        < 1
        or cfg.outlier_controls < 0
    ):
        raise LingregionError(
            "struct_eval_tokens, outlier_scan_tokens, outlier_layers, outlier_confirm and "
            "outlier_dims must be ≥ 1, outlier_controls ≥ 0"
        )


def eval_budget(cfg) -> int:
    """Evaluation tokens per language and setting: struct_eval_tokens, never more than eval_tokens."""
    return min(cfg.struct_eval_tokens, cfg.eval_tokens)


def geometric_ratio(r: dict, base: dict, langs: list[str]) -> float:
    """Geometric mean over languages of perplexity / base perplexity."""
    logs = [math.log(r[lang]["ppl"]) - math.log(base[lang]["ppl"]) for lang in langs]
    return math.exp(sum(logs) / len(logs))
