"""What bounds the lean paths on this machine's kernels: the output layer's products, timed alone.

    python benchmarks/bounds.py [--reps 3]

On the built-in model, median of `reps` runs after a warm-up, prints JSON:
- perplexity of one batch of 4 × 512 tokens: the transformer layers; the output layer's product alone in
  the 2048 × 2048 tiles lingregion uses (no reductions); lingregion's whole output layer; lingregion's and
  the naive `model(labels=)` perplexity of the 4 evaluation windows. The layers plus the product alone are
  what any exact perplexity computes, so naive / (layers + product) is the most a lean path can gain.
- scoring of one 512-token window: lingregion's gradient pass, the bare and the naive forward+backward,
  the two output-layer products every way computes (logits, gradient to the hidden states) and the one
  only the naive way adds (the tied head's weight gradient).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from lingregion import evaluation

import cases


def median_seconds(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times), 3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    s = cases.setup(512, 1, 4)
    model, weight = s.m.module, evaluation.output_layer(s.m.module)[0].weight
    rows, cols = evaluation.tiles("cpu")
    out = {"kernels": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}
    with torch.inference_mode():
        ids = next(evaluation.batches(s.eval_windows, 4))
        hidden, targets = evaluation.hidden_and_targets(model, ids)
        buffer = torch.empty(rows * cols)

        def product():
            for i in range(0, len(hidden), rows):
                for v in range(0, len(weight), cols):
                    h, w = hidden[i : i + rows], weight[v : v + cols]
                    torch.mm(h, w.t(), out=buffer[: len(h) * len(w)].view(len(h), len(w)))

        out["perplexity: transformer layers"] = median_seconds(
            lambda: evaluation.hidden_and_targets(model, ids), args.reps
        )
        out["perplexity: output product alone, in tiles"] = median_seconds(product, args.reps)
        out["perplexity: lingregion's output layer"] = median_seconds(
            lambda: evaluation.token_nll(model, hidden, targets), args.reps
        )
        out["perplexity: lingregion"] = median_seconds(lambda: cases.ppl_lean(s), args.reps)
        out["perplexity: naive"] = median_seconds(lambda: cases.ppl_naive(s), args.reps)
    bound = out["perplexity: transformer layers"] + out["perplexity: output product alone, in tiles"]
    out["perplexity: lingregion / (layers + product)"] = round(out["perplexity: lingregion"] / bound, 3)
    out["perplexity: most a lean path can gain over naive"] = round(out["perplexity: naive"] / bound, 3)
    out["scoring: lingregion's gradient pass"] = median_seconds(lambda: cases.gradient_plain(s), args.reps)
    out["scoring: bare"] = median_seconds(lambda: cases.score_bare(s), args.reps)
    out["scoring: naive"] = median_seconds(lambda: cases.score_naive(s), args.reps)
    n = len(s.score_windows.input_ids[0]) - 1
    h, g = torch.randn(n, weight.shape[1]), torch.randn(n, weight.shape[0])
    with torch.no_grad():
        out["scoring: output products every way computes"] = median_seconds(
            lambda: (torch.mm(h, weight.t()), torch.mm(g, weight)), args.reps
        )
        out["scoring: the tied head's weight gradient, naive only"] = median_seconds(
            lambda: torch.mm(g.t(), h), args.reps
        )
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
