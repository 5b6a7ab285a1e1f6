import math

import torch

from lingregion import figures
from lingregion.regions import Region

PNG = b"\x89PNG\r\n\x1a\n"


def test_density_hand_computed_with_edges_and_corners():
    mask = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    # members / existing cells of each 3×3 neighbourhood (itself included): 4 at corners, 6 at edges, 9 inside
    expected = torch.tensor([[2 / 4, 2 / 6, 2 / 6, 1 / 4], [4 / 6, 4 / 9, 3 / 9, 1 / 6], [3 / 4, 3 / 6, 2 / 6, 0 / 4]])
    got = figures.neighbourhood_density(mask)
    assert got.dtype == torch.float32 and got.shape == (3, 4)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)


def test_density_bounds_and_single_cell():
    assert figures.neighbourhood_density(torch.ones(5, 7, dtype=torch.bool)).eq(1).all()
    assert figures.neighbourhood_density(torch.zeros(5, 7, dtype=torch.bool)).eq(0).all()
    assert figures.neighbourhood_density(torch.ones(1, 1, dtype=torch.bool)).item() == 1.0


def test_reduction_keeps_planted_row_column_and_head_block():
    g = torch.Generator().manual_seed(0)
    background = torch.rand(2048, 640, generator=g) < 0.01
    base = figures.reduce_for_display(background.float()).mean()
    mask = background.clone()
    mask[1000, :] = True  # one full row
    mask[:, 333] = True  # one full column
    mask[1536:1792, :] = True  # one head block (head_dim 256)
    out = figures.reduce_for_display(mask.float())
    assert out.shape == (256, 80)  # at most 256 per side, aspect 2048:640 kept
    assert out[1000 * 256 // 2048].min() > 5 * base
    assert out[:, 333 * 80 // 640].min() > 5 * base
    assert out[1536 // 8 : 1792 // 8].min() == 1.0
    small = torch.rand(30, 40, generator=g)
    assert torch.equal(figures.reduce_for_display(small), small)


def tiny_region():
    def m(shape, ones):
        t = torch.zeros(shape, dtype=torch.bool).reshape(-1)
        t[list(ones)] = True
        return t.reshape(shape)

    return Region.from_masks(
        {
            "model.layers.0.self_attn.q_proj.weight": m((4, 4), [0, 5, 15]),
            "model.layers.0.mlp.down_proj.weight": m((2, 4), [7]),
            "model.layers.1.input_layernorm.weight": m((4,), [1, 2]),
            "model.layers.1.self_attn.o_proj.weight": m((4, 4), [3, 12]),
        }
    )


def test_distribution_hand_count():
    d = figures.region_distribution(tiny_region())  # 8 entries: q 3, down 1, norm 2, o 2
    assert d["by_layer"] == {0: 4 / 8, 1: 4 / 8}
    assert d["by_kind"] == {"q": 3 / 8, "k": 0, "v": 0, "o": 2 / 8, "gate": 0, "up": 0, "down": 1 / 8, "norm": 2 / 8}
    assert math.isclose(sum(d["by_layer"].values()), 1) and math.isclose(sum(d["by_kind"].values()), 1)


def full_region(layers=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "q_proj": (64, 32),
        "k_proj": (32, 32),
        "v_proj": (32, 32),
        "o_proj": (32, 64),
        "gate_proj": (48, 32),
        "up_proj": (48, 32),
        "down_proj": (32, 48),
    }
    masks = {}
    for i in range(layers):
        for k, s in shapes.items():
            part = "self_attn" if k[0] in "qkvo" else "mlp"
            masks[f"model.layers.{i}.{part}.{k}.weight"] = torch.rand(s, generator=g) < 0.05
        masks[f"model.layers.{i}.input_layernorm.weight"] = torch.rand(32, generator=g) < 0.05
    return Region.from_masks(masks)


def test_plots_are_png():
    region = full_region()
    assert figures.region_heatmap(region, "model.layers.0.self_attn.q_proj.weight", head_dim=16).startswith(PNG)
    assert figures.region_heatmap(region, "model.layers.1.self_attn.o_proj.weight", head_dim=16).startswith(PNG)
    assert figures.region_grid(region).startswith(PNG)
    assert figures.region_grid(region, layers=[1]).startswith(PNG)
    gpt2 = Region.from_masks({"transformer.h.0.attn.c_attn.weight": torch.ones(8, 24, dtype=torch.bool)})
    assert figures.region_grid(gpt2).startswith(PNG)
    dists = {
        "core top 1%": figures.region_distribution(region),
        "ru monolingual": figures.region_distribution(full_region(seed=1)),
    }
    assert figures.distribution_plot(dists).startswith(PNG)


def test_removal_chart_is_png_with_infinite_values():
    langs = [f"l{i}" for i in range(34)]
    settings = ["base", "top@0.01", "top@0.03", "bottom@0.01", "random@0.01"]
    table = {
        s: {lang: {"ppl": 10.0 * (j + 1) + i, "bpb": 1.0 + 0.1 * j} for i, lang in enumerate(langs)}
        for j, s in enumerate(settings)
    }
    table["top@0.03"]["l3"] = {"ppl": math.inf, "bpb": math.inf}
    out = figures.removal_chart({"settings": settings, "languages": langs, "table": table})
    assert out.startswith(PNG)
