"""Importance estimators on tiny models: every estimator equals a direct computation (per-window autograd,
hand-captured activations, hand-counted neuron activity), one pass serves all, and group sums add up exactly."""

import math

import pytest
import torch

from lingregion import corpus, importance, models, scoring
from lingregion.regions import select
from lingregion.store import LingregionError

from conftest import TEXT, importance_target, lang_windows


def per_window_gradients(model, w, names):
    """Independent: each window's HF loss × its share of the tokens, one plain autograd backward each."""
    for p in model.parameters():
        p.requires_grad_(True)
    params = dict(model.named_parameters())
    out = []
    for ids in w.input_ids:
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids[None], labels=ids[None]).loss * (len(ids) - 1) / w.n_tokens
        loss.backward()
        out.append({n: params[n].grad.detach().clone() for n in names})
    model.zero_grad(set_to_none=True)
    return out


def hand_normalized(module, x):
    """What a norm's weight multiplies, written out by hand for each family's norm."""
    x = x.float()
    if isinstance(module, torch.nn.LayerNorm):
        return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + module.eps)
    eps = getattr(module, "eps", None) or module.variance_epsilon
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("family", ["gemma3", "llama", "qwen2", "gpt2"])
def test_gradient_estimators_equal_per_window_autograd(tiny, tokenizer, family):
    model = tiny(family, dtype=torch.float64)  # so the reference is exact and the fp32 accumulators are what is tested
    t = importance_target(model)
    langs = [lang_windows(tokenizer, TEXT[:2], "a"), lang_windows(tokenizer, TEXT[3:5], "b")]
    assert len(langs[0].input_ids) >= 3 and len(langs[0].input_ids[-1]) < len(langs[0].input_ids[0])  # a short one too
    ours = importance.estimate(t, langs, ["taylor", "taylor-window", "fisher"], progress=False)
    gs = [per_window_gradients(model, w, t.names) for w in langs]  # per language, per window
    params = dict(model.named_parameters())
    for n in t.names:
        d = params[n].detach() - t.removed[n]
        ref = {
            "taylor": sum((d * sum(g[n] for g in lang)).abs() for lang in gs),
            "taylor-window": sum((d * g[n]).abs() for lang in gs for g in lang),
            "fisher": 0.5 * sum(g[n] ** 2 * d**2 for lang in gs for g in lang),
        }
        for e, r in ref.items():
            assert ours[e][n].dtype == torch.float32
            torch.testing.assert_close(ours[e][n].double(), r, rtol=1e-5, atol=1e-6 * r.abs().max().item())
    # per-window terms never cancel: taylor-window bounds taylor from above
    assert all(bool((ours["taylor-window"][n] >= ours["taylor"][n] * (1 - 1e-5)).all()) for n in t.names)


def test_taylor_equals_the_papers_scores_summed_over_languages(tiny, tokenizer):
    model = tiny("gemma3", dtype=torch.float64)
    t = importance_target(model)
    langs = [lang_windows(tokenizer, TEXT[:2], "a"), lang_windows(tokenizer, TEXT[2:4], "b")]
    ours = importance.score("taylor", t, langs, progress=False)
    ref: dict = {}
    for w in langs:
        scoring.accumulate(ref, scoring.score(model, w, t.names, t.removed, progress=False))
    for n in t.names:
        torch.testing.assert_close(ours[n], ref[n], rtol=1e-5, atol=1e-6 * ref[n].abs().max().item())


@pytest.mark.parametrize("family", ["gemma3", "llama", "qwen2", "gpt2"])
def test_wanda_equals_hand_captured_activations(tiny, tokenizer, family):
    model = tiny(family)
    t = importance_target(model)
    w = lang_windows(tokenizer, TEXT[:3], "mix")
    ours = importance.score("wanda", t, [w], progress=False)

    inputs: dict[str, list] = {}
    modules = dict(model.named_modules())
    owners = {n.rpartition(".")[0] for n in t.names}
    handles = [
        modules[m].register_forward_hook(lambda mod, a, o, m=m: inputs.setdefault(m, []).append(a[0].detach()))
        for m in owners
    ]
    with torch.no_grad():
        for ids in w.input_ids:
            model(input_ids=ids[None])
    for h in handles:
        h.remove()

    params = dict(model.named_parameters())
    for n in t.names:
        mod, _, leaf = n.rpartition(".")
        module = modules[mod]
        x = torch.cat([i.reshape(-1, i.shape[-1]) for i in inputs[mod]])
        if leaf == "bias":
            a_norm = torch.full((params[n].shape[0],), math.sqrt(len(x)))
        elif isinstance(module, (torch.nn.Linear, importance.Conv1D)):
            a_norm = x.float().norm(dim=0)
            a_norm = a_norm[None, :] if isinstance(module, torch.nn.Linear) else a_norm[:, None]
        else:  # a norm: its weight multiplies the normalized input, channel by channel
            a_norm = hand_normalized(module, x).norm(dim=0)
        ref = (params[n].detach() - t.removed[n]).abs() * a_norm
        torch.testing.assert_close(ours[n], ref.expand_as(ours[n]), rtol=1e-4, atol=1e-6)


def test_lape_neuron_scores_from_a_hand_built_table():
    probs = torch.tensor(
        [
            [0.5, 0.5, 0.5],  # fires evenly: entropy ln 3
            [0.9, 0.0, 0.0],  # one language only: entropy 0
            [0.0, 0.0, 0.0],  # never fires
            [0.2, 0.1, 0.1],
        ],
        dtype=torch.float64,
    )
    q = [0.5, 0.25, 0.25]
    expected = [0.5 * math.log(3), 0.0, 0.0, (0.4 / 3) * -sum(v * math.log(v) for v in q)]
    torch.testing.assert_close(importance.lape_neuron_scores(probs), torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lape_maps_hand_counted_activations_to_neuron_rows_and_columns(tiny, tokenizer, family):
    model = tiny(family)
    t = importance_target(model)
    langs = [
        lang_windows(tokenizer, TEXT[:1], "en"),
        lang_windows(tokenizer, TEXT[1:2], "ru"),
        lang_windows(tokenizer, TEXT[3:4], "zh"),
    ]
    ours = importance.score("lape", t, langs, progress=False)

    acts = [n for n, m in model.named_modules() if n.endswith(("mlp.act_fn", "mlp.act"))]
    assert len(acts) == 2
    modules = dict(model.named_modules())
    table = {a: [] for a in acts}
    for w in langs:
        outs = {a: [] for a in acts}
        handles = [
            modules[a].register_forward_hook(lambda m, i, o, a=a, outs=outs: outs[a].append(o.detach())) for a in acts
        ]
        with torch.no_grad():
            for ids in w.input_ids:
                model(input_ids=ids[None])
        for h in handles:
            h.remove()
        for a in acts:
            o = torch.cat([x.reshape(-1, x.shape[-1]) for x in outs[a]])
            table[a].append((o > 0).double().mean(0))
    for a in acts:
        probs = torch.stack(table[a], dim=1)
        q = probs / probs.sum(1, keepdim=True)
        s = (probs.mean(1) * -(q * q.log()).nansum(1)).float()
        mlp = a.rpartition(".")[0]
        if family == "llama":
            expect = {
                f"{mlp}.gate_proj.weight": s[:, None],
                f"{mlp}.up_proj.weight": s[:, None],
                f"{mlp}.down_proj.weight": s[None, :],
            }
        else:  # GPT-2's Conv1D stores in × out
            expect = {f"{mlp}.c_fc.weight": s[None, :], f"{mlp}.c_fc.bias": s, f"{mlp}.c_proj.weight": s[:, None]}
        for n, e in expect.items():
            torch.testing.assert_close(ours[n], e.expand_as(ours[n]).contiguous(), rtol=1e-6, atol=1e-7)
    neuron = {n for n in ours if any(n.startswith(a.rpartition(".")[0] + ".") for a in acts)}
    others = [n for n in t.names if n not in neuron or n.endswith(("c_proj.bias",))]
    assert others and all(bool((ours[n] == 0).all()) for n in others)

    # the region code takes it unchanged: a global Top set of the right size, no unselected entry above it
    region = select(ours, 0.05, "top", scope=importance.get("lape").scope)
    assert region.count() == round(0.05 * region.total())
    inside = torch.cat([ours[n][region.mask(n)] for n in ours])
    outside = torch.cat([ours[n][~region.mask(n)] for n in ours])
    assert inside.min() >= outside.max() and inside.min() > 0


def test_magnitude(tiny):
    model = tiny("gemma3")
    t = importance_target(model)
    ours = importance.score("magnitude", t, [corpus.Windows("x", "score", [], [])], progress=False)
    params = dict(model.named_parameters())
    for n in t.names:
        assert torch.equal(ours[n], (params[n].detach().float() - t.removed[n]).abs())
    assert any(t.removed[n] == -1.0 for n in t.names)  # Gemma norms: distance to −1, not to 0


def test_one_pass_equals_separate_passes(tiny, tokenizer):
    model = tiny("gemma3")
    t = importance_target(model)
    langs = [lang_windows(tokenizer, TEXT[:2], "a"), lang_windows(tokenizer, TEXT[2:5], "b")]
    names = list(importance.ESTIMATORS)
    together = importance.estimate(t, langs, names, progress=False)
    for e in names:
        alone = importance.score(e, t, langs, progress=False)
        assert set(alone) == set(t.names)
        for n in t.names:
            assert torch.equal(together[e][n], alone[n]), (e, n)
    assert all(p.grad is None for p in model.parameters())  # nothing left behind
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_bf16_model_gets_fp32_statistics(tiny, tokenizer):
    model = tiny("llama", dtype=torch.bfloat16)
    t = importance_target(model)
    stats = importance.collect(t, lang_windows(tokenizer, TEXT[:1], "en"), importance.STATS, progress=False)
    for field in ("lang_abs", "window_abs", "window_sq", "act_norm"):
        d = getattr(stats, field)
        assert set(d) == set(t.names) and all(v.dtype == torch.float32 for v in d.values())


def test_adding_an_estimator_is_one_function(tiny, tokenizer):
    @importance.estimator("gradient-norm-test", needs=["window_sq"])
    def gradient_only(stats, t):
        return {n: stats.window_sq[n].sqrt() for n in t.names}

    try:
        model = tiny("llama")
        t = importance_target(model)
        w = lang_windows(tokenizer, TEXT[:2], "mix")
        out = importance.estimate(t, [w], ["gradient-norm-test", "fisher"], progress=False)
        gs = per_window_gradients(model, w, t.names)
        n = t.names[0]
        torch.testing.assert_close(
            out["gradient-norm-test"][n], sum(g[n] ** 2 for g in gs).sqrt(), rtol=1e-4, atol=1e-9
        )
    finally:
        del importance.ESTIMATORS["gradient-norm-test"]


def test_bad_input_is_a_one_line_error(tiny, tokenizer):
    model = tiny("gemma3")
    w = lang_windows(tokenizer, TEXT[:1], "en")
    with pytest.raises(LingregionError, match="unknown estimator"):
        importance.score("nope", importance_target(model), [w])
    with pytest.raises(LingregionError, match="at least two languages"):
        importance.score("lape", importance_target(model), [w], progress=False)
    with pytest.raises(LingregionError, match="wanda: .*embed"):
        importance.score("wanda", importance_target(model, include=r"embed|layers\.0\."), [w], progress=False)
    with pytest.raises(LingregionError, match="lape: no scored MLP"):
        importance.score(
            "lape",
            importance_target(model, include="self_attn"),
            [w, lang_windows(tokenizer, TEXT[1:2], "ru")],
            progress=False,
        )
    with pytest.raises(LingregionError, match="'en' is given twice"):
        importance.score("taylor", importance_target(model), [w, w], progress=False)


@pytest.mark.integration
def test_real_model_neurons_and_norms_are_all_covered():
    """On the built-in Gemma 3: LAPE finds every layer's MLP neurons, and Wanda scores every scored
    parameter, the per-head q/k norms included, from a forward pass of two short windows."""
    m = models.load()
    t = importance_target(m.module)
    langs = [corpus.load_windows(m.tokenizer, lang, "score", 16, 16) for lang in ("ru", "zh")]
    scores = importance.estimate(t, langs, ["wanda", "lape"], progress=False)
    n_layers, inter = m.module.config.num_hidden_layers, m.module.config.intermediate_size
    assert len(importance.activation_modules(m.module, t.names)) == n_layers
    for name in t.names:
        w, lape = scores["wanda"][name], scores["lape"][name]
        assert w.shape == lape.shape == m.module.get_parameter(name).shape and bool(torch.isfinite(w).all())
        assert float(w.max()) > 0
        if ".mlp." in name:  # each neuron's row (gate, up) or column (down) carries one value
            rows = lape if "down_proj" not in name else lape.T
            assert rows.shape[0] == inter and bool((rows == rows[:, :1]).all())
        else:
            assert float(lape.abs().max()) == 0


# --- stability and specificity of each estimator's per-language regions (issue 18) ----------------------
def test_group_sums_add_up_to_the_full_statistics_exactly(tiny, tokenizer):
    model = tiny("gemma3")
    t = importance_target(model)
    w = lang_windows(tokenizer, TEXT[:3], "ru", seq_len=8)
    w = corpus.Windows("ru", "score", w.input_ids[:6], w.n_bytes[:6])
    # 6 windows in 4 groups: groups 0 and 1 hold two windows (sums stored), 2 and 3 one (|g| and g² derived)
    assert len(w.input_ids) == 6
    seen = {}

    def visit(lang, parts):
        seen["groups"] = [p + importance.Part() for p in parts]  # copies: collect adds the groups up in place
        seen["a"], seen["b"] = importance.subset(parts, 0, 2), importance.subset(parts, 1, 2)
        seen["one"] = importance.part_stats(lang, parts[3])  # a group of one window: |g| and g² derived

    stats = importance.collect(t, w, importance.STATS, progress=False, groups=4, visit=visit)
    a, b = seen["a"], seen["b"]
    assert [p.windows for p in seen["groups"]] == [len(range(i, len(w.input_ids), 4)) for i in range(4)]
    assert a.tokens + b.tokens == w.n_tokens
    assert seen["groups"][3].windows == 1 and set(seen["one"].window_sq) == set(seen["one"].window_abs) == set(t.names)
    for n in t.names:
        assert torch.equal(seen["one"].window_sq[n], seen["groups"][3].grad[n] ** 2)
        assert torch.equal(seen["one"].window_abs[n], seen["groups"][3].grad[n].abs())
    for n in t.names:  # bit for bit: the full statistic is the sum of the two halves
        assert torch.equal(stats.lang_abs[n], (a.grad[n] + b.grad[n]).abs())
        assert torch.equal(stats.window_abs[n], a.item("window_abs", n) + b.item("window_abs", n))
        assert torch.equal(stats.window_sq[n], a.item("window_sq", n) + b.item("window_sq", n))
        assert torch.equal(stats.act_norm[n], (a.energy[n] + b.energy[n]).sqrt())
    for act, count in stats.active["ru"].items():
        assert torch.equal(count, a.active[act] + b.active[act])
        assert stats.seen["ru"][act] == a.seen[act] + b.seen[act]
    # each window is in exactly one group: the groups' gradients are the per-window sums of their windows
    gs = per_window_gradients(model, w, t.names)
    for i, part in enumerate(seen["groups"]):
        mine = range(i, len(gs), 4)
        for n in t.names:
            ref = sum(gs[j][n] for j in mine)
            torch.testing.assert_close(part.grad[n], ref, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(
                # a square doubles the relative error of the gradients it squares (checked at 1e-5 above)
                part.item("window_sq", n),
                sum(gs[j][n] ** 2 for j in mine),
                rtol=3e-5,
                atol=1e-9,
            )
    # and grouping changes the full statistics by rounding only
    plain = importance.collect(t, w, importance.STATS, progress=False)
    for n in t.names:
        torch.testing.assert_close(plain.window_sq[n], stats.window_sq[n], rtol=1e-5, atol=1e-12)
        scale = plain.lang_abs[n].abs().max().item()  # |Σ g| cancels: rounding is relative to the largest entry
        torch.testing.assert_close(plain.lang_abs[n], stats.lang_abs[n], rtol=1e-5, atol=1e-5 * scale)
