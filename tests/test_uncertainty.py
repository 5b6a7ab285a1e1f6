"""Bootstrap intervals, verdicts, split-half stability and the budget fit; per-block NLL of an evaluation."""

import math

import numpy as np
import pytest
import torch

from lingregion import checkpoint, corpus, distributed, evaluation, uncertainty
from lingregion.store import LingregionError

from conftest import TEXT


# --- bootstrap -----------------------------------------------------------------------------------------
def synthetic(rng, blocks=100, size=64, shift=0.1):
    """Per-block sums of per-token losses of a base and of a setting whose losses are the base's plus a
    noise of mean `shift` on the same text: the true perplexity ratio is exp(shift). Each block's text has
    its own difficulty, shared by both settings."""
    difficulty = rng.gamma(2.0, 1.0, size=blocks)
    base = rng.normal(2 + difficulty[:, None], 1.0, size=(blocks, size))
    setting = base + rng.normal(shift, 0.5, size=(blocks, size))
    tokens, n_bytes = [size] * blocks, [3 * size] * blocks
    return (
        {"nll": setting.sum(1).tolist(), "tokens": tokens, "bytes": n_bytes},
        {"nll": base.sum(1).tolist(), "tokens": tokens, "bytes": n_bytes},
    )


def test_paired_interval_covers_a_known_ratio():
    truth = math.exp(0.1)
    covered = 0
    for trial in range(200):
        num, den = synthetic(np.random.default_rng(trial))
        lo, hi = uncertainty.paired_bootstrap(num, den, n=1000, seed=trial)
        covered += lo <= truth <= hi
    assert 0.90 <= covered / 200 <= 0.99


def test_paired_interval_is_narrower_than_unpaired_on_shared_text():
    num, den = synthetic(np.random.default_rng(0))
    point = uncertainty.ratio(num, den)
    lo, hi = uncertainty.paired_bootstrap(num, den)
    ulo, uhi = uncertainty.paired_bootstrap(num, den, paired=False)
    assert lo < point < hi and ulo < point < uhi
    assert (hi - lo) < 0.5 * (uhi - ulo)  # the text's own difficulty cancels in the paired ratio
    assert uncertainty.paired_bootstrap(num, den) == (lo, hi)  # seeded
    with pytest.raises(LingregionError, match="same text"):
        uncertainty.paired_bootstrap(num, {**den, "tokens": [1] * len(den["tokens"])})


def test_ppl_and_bpb_intervals_contain_the_estimates_and_are_seeded():
    _, base = synthetic(np.random.default_rng(1))
    nll, tokens, n_bytes = sum(base["nll"]), sum(base["tokens"]), sum(base["bytes"])
    ci = uncertainty.bootstrap_ppl({"blocks": base})
    assert ci["ppl"][0] < math.exp(nll / tokens) < ci["ppl"][1]
    assert ci["bpb"][0] < nll / math.log(2) / n_bytes < ci["bpb"][1]
    assert uncertainty.bootstrap_ppl(base) == ci and uncertainty.bootstrap_ppl(base, seed=1) != ci
    record = uncertainty.method_record(block=64)
    assert record["resamples"] == uncertainty.RESAMPLES and "64" in record["unit"]


@pytest.mark.parametrize(
    "interval, direction, want",
    [
        ((1.2, 1.5), "above", "holds"),
        ((0.8, 0.9), "above", "does not hold"),
        ((0.9, 1.1), "above", "inconclusive"),
        ((0.8, 0.9), "below", "holds"),
        ((1.2, 1.5), "below", "does not hold"),
        ((1.0, 1.5), "above", "inconclusive"),  # touching the threshold is not beyond it
    ],
)
def test_verdict_rule(interval, direction, want):
    assert uncertainty.verdict(interval, 1.0, direction) == want


def test_verdict_turns_inconclusive_when_the_text_is_cut(loaded):
    """Scaling the final norm of a random tiny model down flattens its logits, which lowers its
    perplexity slightly: 123 windows show it, one window's blocks do not."""
    m = loaded("llama")
    scaled = loaded("llama")
    with torch.no_grad():
        scaled.module.model.norm.weight.mul_(0.9)

    def verdict(max_tokens):
        w = corpus.make_windows(m.tokenizer, TEXT * 6, 16, max_tokens, "xx", "eval", "test")
        base, setting = (evaluation.perplexity(x.module, w, progress=False, block=8) for x in (m, scaled))
        return uncertainty.verdict(uncertainty.paired_bootstrap(setting, base), 1.0, "below")

    assert verdict(10_000) == "holds"
    assert verdict(16) == "inconclusive"


# --- region stability ----------------------------------------------------------------------------------
def halves(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"a": (20, 30), "b": (50,), "c": (3, 4)}  # 1% of c is no entry at all
    signal = {n: torch.rand(s, generator=g) for n, s in shapes.items()}
    noisy = [{n: (t + 0.3 * torch.rand(t.shape, generator=g)) for n, t in signal.items()} for _ in range(2)]
    return noisy


def test_split_half_jaccard_equals_direct_computation():
    a, b = halves()
    for ratio in (0.01, 0.1, 0.3):
        want = []
        for n in a:
            k = round(ratio * a[n].numel())
            if k:
                top_a = set(a[n].reshape(-1).topk(k).indices.tolist())
                top_b = set(b[n].reshape(-1).topk(k).indices.tolist())
                want.append(len(top_a & top_b) / len(top_a | top_b))
        assert uncertainty.split_half_jaccard(a, b, ratio) == pytest.approx(np.mean(want), abs=1e-12)
    assert uncertainty.split_half_jaccard(a, a, 0.1) == 1.0


def test_spearman_is_the_mean_over_matrices_and_samples_large_ones():
    a, b = halves()

    def rho(x, y):  # Pearson correlation of ranks (no ties in these scores)
        rx, ry = (t.reshape(-1).argsort().argsort().double() for t in (x, y))
        return float(torch.corrcoef(torch.stack([rx, ry]))[0, 1])

    want = np.mean([rho(a[n], b[n]) for n in a])
    assert uncertainty.spearman(a, b) == pytest.approx(want, abs=1e-9)
    # a sample of 200 of a matrix's entries estimates its correlation, seeded
    sampled = uncertainty.spearman({"a": a["a"]}, {"a": b["a"]}, sample=200)
    assert sampled == uncertainty.spearman({"a": a["a"]}, {"a": b["a"]}, sample=200)
    assert sampled != pytest.approx(rho(a["a"], b["a"]), abs=1e-9)
    assert sampled == pytest.approx(rho(a["a"], b["a"]), abs=0.15)


def test_budget_fit_recovers_a_synthetic_curve():
    intercept, slope = -6.0, 0.8  # logit J = a + b ln n: J = 0.9 at n = exp((ln 9 + 6) / 0.8) ≈ 1.9e4
    tokens = [256, 512, 1024, 2048]
    rng = np.random.default_rng(0)
    jaccard = [1 / (1 + math.exp(-(intercept + slope * math.log(t)))) for t in tokens]
    want = math.exp((math.log(9) - intercept) / slope)
    exact = uncertainty.fit_budget(tokens, jaccard, far=100)
    assert exact["slope"] == pytest.approx(slope) and exact["tokens"] == pytest.approx(want)
    assert exact["extrapolation"] == pytest.approx(want / 2048)
    noisy = uncertainty.fit_budget(tokens, [j * (1 + rng.normal(0, 0.01)) for j in jaccard], far=100)
    assert noisy["tokens"] == pytest.approx(want, rel=0.3)
    # 13.8× the largest budget measured: beyond the default 10×, no budget is stated
    capped = uncertainty.fit_budget(tokens, jaccard)
    assert capped["tokens"] is None and "within 10×" in capped["reason"]
    assert capped["extrapolation"] == pytest.approx(want / 2048)
    flat = uncertainty.fit_budget(tokens, jaccard[::-1])
    assert flat["tokens"] is None and "does not grow" in flat["reason"]
    assert uncertainty.fit_budget([512], [0.3])["tokens"] is None


# --- per-block NLL of an evaluation ----------------------------------------------------------------------
def eval_windows(tokenizer, docs=TEXT * 4, seq_len=23):
    # 22 predicted tokens per window: blocks of 8 leave a short last block in each window
    return corpus.make_windows(tokenizer, docs, seq_len, 10_000, "xx", "eval", "test")


def test_blocks_add_up_to_the_totals_and_stay_within_windows(loaded):
    m = loaded("llama")
    w = eval_windows(m.tokenizer)
    r = evaluation.perplexity(m.module, w, batch_size=3, progress=False, block=8)
    blocks = r["blocks"]
    assert blocks["size"] == 8
    assert math.fsum(blocks["nll"]) == r["nll"]
    assert sum(blocks["tokens"]) == r["tokens"] and sum(blocks["bytes"]) == r["bytes"]
    want_tokens = [t for ids in w.input_ids for t in [8] * ((len(ids) - 1) // 8) + [(len(ids) - 1) % 8] if t]
    assert blocks["tokens"] == want_tokens and len(w.input_ids[-1]) < len(w.input_ids[0])
    # each block's NLL from the model's own logits, window by window
    want = []
    for ids in w.input_ids:
        with torch.no_grad():
            logp = torch.log_softmax(m.module(input_ids=ids[None]).logits[0, :-1].double(), -1)
        nll = -logp.gather(1, ids[1:, None]).squeeze(1)
        want += [float(c.sum()) for c in nll.split(8)]
    np.testing.assert_allclose(blocks["nll"], want, rtol=1e-5)
    # the same blocks whatever the batch size
    other = evaluation.perplexity(m.module, w, batch_size=1, progress=False, block=8)["blocks"]
    np.testing.assert_allclose(other["nll"], blocks["nll"], rtol=1e-6)


def test_block_bytes_are_the_bytes_of_their_tokens(tokenizer):
    w = corpus.make_windows(tokenizer, [TEXT[0]] * 8, 23, 10_000, "en", "eval", "test")  # ASCII only
    layout = evaluation.block_layout(w, 8)
    per_token = [len(tokenizer.decode([t]).encode()) for ids in w.input_ids for t in ids[1:].tolist()]
    assert [sum(b) for b in w.token_bytes] == w.n_bytes
    sizes, it = layout[1], iter(per_token)
    assert layout[2] == [sum(next(it) for _ in range(s)) for s in sizes]
    stale = corpus.Windows("en", "eval", w.input_ids[:1], w.n_bytes[:1], w.meta, w.token_bytes)
    with pytest.raises(LingregionError, match="per-token byte"):
        evaluation.block_layout(stale, 8)


class Killed(Exception):
    pass


def test_blocks_resume_from_a_checkpoint_identically(loaded, tmp_path, monkeypatch):
    m = loaded("llama")
    w = eval_windows(m.tokenizer)
    want = evaluation.perplexity(m.module, w, batch_size=2, progress=False, block=8)
    path = tmp_path / "eval.safetensors"
    real = checkpoint.Checkpoint.update

    def update_then_die(self, sums, batches, windows):
        real(self, sums, batches, windows)
        if self.saved_at == windows:
            raise Killed

    monkeypatch.setattr(checkpoint.Checkpoint, "update", update_then_die)
    with pytest.raises(Killed):
        evaluation.perplexity(m.module, w, batch_size=2, progress=False, block=8, checkpoint=path, every=4)
    monkeypatch.setattr(checkpoint.Checkpoint, "update", real)
    got = evaluation.perplexity(m.module, w, batch_size=2, progress=False, block=8, checkpoint=path, every=4)
    assert got == want and not path.exists()
    # another block size is another job: its checkpoint is not this one's
    assert evaluation.perplexity(m.module, w, batch_size=2, progress=False)["blocks"]["size"] == 64


def test_two_processes_fill_their_own_blocks(loaded, monkeypatch):
    """The all-reduce of two ranks, simulated: each fills its windows' blocks and the sum is the whole."""
    m = loaded("llama")
    w = eval_windows(m.tokenizer)
    want = evaluation.perplexity(m.module, w, batch_size=2, progress=False, block=8)
    parts = []

    def stash(tensors):
        parts.append([t.clone() for t in tensors])
        raise Killed  # rank 1 stops at its all-reduce

    def add_rank_1(tensors):
        for t, other in zip(tensors, parts[0]):
            t += other

    monkeypatch.setattr(distributed, "world", lambda: (1, 2))
    monkeypatch.setattr(distributed, "sum_", stash)
    with pytest.raises(Killed):
        evaluation.perplexity(m.module, w, batch_size=2, progress=False, block=8)
    monkeypatch.setattr(distributed, "world", lambda: (0, 2))
    monkeypatch.setattr(distributed, "sum_", add_rank_1)
    got = evaluation.perplexity(m.module, w, batch_size=2, progress=False, block=8)
    assert got["blocks"]["tokens"] == want["blocks"]["tokens"] and got["bytes"] == want["bytes"]
    np.testing.assert_allclose(got["blocks"]["nll"], want["blocks"]["nll"], rtol=1e-6)
    # rank 1 filled the blocks of windows 1, 3, 5, ... and left the others at zero for rank 0
    starts = evaluation.block_layout(w, 8)[0] + [len(want["blocks"]["tokens"])]
    odd = [i for k in range(1, len(w.input_ids), 2) for i in range(starts[k], starts[k + 1])]
    assert parts[0][0].nonzero().squeeze(1).tolist() == odd


# --- the gain per doubling, on synthetic curves --------------------------------------------------------------
TOKENS = [1536, 3072, 6144, 12288]


def _replicates(curve, noise=0.01, n=200):
    return np.asarray(curve) + np.random.default_rng(1).normal(0, noise, (n, len(curve)))


def test_doubling_gain_of_an_accelerating_curve_states_no_budget_beyond_ten_times():
    # the measured ru curve: faster with each doubling; a logit fit would extrapolate 1e9 tokens
    curve = [0.221, 0.251, 0.281, 0.328]
    g = uncertainty.doubling_gain(TOKENS, curve, _replicates(curve))
    x = np.log2(TOKENS)
    assert g["per_doubling"] == pytest.approx(np.polyfit(x, curve, 1)[0], abs=1e-12)
    lo, hi = g["ci95"]
    assert lo < g["per_doubling"] < hi
    need = (0.9 - 0.328) / g["per_doubling"]  # about 16 doublings: far beyond log2(10) ≈ 3.3
    assert g["doublings"] == pytest.approx(need) and g["tokens"] is None
    assert g["reason"].startswith("not reached within 10× the measured budget; at the measured slope, about 16.")
    assert g["doublings_ci95"] == [pytest.approx((0.9 - 0.328) / hi), pytest.approx((0.9 - 0.328) / lo)]


def test_doubling_gain_of_a_saturating_curve_states_the_budget_within_reach():
    curve = [0.70, 0.80, 0.85, 0.875]  # halving gains; 0.9 one doubling or so away at the fitted slope
    g = uncertainty.doubling_gain(TOKENS, curve, _replicates(curve, 0.002))
    slope = np.polyfit(np.log2(TOKENS), curve, 1)[0]
    assert g["per_doubling"] == pytest.approx(slope)
    assert g["tokens"] == pytest.approx(12288 * 2 ** ((0.9 - 0.875) / slope)) and g["reason"] is None
    reached = uncertainty.doubling_gain(TOKENS, [0.7, 0.8, 0.9, 0.95], _replicates([0.7, 0.8, 0.9, 0.95]))
    assert reached["doublings"] == 0.0 and reached["tokens"] == 12288.0
    flat = uncertainty.doubling_gain(TOKENS, [0.3, 0.3, 0.29, 0.28], _replicates([0.3, 0.3, 0.29, 0.28]))
    assert flat["tokens"] is None and "does not grow" in flat["reason"]
    # an interval that reaches zero gain leaves the number of doublings unbounded above
    noisy = uncertainty.doubling_gain(TOKENS, [0.3, 0.31, 0.31, 0.32], _replicates([0.3, 0.31, 0.31, 0.32], 0.05))
    assert noisy["ci95"][0] < 0 and noisy["doublings_ci95"][1] is None and "unbounded]" in noisy["reason"]


def test_matrix_sample_takes_each_kind_of_matrix_seeded():
    names = [f"model.layers.{i}.{m}" for i in range(16) for m in ("mlp.up_proj.weight", "input_layernorm.weight")]
    names += ["model.layers.0.extra.weight"]
    picked = uncertainty.matrix_sample(names, 0.125, seed=3)
    assert picked == uncertainty.matrix_sample(names, 0.125, seed=3)
    assert picked != uncertainty.matrix_sample(names, 0.125, seed=4)
    assert sum("up_proj" in n for n in picked) == 2 and sum("layernorm" in n for n in picked) == 2
    assert "model.layers.0.extra.weight" in picked  # a kind with one member keeps it
    assert picked == [n for n in names if n in picked]  # parameter order
    assert uncertainty.matrix_sample(names, 1.0) == names
    with pytest.raises(LingregionError, match="outside"):
        uncertainty.matrix_sample(names, 0)


def test_ranked_tops_give_every_smaller_top_set_and_its_region():
    from lingregion.regions import Region, select

    g = torch.Generator().manual_seed(0)
    scores = {
        "w": torch.rand(40, 50, generator=g),
        "ties": torch.randint(0, 4, (30, 30), generator=g).float(),
        "stack": torch.rand(3, 20, 10, generator=g),
    }
    ranked = uncertainty.ranked_tops(scores, 0.2)
    for r in (0.01, 0.05, 0.2):
        want = select(scores, r, "top")
        got = Region.from_ranked(ranked, {n: tuple(t.shape) for n, t in scores.items()}, r, {"x": 1})
        assert all(torch.equal(got.mask(n), want.mask(n)) for n in scores)
        assert got.meta == dict(want.meta, x=1)


def test_split_half_stable_share_is_the_largest_share_whose_interval_clears_the_bar():
    g = torch.Generator().manual_seed(0)
    base = {f"m{i}": torch.rand(100, 1000, generator=g) for i in range(6)}
    # the other half agrees on the largest 0.1% of each matrix and nowhere else
    other = {}
    for n, x in base.items():
        y = torch.rand(x.shape, generator=g) * x.max()
        top = x.reshape(-1).topk(100).indices
        y.view(-1)[top] = x.reshape(-1)[top] + 2
        other[n] = y
    stats, _ = uncertainty.split_half(base, other, [0.01], seed=0)
    at = stats["jaccard_by_share"]
    assert [at[f"{r:g}"]["value"] for r in (1e-5, 3e-5, 1e-4, 3e-4, 1e-3)] == [1.0] * 5
    assert at["0.001"]["ci95"] == [1.0, 1.0] and at["0.003"]["ci95"][1] < 0.5
    assert stats["stable_core_share"] == 1e-3 and stats["matrices"] == 6
    # the 1% Jaccard, directly: 100 shared entries and 900 chosen at random among the rest on each side
    direct = []
    for n in base:
        a, b = (set(h[n].reshape(-1).topk(1000).indices.tolist()) for h in (base, other))
        direct.append(len(a & b) / len(a | b))
    assert stats["split_half_jaccard"]["0.01"] == pytest.approx(np.mean(direct), abs=1e-12)
    lo, hi = stats["split_half_jaccard_ci95"]["0.01"]
    assert lo <= np.mean(direct) <= hi
    unstable, _ = uncertainty.split_half(base, {n: torch.rand(x.shape, generator=g) for n, x in base.items()}, [0.01])
    assert unstable["stable_core_share"] is None
