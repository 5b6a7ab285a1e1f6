"""Score files: round trips, sizes, and regions from compact files equal to those from fp32 scores, ties
included; earlier fp32 files still read."""

import pytest
import torch

from lingregion import scorefile
from lingregion.regions import matching, monolingual, select
from lingregion.store import LingregionError, read_tensors, write_tensors


def scores(seed: int = 0) -> dict[str, torch.Tensor]:
    """Matrices that stress ties: heavy-tailed values with 10% exact zeros, a few repeated values, a
    constant matrix, an all-zero one, one whose values are two adjacent floats, and one too small for a tail."""
    g = torch.Generator().manual_seed(seed)
    heavy = torch.rand(300, 400, generator=g) ** 6
    heavy[torch.rand(300, 400, generator=g) < 0.1] = 0.0
    one = torch.tensor(1.0)
    adjacent = torch.where(torch.rand(2000, generator=g) < 0.5, one, torch.nextafter(one, torch.tensor(2.0)))
    return {
        "heavy.weight": heavy,
        "rounded.weight": (torch.rand(50, 100, generator=g) * 20).round(),  # 21 distinct values
        "constant.weight": torch.full((640,), 0.25),
        "zero.weight": torch.zeros(64, 32),
        "adjacent.weight": adjacent,
        "tiny.weight": torch.rand(7, generator=g),  # round(0.03 · 7) = 0: no tail at all
    }


def same(a, b) -> bool:
    return a.shapes == b.shapes and all(torch.equal(a.packed[n], b.packed[n]) for n in a.packed)


def roundtrip(tmp_path, s, precision="compact", **kw):
    path = tmp_path / f"{precision}.safetensors"
    scorefile.save(path, s, {"lang": "xx", "model_fingerprint": "f"}, precision, **kw)
    back, meta = scorefile.load(path)
    return back, meta, path


def test_float32_and_bfloat16_round_trips(tmp_path):
    s = scores()
    back, meta, _ = roundtrip(tmp_path, s, "float32")
    assert list(back) == list(s) and meta["format"] == scorefile.FORMAT and meta["precision"] == "float32"
    assert all(torch.equal(back[n], s[n]) for n in s)
    back, meta, _ = roundtrip(tmp_path, s, "bfloat16")
    assert list(back) == list(s) and scorefile.exact_share(meta) == 0.0
    assert all(back[n].dtype == torch.float32 and torch.equal(back[n], s[n].bfloat16().float()) for n in s)


def test_compact_size_and_tail_values(tmp_path):
    s = {"a.weight": torch.rand(1000, 1000, generator=torch.Generator().manual_seed(1))}
    back, meta, path = roundtrip(tmp_path, s)
    per_param = path.stat().st_size / 1e6
    assert per_param <= 2.0
    assert per_param == pytest.approx(scorefile.bytes_per_parameter("compact", 0.03), abs=0.005)  # 0.74
    assert meta["exact_share"] == 0.03 and meta["shapes"] == {"a.weight": [1000, 1000]}
    x, y = s["a.weight"], back["a.weight"]
    tails = select(s, 0.03, "top").mask("a.weight") | select(s, 0.03, "bottom").mask("a.weight")
    assert torch.equal(y[tails], x[tails])  # the tails keep their fp32 values
    body = ~tails
    # the body's 4-bit codes: within one bin's width of the value, bins 1/15 of the tails' gap wide
    gap = x[select(s, 0.03, "top").mask("a.weight")].min() - x[select(s, 0.03, "bottom").mask("a.weight")].max()
    assert (y[body] - x[body]).abs().max() <= gap / 15
    assert abs(float(y[body].double().sum() / x[body].double().sum()) - 1) < 1e-3  # per-bin means: unbiased


@pytest.mark.parametrize("seed", [0, 1])
def test_regions_from_compact_equal_fp32_regions(tmp_path, seed):
    """Per-matrix Top and Bottom at every share up to the tails', matching controls and monolingual sets:
    the same entries, ties at the edges included."""
    langs = {lang: scores(seed + i) for i, lang in enumerate(["ru", "uk", "es"])}
    back = {lang: roundtrip(tmp_path, s)[0] for lang, s in langs.items()}
    for ratio in (0.001, 0.01, 0.02, 0.03):
        for side in ("top", "bottom", "random"):
            for lang in langs:
                assert same(select(langs[lang], ratio, side), select(back[lang], ratio, side)), (ratio, side, lang)
    tops = {lang: select(s, 0.03, "top") for lang, s in langs.items()}
    tops_back = {lang: select(s, 0.03, "top") for lang, s in back.items()}
    for lang in langs:
        mono, mono_back = monolingual(tops, lang), monolingual(tops_back, lang)
        assert same(mono, mono_back)
        assert same(matching(langs[lang], mono, "bottom"), matching(back[lang], mono_back, "bottom"))
        assert same(matching(langs[lang], mono, "top"), matching(back[lang], mono_back, "top"))


def test_ties_and_what_compact_does_not_keep_exact(tmp_path):
    s = scores()
    back, meta, _ = roundtrip(tmp_path, s)
    # degenerate matrices come back exactly: every entry is a tail entry or equal to both tails' edges
    for n in ("constant.weight", "zero.weight", "adjacent.weight"):
        assert torch.equal(back[n], s[n]), n
    # beyond the exact share, or summed over languages, regions are close but not promised equal:
    # the file says so, and the Jaccard is what a caller reports
    assert scorefile.exact_share(meta) == 0.03
    wide = select(s, 0.2, "top").jaccard(select(back, 0.2, "top"))
    assert 0.9 < wide <= 1.0


def test_edge_order_of_ties_follows_flat_index(tmp_path):
    """Twenty equal values straddle the 3% edge; the lower-index ones are taken from both."""
    x = torch.arange(1000, dtype=torch.float32)
    x[960:1000] = 960.0  # 40 ties at the top, the 3% tail (30 entries) takes part of them
    x[0:50] = 0.0  # 50 ties at the bottom
    s = {"m.weight": x[torch.randperm(1000, generator=torch.Generator().manual_seed(3))]}
    back, _, _ = roundtrip(tmp_path, s)
    for ratio in (0.01, 0.02, 0.03):
        for side in ("top", "bottom"):
            assert same(select(s, ratio, side), select(back, ratio, side)), (ratio, side)


def test_v1_files_and_malformed_files(tmp_path):
    s = scores()
    old = tmp_path / "old.safetensors"
    write_tensors(old, s, {"format": "lingregion-scores-v1", "lang": "ru", "model_fingerprint": "f"})
    back, meta = scorefile.load(old)
    assert list(back) == list(s) and all(torch.equal(back[n], s[n]) for n in s)
    assert scorefile.exact_share(meta) == 1.0 and scorefile.load_meta(old)["lang"] == "ru"
    other = tmp_path / "region.safetensors"
    select(s, 0.03).save(other)
    with pytest.raises(LingregionError, match="not a score file"):
        scorefile.load(other)
    path = roundtrip(tmp_path, s)[2]
    tensors, meta = read_tensors(path)
    tensors["heavy.weight/exact"] = tensors["heavy.weight/exact"][:-1]
    write_tensors(tmp_path / "bad.safetensors", tensors, meta)
    with pytest.raises(LingregionError, match="corrupt"):
        scorefile.load(tmp_path / "bad.safetensors")
    with pytest.raises(LingregionError, match="unknown score precision"):
        scorefile.save(tmp_path / "x.safetensors", s, {}, "int8")


def _encode_by_masks(x: torch.Tensor, share: float):
    """The compact encoding written plainly, one masked copy at a time (the format's definition): tails by
    `select`, bins equally wide on [lo, hi], each level the float64 mean of its bin's body values."""
    top = select({"m": x}, share, "top").mask("m").reshape(-1)
    bottom = select({"m": x}, share, "bottom").mask("m").reshape(-1)
    x, exact = x.reshape(-1), top | bottom
    body = x[~exact]
    hi = x[top].min() if top.any() else (body.max() if len(body) else x.max())
    lo = x[bottom].max() if bottom.any() else (body.min() if len(body) else x.min())
    codes = torch.full((x.numel(),), 15, dtype=torch.uint8)
    levels = torch.zeros(15)
    if len(body):
        width = (float(hi) - float(lo)) / 15
        b = (
            body.sub(float(lo)).mul_(1 / width).floor_().clamp_(0, 14).long()
            if width > 0
            else torch.zeros_like(body).long()
        )
        sums = torch.zeros(15, dtype=torch.float64).index_add_(0, b, body.double())
        counts = torch.bincount(b, minlength=15).double()
        centres = float(lo) + (torch.arange(15, dtype=torch.float64) + 0.5) * max(width, 0.0)
        levels = torch.where(counts > 0, sums / counts.clamp(min=1), centres).float()
        codes[~exact] = b.to(torch.uint8)
    nibbles = torch.cat([codes, torch.zeros(len(codes) % 2, dtype=torch.uint8)])
    return nibbles[0::2] << 4 | nibbles[1::2], x[exact], torch.cat([torch.stack([lo, hi]).float(), levels])


@pytest.mark.parametrize("share", [0.03, 0.2])
def test_vectorised_encoding_writes_what_the_masked_definition_writes(tmp_path, share):
    """The whole-array encoding (run after every language's gradient pass) is the format's definition, bit for
    bit: the same codes, tail values and levels."""
    data = scores(3)
    scorefile.save(tmp_path / "s.safetensors", data, {}, "compact", share)
    tensors, _ = read_tensors(tmp_path / "s.safetensors")
    for n, x in data.items():
        if x.dim() == 3:
            continue  # stacks: each expert's tails, covered by the selection tests
        for part, want in zip(("codes", "exact", "levels"), _encode_by_masks(x.float(), share)):
            assert torch.equal(tensors[f"{n}/{part}"], want), (n, part)
