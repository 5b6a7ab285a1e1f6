"""The run folder: one score store for every estimator (compact language files, an exact fp32 core that an
interrupted run resumes), regions selected once per run, and evaluations cached by what they depend on; one run
at a time in a folder, and what a killed run or a corrupt cache file leaves behind is cleaned up or recomputed."""

import json
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import torch

from lingregion import Config, importance, models, scorefile
from lingregion.cli import main
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


# --- one run at a time, and what a killed or corrupted run leaves behind ----------------------------------
RUN_ARGS = ["--seq-len", "16", "--score-tokens", "32", "--eval-tokens", "32", "--score-langs", "ru,es"]
RUN_ARGS += ["--eval-langs", "ru,zh", "--ratios", "0.05", "--random-seeds", "1", "--experiments", "removal"]

# Imports first and waits for the test's "go", so that two runs reach the lock together.
RACER = """
import os, sys, time
import lingregion.pipeline
from lingregion.cli import main
print("ready", flush=True)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.01)
sys.exit(main(sys.argv[2:]))
"""

# Writes removal.json's second save halfway and hangs there, to be killed mid-write.
STALLER = """
import json, sys, time
from lingregion import run, store
from lingregion.cli import main
saves = []
def stall(path, obj):
    saves.append(path)
    if len(saves) == 2:
        def half(tmp):
            open(tmp, "w").write(json.dumps(obj)[:40])
            print("writing", flush=True)
            time.sleep(600)
        store._atomic(path, half)
    store.write_json(path, obj)
run.write_json = stall
sys.exit(main(sys.argv[1:]))
"""


def _table(out: Path) -> dict:
    return json.loads((out / "results" / "removal-summary.json").read_text())["table"]


def test_two_runs_into_one_folder_one_refuses_the_other_finishes(tiny_folder, tmp_path, capsys):
    single = tmp_path / "single"
    assert main(["reproduce", "--model", str(tiny_folder), "--out", str(single), *RUN_ARGS]) == 0
    out, go = tmp_path / "run", tmp_path / "go"
    argv = ["reproduce", "--model", str(tiny_folder), "--out", str(out), *RUN_ARGS]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(go), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    for p in procs:
        assert p.stdout.readline() == "ready\n"
    go.write_text("")
    results = [(p.wait(timeout=600), p.stderr.read(), p.pid) for p in procs]
    (winner,) = [r for r in results if r[0] == 0]
    (loser,) = [r for r in results if r[0] != 0]
    errors = [line for line in loser[1].splitlines() if line.startswith("lingregion:")]
    assert loser[0] == 2 and errors == [
        f"lingregion: error: {out.resolve()} is in use by another lingregion run (PID {winner[2]}); "
        "wait for it to finish, or pass another --out"
    ]
    assert _table(out) == _table(single)  # the finished run is an uninterrupted run's
    capsys.readouterr()
    assert main(argv) == 0 and _table(out) == _table(single)  # the refused command, given again, runs


def test_a_run_killed_mid_write_resumes_to_an_uninterrupted_result(tiny_folder, tmp_path, capsys):
    single = tmp_path / "single"
    assert main(["reproduce", "--model", str(tiny_folder), "--out", str(single), *RUN_ARGS]) == 0
    out = tmp_path / "run"
    argv = ["reproduce", "--model", str(tiny_folder), "--out", str(out), *RUN_ARGS]
    proc = subprocess.Popen(
        [sys.executable, "-c", STALLER, *argv], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        assert "writing" in proc.stdout.readline()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    (orphan,) = (out / "results").glob(".removal.json.*.tmp")  # what the kill left
    assert json.loads((out / "results" / "removal.json").read_text())["entries"]  # the first save, whole
    capsys.readouterr()
    assert main(argv) == 0
    assert not orphan.exists() and not list(out.rglob("*.tmp"))
    assert _table(out) == _table(single)


def test_a_corrupt_cached_score_is_moved_aside_and_recomputed(tiny_folder, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["reproduce", "--model", str(tiny_folder), "--out", str(out), *RUN_ARGS]
    assert main(argv) == 0
    table = _table(out)
    score = out / "scores" / "ru.safetensors"
    score.write_bytes(score.read_bytes()[:100])
    (out / "scores" / "core.safetensors").unlink()  # so that the ru scores are read again
    capsys.readouterr()
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert f"lingregion: warning: {score}: not a readable safetensors file" in err
    assert "moved it to ru.safetensors.corrupt and recomputing" in err
    assert (out / "scores" / "ru.safetensors.corrupt").stat().st_size == 100 and score.stat().st_size > 100
    assert _table(out) == table
