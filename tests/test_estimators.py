import math

import numpy as np
import pytest
import torch

from lingregion import Config, corpus, importance, models, regions, reproduce, scoring
from lingregion.experiments.registry import validate
from lingregion.regions import select
from lingregion.run import Run
from lingregion.store import LingregionError

from conftest import TEXT, tiny_config


def windows(tokenizer, texts, lang, seq_len=12):
    return corpus.make_windows(tokenizer, texts, seq_len, 10_000, lang, "score", "test")


def target(model, include=None):
    names = models.scored_names(model, include)
    return importance.Target(model, names, models.removed_values(model, names))


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


@pytest.mark.parametrize("family", ["gemma3", "llama", "qwen2", "gpt2"])
def test_gradient_estimators_equal_per_window_autograd(tiny, tokenizer, family):
    model = tiny(family, dtype=torch.float64)  # so the reference is exact and the fp32 accumulators are what is tested
    t = target(model)
    langs = [windows(tokenizer, TEXT[:2], "a"), windows(tokenizer, TEXT[3:5], "b")]
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
    t = target(model)
    langs = [windows(tokenizer, TEXT[:2], "a"), windows(tokenizer, TEXT[2:4], "b")]
    ours = importance.score("taylor", t, langs, progress=False)
    ref: dict = {}
    for w in langs:
        scoring.accumulate(ref, scoring.score(model, w, t.names, t.removed, progress=False))
    for n in t.names:
        torch.testing.assert_close(ours[n], ref[n], rtol=1e-5, atol=1e-6 * ref[n].abs().max().item())


def hand_normalized(module, x):
    """What a norm's weight multiplies, written out by hand for each family's norm."""
    x = x.float()
    if isinstance(module, torch.nn.LayerNorm):
        return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + module.eps)
    eps = getattr(module, "eps", None) or module.variance_epsilon
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("family", ["gemma3", "llama", "qwen2", "gpt2"])
def test_wanda_equals_hand_captured_activations(tiny, tokenizer, family):
    model = tiny(family)
    t = target(model)
    w = windows(tokenizer, TEXT[:3], "mix")
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
    t = target(model)
    langs = [
        windows(tokenizer, TEXT[:1], "en"),
        windows(tokenizer, TEXT[1:2], "ru"),
        windows(tokenizer, TEXT[3:4], "zh"),
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
    t = target(model)
    ours = importance.score("magnitude", t, [corpus.Windows("x", "score", [], [])], progress=False)
    params = dict(model.named_parameters())
    for n in t.names:
        assert torch.equal(ours[n], (params[n].detach().float() - t.removed[n]).abs())
    assert any(t.removed[n] == -1.0 for n in t.names)  # Gemma norms: distance to −1, not to 0


def test_one_pass_equals_separate_passes(tiny, tokenizer):
    model = tiny("gemma3")
    t = target(model)
    langs = [windows(tokenizer, TEXT[:2], "a"), windows(tokenizer, TEXT[2:5], "b")]
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
    t = target(model)
    stats = importance.collect(t, windows(tokenizer, TEXT[:1], "en"), importance.STATS, progress=False)
    for field in ("lang_abs", "window_abs", "window_sq", "act_norm"):
        d = getattr(stats, field)
        assert set(d) == set(t.names) and all(v.dtype == torch.float32 for v in d.values())


def test_adding_an_estimator_is_one_function(tiny, tokenizer):
    @importance.estimator("gradient-norm-test", needs=["window_sq"])
    def gradient_only(stats, t):
        return {n: stats.window_sq[n].sqrt() for n in t.names}

    try:
        model = tiny("llama")
        t = target(model)
        w = windows(tokenizer, TEXT[:2], "mix")
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
    w = windows(tokenizer, TEXT[:1], "en")
    with pytest.raises(LingregionError, match="unknown estimator"):
        importance.score("nope", target(model), [w])
    with pytest.raises(LingregionError, match="at least two languages"):
        importance.score("lape", target(model), [w], progress=False)
    with pytest.raises(LingregionError, match="wanda: .*embed"):
        importance.score("wanda", target(model, include=r"embed|layers\.0\."), [w], progress=False)
    with pytest.raises(LingregionError, match="lape: no scored MLP"):
        importance.score(
            "lape", target(model, include="self_attn"), [w, windows(tokenizer, TEXT[1:2], "ru")], progress=False
        )
    with pytest.raises(LingregionError, match="'en' is given twice"):
        importance.score("taylor", target(model), [w, w], progress=False)


# --- the experiment ----------------------------------------------------------------------------------
def test_shuffled_windows_keep_bos_and_tokens_and_are_seeded(tokenizer):
    from lingregion.experiments import estimators as exp

    w = windows(tokenizer, TEXT[:3], "ru")
    a, b, c = exp.shuffled(w, 0), exp.shuffled(w, 0), exp.shuffled(w, 1)
    assert all(torch.equal(x, y) for x, y in zip(a.input_ids, b.input_ids))
    assert any(not torch.equal(x, y) for x, y in zip(a.input_ids, c.input_ids))
    for orig, s in zip(w.input_ids, a.input_ids):
        assert s[0] == orig[0] == tokenizer.bos_token_id
        assert sorted(s.tolist()) == sorted(orig.tolist())
    assert any(not torch.equal(x, y) for x, y in zip(a.input_ids, w.input_ids))
    assert a.n_bytes == w.n_bytes and a.n_tokens == w.n_tokens


def test_damage_is_the_log_perplexity_ratio_capped_at_a_uniform_guess():
    from lingregion.experiments import estimators as exp

    base = {"ru": {"nll": 100.0, "tokens": 50, "ppl": math.exp(2.0)}, "en": {"nll": 50.0, "tokens": 50}}
    removed = {"ru": {"nll": 150.0, "tokens": 50, "ppl": math.exp(3.0)}, "en": {"nll": 5000.0, "tokens": 50}}
    d = exp.damage(base, removed, vocab=1000)
    assert d["ru"] == pytest.approx(math.log(removed["ru"]["ppl"] / base["ru"]["ppl"]))
    assert d["en"] == pytest.approx(math.log(1000) - 1.0)  # ln ppl 100 is past ln 1000: counted up to the cap


def test_experiment_end_to_end_on_a_tiny_model_and_resume(tiny_folder, tmp_path, monkeypatch):
    from lingregion import evaluation, interventions
    from lingregion.regions import Region

    cfg = Config(
        model=str(tiny_folder),
        seq_len=16,
        score_tokens=32,
        score_langs=["ru", "es", "zh"],
        est_tokens=32,
        est_seq_len=8,
        est_eval_tokens=32,
        est_eval_langs=["ru", "en"],
        est_ratios=[0.01, 0.1],
        est_overlap_ratio=0.1,
        est_outlier_dims=1,
        experiments=["estimators"],
    )
    out = tmp_path / "run"
    res = reproduce(cfg, out, progress=False)["estimators"]
    assert set(res["damage"]) == set(cfg.est_estimators) | {"random"}
    assert res["scopes"]["lape"] == "global" and res["scopes"]["fisher"] == "matrix"
    for r in ("0.01", "0.1"):
        spec = res["specificity"][r]
        assert set(spec) == {"core", "en-only", "shuffled", "magnitude", "outlier-dims", "random"}
        assert spec["core"]["jaccard_core"] == 1.0 and spec["core"]["relative_damage"] == 1.0
        assert spec["random"]["relative_damage"] == 0.0
        assert spec["core"]["damage"] == res["damage"]["taylor"][r]
    for a in res["jaccard"]:
        assert res["jaccard"][a][a] == 1.0
    # a damage entry equals the evaluation redone by hand with the saved region removed
    m = models.load(str(tiny_folder))
    run = Run(out, cfg, m, progress=False)
    region = Region.load(out / "regions" / "est-fisher-top-0.1.safetensors")
    assert region.count() == sum(round(0.1 * region.mask(n).numel()) for n in region.packed)  # per matrix
    with interventions.applied(m.module, interventions.removal(region, run.removed)):
        nll = evaluation.perplexity(m.module, run.windows("en", "eval", 32), cfg.batch_size, False)["nll"]
    b = res["base"]["en"]["nll"] / res["base"]["en"]["tokens"]
    assert res["damage_by_language"]["fisher@0.1"]["en"] == pytest.approx(
        min(nll / res["base"]["en"]["tokens"], max(b, math.log(300))) - b, rel=1e-9, abs=1e-12
    )
    assert (out / "figures" / "estimators-damage.png").read_bytes().startswith(b"\x89PNG")
    assert "Is the core region specific to language?" in (out / "report.md").read_text()

    # a second run reads the regions back instead of scoring again
    monkeypatch.setattr(importance, "estimate", lambda *a, **k: pytest.fail("scored again"))
    monkeypatch.setattr(importance, "score", lambda *a, **k: pytest.fail("scored again"))
    again = reproduce(cfg, out, progress=False)["estimators"]
    assert again["damage"] == res["damage"] and again["specificity"] == res["specificity"]


def test_bad_config_is_a_one_line_error(tiny_folder):

    for bad, match in [
        ({"est_estimators": ["fisher"]}, "must include taylor"),
        ({"est_estimators": ["taylor", "nope"]}, "unknown estimator"),
        ({"est_overlap_ratio": 0.02}, "must be one of the estimator ratios"),
        ({"est_control_lang": "xx"}, "unknown language 'xx'"),
    ]:
        with pytest.raises(LingregionError, match=match):
            validate(Config(experiments=["estimators"], **bad))


def synthetic(core: dict, en: dict, shuffled: dict, random: dict, limit: float = 5.0) -> dict:
    """A saved result with only what the specificity answer reads: one language, damage per k per region."""
    ratios = list(core)
    spec = {}
    for r in ratios:
        lo, hi = random[r], core[r]
        spec[r] = {
            label: {
                "damage": d[r],
                "jaccard_core": 0.1,
                "entries": 10,
                "share_in_core": 0.1,
                "relative_damage": (d[r] - lo) / (hi - lo),
            }
            for label, d in (("core", core), ("en-only", en), ("shuffled", shuffled), ("random", random))
        }
    return {
        "ratios": ratios,
        "specificity": spec,
        "score_languages": ["ru", "es"],
        "control_language": "en",
        "estimators": ["taylor"],
        "vocab": 1000,
        "scored_parameters": 1000,
        "cap": {"ru": limit},
        "damage_by_language": {f"taylor@{r}": {"ru": core[r]} for r in ratios},
    }


def test_specificity_answer_follows_its_rule():
    from lingregion.experiments import estimators as exp

    # at 0.001 the core does nothing beyond Random: the answer is read at 0.01
    res = synthetic(
        core={"0.001": 0.05, "0.01": 3.0},
        en={"0.001": 0.0, "0.01": 2.0},
        shuffled={"0.001": 0.0, "0.01": 0.5},
        random={"0.001": 0.0, "0.01": 0.2},
    )
    assert exp.answer_ratio(res) == "0.01"
    text = exp.answer(res)
    assert text.startswith("At Top 1%") and "tied to structured text" in text
    assert "does 64% of its damage" in text  # (2.0 − 0.2) / (3.0 − 0.2)
    assert "uniform guess" not in text
    res = synthetic(core={"0.01": 3.0}, en={"0.01": 0.5}, shuffled={"0.01": 0.6}, random={"0.01": 0.2})
    assert "specific to the scored languages" in exp.answer(res)
    res = synthetic(core={"0.01": 3.0}, en={"0.01": 2.9}, shuffled={"0.01": 2.0}, random={"0.01": 0.2})
    assert "generally important" in exp.answer(res)
    res = synthetic(core={"0.01": 0.05}, en={"0.01": 0.0}, shuffled={"0.01": 0.0}, random={"0.01": 0.0})
    assert exp.answer_ratio(res) is None and "cannot be compared" in exp.answer(res)
    # a core region at the cap (every language past a uniform guess) is called out
    res = synthetic(core={"0.01": 5.0}, en={"0.01": 5.0}, shuffled={"0.01": 4.0}, random={"0.01": 0.2})
    assert "worse than a uniform guess" in exp.answer(res) and exp.saturated(res) == {"0.01": ["taylor"]}


def test_findings_break_ties_at_the_next_k():
    from lingregion.experiments import estimators as exp

    res = synthetic(
        core={"0.001": 5.0, "0.01": 5.0},
        en={"0.001": 1, "0.01": 1},
        shuffled={"0.001": 1, "0.01": 1},
        random={"0.001": 0.0, "0.01": 0.1},
    )
    res["estimators"] = ["taylor", "fisher", "wanda"]
    res["damage"] = {
        "taylor": {"0.001": 5.0, "0.01": 5.0},
        "fisher": {"0.001": 5.0, "0.01": 4.0},
        "wanda": {"0.001": 1.0, "0.01": 5.0},
        "random": {"0.001": 0.0, "0.01": 0.1},
    }
    res["damage_by_language"] = {f"{n}@{r}": {"ru": v} for n, c in res["damage"].items() for r, v in c.items()}
    res["answer"] = exp.answer(res)
    first = exp.findings(res)[0]
    assert "0.1% of each importance estimator's scores, taylor does the most damage" in first
    assert "every language past a uniform guess" in first  # 5.0 is this language's cap
    assert "then fisher 5.000, wanda 1.000" in first and "ties broken at 1%" in first


@pytest.mark.integration
def test_real_model_neurons_and_norms_are_all_covered():
    """On the built-in Gemma 3: LAPE finds every layer's MLP neurons, and Wanda scores every scored
    parameter, the per-head q/k norms included, from a forward pass of two short windows."""
    m = models.load()
    t = target(m.module)
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
    t = target(model)
    w = windows(tokenizer, TEXT[:3], "ru", seq_len=8)
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
                part.item("window_sq", n), sum(gs[j][n] ** 2 for j in mine), rtol=1e-5, atol=1e-9
            )
    # and grouping changes the full statistics by rounding only
    plain = importance.collect(t, w, importance.STATS, progress=False)
    for n in t.names:
        torch.testing.assert_close(plain.window_sq[n], stats.window_sq[n], rtol=1e-5, atol=1e-12)
        scale = plain.lang_abs[n].abs().max().item()  # |Σ g| cancels: rounding is relative to the largest entry
        torch.testing.assert_close(plain.lang_abs[n], stats.lang_abs[n], rtol=1e-5, atol=1e-5 * scale)


def test_top_set_and_its_jaccard_equal_select_and_split_half_jaccard(tiny):
    from lingregion import uncertainty

    model = tiny("llama")
    t = target(model)
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


def synthetic_parts(model, names, g, groups=4):
    """Groups of windows with random gradients and squared sums (two windows each, so nothing is derived)."""
    parts = []
    for _ in range(groups):
        p = importance.Part(windows=2, tokens=20)
        for n in names:
            shape = model.get_parameter(n).shape
            p.grad[n] = torch.randn(shape, generator=g)
            p.window_sq[n] = torch.rand(shape, generator=g)
        parts.append(p)
    return parts


def test_within_between_and_specificity_equal_a_direct_computation(tiny):
    from lingregion import uncertainty
    from lingregion.experiments import estimators as exp

    model = tiny("llama")
    t = target(model)
    g = torch.Generator().manual_seed(1)
    langs = {lang: synthetic_parts(model, t.names, g) for lang in ("ru", "uk", "zh")}
    ratio = 0.05
    split = exp.SplitHalf(t, ["taylor", "fisher", "magnitude", "lape"], ratio, seed=3)
    assert split.names == ["taylor", "fisher", "magnitude"]  # lape has no per-language score
    for lang, parts in langs.items():
        split.visit(lang, parts)
    res = split.result(resamples=500)
    assert res["splits"] == 3  # 4 groups: three distinct ways to halve them, odd/even first
    assert res["fewest_windows_per_half"] == 4  # two groups of two windows
    for s in res["split_groups"].values():
        assert s[0] == [0, 2] and sorted(map(tuple, s)) == [(0, 1), (0, 2), (0, 3)]

    delta = {n: (model.get_parameter(n).detach().float() - t.removed[n]) for n in t.names}

    def scores(name, ps):  # the estimator written out, on the sum of the groups `ps` (added as subset adds them)
        total = ps[0]
        for p in ps[1:]:
            total = total + p
        if name == "taylor":
            return {n: delta[n].abs() * total.grad[n].abs() for n in t.names}
        return {n: delta[n].square() * total.window_sq[n] * 0.5 for n in t.names}

    def halves(ps, a):
        return [ps[i] for i in a], [ps[i] for i in range(4) if i not in a]

    for name in ("taylor", "fisher"):
        r = res["estimators"][name]
        # at the budget: even windows (groups 0, 2) against odd (1, 3); at half of it: group 0 against 2
        for label, (ga, gb) in {"budget": ([0, 2], [1, 3]), "half": ([0], [2])}.items():
            for lang, ps in langs.items():
                ref = uncertainty.split_half_jaccard(
                    scores(name, [ps[i] for i in ga]), scores(name, [ps[i] for i in gb]), ratio
                )
                assert r["split_half_jaccard"][label]["by_language"][lang] == pytest.approx(ref, abs=1e-12)
        assert "needs at least 8 windows" in r["split_half_jaccard"]["quarter"]["reason"]
        # specificity: over pairs, mean within − mean of the four half-against-half Jaccards
        per_split = []
        for j in range(3):  # each language draws its own order of the three ways to halve 4 groups
            a = res["split_groups"]["ru"][j]
            h = {
                lang: [scores(name, x) for x in halves(ps, res["split_groups"][lang][j])] for lang, ps in langs.items()
            }
            within = {lang: uncertainty.split_half_jaccard(*h[lang], ratio) for lang in langs}
            diffs = {}
            for x, y in [("ru", "uk"), ("ru", "zh"), ("uk", "zh")]:
                cross = np.mean([uncertainty.split_half_jaccard(p, q, ratio) for p in h[x] for q in h[y]])
                diffs[f"{x}-{y}"] = (within[x] + within[y]) / 2 - cross
                if a == [0, 2]:
                    assert r["between_language_jaccard"]["by_pair"][f"{x}-{y}"] == pytest.approx(cross, abs=1e-12)
            per_split.append(np.mean(list(diffs.values())))
            if a == [0, 2]:
                assert r["specificity"]["value"] == pytest.approx(per_split[-1], abs=1e-12)
                assert r["specificity"]["by_pair"] == pytest.approx(diffs, abs=1e-12)
        assert r["specificity"]["by_split"] == pytest.approx(per_split, abs=1e-12)
        lo, hi = r["specificity"]["ci95"]
        assert min(per_split) - 1 <= lo <= hi <= max(per_split) + 1 and lo < hi
    # the interval is seeded
    assert (
        split.result(resamples=500)["estimators"]["taylor"]["specificity"] == res["estimators"]["taylor"]["specificity"]
    )

    # magnitude reads no text: every half and every language picks the same entries
    m = res["estimators"]["magnitude"]
    assert m["split_half_jaccard"]["budget"]["mean"] == 1.0 and m["split_half_jaccard"]["half"]["mean"] == 1.0
    assert m["between_language_jaccard"]["mean"] == 1.0
    assert m["specificity"]["value"] == 0.0 and m["specificity"]["ci95"] == [0.0, 0.0]


def test_recommendation_follows_its_rule():
    from lingregion.experiments import estimators as exp

    def entry(stab, ci, damage=1.0):
        spec = {"value": sum(ci) / 2, "ci95": list(ci)}
        return {
            "split_half_jaccard": {"budget": {"mean": stab}},
            "specificity": spec,
            "damage_at_overlap_ratio": damage,
        }

    table = {
        "taylor": entry(0.3, (0.01, 0.05)),
        "fisher": entry(0.6, (0.02, 0.04)),
        "taylor-window": entry(0.7, (-0.01, 0.05)),  # most stable, but its interval reaches 0
        "magnitude": entry(1.0, (0.0, 0.0)),
    }
    rec = exp.recommend(table)
    assert rec["estimator"] == "fisher" and rec["qualifying"] == ["taylor", "fisher"]
    assert rec["verdicts"]["taylor-window"] == "inconclusive" and rec["verdicts"]["magnitude"] == "inconclusive"
    table["fisher"] = entry(0.6, (-0.04, -0.02))
    table["taylor"] = entry(0.3, (-0.01, 0.01))
    rec = exp.recommend(table)
    assert rec["estimator"] is None and rec["verdicts"]["fisher"] == "does not hold"
    assert exp.recommendation_text({"recommendation": rec, "by_estimator": table}).startswith("No estimator qualifies")


def test_stability_is_saved_per_estimator_and_read_back(tiny_folder, tmp_path, monkeypatch):
    cfg = Config(
        model=str(tiny_folder),
        seq_len=16,
        score_tokens=32,
        score_langs=["ru", "es", "zh"],
        est_estimators=["taylor", "fisher", "magnitude", "lape"],
        est_tokens=64,
        est_seq_len=8,
        est_eval_tokens=16,
        est_eval_langs=["ru"],
        est_ratios=[0.1],
        est_overlap_ratio=0.1,
        est_outlier_dims=0,
        experiments=["estimators"],
    )
    out = tmp_path / "run"
    res = reproduce(cfg, out, progress=False)["estimators"]
    saved = __import__("json").loads((out / "results" / "estimators-summary.json").read_text())
    table = saved["by_estimator"]
    assert set(table) == {"taylor", "fisher", "magnitude", "lape"}
    for name in ("taylor", "fisher", "magnitude"):
        e = table[name]
        assert set(e["split_half_jaccard"]) == {"budget", "half", "quarter"}
        assert e["split_half_jaccard"]["quarter"]["tokens_per_half"] > 0  # 8 windows per language: every level
        lo, hi = e["specificity"]["ci95"]
        assert (
            lo <= hi
            and e["damage"] == res["damage"][name]
            and e["damage_at_overlap_ratio"] == res["damage"][name]["0.1"]
        )
    assert table["lape"]["specificity"] is None and "compares the languages" in table["lape"]["note"]
    assert table["magnitude"]["specificity"]["value"] == 0.0
    assert res["stability"]["splits"] == exp_splits() and res["recommendation"]["rule"]
    assert (out / "figures" / "estimators-stability.png").read_bytes().startswith(b"\x89PNG")
    report = (out / "report.md").read_text()
    assert "Stable and language-specific?" in report and "Rule: An estimator qualifies" in report

    # a rerun needs no pass: regions and split-half results are both read back
    monkeypatch.setattr(importance, "iter_estimates", lambda *a, **k: pytest.fail("a pass ran again"))
    again = reproduce(cfg, out, progress=False)["estimators"]
    assert again["by_estimator"] == res["by_estimator"]


def exp_splits():
    from lingregion.experiments import estimators as exp

    return exp.SPLITS


def test_monolingual_regions_from_another_estimator_beside_the_papers(tiny_folder, tmp_path):
    from lingregion.regions import Region, monolingual

    base = dict(
        mono_eval_tokens=32,
        eval_langs=["ru", "uk", "es"],
        mono_langs=["ru", "uk", "es"],
        mono_ratio=0.1,
        experiments=["monolingual"],
        gen_tokens=2,
    )
    out = tmp_path / "run"
    cfg = tiny_config(tiny_folder, **base, mono_estimator="fisher")
    res = reproduce(cfg, out, progress=False)["monolingual"]
    # the regions are built from fisher scores of each language's own scoring windows
    m = models.load(str(tiny_folder))
    run = Run(out, cfg, m, progress=False)
    t = importance.Target(m.module, run.names, run.removed)
    tops = {
        lang: select(importance.score("fisher", t, [run.windows(lang, "score")], progress=False), 0.1, "top")
        for lang in cfg.mono_langs
    }
    for lang in cfg.mono_langs:
        saved = Region.load(out / "regions" / f"monolingual-{lang}-0.1-fisher.safetensors")
        assert saved.meta["estimator"] == "fisher"
        assert (saved - monolingual(tops, lang)).count() == 0 and (monolingual(tops, lang) - saved).count() == 0
    assert not (out / "regions" / "monolingual-ru-0.1.safetensors").exists()  # taylor's names stay taylor's
    assert res["estimator"] == "fisher" and res["paper_estimator"]["estimator"] == "taylor"
    assert "The same matrix with the paper's estimator (taylor) instead of fisher" in (out / "report.md").read_text()

    # the paper's matrix shown beside it is the one a taylor run makes, from the same cached evaluations
    paper = reproduce(tiny_config(tiny_folder, **base), out, progress=False)["monolingual"]
    assert paper["ppl_ratio"] == res["paper_estimator"]["ppl_ratio"]
    assert "estimator" not in paper and "paper_estimator" not in paper  # the taylor summary is as before
    assert Region.load(out / "regions" / "monolingual-ru-0.1.safetensors").meta["estimator"] == "taylor"
    names = {p.name for p in (out / "scores").glob("ru*.safetensors")}
    assert {"ru.safetensors", "ru.fisher.safetensors", "ru-16.fisher.safetensors"} <= names


def test_ranks_share_ties_and_compare_damage_curves_in_order():
    from lingregion.experiments import estimators as exp

    assert exp.ranks({"a": 0.2, "b": 0.5, "c": 0.2, "d": None}) == {"a": 2, "b": 1, "c": 2, "d": None}
    # damage at the cap for all at the smallest k: the next k decides
    assert exp.ranks({"a": (9.5, 1.0), "b": (9.5, 2.0), "c": (9.5, 2.0)}) == {"a": 3, "b": 1, "c": 1}
