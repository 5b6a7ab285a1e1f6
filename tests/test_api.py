"""The notebook API: each verb equals the machinery it stands for, computed directly."""

import warnings

import pytest
import torch

import lingregion as lr
from lingregion import Config, models, regions, scorefile, scoring
from lingregion.run import Run

from conftest import tiny_config


@pytest.fixture
def scored(tiny_folder, tmp_path):
    """A run folder with ru, es and zh scored at float32 (exact) and the same languages at compact storage."""
    m = models.load(str(tiny_folder))
    out = {}
    for storage in ("float32", "compact"):
        cfg = tiny_config(tiny_folder, score_langs=["ru", "es", "zh"], score_storage=storage)
        run = Run(tmp_path / storage, cfg, m, progress=False)
        out[storage] = (run, {lang: run.scores(lang, exact=True) for lang in cfg.score_langs})
    return m, out


def test_locate_equals_the_selection_of_the_summed_scores(scored):
    m, runs = scored
    run, scores = runs["float32"]
    total = {}
    for s in scores.values():
        scoring.accumulate(total, s)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # float32 files: exact, no note
        found = lr.locate(run=run.out, languages=list(scores), ratio=0.1)
        files = [run.out / "scores" / f"{lang}.safetensors" for lang in scores]
        assert lr.locate(files, ratio=0.1, side="bottom").jaccard(regions.select(total, 0.1, "bottom")) == 1.0
    want = regions.select(total, 0.1, "top")
    assert found.jaccard(want) == 1.0 and found.count() == want.count()
    assert found.meta["languages"] == ["ru", "es", "zh"] and found.meta["model"] == m.info["fingerprint"]
    assert lr.core(scores, 0.1).jaccard(want) == 1.0  # the in-memory verb gives the same region

    mono = lr.locate(run=run.out, languages=list(scores), ratio=0.1, monolingual="es")
    tops = {lang: regions.select(s, 0.1, "top") for lang, s in scores.items()}
    assert mono.jaccard(regions.monolingual(tops, "es")) == 1.0
    assert lr.monolingual(scores, "es", 0.1).jaccard(mono) == 1.0


def test_locate_warns_when_compact_files_are_summed(scored):
    _, runs = scored
    run, scores = runs["compact"]
    with pytest.warns(scorefile.Inexact, match="compact, exact up to 0.03 of each matrix"):
        lr.locate(run=run.out, languages=list(scores), ratio=0.05)
    with pytest.raises(lr.store.LingregionError, match="give score files"):
        lr.locate()
    with pytest.raises(lr.store.LingregionError, match="--monolingual ko is not among"):
        lr.locate(run=run.out, languages=list(scores), ratio=0.03, monolingual="ko")


def test_defaults_are_a_runs(tiny_folder):
    m = models.load(str(tiny_folder))
    w = lr.windows(m, "ru")
    want = Config()
    assert max(len(ids) for ids in w.input_ids) <= want.seq_len
    assert sum(len(ids) - 1 for ids in w.input_ids) <= want.score_tokens
    short = lr.windows(m, "ru", "eval", tokens=40, seq_len=16)
    assert [len(ids) for ids in short.input_ids][:2] == [16, 16]
    ppl = lr.perplexity(m, short, progress=False)
    assert ppl["tokens"] == sum(len(ids) - 1 for ids in short.input_ids) and ppl["ppl"] > 1
    region = lr.core(lr.score(m, short, progress=False), 0.1)
    before = {n: p.detach().clone() for n, p in m.module.named_parameters()}
    with lr.removed(m, region):
        assert lr.perplexity(m, short, progress=False)["ppl"] != ppl["ppl"]
    assert all(torch.equal(before[n], p) for n, p in m.module.named_parameters())  # undone bit for bit
