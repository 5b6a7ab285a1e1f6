"""The notebook API: a few verbs over a loaded model, each a thin call into the module that does the work.

import lingregion as lr
m = lr.load()
scores = {lang: lr.score(m, lr.windows(m, lang)) for lang in ["ru", "zh"]}
top = lr.core(scores, 0.01)
with lr.removed(m, top):
    print(lr.perplexity(m, lr.windows(m, "ja", "eval")))
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from . import corpus, evaluation, figures, freezing, interventions, pretraining, regions, scorefile, scoring
from .config import Config
from .models import Model
from .store import LingregionError, write_bytes

Scores = dict[str, torch.Tensor]


def windows(
    m: Model,
    lang: str,
    split: str = "score",
    tokens: int | None = None,
    seq_len: int | None = None,
    text: str | None = None,
) -> corpus.Windows:
    """`tokens` window positions of one language's text (`split` "score" or "eval"; built-in corpus, or your
    own file or hf:DATASET with `text`), cut into windows of `seq_len` that start with BOS. The defaults are
    a run's: Config's score_tokens or eval_tokens, and seq_len."""
    if tokens is None:
        tokens = Config.score_tokens if split == "score" else Config.eval_tokens
    return corpus.load_windows(m.tokenizer, lang, split, seq_len or Config.seq_len, tokens, text)


def score(m: Model, w: corpus.Windows, progress: bool = True) -> Scores:
    """The paper's importance of every scored parameter on these windows: |(θ − θ_removed) ⊙ Σg|, fp32."""
    return scoring.score(m.module, w, m.names, m.removed, progress=progress)


def _summed(scores: Scores | Mapping[str, Scores]) -> Scores:
    """One score per parameter: per-language scores (keyed by language) are summed, as the paper does."""
    first = next(iter(scores.values()))
    if torch.is_tensor(first):
        return dict(scores)
    total: Scores = {}
    for s in scores.values():
        scoring.accumulate(total, s)
    return total


def core(
    scores: Scores | Mapping[str, Scores],
    ratio: float = 0.01,
    side: str = "top",
    scope: str = Config.scope,
    seed: int = Config.seed,
) -> regions.Region:
    """The core region: the Top / Bottom / Random `ratio` of each matrix (or of everything, scope "global") of
    the summed scores; pass one score dict, or one per language."""
    return regions.select(_summed(scores), ratio, side, scope, seed, {"label": "core", "estimator": "taylor"})


def monolingual(scores: Mapping[str, Scores], lang: str, ratio: float = Config.mono_ratio) -> regions.Region:
    """L's monolingual region S_L − ∪ S_L', S the per-matrix Top `ratio` of each language's own score."""
    tops = {code: regions.select(s, ratio, "top", meta={"estimator": "taylor"}) for code, s in scores.items()}
    return regions.monolingual(tops, lang)


def locate(
    files: Sequence[str | Path] = (),
    run: str | Path | None = None,
    languages: Sequence[str] = (),
    ratio: float = 0.01,
    side: str = "top",
    scope: str = Config.scope,
    seed: int = Config.seed,
    monolingual: str | None = None,
) -> regions.Region:
    """A region from score files on disk: the core region (Top / Bottom / Random `ratio` of the summed scores)
    or, with `monolingual=L`, L's monolingual region among the given languages. Give the files, or a run
    folder and the `languages` whose scores/LANG.safetensors to read; from a run folder the core comes from
    its stored fp32 core sum when that covers exactly these languages. Warns (scorefile.Inexact) when compact
    files make the region differ slightly from the one fp32 scores give."""
    paths = [Path(run) / "scores" / f"{lang}.safetensors" for lang in languages] if run else [Path(f) for f in files]
    if not paths:
        raise LingregionError("give score files with --scores FILE ... or a run folder with --run DIR --langs ar,es")
    core = Path(run) / "scores" / "core.safetensors" if run and monolingual is None else None
    if core and core.is_file() and sorted(scorefile.load_meta(core).get("languages") or []) == sorted(languages):
        paths = [core]  # the fp32 sum as the run made it, rather than a sum of compact files
    total, tops, fingerprint, langs, inexact = {}, {}, None, [], []
    summed = monolingual is None and len(paths) > 1
    for f in paths:
        tensors, meta = scorefile.load(f)
        if fingerprint and meta["model_fingerprint"] != fingerprint:
            raise LingregionError(
                f"{f}: scores come from another model ({meta['model_fingerprint']} ≠ "
                f"{fingerprint}); score every language with the same model"
            )
        fingerprint = meta["model_fingerprint"]
        langs += meta.get("languages") or [meta["lang"]]
        share = scorefile.exact_share(meta)
        if side != "random" and (ratio > share or scope == "global" or (summed and share < 1)):
            inexact.append(f"{f.name} ({meta.get('precision', 'float32')}, exact up to {share:g} of each matrix)")
        if monolingual is not None:
            tops[meta["lang"]] = regions.select(
                tensors, ratio, "top", meta={"model": fingerprint, "estimator": "taylor"}
            )
        else:
            scoring.accumulate(total, tensors)
    if inexact:
        # compact files keep exact values only in each matrix's tails; a sum, a larger share or a global
        # selection also reads the 4-bit body, so the region can differ slightly from the fp32 one
        warnings.warn(
            "this region may differ slightly from the one fp32 scores give: "
            + "; ".join(inexact)
            + " (score with --score-storage float32 for exact sums and shares)",
            scorefile.Inexact,
            stacklevel=2,
        )
    if monolingual is not None:
        if side != "top" or scope != "matrix":
            raise LingregionError("a monolingual region uses per-matrix Top sets; drop --side/--scope")
        if monolingual not in langs:
            raise LingregionError(f"--monolingual {monolingual} is not among the scored languages {','.join(langs)}")
        return regions.monolingual(tops, monolingual)
    meta = {"model": fingerprint, "languages": langs, "estimator": "taylor", "label": "core"}
    return regions.select(total, ratio, side, scope, seed, meta)


@contextmanager
def removed(m: Model, region: regions.Region) -> Iterator[Model]:
    """Inside the block the region is set to its removed value; on exit it is restored bit for bit."""
    with interventions.applied(m.module, interventions.removal(region, m.removed)):
        yield m


@contextmanager
def applied(m: Model, edits: list[interventions.Edit]) -> Iterator[Model]:
    """Any list of edits (a structural removal, a norm perturbation), undone exactly on exit."""
    with interventions.applied(m.module, edits):
        yield m


def perplexity(m: Model, w: corpus.Windows, batch_size: int = Config.batch_size, progress: bool = True) -> dict:
    """Token-weighted perplexity and bits per byte of the windows: {'ppl', 'bpb', 'nll', 'tokens', 'bytes'}."""
    return evaluation.perplexity(m.module, w, batch_size, progress)


def train(
    m: Model,
    data: corpus.Windows,
    freeze: regions.Region | None = None,
    eval: Mapping[str, corpus.Windows] | None = None,
    steps: int = 100,
    lr: float = 5e-5,
    *,
    values: str = "current",
    out: str | Path | None = None,
    progress: bool = True,
    **settings,
) -> dict:
    """Further pre-train `m` on `data` (windows, or a dataset of rows with input_ids) through the Hugging Face
    Trainer with `freeze` held bit-identical (`values="removed"`: at its removed value), and the perplexity of
    each `eval` language before, half-way and after, with intervals; `settings` are further
    `freezing.TrainConfig` fields (warmup, batch_size, eval_steps, ...). With `out`, the model is saved there as a
    plain Hugging Face folder with its model card and summary, and a rerun resumes. Returns the summary."""
    defaults = {"warmup": min(100, steps // 10), "eval_steps": sorted({0, steps // 2, steps})}
    cfg = freezing.TrainConfig(steps=steps, lr=lr, **{**defaults, **settings})
    return pretraining.train(
        m, data, freeze, eval, values=values, settings=cfg, out=Path(out) if out else None, progress=progress
    )


def generate(m: Model, prompt: str, max_new_tokens: int = 16) -> str:
    """The greedy continuation of `prompt` (the new text only)."""
    return evaluation.generate(m.module, m.tokenizer, {"": prompt}, max_new_tokens)[""]


def plot(
    region: regions.Region, matrix: str | None = None, head_dim: int | None = None, out: str | Path | None = None
) -> bytes:
    """A PNG of the region: the layers × matrix-types grid, or one matrix in detail; written to `out` if given."""
    data = figures.region_heatmap(region, matrix, head_dim) if matrix else figures.region_grid(region)
    if out is not None:
        write_bytes(Path(out), data)
    return data
