"""The benchmark script runs end to end (on a tiny model, so in seconds) and writes every figure it promises."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "run.py"


def _run(tmp_path, tiny_folder, *extra):
    out = tmp_path / "out"
    args = [sys.executable, str(BENCH), "--quick", "--model", str(tiny_folder), "--out", str(out), "--threads", "1"]
    subprocess.run(args + list(extra), check=True, capture_output=True, text=True, timeout=600)
    return out


def test_full_benchmark_writes_every_part(tmp_path, tiny_folder):
    out = _run(tmp_path, tiny_folder)
    r = json.loads((out / "benchmarks.json").read_text())
    for part in (
        "scoring",
        "perplexity",
        "switching",
        "selection",
        "storage",
        "checkpoint",
        "score_storage",
        "bfloat16",
        "memory_model",
        "accuracy",
    ):
        assert part in r, part
    assert r["perplexity"]["relative_error_vs_fp64"]["lean"] < 1e-5
    assert "| scoring tok/s |" in (out / "benchmarks.md").read_text()


def test_bfloat16_part_compares_speed_regions_and_perplexity(tmp_path, tiny_folder):
    out = _run(tmp_path, tiny_folder, "--only", "bfloat16")
    b = json.loads((out / "benchmarks-only.json").read_text())["bfloat16"]
    assert set(b["scoring_tokens_per_s"]) == {"float32", "bfloat16"}
    assert all(v > 0 for v in b["perplexity_tokens_per_s"].values())
    # bf16 weights change the perplexity a little, never by orders of magnitude
    assert 0 < b["ppl_relative_difference"] < 0.1
    assert set(b["regions"]) == {"top 0.01", "top 0.03", "bottom 0.01", "bottom 0.03"}
    assert all(0 < v["jaccard"] <= 1 for v in b["regions"].values())
