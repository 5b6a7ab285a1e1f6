"""The estimators experiment's one pass: every estimator's Top regions and the split-half Top sets, from one
pass over the scoring windows and cached in the run folder, and the specificity controls' windows and regions.

Every estimator scores the same languages' windows once (`importance.iter_estimates`); each one's Top
regions are selected and saved, and the split-half Top sets (`SplitHalf`) are read off the same pass. The
controls: another language's windows, token-shuffled windows, and the outlier dimensions."""

from __future__ import annotations

import zlib
from dataclasses import replace

import torch

from .. import importance, interventions, slices, uncertainty
from ..corpus import Windows, load_windows
from ..regions import Region, select
from ..run import Run, digest
from ..store import read_cached, read_json, write_json
from .estimator_stability import GROUPS, SPLITS, SplitHalf

STABILITY = "estimators-stability.json"  # the split-half Top sets' Jaccards, kept so that a rerun needs no pass


def shuffled(windows: Windows, seed: int) -> Windows:
    """The same windows with their tokens in a random order within each window (a BOS stays first)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(windows.lang.encode()))
    keep = 1 if windows.meta.get("bos") else 0
    ids = [torch.cat([w[:keep], w[keep:][torch.randperm(len(w) - keep, generator=g)]]) for w in windows.input_ids]
    return replace(windows, input_ids=ids, meta=dict(windows.meta, shuffled_within_windows_seed=seed))


def _region_path(run: Run, label: str, ratio: float):
    return run.out / "regions" / f"est-{label}-top-{ratio:g}.safetensors"


def top_regions(
    run: Run, labels: list[str], ratios: list[float], made: dict[str, str], scopes: dict[str, str], compute
) -> dict[str, dict[float, Region]]:
    """Top regions of each label at each ratio: read back when made from the same inputs, otherwise
    `compute(labels)` yields the missing labels' (label, scores), each selected, saved and dropped in turn."""
    out, missing = {}, []
    for label in labels:
        paths = {r: _region_path(run, label, r) for r in ratios}
        if all(p.is_file() for p in paths.values()):
            loaded = {r: read_cached(p, Region.load) for r, p in paths.items()}
            if all(reg is not None and reg.meta.get("made_of") == made[label] for reg in loaded.values()):
                out[label] = loaded
                continue
        missing.append(label)
    if missing:
        for label, scores in compute(missing):
            meta = {"model": run.info["fingerprint"], "label": label, "made_of": made[label]}
            out[label] = {r: select(scores, r, "top", scopes[label], run.cfg.seed, meta) for r in ratios}
            for r, region in out[label].items():
                region.save(_region_path(run, label, r))
            del scores
    return out


def made_of(run: Run, what: str, windows: list[Windows], scope: str) -> str:
    """What a region of estimator `what` is made from: the model, its scored names, the windows, the scope
    and the dtype; a cached region made from other inputs is computed again."""
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


def score_windows(run: Run, lang: str) -> Windows:
    """A language's scoring windows at the estimators' own budget and window length."""
    cfg = run.cfg
    return load_windows(
        run.tokenizer, lang, "score", cfg.est_seq_len or cfg.seq_len, cfg.est_tokens, cfg.texts.get(lang)
    )


def outlier_dims(run: Run, windows: list[Windows]) -> tuple[list[int], list[interventions.Edit], Region]:
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


def stability_key(run: Run, windows: list[Windows], names: list[str]) -> str:
    """What the split-half results depend on: each estimator's inputs and how the halves are made."""
    cfg = run.cfg
    return digest(
        {
            "made_of": [made_of(run, n, windows, "matrix") for n in names],
            "ratio": cfg.est_overlap_ratio,
            "groups": GROUPS,
            "splits": SPLITS,
            "seed": cfg.seed,
            "resamples": uncertainty.RESAMPLES,
        }
    )


def regions_and_stability(
    run: Run, t: importance.Target, windows: list[Windows], ratios: list[float], scopes: dict[str, str]
) -> tuple[dict[str, dict[float, Region]], dict]:
    """Every estimator's Top regions at every ratio, and the split-half results (`SplitHalf.result`) of the
    per-language ones. The split-half Top sets come from the same pass as the regions: its sums are kept
    per group of windows while it runs. Both are cached; a pass runs only for what is missing."""
    cfg = run.cfg
    made = {name: made_of(run, name, windows, scopes[name]) for name in cfg.est_estimators}
    split_names = [n for n in cfg.est_estimators if importance.per_language(n)]
    key, cache = stability_key(run, windows, split_names), run.out / "results" / STABILITY
    cached = read_cached(cache, read_json) or {}
    stability = cached.get("stability") if cached.get("key") == key else None
    splitter = None if stability else SplitHalf(t, split_names, cfg.est_overlap_ratio, cfg.seed)

    def compute(which):
        which = list(which)
        extra = [n for n in split_names if n not in which] if splitter else []
        groups, visit = (GROUPS, splitter.visit) if splitter else (1, None)
        for name, scores in importance.iter_estimates(t, windows, which + extra, run.progress, groups, visit):
            if name in which:
                yield name, scores

    regions = top_regions(run, cfg.est_estimators, ratios, made, scopes, compute)
    if splitter:
        if not splitter.groups:  # every region was read back: a pass for the halves alone
            for _ in compute([]):
                pass
        stability = splitter.result()
        write_json(cache, {"key": key, "stability": stability})
    return regions, stability
