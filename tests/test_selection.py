"""Selection over many matrices at a size where the sampled bracket is used, and its exact fallbacks,
against a stable sort of all values (ties: parameter order, then flat index)."""

import pytest
import torch

from lingregion import regions
from lingregion.regions import select


def scores(zeros: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """Three matrices of fp32 scores, a share `zeros` of them exactly 0, and repeated values."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in (("a.weight", (300, 400)), ("b.weight", (500, 300)), ("c.weight", (70_000,))):
        x = torch.rand(shape, generator=g).mul_(1000).round_().div_(1000)  # about 1000 distinct values
        x[torch.rand(shape, generator=g) < zeros] = 0.0
        out[name] = x
    return out


def by_sorting(sc, k, largest):
    flat = torch.cat([t.reshape(-1) for t in sc.values()])
    order = torch.sort(flat if largest else -flat, descending=True, stable=True).indices[:k]
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order] = True
    out, start = {}, 0
    for n, t in sc.items():
        out[n] = mask[start : start + t.numel()].reshape(t.shape)
        start += t.numel()
    return out


def check(sc, ratio, side):
    region = select(sc, ratio, side, scope="global")
    k = round(ratio * sum(t.numel() for t in sc.values()))
    want = by_sorting(sc, k, side == "top")
    assert region.count() == k
    for n in sc:
        assert torch.equal(region.mask(n), want[n]), n


@pytest.fixture
def bisections(monkeypatch):
    calls = []
    real = regions._bisect
    monkeypatch.setattr(regions, "_bisect", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("side,ratio", [("top", 0.03), ("bottom", 0.03), ("top", 0.4), ("bottom", 0.01)])
def test_sampled_bracket_matches_sorting(side, ratio, bisections):
    sc = scores(zeros=0.05)
    assert 1 << 16 < sum(t.numel() for t in sc.values())  # a sample, not every value
    check(sc, ratio, side)
    assert bisections == []  # found through the bracket


def test_too_many_ties_in_the_bracket_fall_back_to_bisection(bisections):
    sc = scores(zeros=0.9)  # the bottom 3% are all tied at 0, more than the largest matrix holds
    check(sc, 0.03, "bottom")
    check(sc, 0.03, "top")
    assert len(bisections) == 1


def test_a_missed_bracket_falls_back_to_bisection(monkeypatch, bisections):
    sc = scores(zeros=0.05)
    monkeypatch.setattr(regions, "_sample", lambda s, names, sizes, count: torch.zeros(count))  # a useless sample
    check(sc, 0.03, "top")
    assert len(bisections) == 1


def test_per_matrix_quickselect_matches_sorting():
    sc = scores(zeros=0.3, seed=1)
    for side in ("top", "bottom"):
        region = select(sc, 0.05, side)
        for n, t in sc.items():
            want = by_sorting({n: t}, round(0.05 * t.numel()), side == "top")[n]
            assert torch.equal(region.mask(n), want)


def test_gpu_rank_by_topk_matches_sorting():
    """The GPU path of the rank-i value (top-k from the nearer end), run here on CPU tensors."""
    x = torch.rand(1001, generator=torch.Generator().manual_seed(3))
    x[::7] = 0.5  # ties
    ordered = x.sort().values
    for i in (0, 1, 499, 500, 501, 999, 1000):
        assert regions._smallest_by_topk(x, i) == ordered[i].item()
