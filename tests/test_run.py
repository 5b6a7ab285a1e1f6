"""The run folder: one score store for every estimator (compact language files, an exact fp32 core that an
interrupted run resumes), regions selected once per run, and evaluations cached by what they depend on."""

from dataclasses import replace

import torch

from lingregion import Config, importance, models, scorefile
from lingregion.regions import select
from lingregion.run import Run
from lingregion.store import write_tensors

from conftest import TEXT, tiny_config


def test_run_keeps_compact_language_files_and_an_exact_core(tiny_folder, tmp_path):
    texts = {}
    for i, lang in enumerate(["ru", "es"]):  # the run's own text files: the test needs no built-in corpus
        texts[lang] = str(tmp_path / f"{lang}.txt")
        (tmp_path / f"{lang}.txt").write_text("\n\n".join(TEXT[i:] + TEXT[:i]) * 5, encoding="utf-8")
    cfg = Config(
        model=str(tiny_folder), seq_len=16, score_tokens=32, score_langs=["ru", "es"], ratios=[0.05], texts=texts
    )
    m = models.load(str(tiny_folder))
    out = tmp_path / "run"
    run = Run(out, cfg, m, progress=False)
    core = run.core_scores()  # fresh: the fp32 sum
    fresh = {lang: run.scores(lang) for lang in ("ru", "es")}  # read back from compact files
    assert not (out / "scores" / ".core.partial.safetensors").exists()
    for name in ("ru", "es", "core"):
        m_ = scorefile.load_meta(out / "scores" / f"{name}.safetensors")
        assert m_["precision"] == "compact" and m_["exact_share"] == 0.05, name

    # the fp32 scores, computed again, give the same regions as the compact files
    again = Run(tmp_path / "fp32", replace(cfg, score_storage="float32"), m, progress=False)
    exact = {lang: again.scores(lang) for lang in ("ru", "es")}
    exact_core = again.core_scores()
    for side in ("top", "bottom"):
        assert same(select(exact_core, 0.05, side), select(core, 0.05, side))
        for lang in exact:
            assert same(select(exact[lang], 0.05, side), select(fresh[lang], 0.05, side))
    assert all(torch.equal(exact_core[n], core[n]) for n in core)  # the core was summed from fp32 scores

    # a new Run reads the core file back; its regions are the fp32 ones
    reread = Run(out, cfg, m, progress=False).core_scores()
    for side in ("top", "bottom"):
        assert same(select(exact_core, 0.05, side), select(reread, 0.05, side))

    # an interrupted core (the sum of ru kept, es not yet added) resumes from the fp32 partial sum
    (out / "scores" / "core.safetensors").unlink()
    write_tensors(
        out / "scores" / ".core.partial.safetensors",
        exact["ru"],
        {"made_of": read_made_of(again), "done": ["ru"], "format": "lingregion-core-partial"},
    )
    resumed = Run(out, cfg, m, progress=False).core_scores()  # es is rescored for its fp32 values
    assert all(torch.equal(exact_core[n], resumed[n]) for n in core)
    assert not (out / "scores" / ".core.partial.safetensors").exists()


def read_made_of(run: Run) -> dict:
    return scorefile.load_meta(run.out / "scores" / "core.safetensors")["made_of"]


def same(a, b) -> bool:
    return a.shapes == b.shapes and all(torch.equal(a.packed[n], b.packed[n]) for n in a.packed)


def test_other_estimators_share_the_score_store(tiny_folder, tmp_path):
    """Scores of another estimator are written through the same store (scorefile, made_of keyed), equal the
    importance pass they stand for, and are read back, not recomputed, by a new Run of the same folder."""
    cfg = tiny_config(tiny_folder)
    m = models.load(str(tiny_folder))
    run = Run(tmp_path / "run", cfg, m, progress=False)
    s = run.scores("ru", estimator="fisher")
    want = importance.score("fisher", importance.Target(m.module, m.names, m.removed), [run.windows("ru", "score")])
    assert all(torch.equal(s[n], want[n]) for n in m.names)
    path = tmp_path / "run" / "scores" / "ru.fisher.safetensors"
    meta = scorefile.load_meta(path)
    assert meta["format"] == scorefile.FORMAT and meta["made_of"]["estimator"] == "fisher"
    assert not (tmp_path / "run" / "scores" / "ru.safetensors").exists()  # the paper's taylor file is its own
    mtime = path.stat().st_mtime_ns
    back = Run(tmp_path / "run", cfg, m, progress=False).scores("ru", estimator="fisher")
    assert path.stat().st_mtime_ns == mtime
    for side in ("top", "bottom"):
        assert same(select(back, 0.03, side), select(s, 0.03, side))  # exact up to the run's largest share


def test_regions_are_selected_once_per_run_and_evaluations_cached(tiny_folder, tmp_path):
    cfg = tiny_config(tiny_folder, eval_langs=["ru"])
    m = models.load(str(tiny_folder))
    run = Run(tmp_path / "run", cfg, m, progress=False)
    top = run.core_region("top", 0.05)
    assert run.core_region("top", 0.05) is top
    assert same(top, select(run.core_scores(), 0.05, "top", cfg.scope, cfg.seed))
    assert (tmp_path / "run" / "regions" / "core-top-0.05.safetensors").is_file()
    first = run.evaluate("t.json", "base", [], ["ru"])
    again = Run(tmp_path / "run", cfg, m, progress=False)
    again.model = None  # a cached entry needs no model: evaluating would fail
    assert again.evaluate("t.json", "base", [], ["ru"]) == first
