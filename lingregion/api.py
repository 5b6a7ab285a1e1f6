"""The notebook API: a few verbs over a loaded model, each a thin call into the module that does the work.

import lingregion as lr
m = lr.load()
scores = {lang: lr.score(m, lr.windows(m, lang)) for lang in ["ru", "zh"]}
top = lr.core(scores, 0.01)
with lr.removed(m, top):
    print(lr.perplexity(m, lr.windows(m, "ja", "eval")))
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch

from . import corpus, evaluation, figures, interventions, regions, scoring
from .models import Model
from .store import write_bytes

Scores = dict[str, torch.Tensor]


def windows(
    m: Model, lang: str, split: str = "score", tokens: int = 4096, seq_len: int = 512, text: str | None = None
) -> corpus.Windows:
    """`tokens` window positions of one language's text (`split` "score" or "eval"; built-in corpus, or your
    own file or hf:DATASET with `text`), cut into windows of `seq_len` that start with BOS."""
    return corpus.load_windows(m.tokenizer, lang, split, seq_len, tokens, text)


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
    scores: Scores | Mapping[str, Scores], ratio: float = 0.01, side: str = "top", scope: str = "matrix", seed: int = 0
) -> regions.Region:
    """The core region: the Top / Bottom / Random `ratio` of each matrix (or of everything, scope "global") of
    the summed scores; pass one score dict, or one per language."""
    return regions.select(_summed(scores), ratio, side, scope, seed, {"label": "core", "estimator": "taylor"})


def monolingual(scores: Mapping[str, Scores], lang: str, ratio: float = 0.03) -> regions.Region:
    """L's monolingual region S_L − ∪ S_L', S the per-matrix Top `ratio` of each language's own score."""
    tops = {code: regions.select(s, ratio, "top", meta={"estimator": "taylor"}) for code, s in scores.items()}
    return regions.monolingual(tops, lang)


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


def perplexity(m: Model, w: corpus.Windows, batch_size: int = 4, progress: bool = True) -> dict:
    """Token-weighted perplexity and bits per byte of the windows: {'ppl', 'bpb', 'nll', 'tokens', 'bytes'}."""
    return evaluation.perplexity(m.module, w, batch_size, progress)


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
