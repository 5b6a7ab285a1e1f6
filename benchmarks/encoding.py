"""The compact score file's cost, part by part, against an earlier commit's, on one language's real scores.

    python benchmarks/encoding.py --against 2d8145f [--reps 5]

Scores one language (2 windows of 256 tokens of the built-in model), then times, interleaved rep by rep
in one process: both tails of every matrix (one thread), the codes, tail values and levels of every
matrix (one thread), and the whole `scorefile.save` (on the matrix threads), for this checkout and for
`scorefile.py` / `regions.py` as they were at the given commit (read with `git show`). Checks that both
write the same tensors and record. Prints JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lingregion import scorefile
from lingregion.store import read_tensors

import cases

ROOT = Path(__file__).resolve().parents[1]


def old_scorefile(commit: str, folder: Path):
    """`scorefile` as it was at `commit`, importing that commit's `regions` beside the current `store`."""
    package = folder / "old"
    package.mkdir()
    for name in ("scorefile", "regions"):
        show = ["git", "-C", str(ROOT), "show", f"{commit}:lingregion/{name}.py"]
        got = subprocess.run(show, capture_output=True, text=True)
        if got.returncode:
            print(
                f"encoding.py: error: no lingregion/{name}.py at {commit!r}; pass a commit of this repository",
                file=sys.stderr,
            )
            sys.exit(2)
        text = got.stdout
        (package / f"{name}.py").write_text(text.replace("from .store import", "from lingregion.store import"))
    (package / "__init__.py").write_text("")
    sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location("old.scorefile", package / "scorefile.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["old.scorefile"] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--against", required=True, help="the earlier commit")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        old = old_scorefile(args.against, tmp)
        s = cases.setup(256, 2, 1)
        scores = cases.score_lean(s)
        flat = [(x.reshape(-1).numpy(), tuple(x.shape)) for x in scores.values()]
        old_tails = [[old._tails(v, shape, 0.03, largest) for largest in (True, False)] for v, shape in flat]
        tails = [scorefile._tails(v, shape, 0.03) for v, shape in flat]
        out = tmp / "before.safetensors", tmp / "after.safetensors"
        jobs = {
            "tails, one thread: before": lambda: [[old._tails(v, sh, 0.03, x) for x in (1, 0)] for v, sh in flat],
            "tails, one thread: after": lambda: [scorefile._tails(v, sh, 0.03) for v, sh in flat],
            "codes and levels, one thread: before": lambda: [old._encode(v, *t) for (v, _), t in zip(flat, old_tails)],
            "codes and levels, one thread: after": lambda: [scorefile._encode(v, *t) for (v, _), t in zip(flat, tails)],
            "save, matrix threads: before": lambda: old.save(out[0], scores, {}, "compact", 0.03),
            "save, matrix threads: after": lambda: scorefile.save(out[1], scores, {}, "compact", 0.03),
        }
        times: dict[str, list[float]] = {name: [] for name in jobs}
        for _ in range(args.reps):
            for name, job in jobs.items():
                t0 = time.perf_counter()
                job()
                times[name].append(time.perf_counter() - t0)
        (before, meta_before), (after, meta_after) = (read_tensors(path) for path in out)
    same = meta_before == meta_after and list(before) == list(after)
    same = same and all(torch.equal(before[n], after[n]) for n in before)
    print(
        json.dumps(
            {
                "against": args.against,
                "entries": sum(len(v) for v, _ in flat),
                "matrices": len(flat),
                "seconds_median": {name: round(statistics.median(t), 3) for name, t in times.items()},
                "same_tensors_and_record": same,
                "threads": torch.get_num_threads(),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
