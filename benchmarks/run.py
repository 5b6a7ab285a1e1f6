"""Speed and memory of lingregion's passes over a model, against baselines, on the default model.

    python benchmarks/run.py [--quick] [--out DIR] [--device cuda] [--dtype bfloat16] [--doc BENCHMARKS.md]

Every figure is a ratio against a baseline run on the same data. Times are measured in this process
with the compared methods interleaved rep by rep (median over reps), so that load from other processes
hits both alike. Peak memory is measured in a fresh subprocess per method, after the model and data are
loaded and every weight page has been touched: on CPU the resident-set high-water mark
(/proc/self/status VmHWM, reset through /proc/self/clear_refs just before the job) with glibc's mmap
threshold fixed at 64 KiB, so that a freed tensor leaves the resident set instead of lingering in the
heap; on CUDA the allocator's peak. Writes DIR/benchmarks.json and DIR/benchmarks.md (default:
benchmarks/results); --doc also puts the tables into that file, between its "figures" markers.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lingregion import memory, models, store  # noqa: E402
from lingregion.checkpoint import CHECKPOINT_EVERY, Checkpoint  # noqa: E402
from lingregion.regions import Region  # noqa: E402

import cases  # noqa: E402

PRESETS = {  # seq_len, scoring windows, evaluation windows (one batch of 4), reps
    "default": {"seq_len": 512, "score_windows": 2, "eval_windows": 4, "reps": 3},
    "quick": {"seq_len": 256, "score_windows": 1, "eval_windows": 4, "reps": 2},
    # a GPU does a few windows in milliseconds, where launch overheads would decide every ratio
    "gpu": {"seq_len": 512, "score_windows": 16, "eval_windows": 64, "reps": 3},
}
# the bf16 comparison where bf16 is emulated (hours at full size), unless --seq-len / --*-windows say otherwise
EMULATED_BF16_SIZES = {"seq_len": 64, "score_windows": 1, "eval_windows": 1}
MB = 2**20


# --- measuring -----------------------------------------------------------------------------------------

CPU_SECONDS: dict[str, float] = {}  # median process CPU time of each timed job, beside the wall-clock figures


def interleaved(group: str, fns: dict, reps: int, warmup: bool = True) -> tuple[dict[str, float], dict]:
    """Median wall-clock seconds of each function over `reps` rounds (after an untimed warm-up round),
    running them in turn within each round; and each function's last return value."""
    last = {name: fn() for name, fn in fns.items()} if warmup else {}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            last[name] = fn()
            _sync()
            times[name].append((time.perf_counter() - t0, time.process_time() - c0))
    for name, t in times.items():
        CPU_SECONDS[f"{group} {name}"] = statistics.median(c for _, c in t)
    return {name: statistics.median(w for w, _ in t) for name, t in times.items()}, last


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_of(fn, device: str) -> dict:
    """Memory in use before `fn` and its peak while it runs (bytes)."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return {
            "before": before,
            "peak": torch.cuda.max_memory_allocated(),
            "method": "torch.cuda.max_memory_allocated",
        }
    assert os.environ.get("MALLOC_MMAP_THRESHOLD_"), "run through memory_of, which fixes the mmap threshold"
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    fn()
    return {
        "before": before,
        "peak": _status("VmHWM"),
        "method": "VmHWM after clear_refs (resident set of the whole process; glibc mmap threshold 64 KiB)",
    }


MEMORY_CASES = {  # name → (Setup → the zero-argument job whose peak is measured)
    "score.lean": lambda s: lambda: cases.score_lean(s),
    "score.bare": lambda s: lambda: cases.score_bare(s),
    "score.naive": lambda s: lambda: cases.score_naive(s),
    "ppl.lean": lambda s: lambda: cases.ppl_lean(s),
    "ppl.naive": lambda s: lambda: cases.ppl_naive(s),
    "ppl.lmeval": cases.lmeval_harness,
    "select.matrix": lambda s: lambda: cases.select_lean(s, "matrix"),
    "select.global": lambda s: lambda: cases.select_lean(s, "global"),
    "select.random-global": lambda s: lambda: cases.select_lean(s, "global", "random"),
    "sort.matrix": lambda s: lambda: cases.select_sort(s, "matrix"),
    "sort.global": lambda s: lambda: cases.select_sort(s, "global"),
}


def memory_child(args) -> None:
    """Subprocess entry: load, then measure one case and print its figures as JSON."""
    start = _status("VmRSS") if not args.device.startswith("cuda") else 0
    if args.scores:  # selection needs the scores only
        scores = store.read_tensors(Path(args.scores))[0]
        s = cases.Setup(None, None, None, list(scores), {}, scores)
        for t in scores.values():  # memory-mapped: page them in now, or the job would count them
            t.sum()
    else:
        s = cases.setup(args.seq_len, args.score_windows, args.eval_windows, args.device, args.dtype, args.model)
        with torch.no_grad():  # weights are memory-mapped: page them in now, or the job would count them
            for p in s.m.module.parameters():
                p.sum()
    job = MEMORY_CASES[args.memory](s)
    if args.scores:
        # run once first: the code it pages in on first use (a few MB of libraries) is no working memory,
        # and the budget here is one matrix (5 MB on the default model)
        job()
    print(json.dumps(dict(peak_of(job, args.device), process_start=start)))


def memory_of(case: str, args, scores: Path | None = None) -> dict:
    # selection works on scores read into host memory, whatever device the model is on
    device = "cpu" if scores else args.device
    cmd = [
        sys.executable,
        __file__,
        "--memory",
        case,
        "--seq-len",
        str(args.seq_len),
        "--score-windows",
        str(args.score_windows),
        "--eval-windows",
        str(args.eval_windows),
        "--device",
        device,
        "--dtype",
        args.dtype,
        "--threads",
        str(torch.get_num_threads()),
    ]
    cmd += (["--scores", str(scores)] if scores else []) + (["--model", args.model] if args.model else [])
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(64 * 1024))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"memory measurement of {case} failed:\n{done.stderr[-2000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["increment"] = out["peak"] - out["before"]
    print(f"  memory {case}: peak {out['peak'] / MB:,.0f} MB, +{out['increment'] / MB:,.0f} MB over loaded", flush=True)
    return out


# --- the benchmarks ------------------------------------------------------------------------------------


def bench_scoring(s: cases.Setup, args) -> tuple[dict, dict]:
    """Figures, and the naive way's scores (for the accuracy check at the end)."""
    tokens = s.score_windows.n_tokens
    secs, last = interleaved(
        "scoring",
        {
            "lean": lambda: cases.score_lean(s),
            "bare": lambda: cases.score_bare(s),
            "naive": lambda: cases.score_naive(s),
        },
        args.reps,
    )
    s.scores = last["lean"]
    mem = {k: memory_of(f"score.{k}", args) for k in ("lean", "bare", "naive")}
    return {
        "tokens": tokens,
        "seconds": secs,
        "tokens_per_s": {k: tokens / v for k, v in secs.items()},
        "memory": mem,
    }, last["naive"]


def bench_scoring_cost(s: cases.Setup, args) -> dict:
    """What a user waits for per language: a run's whole scoring of one language (gradient pass with split
    halves, importance, split-half statistics, compact score file written) against the gradient pass alone,
    the pass with split halves against the plain pass, and the whole job against a bare forward+backward."""
    tokens = s.score_windows.n_tokens
    secs, _ = interleaved(
        "scoring cost",
        {
            "bare": lambda: cases.score_bare(s),
            "gradient": lambda: cases.gradient_plain(s),
            "gradient.halves": lambda: cases.gradient_halves(s),
            "language": lambda: cases.score_language(s, args.model),
        },
        args.reps,
    )
    return {
        "tokens": tokens,
        "windows": len(s.score_windows.input_ids),
        "seconds": secs,
        "tokens_per_s": {k: tokens / v for k, v in secs.items()},
        "after_gradient_seconds": secs["language"] - secs["gradient.halves"],
        "after_gradient_over_gradient": (secs["language"] - secs["gradient.halves"]) / secs["gradient.halves"],
        "halves_over_plain_throughput": secs["gradient"] / secs["gradient.halves"],
        "language_over_bare_throughput": secs["bare"] / secs["language"],
    }


def bench_perplexity(s: cases.Setup, args) -> dict:
    fns = {"lean": lambda: cases.ppl_lean(s), "naive": lambda: cases.ppl_naive(s)}
    if cases.lmeval_available():
        fns["lmeval"] = cases.lmeval_harness(s)
    secs, last = interleaved("perplexity", fns, args.reps)
    n = s.eval_windows.n_tokens
    tokens, exact = {"lean": n, "naive": n}, cases.nll_exact(s)
    ppl = {k: math.exp(last[k] / n) for k in ("lean", "naive")}
    out = {
        "batch": [4, args.seq_len],
        "seconds": secs,
        "ppl": ppl,
        "nll": {k: last[k] for k in ppl},
        "nll_fp64_reference": exact,
        "relative_difference": abs(ppl["lean"] - ppl["naive"]) / ppl["naive"],
        "relative_error_vs_fp64": {k: abs(last[k] - exact) / exact for k in ppl},
        "relative_difference_vs_fp64": abs(ppl["lean"] - math.exp(exact / n)) / math.exp(exact / n),
    }
    if "lmeval" in fns:
        tokens["lmeval"] = cases.lmeval_tokens(s)
        out["lmeval_loglikelihood"] = last["lmeval"]
        out["ppl"]["lmeval"] = math.exp(-last["lmeval"] / tokens["lmeval"])
    out["tokens"] = tokens
    out["tokens_per_s"] = {k: tokens[k] / v for k, v in secs.items()}
    out["memory"] = {k: memory_of(f"ppl.{k}", args) for k in fns}
    return out


def bench_switching(s: cases.Setup, args) -> dict:
    """Switching a 3% region in and out against one evaluation pass, timed in alternation (rep by rep).
    The first apply after loading also turns the memory-mapped weight pages it writes into private
    copies (once per model load): reported apart."""
    region = cases.select_lean(s, "matrix")
    first = cases.region_switch(s, region)
    runs = []
    for _ in range(args.reps):
        run = cases.region_switch(s, region)
        t0 = time.perf_counter()
        cases.ppl_lean(s)
        runs.append(dict(run, eval=time.perf_counter() - t0))
    med = {k: statistics.median(r[k] for r in runs) for k in ("build", "apply", "undo", "eval")}
    return {
        "seconds": med,
        "first_apply_seconds": first["apply"],
        "entries": first["entries"],
        "of": first["of"],
        "eval_pass_seconds": med["eval"],
        "apply_undo_over_eval": statistics.median((r["apply"] + r["undo"]) / r["eval"] for r in runs),
        "build_apply_undo_over_eval": statistics.median(
            (r["build"] + r["apply"] + r["undo"]) / r["eval"] for r in runs
        ),
    }


def bench_selection(s: cases.Setup, args, scores_file: Path) -> dict:
    secs, _ = interleaved(
        "selection",
        {
            "matrix": lambda: cases.select_lean(s, "matrix"),
            "sort.matrix": lambda: cases.select_sort(s, "matrix"),
            "global": lambda: cases.select_lean(s, "global"),
            "sort.global": lambda: cases.select_sort(s, "global"),
            "random.global": lambda: cases.select_lean(s, "global", "random"),
        },
        max(1, args.reps - 1),
        warmup=False,
    )
    largest = max(t.numel() * t.element_size() for t in s.scores.values())
    mem = {
        k: memory_of(f"{k}", args, scores_file)
        for k in ("select.matrix", "select.global", "select.random-global", "sort.global")
    }
    entries = sum(t.numel() for t in s.scores.values())
    return {
        "seconds": secs,
        "entries": entries,
        "largest_matrix_bytes": largest,
        "memory": mem,
        "region_bytes": sum((t.numel() + 7) // 8 for t in s.scores.values()),
    }


def bench_storage(s: cases.Setup, folder: Path) -> dict:
    region = cases.select_lean(s, "matrix")
    region.save(folder / "region.safetensors")
    store.write_tensors(folder / "scores.safetensors", s.scores, {"format": "benchmark"})
    assert Region.load(folder / "region.safetensors").count() == region.count()
    n = region.total()
    return {
        "entries": n,
        "region_file_bytes": (folder / "region.safetensors").stat().st_size,
        "region_bits_per_entry": 8 * (folder / "region.safetensors").stat().st_size / n,
        "scores_file_bytes": (folder / "scores.safetensors").stat().st_size,
        "score_dtype": str(next(iter(s.scores.values())).dtype).replace("torch.", ""),
    }


def bench_bfloat16(s: cases.Setup, args) -> dict:
    """Scoring and perplexity with the weights in bfloat16 beside float32 (sums in fp32 in both), timed
    interleaved rep by rep in this process so that load from other processes hits both alike; and how far
    bf16's regions (per-matrix Top / Bottom 1% and 3%) and perplexity are from fp32's on the same data.

    Where bf16 has no instructions on this CPU (models.bfloat16_slowdown), the full-size comparison would take
    hours: both dtypes are then timed, scored and evaluated on EMULATED_BF16_SIZES, or on the sizes given."""
    slowdown = models.bfloat16_slowdown(args.device)
    emulated = slowdown > models.EMULATED_BF16
    if emulated:
        size = {k: getattr(args, k) if k in args.given else v for k, v in EMULATED_BF16_SIZES.items()}
        s = cases.setup(*size.values(), args.device, "float32", args.model)
        bf = cases.setup(*size.values(), args.device, "bfloat16", args.model)
    else:
        bf = cases.setup(args.seq_len, args.score_windows, args.eval_windows, args.device, "bfloat16", args.model)
    both = {"float32": s, "bfloat16": bf}
    score_jobs = {k: (lambda x=x: cases.score_lean(x)) for k, x in both.items()}
    ppl_jobs = {k: (lambda x=x: cases.ppl_lean(x)) for k, x in both.items()}
    reps = 1 if emulated else args.reps
    score_secs, scores = interleaved("dtype scoring", score_jobs, reps, warmup=not emulated)
    ppl_secs, nll = interleaved("dtype perplexity", ppl_jobs, reps, warmup=not emulated)
    n_score, n_eval = s.score_windows.n_tokens, s.eval_windows.n_tokens
    ppl = {k: math.exp(v / n_eval) for k, v in nll.items()}
    out = {
        "score_tokens": n_score,
        "eval_tokens": n_eval,
        "scoring_seconds": score_secs,
        "scoring_tokens_per_s": {k: n_score / v for k, v in score_secs.items()},
        "scoring_speedup": score_secs["float32"] / score_secs["bfloat16"],
        "perplexity_seconds": ppl_secs,
        "perplexity_tokens_per_s": {k: n_eval / v for k, v in ppl_secs.items()},
        "perplexity_speedup": ppl_secs["float32"] / ppl_secs["bfloat16"],
        "ppl": ppl,
        "ppl_relative_difference": abs(ppl["bfloat16"] - ppl["float32"]) / ppl["float32"],
        "matmul_slowdown": slowdown,
        "regions": cases.region_agreement(scores["float32"], scores["bfloat16"]),
        **(
            {
                "note": f"bf16 emulated on this CPU ({slowdown:.0f}× slower matrix products): "
                f"{size['score_windows']} scoring and {size['eval_windows']} evaluation window(s) of "
                f"{size['seq_len']} tokens"
            }
            if emulated
            else {}
        ),
    }
    del bf, scores
    gc.collect()
    return out


def bench_score_storage(s: cases.Setup, folder: Path) -> dict:
    """Bytes per scored parameter of a score file at each precision, its save and load time, and whether
    the regions read back from it (per-matrix Top / Bottom 1% and 3%) are those of the fp32 scores."""
    from lingregion import scorefile

    out = {}
    for precision in scorefile.PRECISIONS:
        r = cases.score_file_roundtrip(s.scores, folder / f"scores-{precision}.safetensors", precision)
        r["regions"] = cases.region_agreement(s.scores, r.pop("scores"))
        out[precision] = r
        (folder / f"scores-{precision}.safetensors").unlink()
    return out


def bench_checkpoint(s: cases.Setup, folder: Path, seconds_per_window: float) -> dict:
    ckpt = Checkpoint(folder / "checkpoint.safetensors", {"job": "benchmark"}, every=1)
    t0 = time.perf_counter()
    ckpt.update(s.scores, 1, 1)
    save = time.perf_counter() - t0
    return {
        "save_seconds": save,
        "every_windows": CHECKPOINT_EVERY,
        "overhead": save / (CHECKPOINT_EVERY * seconds_per_window),
        "every_for_2_percent": math.ceil(save / (0.02 * seconds_per_window)),
    }


def bench_accuracy(s: cases.Setup, naive: dict) -> dict:
    """Importance by lingregion and by the naive way against an fp64 computation, per matrix:
    max |error| / max |reference| (the largest over matrices, and the median)."""
    ref = cases.score_fp64(s)
    out = {}
    for name, scores in (("lean", s.scores), ("naive", naive)):
        errs = sorted(((scores[n].double() - ref[n]).abs().max() / ref[n].abs().max()).item() for n in s.names)
        out[name] = {"max": errs[-1], "median": errs[len(errs) // 2]}
    return out


def bench_memory_model(s: cases.Setup, args, scoring: dict, perplexity: dict) -> dict:
    """memory.estimate's figures for this model against the measured peaks (both over the process's
    resident size before the model was loaded)."""
    config = s.m.module.config
    score_est = memory.estimate(config, args.seq_len, 1, args.dtype, args.device)
    eval_est = memory.estimate(config, args.seq_len, 4, args.dtype, args.device)
    weights = score_est["weights"]  # resident before the job, with the tokenizer and data, which it omits
    lean, ppl = scoring["memory"]["lean"], perplexity["memory"]["lean"]
    return {
        "scoring": {"estimate": score_est["scoring_peak"], "measured": weights + lean["increment"]},
        "evaluation": {"estimate": eval_est["evaluation_peak"], "measured": weights + ppl["increment"]},
        "estimate": score_est,
        "windows": args.score_windows,
    }


def machine(args) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    out = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "device": args.device,
        "dtype": args.dtype,
        **store.environment(),
    }
    if args.device.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name()
    return out


def describe_model(s: cases.Setup, args) -> dict:
    info = s.m.info
    return {
        "name": info["name"],
        "class": info["class"],
        "parameters": info["parameters"],
        "fingerprint": info["fingerprint"],
        "note": args.model_note or "",
    }


# --- report --------------------------------------------------------------------------------------------


def _row(target: str, measured: float, goal: str, ok: bool | None, fmt: str = "{:.2f}") -> list[str]:
    return [target, fmt.format(measured), goal, "n/a" if ok is None else ("yes" if ok else "**no**")]


def targets(r: dict) -> list[list[str]]:
    sc, pp, sw, se, st = r["scoring"], r["perplexity"], r["switching"], r["selection"], r["storage"]
    peak = lambda m: m["peak"]  # noqa: E731

    def working(case: str) -> float:
        """Growth during the selection less the region it returns (1 bit per entry), per largest matrix."""
        return (se["memory"][case]["increment"] - se["region_bytes"]) / se["largest_matrix_bytes"]

    def extra(case: str) -> float:
        return se["memory"][case]["increment"] / se["largest_matrix_bytes"]

    rows = [
        _row(
            "Scoring throughput / bare forward+backward",
            sc["tokens_per_s"]["lean"] / sc["tokens_per_s"]["bare"],
            "≥ 0.95",
            sc["tokens_per_s"]["lean"] / sc["tokens_per_s"]["bare"] >= 0.95,
        ),
        _row(
            "Scoring throughput / naive (all grads, .grad)",
            sc["tokens_per_s"]["lean"] / sc["tokens_per_s"]["naive"],
            "≥ 1.4",
            sc["tokens_per_s"]["lean"] / sc["tokens_per_s"]["naive"] >= 1.4,
        ),
        _row(
            "Scoring peak memory / naive",
            peak(sc["memory"]["lean"]) / peak(sc["memory"]["naive"]),
            "≤ 0.7",
            peak(sc["memory"]["lean"]) / peak(sc["memory"]["naive"]) <= 0.7,
        ),
        _row(
            "Scores vs fp64, largest per-matrix error: lingregion",
            r["accuracy"]["lean"]["max"],
            "report",
            None,
            "{:.1e}",
        ),
        _row(
            "Scores vs fp64, largest per-matrix error: naive", r["accuracy"]["naive"]["max"], "report", None, "{:.1e}"
        ),
        _row(
            "Perplexity peak memory / naive model(labels=) at 4×" + str(pp["batch"][1]),
            peak(pp["memory"]["lean"]) / peak(pp["memory"]["naive"]),
            "≤ 0.4",
            peak(pp["memory"]["lean"]) / peak(pp["memory"]["naive"]) <= 0.4,
        ),
        _row(
            "Perplexity throughput / naive",
            pp["tokens_per_s"]["lean"] / pp["tokens_per_s"]["naive"],
            "≥ 1.3",
            pp["tokens_per_s"]["lean"] / pp["tokens_per_s"]["naive"] >= 1.3,
        ),
        _row(
            "Perplexity relative difference from naive",
            pp["relative_difference"],
            "≤ 1e-5",
            pp["relative_difference"] <= 1e-5,
            "{:.1e}",
        ),
        _row(
            "Perplexity relative difference from fp64 log-softmax",
            pp["relative_difference_vs_fp64"],
            "≤ 1e-5",
            pp["relative_difference_vs_fp64"] <= 1e-5,
            "{:.1e}",
        ),
        _row(
            "Σ NLL relative error vs fp64 log-softmax: lingregion",
            pp["relative_error_vs_fp64"]["lean"],
            "report",
            None,
            "{:.1e}",
        ),
        _row(
            "Σ NLL relative error vs fp64 log-softmax: naive",
            pp["relative_error_vs_fp64"]["naive"],
            "report",
            None,
            "{:.1e}",
        ),
    ]
    if "lmeval" in pp["tokens_per_s"]:
        rows.append(
            _row(
                "Perplexity throughput / lm-eval HF backend",
                pp["tokens_per_s"]["lean"] / pp["tokens_per_s"]["lmeval"],
                "report",
                None,
            )
        )
        rows.append(
            _row(
                "Perplexity peak memory / lm-eval HF backend",
                peak(pp["memory"]["lean"]) / peak(pp["memory"]["lmeval"]),
                "report",
                None,
            )
        )
    rows += [
        _row(
            "Apply + undo a 3% region / one evaluation pass",
            sw["apply_undo_over_eval"],
            "≤ 0.02",
            sw["apply_undo_over_eval"] <= 0.02,
            "{:.4f}",
        ),
        _row(
            "Build edits + apply + undo / one evaluation pass",
            sw["build_apply_undo_over_eval"],
            "report",
            None,
            "{:.4f}",
        ),
        _row(
            "Top 3% per matrix: time / full sort",
            se["seconds"]["matrix"] / se["seconds"]["sort.matrix"],
            "report",
            None,
        ),
        _row("Top 3% global: time / full sort", se["seconds"]["global"] / se["seconds"]["sort.global"], "report", None),
        _row(
            "Top 3% global: working memory / largest matrix",
            working("select.global"),
            "≤ 1",
            working("select.global") <= 1,
        ),
        # Random has no scores to select from: it makes one matrix of uniform values at a time, which
        # is its data rather than working memory
        _row(
            "Random 3% global: working memory besides its uniform values / largest matrix",
            working("select.random-global") - 1,
            "≤ 1",
            working("select.random-global") - 1 <= 1,
        ),
        _row("Full sort global: extra memory / largest matrix", extra("sort.global"), "report", None),
        _row(
            "Region file (Top 3%, compressed masks): bits per parameter",
            st["region_bits_per_entry"],
            "< 1",
            st["region_bits_per_entry"] < 1,
            "{:.4f}",
        ),
    ]
    return rows


def details(r: dict) -> list[list[str]]:
    sc, pp, sw, se, ck, mm = (
        r[k] for k in ("scoring", "perplexity", "switching", "selection", "checkpoint", "memory_model")
    )
    rows = [
        [
            f"scoring {k}",
            f"{sc['tokens_per_s'][k]:.1f} tok/s",
            f"{sc['memory'][k]['peak'] / MB:,.0f} MB",
            f"+{sc['memory'][k]['increment'] / MB:,.0f} MB",
        ]
        for k in sc["seconds"]
    ]
    rows += [
        [
            f"perplexity {k}",
            f"{pp['tokens_per_s'][k]:.1f} tok/s",
            f"{pp['memory'][k]['peak'] / MB:,.0f} MB",
            f"+{pp['memory'][k]['increment'] / MB:,.0f} MB",
        ]
        for k in pp["seconds"]
    ]
    rows += [[f"selection {k}", f"{v:.2f} s", "", ""] for k, v in se["seconds"].items()]
    rows += [
        [f"selection memory {k}", "", f"{m['peak'] / MB:,.0f} MB", f"+{m['increment'] / MB:,.0f} MB"]
        for k, m in se["memory"].items()
    ]
    rows += [
        [
            "region 3%: build edits / apply / undo",
            " / ".join(f"{sw['seconds'][k] * 1e3:.0f} ms" for k in ("build", "apply", "undo")),
            "",
            "",
        ],
        [
            "first apply after loading (copies the mapped weight pages it writes; once)",
            f"{sw['first_apply_seconds']:.2f} s",
            "",
            "",
        ],
        [
            f"one evaluation pass ({r['config']['eval_windows']} windows, batch 4)",
            f"{sw['eval_pass_seconds']:.2f} s",
            "",
            "",
        ],
        [
            f"checkpoint save (every {ck['every_windows']} windows)",
            f"{ck['save_seconds']:.2f} s",
            f"{ck['overhead']:.1%} of scoring time",
            f"every {ck['every_for_2_percent']} windows for ≤ 2% (`scale_checkpoint_every`)",
        ],
        [
            f"memory.estimate vs weights + measured growth, scoring ({mm['windows']} windows, 1 per pass)",
            f"{mm['scoring']['estimate'] / MB:,.0f} MB est.",
            f"{mm['scoring']['measured'] / MB:,.0f} MB measured",
            "",
        ],
        [
            "memory.estimate vs weights + measured growth, evaluation 4 windows",
            f"{mm['evaluation']['estimate'] / MB:,.0f} MB est.",
            f"{mm['evaluation']['measured'] / MB:,.0f} MB measured",
            "",
        ],
    ]
    return rows


def markdown(r: dict) -> str:
    m, c = r["machine"], r["config"]
    model = r["model"]
    out = [
        f"Model: {model['class']} `{model['name']}`, {model['parameters'] / 1e6:,.0f}M parameters"
        + (f" ({model['note']})" if model["note"] else "")
        + ".",
        f"Machine: {m['gpu'] + ', ' if m.get('gpu') else ''}{m['cpu']}, {m['cores']} cores, "
        f"torch {m['torch']} ({m['torch_threads']} threads), "
        f"{m['device']} {m['dtype']}; load average {m['load_average'][0]:.1f} at the start, "
        f"{r['load_average_end'][0]:.1f} at the end. Windows of {c['seq_len']} tokens; {c['reps']} interleaved "
        f"reps, median. Command: `{r['command']}`.",
        "",
        "| Target | Measured | Goal | Met |",
        "|---|---|---|---|",
    ]
    out += ["| " + " | ".join(row) + " |" for row in targets(r)]
    out += ["", "| Measurement | Speed | Peak memory | Over the loaded model |", "|---|---|---|---|"]
    out += ["| " + " | ".join(row) + " |" for row in details(r)]
    out += [
        "",
        "Process CPU time per job (median): " + ", ".join(f"{k} {v:.2f} s" for k, v in r["cpu_seconds"].items()) + ".",
    ]
    out += ["", f"Peak memory: {r['scoring']['memory']['lean']['method']}, one fresh process per measurement."]
    return "\n".join(out) + "\n"


def markdown_extra(r: dict) -> str:
    """Tables of the scoring cost per language, the bfloat16 comparison and score storage, where measured."""
    out = []
    if "scoring_cost" in r:
        c = r["scoring_cost"]
        sec, tps = c["seconds"], c["tokens_per_s"]
        out += [
            "",
            f"**One language's scoring, end to end** ({c['windows']} windows, {c['tokens']} predicted tokens; "
            "interleaved reps, median):",
            "",
            "| | seconds | tok/s |",
            "|---|---|---|",
            *[
                f"| {label} | {sec[k]:.2f} | {tps[k]:.1f} |"
                for k, label in (
                    ("bare", "bare forward+backward (`model(labels=).loss.backward()`)"),
                    ("gradient", "gradient pass, one accumulator"),
                    ("gradient.halves", "gradient pass with the split-half sample"),
                    ("language", "`Run.scores`: pass, importance, split-half statistics, compact file written"),
                )
            ],
            "",
            "| Target | Measured | Goal | Met |",
            "|---|---|---|---|",
            "| "
            + " | ".join(
                _row(
                    "Work after the gradient pass / the pass",
                    c["after_gradient_over_gradient"],
                    "≤ 0.3",
                    c["after_gradient_over_gradient"] <= 0.3,
                )
            )
            + " |",
            "| "
            + " | ".join(
                _row(
                    "Gradient pass throughput with split halves / without",
                    c["halves_over_plain_throughput"],
                    "≥ 0.9",
                    c["halves_over_plain_throughput"] >= 0.9,
                )
            )
            + " |",
            "| "
            + " | ".join(
                _row(
                    "One language end to end / bare forward+backward (throughput)",
                    c["language_over_bare_throughput"],
                    "report",
                    None,
                )
            )
            + " |",
        ]
    if "bfloat16" in r:
        b = r["bfloat16"]
        out += [
            "",
            f"**bfloat16 beside float32** (same process, interleaved; {b['score_tokens']} scoring and "
            f"{b['eval_tokens']} evaluation tokens; sums in fp32 in both):",
            "",
            "| | float32 | bfloat16 | bf16 / fp32 |",
            "|---|---|---|---|",
            "| scoring tok/s | {:.1f} | {:.1f} | **{:.2f}×** |".format(
                *b["scoring_tokens_per_s"].values(), b["scoring_speedup"]
            ),
            "| perplexity tok/s | {:.1f} | {:.1f} | **{:.2f}×** |".format(
                *b["perplexity_tokens_per_s"].values(), b["perplexity_speedup"]
            ),
            "| perplexity | {:.4f} | {:.4f} | relative difference {:.1e} |".format(
                b["ppl"]["float32"], b["ppl"]["bfloat16"], b["ppl_relative_difference"]
            ),
        ]
        out += [
            f"| Jaccard of per-matrix {k} (bf16 scores vs fp32 scores) | | | {v['jaccard']:.4f} |"
            for k, v in b["regions"].items()
        ]
        if b.get("note"):
            out += ["", f"*{b['note']}.*"]
    if "score_storage" in r:
        out += [
            "",
            "**Score storage** (the scores above written and read back with `lingregion.scorefile`):",
            "",
            "| Precision | Bytes per parameter | Exact up to | Save / load | Regions read back: Jaccard vs fp32 |",
            "|---|---|---|---|---|",
        ]
        for precision, v in r["score_storage"].items():
            jac = ", ".join(
                f"{k} {x['jaccard']:.4f}" + (" (identical)" if x["identical"] else "") for k, x in v["regions"].items()
            )
            out.append(
                f"| {precision} | {v['bytes_per_parameter']:.3f} | {v['exact_share']:g} of each matrix | "
                f"{v['save_seconds']:.2f} / {v['load_seconds']:.2f} s | {jac} |"
            )
    return "\n".join(out) + ("\n" if out else "")


def only(s: cases.Setup, args, r: dict, started: float) -> None:
    """`--only`: the bfloat16 comparison and / or score storage alone, written and printed like a full run."""
    unknown = set(args.only) - {"bfloat16", "storage", "scoring-cost"}
    if unknown:
        raise SystemExit(
            f"--only: unknown part(s) {', '.join(sorted(unknown))}; use bfloat16, storage and/or scoring-cost"
        )
    if "scoring-cost" in args.only:
        print("scoring cost per language", flush=True)
        r["scoring_cost"] = bench_scoring_cost(s, args)
    if "storage" in args.only:
        print("scores for the storage figures", flush=True)
        s.scores = cases.score_lean(s)
        with tempfile.TemporaryDirectory() as tmp:
            r["score_storage"] = bench_score_storage(s, Path(tmp))
    if "bfloat16" in args.only:
        print("bfloat16 beside float32", flush=True)
        r["bfloat16"] = bench_bfloat16(s, args)
    r["load_average_end"] = os.getloadavg()
    r["cpu_seconds"] = CPU_SECONDS
    r["seconds"] = round(time.time() - started, 1)
    out = Path(args.out)
    store.write_json(out / "benchmarks-only.json", _jsonable(r))
    m = r["machine"]
    text = (
        f"Machine: {m.get('gpu', '') + ', ' if m.get('gpu') else ''}{m['cpu']}, {m['cores']} cores, torch {m['torch']} "
        f"({m['torch_threads']} threads); load average {m['load_average'][0]:.1f} at the start, "
        f"{r['load_average_end'][0]:.1f} at the end. Command: `{r['command']}`.\n" + markdown_extra(r)
    )
    store.write_text(out / "benchmarks-only.md", text)
    print(json.dumps(_jsonable(r), indent=1))
    print(text)


def _jsonable(r: dict) -> dict:
    """The results without tensors (score storage keeps none, but a caller's additions might)."""
    return json.loads(json.dumps(r, default=lambda o: None))


def update_doc(path: Path, tables: str) -> None:
    text = path.read_text(encoding="utf-8")
    start, end = "<!-- figures:start -->", "<!-- figures:end -->"
    if start not in text or end not in text:
        raise SystemExit(f"{path}: no {start} ... {end} block to fill")
    head, rest = text.split(start, 1)
    store.write_text(path, head + start + "\n" + tables + end + rest.split(end, 1)[1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick", action="store_true", help="256-token windows, 1 scoring window, 2 reps (default: 512, 2, 3)"
    )
    p.add_argument(
        "--out",
        default=str(Path(__file__).resolve().parent / "results"),
        help="folder for benchmarks.json and benchmarks.md (default benchmarks/results)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--model", help="a Hugging Face model folder or name (default: the built-in Gemma 3 270M)")
    p.add_argument("--model-note", help="a remark on the model printed beside its name in the tables")
    p.add_argument("--doc", help="a Markdown file whose <!-- figures:start/end --> block gets the new tables")
    p.add_argument(
        "--threads",
        type=int,
        help="torch threads (default: torch's own). On a machine shared with other "
        "jobs, 1 avoids threads waiting on each other's time slices",
    )
    p.add_argument(
        "--only",
        type=lambda v: v.split(","),
        help="run only these parts, comma-separated: bfloat16 (bf16 beside fp32: speed, regions, perplexity), "
        "storage (score file bytes per parameter and regions read back) and/or scoring-cost (one language's "
        "whole scoring against its gradient pass); default: everything",
    )
    p.add_argument("--memory", choices=list(MEMORY_CASES), help=argparse.SUPPRESS)  # subprocess mode
    p.add_argument("--scores", help=argparse.SUPPRESS)
    for key in ("seq_len", "score_windows", "eval_windows", "reps"):
        p.add_argument("--" + key.replace("_", "-"), type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    preset = "quick" if args.quick else "gpu" if args.device.startswith("cuda") else "default"
    args.given = {k for k in PRESETS[preset] if getattr(args, k) is not None}
    for key, value in PRESETS[preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory:
        return memory_child(args)

    started = time.time()
    r = {
        "command": " ".join(["python", "benchmarks/run.py"] + (argv if argv is not None else sys.argv[1:])),
        "config": {k: getattr(args, k) for k in PRESETS["default"]},
        "machine": machine(args),
    }
    s = cases.setup(args.seq_len, args.score_windows, args.eval_windows, args.device, args.dtype, args.model)
    r["model"] = describe_model(s, args)
    if args.only:
        return only(s, args, r, started)
    print("scoring", flush=True)
    r["scoring"], naive_scores = bench_scoring(s, args)
    print("scoring cost per language", flush=True)
    r["scoring_cost"] = bench_scoring_cost(s, args)
    print("perplexity", flush=True)
    r["perplexity"] = bench_perplexity(s, args)
    with tempfile.TemporaryDirectory() as tmp:
        scores_file = Path(tmp) / "scores.safetensors"
        store.write_tensors(scores_file, s.scores, {"format": "benchmark"})
        print("region switching, selection, storage", flush=True)
        r["switching"] = bench_switching(s, args)
        r["selection"] = bench_selection(s, args, scores_file)
        r["storage"] = bench_storage(s, Path(tmp))
        r["checkpoint"] = bench_checkpoint(s, Path(tmp), r["scoring"]["seconds"]["lean"] / args.score_windows)
        r["score_storage"] = bench_score_storage(s, Path(tmp))
    if args.dtype == "float32":
        print("bfloat16 beside float32", flush=True)
        r["bfloat16"] = bench_bfloat16(s, args)
    r["memory_model"] = bench_memory_model(s, args, r["scoring"], r["perplexity"])
    print("accuracy against fp64", flush=True)
    r["accuracy"] = bench_accuracy(s, naive_scores)
    del naive_scores
    r["load_average_end"] = os.getloadavg()
    r["cpu_seconds"] = CPU_SECONDS
    r["seconds"] = round(time.time() - started, 1)
    out = Path(args.out)
    store.write_json(out / "benchmarks.json", r)
    store.write_text(out / "benchmarks.md", markdown(r) + markdown_extra(r))
    print(markdown(r) + markdown_extra(r))
    if args.doc:
        update_doc(Path(args.doc), markdown(r))
    print(f"{out / 'benchmarks.json'}, {out / 'benchmarks.md'} ({r['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
