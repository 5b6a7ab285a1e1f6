"""Two CPU processes under torchrun (gloo) give the gradient sums and perplexity of one process."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lingregion import corpus, distributed, evaluation, models, scoring
from lingregion.store import LingregionError

from conftest import TEXT

WORKER = """
import json, sys
from pathlib import Path
from safetensors.torch import save_file
from lingregion import corpus, distributed, evaluation, models, scoring

folder, text, out = sys.argv[1:4]
m = models.load(folder)
w = corpus.make_windows(m.tokenizer, Path(text).read_text().split("\\n\\n"), 12, 10_000, "xx", "score", "test")
names = models.scored_names(m.module)
grads = scoring.gradient_sum(m.module, w, names, batch_size=2, progress=False)
ppl = evaluation.perplexity(m.module, w, batch_size=2, progress=False)
rank, size = distributed.world()
save_file(grads, f"{out}/grads{rank}.safetensors")
Path(f"{out}/rank{rank}.json").write_text(json.dumps({"size": size, "share": len(distributed.shard(w).input_ids),
                                                      "ppl": ppl}))
"""


def test_two_processes_equal_one(tiny_folder, tmp_path):
    text = tmp_path / "xx.txt"
    text.write_text("\n\n".join(TEXT * 3), encoding="utf-8")
    (tmp_path / "worker.py").write_text(WORKER, encoding="utf-8")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(tmp_path / "worker.py"),
            str(tiny_folder),
            str(text),
            str(tmp_path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    # the same job in this process (no torchrun: one process)
    assert distributed.world() == (0, 1)
    m = models.load(str(tiny_folder))
    w = corpus.make_windows(m.tokenizer, text.read_text().split("\n\n"), 12, 10_000, "xx", "score", "test")
    names = models.scored_names(m.module)
    want = scoring.gradient_sum(m.module, w, names, batch_size=2, progress=False)
    want_ppl = evaluation.perplexity(m.module, w, batch_size=2, progress=False)

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["size"] for r in ranks] == [2, 2]
    shares = [r["share"] for r in ranks]
    assert min(shares) > 0 and sum(shares) == len(w.input_ids)  # each process took its own part
    for r in ranks:
        assert r["ppl"]["tokens"] == want_ppl["tokens"] and r["ppl"]["bytes"] == want_ppl["bytes"]
        assert abs(r["ppl"]["nll"] - want_ppl["nll"]) <= 1e-6 * want_ppl["nll"]
        assert abs(r["ppl"]["ppl"] - want_ppl["ppl"]) <= 1e-6 * want_ppl["ppl"]
    for r in (0, 1):
        got = load_file(str(tmp_path / f"grads{r}.safetensors"))
        assert got.keys() == want.keys()
        for n in want:
            scale = want[n].abs().max()
            assert scale > 0
            assert (got[n] - want[n]).abs().max() <= 1e-6 * scale, n


def test_shards_partition_the_windows(tokenizer, monkeypatch):
    w = corpus.make_windows(tokenizer, TEXT, 12, 10_000, "xx", "score", "test")
    seen = []
    for rank in range(3):
        monkeypatch.setattr(distributed, "world", lambda rank=rank: (rank, 3))
        part = distributed.shard(w)
        assert len(part.input_ids) == len(part.n_bytes)
        # the one short window can only be last in its shard, so batches keep equal lengths
        assert all(len(ids) == len(w.input_ids[0]) for ids in part.input_ids[:-1])
        seen += [(tuple(ids.tolist()), b) for ids, b in zip(part.input_ids, part.n_bytes)]
    assert sorted(seen) == sorted((tuple(ids.tolist()), b) for ids, b in zip(w.input_ids, w.n_bytes))
    assert len(w.input_ids[-1]) < len(w.input_ids[0])  # the case above did arise


def test_device_map_auto_gives_the_same_numbers(tiny_folder, monkeypatch):
    """--device-map auto (accelerate) on this machine's devices: same scores and perplexity as a plain load."""
    plain, spread = models.load(str(tiny_folder)), models.load(str(tiny_folder), device="auto")
    assert "device_map" in spread.info and spread.device == plain.device
    w = corpus.make_windows(plain.tokenizer, TEXT, 12, 10_000, "xx", "score", "test")
    names = models.scored_names(plain.module)
    a = scoring.gradient_sum(plain.module, w, names, batch_size=2, progress=False)
    b = scoring.gradient_sum(spread.module, w, names, batch_size=2, progress=False)
    assert all(torch.equal(a[n], b[n]) for n in names)
    assert evaluation.perplexity(plain.module, w, progress=False) == evaluation.perplexity(
        spread.module, w, progress=False
    )
    monkeypatch.setenv("WORLD_SIZE", "2")  # inside torchrun, one model per process: refused before loading
    with pytest.raises(LingregionError, match="torchrun"):
        models.load(str(tiny_folder), device="auto")
