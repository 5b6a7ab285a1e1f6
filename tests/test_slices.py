"""slices: structural removal, single-parameter perturbation and the outlier scan, checked on tiny models against
masks and numbers written out by hand from each architecture's own weight layout. The experiments built on them
are tested in experiments/test_structural.py and experiments/test_outliers.py."""

import pytest
import torch

from lingregion import architectures, corpus, interventions, slices
from lingregion.regions import Region
from lingregion.store import LingregionError

from conftest import TEXT

ARCHS = ["llama", "gemma3", "qwen2", "gpt2"]
HIDDEN, HEADS, KV, HD = 32, 2, 1, 16  # the conftest configs (GPT-2: 2 heads of 16, no grouping)


def state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def expected_mask(model, arch, family, index):
    """What removing `index` of `family` (common index) must zero, written from each layout directly:
    LLaMA-style Linear weights are [out, in]; GPT-2's Conv1D weights are [in, out] with q|k|v side by side."""
    exp = {n: torch.zeros(p.shape, dtype=torch.bool) for n, p in model.named_parameters()}
    i = torch.tensor(index)
    for layer in range(2):
        if arch == "gpt2":
            p = f"transformer.h.{layer}."
            if family == "head":
                exp[p + "attn.c_proj.weight"][i, :] = True
                for part in range(3):  # q, k, v outputs of the fused matrix
                    exp[p + "attn.c_attn.weight"][:, part * HIDDEN + i] = True
            else:
                exp[p + "attn.c_proj.weight"][:, i] = True
                exp[p + "attn.c_attn.weight"][i, :] = True
                if family == "feature+ffn":
                    exp[p + "mlp.c_proj.weight"][:, i] = True
                    exp[p + "mlp.c_fc.weight"][i, :] = True
            continue
        p = f"model.layers.{layer}."
        if family == "head":
            kv_rows = (i // HD // (HEADS // KV)) * HD + i % HD  # one k/v head serves both query heads
            exp[p + "self_attn.o_proj.weight"][:, i] = True
            exp[p + "self_attn.q_proj.weight"][i, :] = True
            exp[p + "self_attn.k_proj.weight"][kv_rows, :] = True
            exp[p + "self_attn.v_proj.weight"][kv_rows, :] = True
        else:
            exp[p + "self_attn.o_proj.weight"][i, :] = True
            for m in ("q", "k", "v"):
                exp[p + f"self_attn.{m}_proj.weight"][:, i] = True
            if family == "feature+ffn":
                exp[p + "mlp.down_proj.weight"][i, :] = True
                exp[p + "mlp.gate_proj.weight"][:, i] = True
                exp[p + "mlp.up_proj.weight"][:, i] = True
    return exp


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("family", list(slices.FAMILIES))
def test_exactly_the_intended_rows_and_columns_change(tiny, arch, family):
    model = tiny(arch)
    before = state(model)
    index = [3, 20, 31]
    group_map = slices.groups(model, family, "common")
    chosen = {space: torch.tensor(index) for space in group_map}
    edits = slices.edits_for(group_map, chosen)
    exp = expected_mask(model, arch, family, index)
    touched = {e.name: e.index for e in edits}
    assert len(touched) == len(edits)  # one edit per parameter
    for name, mask in exp.items():
        want = mask.reshape(-1).nonzero().squeeze(1)
        assert torch.equal(touched.get(name, torch.zeros(0, dtype=torch.long)), want), name
    handle = interventions.apply(model, edits)
    for name, p in model.named_parameters():
        assert torch.all(p[exp[name]] == 0)
        assert torch.equal(p[~exp[name]], before[name][~exp[name]]), f"{name} changed outside the rows/columns"
    handle.undo()
    for name, p in model.named_parameters():
        assert torch.equal(p.detach().view(torch.uint8), before[name].view(torch.uint8))


def random_region(model, density=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    masks = {
        n: torch.rand(p.shape, generator=g) < density
        for n, p in model.named_parameters()
        if n.startswith(("model.layers.", "transformer.h."))
    }
    return Region.from_masks(masks)


def hand_ranking(count):
    order = sorted(range(len(count)), key=lambda d: (-int(count[d]), d))
    return order


def hand_pick(count, n, how):
    order = hand_ranking(count)
    start = {"top": 0, "middle": (len(order) - n) // 2, "bottom": len(order) - n}[how]
    return sorted(order[start : start + n])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("how", ["top", "middle", "bottom"])
def test_common_picks_match_hand_counts(tiny, arch, how):
    model = tiny(arch)
    region = random_region(model)
    m = {n: region.mask(n) for n in region.shapes}
    feature = torch.zeros(HIDDEN, dtype=torch.long)
    for layer in range(2):
        if arch == "gpt2":  # Conv1D [in, out]: o's outputs are columns, c_attn's inputs are rows
            p = f"transformer.h.{layer}."
            feature += m[p + "attn.c_proj.weight"].sum(0) + m[p + "attn.c_attn.weight"].sum(1)
        else:
            p = f"model.layers.{layer}.self_attn."
            feature += m[p + "o_proj.weight"].sum(1)
            for x in "qkv":
                feature += m[p + f"{x}_proj.weight"].sum(0)
    n = 5
    _, picks = slices.removal(model, region, "feature", n, how)
    assert picks == {"residual": hand_pick(feature, n, how)}


@pytest.mark.parametrize("how", ["top", "middle", "bottom"])
def test_head_picks_per_layer_with_grouped_kv(tiny, how):
    model = tiny("llama")
    region = random_region(model, seed=2)
    m = {n: region.mask(n) for n in region.shapes}
    expected = {}
    for layer in range(2):
        p = f"model.layers.{layer}.self_attn."
        c = m[p + "o_proj.weight"].sum(0) + m[p + "q_proj.weight"].sum(1)
        kv = m[p + "k_proj.weight"].sum(1) + m[p + "v_proj.weight"].sum(1)  # 16 k/v rows
        c = c + torch.cat([kv, kv])  # both query heads read the single k/v head
        expected[f"layer{layer}"] = hand_pick(c, 4, how)
    _, picks = slices.removal(model, region, "head", 4, how)
    assert picks == expected


def test_matrix_mode_picks_each_matrix_own_rows(tiny):
    model = tiny("qwen2")
    region = random_region(model, seed=3)
    edits, picks = slices.removal(model, region, "feature+ffn", 2, "top", mode="matrix")
    name = "model.layers.1.mlp.down_proj.weight"
    down = region.mask(name).sum(1)  # rows of down = residual dims it writes
    assert picks[f"{name}:down:row"] == hand_pick(down, 2, "top")
    gate = region.mask("model.layers.0.mlp.gate_proj.weight").sum(0)
    assert picks["model.layers.0.mlp.gate_proj.weight:gate:col"] == hand_pick(gate, 2, "top")
    # every matrix of the family has its own pick, and the edits zero exactly those rows/columns
    assert len(picks) == 2 * 7
    by_name = {e.name: e.index for e in edits}
    exp = torch.zeros(32, 48, dtype=torch.bool)
    exp[hand_pick(down, 2, "top"), :] = True
    assert torch.equal(by_name[name], exp.reshape(-1).nonzero().squeeze(1))


def test_random_pick_is_seeded_nested_and_per_space():
    count = torch.arange(40)
    a = slices.pick(count, 10, "random", seed=0, key="layer0")
    assert torch.equal(a, slices.pick(count, 10, "random", seed=0, key="layer0"))
    assert not torch.equal(a, slices.pick(count, 10, "random", seed=1, key="layer0"))
    assert not torch.equal(a, slices.pick(count, 10, "random", seed=0, key="layer1"))
    assert set(slices.pick(count, 3, "random", seed=0, key="layer0").tolist()) <= set(a.tolist())


def test_bad_requests_raise_one_line_errors(tiny):
    model = tiny("llama")
    region = random_region(model)
    with pytest.raises(LingregionError, match="N_d"):
        slices.removal(model, region, "feature", 33, "top")
    with pytest.raises(LingregionError, match="unknown family"):
        slices.removal(model, region, "neurons", 1, "top")
    with pytest.raises(LingregionError, match="unknown pick"):
        slices.pick(torch.zeros(4), 1, "best")
    partial = Region.from_masks({n: region.mask(n) for n in region.shapes if "q_proj" not in n})
    with pytest.raises(LingregionError, match="does not cover"):
        slices.removal(model, partial, "feature", 1, "top")
    with pytest.raises(LingregionError, match="out of range"):
        slices.perturbation(model, 5, 0, "reset")


def test_dimension_removal_is_feature_ffn_at_a_common_index(tiny):
    model = tiny("gemma3")
    exp = expected_mask(model, "gemma3", "feature+ffn", [7])
    got = {e.name: e.index for e in slices.dimension_removal(model, [7])}
    assert set(got) == {n for n, m in exp.items() if m.any()}
    for name, idx in got.items():
        assert torch.equal(idx, exp[name].reshape(-1).nonzero().squeeze(1))


def norm_output(model, layer, x):
    return model.get_submodule(architectures.input_norms(model)[layer].rpartition(".")[0])(x)


@pytest.mark.parametrize("arch,init", [("llama", 1.0), ("gemma3", 0.0), ("gpt2", 1.0)])
def test_perturbation_acts_on_the_effective_scale(tiny, arch, init):
    model = tiny(arch)
    before = state(model)
    name = architectures.input_norms(model)[1]
    w = before[name]
    x = torch.randn(5, HIDDEN)
    bias = dict(model.named_parameters()).get(name.replace("weight", "bias"))
    b = bias.detach() if bias is not None else torch.zeros(HIDDEN)
    y = norm_output(model, 1, x).detach()
    with interventions.applied(model, slices.perturbation(model, 1, 4, "reset")):
        assert model.get_parameter(name)[4].item() == init
        y_reset = norm_output(model, 1, x).detach()
    with interventions.applied(model, slices.perturbation(model, 1, 4, "x10")):
        expect_w = 10 * w[4] + 9 if arch == "gemma3" else 10 * w[4]  # (1 + w') = 10 (1 + w) for Gemma
        assert model.get_parameter(name)[4].item() == pytest.approx(expect_w.item(), rel=1e-6)
        y_x10 = norm_output(model, 1, x).detach()
    others = torch.arange(HIDDEN) != 4
    assert torch.equal(y_reset[:, others], y[:, others]) and torch.equal(y_x10[:, others], y[:, others])
    torch.testing.assert_close(y_x10[:, 4] - b[4], 10 * (y[:, 4] - b[4]), rtol=1e-5, atol=1e-6)
    scale = w[4] + 1 if arch == "gemma3" else w[4]  # reset = the normalised input at unit scale
    torch.testing.assert_close(y_reset[:, 4] - b[4], (y[:, 4] - b[4]) / scale, rtol=1e-4, atol=1e-5)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach().view(torch.uint8), before[n].view(torch.uint8))


def windows(tokenizer):
    return [corpus.make_windows(tokenizer, TEXT, 24, 10_000, "mix", "eval", "test")]


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_scan_finds_a_planted_massive_dimension(tiny, tokenizer, arch):
    model = tiny(arch)
    planted = 13
    emb = model.get_input_embeddings().weight
    norm = model.get_parameter(architectures.input_norms(model)[0])
    with torch.no_grad():  # one embedding column 200× larger: a massive activation at every token, which
        emb[:, planted] *= 200  # the first norm passes on at half scale (effective scale 0.5), so both
        norm[planted] = -0.5 if arch == "gemma3" else 0.5  # perturbations change what attention reads
    before = state(model)
    result = slices.scan(model, windows(tokenizer), [0, 1], batch_size=2, progress=False)
    assert result.top(1) == [(0, planted)]
    assert int(result.massive().argmax()) == planted
    assert result.massive()[planted] > 20 * result.massive()[torch.arange(HIDDEN) != planted].max()
    for n, p in model.named_parameters():  # scanning changed nothing
        assert torch.equal(p.detach().view(torch.uint8), before[n].view(torch.uint8))


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_scan_scores_equal_hand_computation(tiny, tokenizer, arch):
    model = tiny(arch)
    w = windows(tokenizer)
    result = slices.scan(model, w, [0, 1], batch_size=2, progress=False)
    peaks = torch.zeros(2, HIDDEN)
    change = {k: torch.zeros(2, HIDDEN) for k in slices.PERTURBATIONS}
    eps = model.config.rms_norm_eps
    with torch.no_grad():
        xs = [model(input_ids=ids[None], output_hidden_states=True).hidden_states for ids in w[0].input_ids]
    for layer in range(2):
        x = torch.cat([h[layer][0] for h in xs])  # residual stream entering the layer, all tokens
        peaks[layer] = x.abs().amax(0)
        xhat = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        wt = model.get_parameter(architectures.input_norms(model)[layer]).detach()
        s = 1 + wt if arch == "gemma3" else wt
        y = xhat * s
        for kind, new in (("reset", torch.ones_like(s)), ("x10", 10 * s)):
            change[kind][layer] = (xhat * (new - s)).abs().div(y.norm(dim=-1, keepdim=True)).amax(0)
    torch.testing.assert_close(result.peak, peaks, rtol=1e-5, atol=1e-6)
    for kind in slices.PERTURBATIONS:
        torch.testing.assert_close(result.change[kind], change[kind], rtol=1e-4, atol=1e-6)
    assert result.tokens == sum(len(i) for i in w[0].input_ids)


def test_in_region_reads_the_packed_bits(tiny):
    model = tiny("qwen2")
    region = random_region(model, seed=4)
    name = "model.layers.0.mlp.up_proj.weight"
    index = torch.randperm(48 * 32)[:100]
    assert torch.equal(slices.in_region(region, name, index), region.mask(name).reshape(-1)[index])


def test_parameter_labels_round_trip():
    assert slices.label(0, 2100) == "L1-N2100"
    assert slices.parse_label("L1-N2100") == (0, 2100)
    for bad in ["L0-N5", "1-2100", "L1N2100"]:
        with pytest.raises(LingregionError, match="L1-N2100"):
            slices.parse_label(bad)


def test_perturb_command_prints_base_and_perturbed(tiny_folder, capsys):
    from lingregion import evaluation, models
    from lingregion.cli import main

    argv = ["perturb", "--model", str(tiny_folder), "--lang", "ru", "--seq-len", "16", "--eval-tokens", "32"]
    assert main(argv + ["--param", "L2-N5", "--kind", "x10"]) == 0
    out = capsys.readouterr().out
    assert "| Language | Base | x10 L2-N5 |" in out
    m = models.load(str(tiny_folder))
    w = corpus.load_windows(m.tokenizer, "ru", "eval", 16, 32)
    with interventions.applied(m.module, slices.perturbation(m.module, 1, 5, "x10")):
        ppl = evaluation.perplexity(m.module, w, 4, False)["ppl"]
    assert f"| {ppl:.3f} |" in out
    assert main(argv + ["--remove-dim", "7"]) == 0
    assert "remove D7" in capsys.readouterr().out
    assert main(argv + ["--param", "L9-N5"]) == 2
    assert "out of range" in capsys.readouterr().err


@pytest.mark.integration
def test_real_model_scan_finds_a_dimension_whose_removal_breaks_it():
    """Gemma 3 270M: the scan's most massive residual dimension, removed from every matrix, wrecks
    perplexity; a random dimension barely moves it; undo restores every weight bit for bit."""
    from lingregion import evaluation, models

    gemma = models.load()
    m, tok = gemma.module, gemma.tokenizer
    scan = slices.scan(m, [corpus.load_windows(tok, "en", "score", 128, 128)], [0], progress=False)
    massive = scan.massive()
    dim = int(massive.argmax())
    assert massive[dim] > 100  # a massive activation: its peak is > 100× the median dimension's
    w = corpus.load_windows(tok, "en", "eval", 128, 128)
    before = {n: p.detach().clone() for n, p in m.named_parameters() if ".layers." in n}

    def ppl(edits):
        with interventions.applied(m, edits):
            return evaluation.perplexity(m, w, progress=False)["ppl"]

    base = ppl([])
    control = next(d for d in (5, 6, 7) if massive[d] < 10)
    assert ppl(slices.dimension_removal(m, [dim])) > 100 * base
    assert ppl(slices.dimension_removal(m, [control])) < 1.5 * base
    for n, p in m.named_parameters():
        if n in before:
            assert torch.equal(p.detach().view(torch.uint8), before[n].view(torch.uint8))
