"""Kill a scoring job with SIGKILL once it has saved a checkpoint, run the same command again, and get
bit for bit the scores of an uninterrupted run; and the same for an evaluation's running sums. A checkpoint
that cannot be read is set aside with a warning."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from lingregion import checkpoint, corpus, evaluation, models
from lingregion.store import LingregionWarning, read_tensors

from conftest import TEXT

WINDOWS, EVERY = 300, 25


def score_command(model_dir, text, out):
    # two languages: the second is scored after the first, from its own checkpoint
    return [
        sys.executable,
        "-m",
        "lingregion.cli",
        "score",
        "--model",
        str(model_dir),
        "--lang",
        f"xx={text}",
        "--lang",
        f"yy={text.with_name('yy.txt')}",
        "--seq-len",
        "16",
        "--score-tokens",
        str(16 * WINDOWS),
        "--checkpoint-every",
        str(EVERY),
        "--out",
        str(out),
    ]


def run(cmd, **kw):
    # One thread: the same kernels in every run, and gentle on a shared machine.
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_killed_scoring_resumes_bit_identical(tiny_folder, tmp_path):
    text = tmp_path / "xx.txt"
    text.write_text("\n\n".join(TEXT * 200), encoding="utf-8")
    text.with_name("yy.txt").write_text("\n\n".join(TEXT * 2), encoding="utf-8")
    partial = tmp_path / "killed" / "scores" / ".xx.partial.safetensors"
    final = tmp_path / "killed" / "scores" / "xx.safetensors"

    child = run(score_command(tiny_folder, text, tmp_path / "killed"))
    deadline = time.time() + 300
    while not partial.exists() and child.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.communicate()
    assert child.returncode == -signal.SIGKILL, "the job ended before it could be killed"
    assert partial.exists() and not final.exists()
    _, meta = read_tensors(partial)
    assert 0 < meta["windows"] < WINDOWS

    resumed = run(score_command(tiny_folder, text, tmp_path / "killed"))
    whole = run(score_command(tiny_folder, text, tmp_path / "whole"))
    (_, err), (_, err_whole) = resumed.communicate(timeout=600), whole.communicate(timeout=600)
    assert resumed.returncode == 0 and whole.returncode == 0, err + err_whole
    assert "resumed after" in err and "resumed after" not in err_whole
    assert not partial.exists()  # removed once the sums are complete
    got, _ = read_tensors(final)
    want, _ = read_tensors(tmp_path / "whole" / "scores" / "xx.safetensors")
    assert got.keys() == want.keys()
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert any(t.abs().sum() > 0 for t in want.values())


class Killed(Exception):
    pass


def test_evaluation_resumes_from_its_checkpoint(loaded, tmp_path, monkeypatch):
    """An evaluation interrupted after a save continues from the saved sums to exactly the same result."""
    m = loaded("llama")
    w = corpus.make_windows(m.tokenizer, TEXT * 4, 12, 10_000, "xx", "eval", "test")
    assert len(w.input_ids) >= 8
    want = evaluation.perplexity(m.module, w, batch_size=2, progress=False)
    path = tmp_path / "eval.safetensors"

    saves = []
    real_update = checkpoint.Checkpoint.update

    def update_then_die(self, sums, batches, windows):
        real_update(self, sums, batches, windows)
        if self.saved_at == windows:
            saves.append(windows)
            raise Killed  # dies right after its first save, as a SIGKILL would

    monkeypatch.setattr(checkpoint.Checkpoint, "update", update_then_die)
    with pytest.raises(Killed):
        evaluation.perplexity(m.module, w, batch_size=2, progress=False, checkpoint=path, every=4)
    monkeypatch.setattr(checkpoint.Checkpoint, "update", real_update)
    assert saves == [4] and path.exists()

    calls = []
    real_nll = evaluation.summed_nll
    monkeypatch.setattr(evaluation, "summed_nll", lambda *a: calls.append(1) or real_nll(*a))
    got = evaluation.perplexity(m.module, w, batch_size=2, progress=False, checkpoint=path, every=4)
    assert got == want  # bit for bit, every field
    assert len(calls) == len(list(evaluation.batches(w, 2))) - 2  # only the batches after the save ran again
    assert not path.exists()


def test_checkpoint_of_another_job_is_ignored(loaded, tmp_path):
    m = loaded("llama")
    w = corpus.make_windows(m.tokenizer, TEXT * 4, 12, 10_000, "xx", "eval", "test")
    path = tmp_path / "eval.safetensors"
    key = {
        "job": "perplexity",
        "model": models.fingerprint(m.module),
        "windows": checkpoint.windows_digest(w),
        "batch_size": 2,
    }
    # a checkpoint of the same windows at another batch size claims a huge NLL: it must not be used
    checkpoint.Checkpoint(path, dict(key, batch_size=3), every=1).update(
        {"sums": torch.tensor([1e9, 4.0], dtype=torch.float64)}, 1, 3
    )
    assert path.exists()
    want = evaluation.perplexity(m.module, w, batch_size=2, progress=False)
    assert evaluation.perplexity(m.module, w, batch_size=2, progress=False, checkpoint=path) == want
    assert not path.exists()  # replaced by this job's own, then removed when it finished


def test_a_corrupt_checkpoint_is_moved_aside_with_a_warning(loaded, tmp_path):
    """As every cached file of a run: set aside (PATH.corrupt) and recomputed, never silently dropped."""
    m = loaded("llama")
    w = corpus.make_windows(m.tokenizer, TEXT * 4, 12, 10_000, "xx", "eval", "test")
    path = tmp_path / "eval.safetensors"
    path.write_bytes(b"\x00" * 40)
    want = evaluation.perplexity(m.module, w, batch_size=2, progress=False)
    with pytest.warns(LingregionWarning, match=r"eval.safetensors: not a readable safetensors file .* moved it to"):
        assert evaluation.perplexity(m.module, w, batch_size=2, progress=False, checkpoint=path) == want
    assert (tmp_path / "eval.safetensors.corrupt").read_bytes() == b"\x00" * 40 and not path.exists()
