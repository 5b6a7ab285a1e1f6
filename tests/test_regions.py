import pytest
import torch

from lingregion.regions import Region, select
from lingregion.store import LingregionError


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
