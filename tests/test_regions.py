"""Scores → regions: Top / Bottom / Random selection per matrix and over all matrices (against a stable
sort, ties by parameter order then flat index), packing and set operations, region files, and the
monolingual region and size-matched controls built from them."""

import numpy as np
import pytest
import torch

from lingregion import regions, store, uncertainty
from lingregion.regions import Region, matching, monolingual, select
from lingregion.store import LingregionError

from conftest import importance_target


def scores(seed=0):
    g = torch.Generator().manual_seed(seed)
    # small integers: many ties, so the tie-break rule is exercised
    return {
        "a.weight": torch.randint(0, 7, (13, 11), generator=g).float(),
        "b.weight": torch.randint(0, 7, (29,), generator=g).float(),
        "c.weight": torch.rand(8, 5, generator=g),
    }


def reference(sc, names, k, largest):
    """Sort-based reference: order by score, ties by (parameter order, flat index)."""
    keys = []
    for i, n in enumerate(names):
        for j, v in enumerate(sc[n].reshape(-1).tolist()):
            keys.append(((-v if largest else v), i, j))
    chosen = sorted(keys)[:k]
    masks = {n: torch.zeros(sc[n].numel(), dtype=torch.bool) for n in names}
    for _, i, j in chosen:
        masks[names[i]][j] = True
    return {n: m.reshape(sc[n].shape) for n, m in masks.items()}


@pytest.mark.parametrize("side", ["top", "bottom"])
@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.37])
def test_per_matrix_selection_matches_sorting(side, ratio):
    sc = scores()
    region = select(sc, ratio, side)
    for n, s in sc.items():
        k = round(ratio * s.numel())
        assert region.count(n) == k
        assert torch.equal(region.mask(n), reference(sc, [n], k, side == "top")[n])


@pytest.mark.parametrize("side", ["top", "bottom"])
def test_global_selection_matches_sorting(side):
    sc = scores(1)
    region = select(sc, 0.2, side, scope="global")
    k = round(0.2 * sum(s.numel() for s in sc.values()))
    ref = reference(sc, list(sc), k, side == "top")
    assert region.count() == k
    for n in sc:
        assert torch.equal(region.mask(n), ref[n])


def test_random_is_seeded_and_exact_in_size():
    sc = scores()
    a, b, c = (select(sc, 0.1, "random", seed=s) for s in (3, 3, 4))
    for n, s in sc.items():
        assert a.count(n) == round(0.1 * s.numel())
        assert torch.equal(a.mask(n), b.mask(n))
    assert any(not torch.equal(a.mask(n), c.mask(n)) for n in sc)
    g = select(sc, 0.1, "random", scope="global", seed=3)
    assert g.count() == round(0.1 * sum(s.numel() for s in sc.values()))


def test_packing_round_trip_and_set_operations(tmp_path):
    g = torch.Generator().manual_seed(0)
    shapes = {"x": (7, 9), "y": (13,), "z": (3, 1)}  # sizes not multiples of 8
    ma = {n: torch.rand(s, generator=g) < 0.4 for n, s in shapes.items()}
    mb = {n: torch.rand(s, generator=g) < 0.4 for n, s in shapes.items()}
    a, b = Region.from_masks(ma, {"model": "m1"}), Region.from_masks(mb, {"model": "m1"})
    assert all(a.packed[n].numel() == (torch.Size(s).numel() + 7) // 8 for n, s in shapes.items())  # 1 bit each
    a.save(tmp_path / "a.safetensors")
    back = Region.load(tmp_path / "a.safetensors")
    assert back.meta["model"] == "m1"
    for n in shapes:
        assert torch.equal(back.mask(n), ma[n])
        assert torch.equal((a | b).mask(n), ma[n] | mb[n])
        assert torch.equal((a & b).mask(n), ma[n] & mb[n])
        assert torch.equal((a - b).mask(n), ma[n] & ~mb[n])
        assert torch.equal(a.indices(n), ma[n].reshape(-1).nonzero().squeeze(1))
    inter = sum(int((ma[n] & mb[n]).sum()) for n in shapes)
    union = sum(int((ma[n] | mb[n]).sum()) for n in shapes)
    assert a.jaccard(b) == pytest.approx(inter / union)
    assert a.count() == sum(int(m.sum()) for m in ma.values())


def test_region_files_are_compressed_and_old_uncompressed_files_still_load(tmp_path):
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(400, 500, generator=g) < 0.03  # a 3% region: far less than 1 bit of information per entry
    region = Region.from_masks({"w": mask}, {"model": "m"})
    region.save(tmp_path / "r.safetensors")
    payload = (tmp_path / "r.safetensors").stat().st_size - 1024  # generous allowance for the header
    assert payload * 8 / mask.numel() < 0.4  # bits per entry on disk; 1.0 uncompressed
    assert torch.equal(Region.load(tmp_path / "r.safetensors").mask("w"), mask)
    meta = {"model": "m", "shapes": {"w": [400, 500]}, "format": "lingregion-region-v1"}
    store.write_tensors(tmp_path / "v1.safetensors", region.packed, meta)
    assert torch.equal(Region.load(tmp_path / "v1.safetensors").mask("w"), mask)
    meta["format"] = regions.FORMAT  # v2's name on uncompressed masks: refused, not misread
    store.write_tensors(tmp_path / "bad.safetensors", region.packed, meta)
    with pytest.raises(LingregionError, match="corrupt"):
        Region.load(tmp_path / "bad.safetensors")


def test_bad_inputs():
    sc = scores()
    for ratio in (0, 1, 1.5, -0.1):
        with pytest.raises(LingregionError, match="outside"):
            select(sc, ratio)
    with pytest.raises(LingregionError, match="negative"):
        select({"a": torch.tensor([1.0, -2.0])}, 0.5)
    with pytest.raises(LingregionError, match="different"):
        Region.from_masks({"a": torch.ones(3, dtype=torch.bool)}) | Region.from_masks(
            {"a": torch.ones(4, dtype=torch.bool)}
        )


def test_corrupt_and_foreign_files_are_refused(tmp_path, tiny):
    region = Region.from_masks(
        {"model.layers.0.mlp.up_proj.weight": torch.ones(48, 32, dtype=torch.bool)}, {"model": "other"}
    )
    path = tmp_path / "r.safetensors"
    region.save(path)
    data = path.read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(LingregionError, match="corrupt or truncated"):
        Region.load(tmp_path / "t.safetensors")
    model = tiny("llama")
    with pytest.raises(LingregionError, match="made on model other"):
        Region.load(path).check_model(model, "mine")
    wrong = Region.from_masks({"model.layers.0.mlp.up_proj.weight": torch.ones(4, 4, dtype=torch.bool)})
    with pytest.raises(LingregionError, match="does not fit"):
        wrong.check_model(model, "mine")


# --- selection at scale: the sampled bracket across matrices and its exact fallbacks -----------------
def large_scores(zeros: float, seed: int = 0) -> dict[str, torch.Tensor]:
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


def check_global(sc, ratio, side):
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
    sc = large_scores(zeros=0.05)
    assert 1 << 16 < sum(t.numel() for t in sc.values())  # a sample, not every value
    check_global(sc, ratio, side)
    assert bisections == []  # found through the bracket


def test_too_many_ties_in_the_bracket_fall_back_to_bisection(bisections):
    sc = large_scores(zeros=0.9)  # the bottom 3% are all tied at 0, more than the largest matrix holds
    check_global(sc, 0.03, "bottom")
    check_global(sc, 0.03, "top")
    assert len(bisections) == 1


def test_a_missed_bracket_falls_back_to_bisection(monkeypatch, bisections):
    sc = large_scores(zeros=0.05)
    monkeypatch.setattr(regions, "_sample", lambda s, names, sizes, count: torch.zeros(count))  # a useless sample
    check_global(sc, 0.03, "top")
    assert len(bisections) == 1


def test_per_matrix_quickselect_matches_sorting():
    sc = large_scores(zeros=0.3, seed=1)
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


# --- monolingual regions and size-matched controls -------------------------------------------------
def test_set_difference_hand_case():
    # one 2×4 matrix; each language's Top 25% (2 entries) written out by hand
    scores = {
        "ru": {"w": torch.tensor([[9.0, 8, 0, 0], [0, 0, 0, 0]])},  # Top {0, 1}
        "uk": {"w": torch.tensor([[0.0, 8, 9, 0], [0, 0, 0, 0]])},  # Top {1, 2}
        "es": {"w": torch.tensor([[0.0, 0, 0, 0], [9, 8, 0, 0]])},  # Top {4, 5}
    }
    tops = {lang: select(s, 0.25, "top") for lang, s in scores.items()}
    assert tops["ru"].indices("w").tolist() == [0, 1]
    assert monolingual(tops, "ru").indices("w").tolist() == [0]  # 1 is shared with uk
    assert monolingual(tops, "uk").indices("w").tolist() == [2]
    assert monolingual(tops, "es").indices("w").tolist() == [4, 5]  # shares nothing


def test_monolingual_regions_are_disjoint_from_every_other_top_set():
    g = torch.Generator().manual_seed(0)
    langs = ["ar", "es", "ru", "zh"]
    tops = {
        lang: select({"a": torch.rand(40, 30, generator=g), "b": torch.rand(77, generator=g)}, 0.1, "top")
        for lang in langs
    }
    for lang in langs:
        mono = monolingual(tops, lang)
        for n in mono.packed:
            assert mono.count(n) <= round(0.1 * mono.mask(n).numel())
            assert not (mono.mask(n) & ~tops[lang].mask(n)).any()
        for other in langs:
            if other != lang:
                assert (mono & tops[other]).count() == 0
    with pytest.raises(LingregionError):
        monolingual({"ru": tops["ru"]}, "ru")


def test_matching_control_has_the_same_size_per_matrix():
    g = torch.Generator().manual_seed(1)
    scores = {"a": torch.rand(20, 10, generator=g), "b": torch.rand(50, generator=g)}
    like = Region.from_masks({"a": torch.rand(20, 10, generator=g) < 0.2, "b": torch.rand(50, generator=g) < 0.5})
    bottom = matching(scores, like, "bottom")
    for n in scores:
        assert bottom.count(n) == like.count(n)
        chosen = scores[n][bottom.mask(n)]
        assert chosen.max() <= scores[n][~bottom.mask(n)].min()


def test_top_set_and_its_jaccard_equal_select_and_split_half_jaccard(tiny):

    model = tiny("llama")
    t = importance_target(model)
    g = torch.Generator().manual_seed(0)
    a = {n: torch.rand(model.get_parameter(n).shape, generator=g) for n in t.names}
    b = {n: torch.rand(model.get_parameter(n).shape, generator=g) for n in t.names}
    a[t.names[0]] = torch.zeros_like(a[t.names[0]])  # all tied: filled by lowest index, as select does
    b[t.names[1]] = a[t.names[1]].round(decimals=1)  # many ties at the k-th value
    layout = regions.Layout.of({n: tuple(v.shape) for n, v in a.items()}, 0.01)
    assert 0 in layout.k and max(layout.k) > 5  # a norm of 32 entries has no Top 1%: left out of the mean
    for scores in (a, b):
        region = select(scores, 0.01, "top", "matrix")
        flat = np.concatenate([region.indices(n).numpy() + o for n, o in zip(layout.names, layout.offsets)])
        assert np.array_equal(regions.top_set(scores, layout), np.sort(flat))
    ta, tb = regions.top_set(a, layout), regions.top_set(b, layout)
    assert regions.top_set_jaccards(ta, tb, layout).mean() == pytest.approx(
        uncertainty.split_half_jaccard(a, b, 0.01), abs=1e-15
    )
    assert regions.top_set_jaccards(ta, ta, layout).mean() == 1.0


BOMB = """
import resource, sys, zlib
import torch
from lingregion import regions, store
# a mask said to cover 16 entries (2 bytes) whose compressed data inflates to 1 GiB
z, parts = zlib.compressobj(9), []
for _ in range(1024):
    parts.append(z.compress(bytes(1 << 20)))
parts.append(z.flush())
blob = b"".join(parts)
meta = {"model": "m", "shapes": {"w": [4, 4]}, "format": regions.FORMAT}
store.write_tensors(sys.argv[1], {"w": torch.frombuffer(bytearray(blob), dtype=torch.uint8)}, meta)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    regions.Region.load(sys.argv[1])
except store.LingregionError as e:
    print(e)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)  # MiB the load added at its peak
"""


def test_a_region_file_cannot_inflate_past_its_declared_size(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", BOMB, str(tmp_path / "bomb.safetensors")], capture_output=True, text=True
    )
    error, grown = proc.stdout.splitlines()
    assert "mask for w has the wrong size; the file is corrupt; recreate it" in error
    assert int(grown) < 64  # 1 GiB if it were inflated whole
    # and a malformed shapes record is refused as corrupt, not a traceback
    store.write_tensors(
        tmp_path / "s.safetensors", {"w": torch.zeros(2, dtype=torch.uint8)}, {"format": regions.FORMAT}
    )
    with pytest.raises(store.Corrupt, match="shapes record is missing or malformed"):
        Region.load(tmp_path / "s.safetensors")
