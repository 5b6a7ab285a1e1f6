"""The architecture matrix: every supported family, as a tiny random model, through the whole pipeline
(score → locate → remove and undo → perplexity → structural families → outlier scan → frozen training →
export), each stage checked against a hand computation from the model's own forward pass; the structural
families checked by what the model computes, not by re-deriving each layout's indices; and the one-line
error and the registration of an architecture lingregion does not know."""

import inspect
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AutoModelForCausalLM, LlamaForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from lingregion import api, architectures, corpus, evaluation, export, freezing, interventions, models, scoring, slices
from lingregion.store import LingregionError

from conftest import CONFIGS, IDS, SMALL, TEXT, make_model

# Gemma 2: logits soft-capped (c · tanh(z / c)) and attention scores too, and four norms per layer (input,
# post-attention, pre- and post-feed-forward), each scaling by (1 + w); caps small enough here to bite.
CONFIGS["gemma2"] = lambda: _gemma2()


def _gemma2():
    from transformers import Gemma2Config

    return Gemma2Config(
        **SMALL,
        **IDS,
        intermediate_size=48,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=16,
        final_logit_softcapping=0.25,
        attn_logit_softcapping=0.5,
        query_pre_attn_scalar=16,
    )


ARCHS = [
    "gemma3",
    "gemma2",
    "llama",
    "llama3",
    "qwen2",
    "qwen3",
    "mistral",
    "phi3",
    "gpt2",
    "gpt_neox",
    "olmo2",
    "bloom",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
]
MOE = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe"}
POST_NORM = {"olmo2"}  # no input norm: single-parameter perturbation does not apply
HIDDEN = 32
RATIO = 0.05


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread while these tests run: on 32-wide matrices a second thread only adds
    synchronisation, and on a busy CI machine its spin-waits made a forward pass ~80× slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_bits_equal(model, before):
    for n, p in model.named_parameters():
        assert torch.equal(p.detach().view(torch.uint8), before[n].view(torch.uint8)), n


def handle(arch, tokenizer):
    m = make_model(arch)
    names = models.scored_names(m)
    return models.Model(m, tokenizer, {"fingerprint": models.fingerprint(m)}, names, models.removed_values(m, names))


def windows(tokenizer):
    return corpus.make_windows(tokenizer, TEXT, 24, 10_000, "mix", "eval", "test")


def hand_nll(model, ids):
    """Σ NLL of a batch from the model's own logits."""
    logits = model(input_ids=ids).logits.float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")


def hand_ppl(model, w):
    with torch.no_grad():
        nll = sum(hand_nll(model, ids).double() for ids in evaluation.batches(w, 4))
    return torch.exp(nll / w.n_tokens).item()


def matrices(name, t):
    """A parameter's matrices for per-matrix selection: the experts of a stack one by one."""
    return list(t) if t.dim() == 3 else [t]


@pytest.mark.parametrize("arch", ARCHS)
def test_whole_pipeline(arch, tokenizer, tmp_path):
    m = handle(arch, tokenizer)
    model, w = m.module, windows(tokenizer)
    before = state(model)

    # score: |(θ − θ_removed) ⊙ g|, g from autograd on the model's own loss
    scores = scoring.score(model, w, m.names, m.removed, batch_size=4, progress=False)
    params = dict(model.named_parameters())
    grads = {n: torch.zeros_like(params[n]) for n in m.names}
    for ids in evaluation.batches(w, 4):
        g = torch.autograd.grad(hand_nll(model, ids) / w.n_tokens, [params[n] for n in m.names], allow_unused=True)
        for n, gi in zip(m.names, g):
            grads[n] += 0 if gi is None else gi
    for n in m.names:
        want = ((params[n].detach() - m.removed[n]) * grads[n]).abs()
        torch.testing.assert_close(scores[n], want, rtol=1e-3, atol=1e-4 * float(want.max()) + 1e-12)
    routers = architectures.routers(model)
    assert bool(routers) == (arch in MOE)
    assert set(routers) <= set(m.names)  # models.ROUTER_SCORED: routers are scored like any matrix
    if arch in MOE:
        assert any(scores[n].any() for n in routers)
        assert any(scores[n].dim() == 3 for n in m.names)  # stacked experts are scored entry by entry

    # locate: the Top RATIO of every matrix, each expert of a stack its own matrix
    region = api.core(scores, RATIO)
    for n in m.names:
        mask = region.mask(n)
        for s, k in zip(matrices(n, scores[n]), matrices(n, mask)):
            assert int(k.sum()) == round(RATIO * s.numel())
            if k.any() and (~k).any():
                assert s[k].min() >= s[~k].max()

    # remove and undo
    edits = interventions.removal(region, m.removed)
    base = evaluation.perplexity(model, w, 4, False)["ppl"]
    assert base == pytest.approx(hand_ppl(model, w), rel=1e-5)
    with interventions.applied(model, edits):
        for n in m.names:
            p, mask = params[n].detach(), region.mask(n)
            assert torch.all(p[mask] == m.removed[n])
            assert torch.equal(p[~mask], before[n][~mask])
        removed_ppl = evaluation.perplexity(model, w, 4, False)["ppl"]
        assert removed_ppl == pytest.approx(hand_ppl(model, w), rel=1e-5)
        edited = state(model)
    assert removed_ppl != base
    assert_bits_equal(model, before)

    # structural families: the Top-ranked dimensions, removed and undone
    for family in slices.FAMILIES:
        fam_edits, picks = slices.removal(model, region, family, 3, "top")
        assert all(len(v) == 3 for v in picks.values())
        with interventions.applied(model, fam_edits):
            assert all(torch.all(params[e.name].detach().reshape(-1)[e.index] == 0) for e in fam_edits)
            ppl = evaluation.perplexity(model, w, 4, False)["ppl"]
            assert ppl == pytest.approx(hand_ppl(model, w), rel=1e-5) and ppl != base
        assert_bits_equal(model, before)

    # outlier scan: residual peaks and perturbation changes by hand
    if arch in POST_NORM:
        with pytest.raises(architectures.NotApplicable, match="post-norm"):
            slices.scan(model, [w], [0, 1], batch_size=4, progress=False)
        result = slices.scan(model, [w], [], batch_size=4, progress=False)  # massive activations still apply
    else:
        result = slices.scan(model, [w], [0, 1], batch_size=4, progress=False)
    with torch.no_grad():
        hs = [model(input_ids=ids, output_hidden_states=True).hidden_states for ids in evaluation.batches(w, 4)]
    for layer in range(2):
        x = torch.cat([h[layer].reshape(-1, HIDDEN) for h in hs])  # residual stream entering the layer
        assert torch.equal(result.peak[layer], x.abs().amax(0))
        if arch in POST_NORM:
            continue
        norm = architectures.input_norms(model)[layer]
        module = model.get_submodule(norm.rpartition(".")[0])
        if isinstance(module, torch.nn.LayerNorm):
            xhat = F.layer_norm(x, (HIDDEN,), eps=module.eps)
        else:
            eps = getattr(module, "variance_epsilon", None) or module.eps
            xhat = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        wt = params[norm].detach()
        s = 1 + wt if slices.is_offset(model, norm) else wt
        y = module(x).detach()
        for kind, new in (("reset", torch.ones_like(s)), ("x10", 10 * s)):
            want = (xhat * (new - s)).abs().div(y.norm(dim=-1, keepdim=True)).amax(0)
            torch.testing.assert_close(result.change[kind][layer], want, rtol=1e-4, atol=1e-6)
    assert_bits_equal(model, before)

    # export: a plain HF folder with the region removed; reloads to the edited weights, bit for bit
    out = export.export(model, tokenizer, tmp_path / "out", edits, {"kind": "region removal"})
    assert_bits_equal(model, before)
    again = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert_bits_equal(again, edited)
    assert evaluation.perplexity(again, w, 4, False)["ppl"] == removed_ppl

    # frozen training: the region holds its removed value bit for bit while everything else trains
    cfg = freezing.TrainConfig(steps=2, lr=1e-2, warmup=0, batch_size=2)
    history = freezing.train(model, w, cfg, frozen=region, frozen_values=m.removed, progress=False)
    assert len(history["loss"]) == 2 and history["frozen_entries"] == region.count()
    for n in m.names:
        p, mask = params[n].detach(), region.mask(n)
        assert torch.equal(p[mask].view(torch.uint8), edited[n][mask].view(torch.uint8)), n
    trained = [n for n in m.names if not torch.equal(params[n].detach()[~region.mask(n)], edited[n][~region.mask(n)])]
    assert set(routers) <= set(trained) and len(trained) >= 0.8 * len(m.names)


# --- the structural families cut what they name, read off the model's own computation ---------------------
CAPTURED: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []


def _capture(module, query, key, value, attention_mask, **kwargs):
    CAPTURED.append((query.detach(), key.detach(), value.detach()))
    if kwargs.get("softcap"):  # soft-capped scores (Gemma 2): sdpa has no cap, the model's own eager code has
        eager = sys.modules[type(module).__module__].eager_attention_forward
        return eager(module, query, key, value, attention_mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register("lingregion_capture", _capture)


def qkv_per_head(model, arch, ids):
    """Each layer's q, k, v as the attention computes with them, [batch, heads, tokens, head_dim], at
    position 0 for every token, so that rotary embeddings are the identity and a cut row stays constant."""
    CAPTURED.clear()
    if arch == "bloom":  # BLOOM has its own attention code: read its split of the fused matrix
        for block in model.transformer.h:
            attn = block.self_attention
            split = attn._reshape

            def reshape(fused, split=split):
                q, k, v = split(fused)
                CAPTURED.append((q.detach(), k.detach(), v.detach()))
                return q, k, v

            attn._reshape = reshape
    else:
        model.set_attn_implementation("lingregion_capture")
    kwargs = (
        {"position_ids": torch.zeros_like(ids)} if "position_ids" in inspect.signature(model.forward).parameters else {}
    )
    try:
        with torch.no_grad():
            model(input_ids=ids, **kwargs)
    finally:
        if arch == "bloom":
            for block in model.transformer.h:
                del block.self_attention._reshape
    out = list(CAPTURED)
    assert len(out) == 2
    return out


def constant_over_tokens(t):
    """t [..., tokens]: equal at every token."""
    return bool((t == t[..., :1]).all())


def module_of(model, name):
    return model.get_submodule(name.rpartition(".")[0])


def differ_at(d, shape=(1, 7, HIDDEN), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x2 = x.clone()
    x2[..., d] += 3.0
    return x, x2


@pytest.mark.parametrize("arch", ARCHS)
def test_structural_families_cut_what_they_name(arch, tokenizer):
    model = make_model(arch)
    before = state(model)
    n, kv, hd = architectures.heads(model)
    ids = windows(tokenizer).input_ids[0][None, :12]
    found = architectures.role_matrices(model)
    by_role = {}
    for b in found:
        by_role.setdefault((b.layer, b.role), []).append(b)

    # head: query head h's dimension p, and the k/v head it reads, are cut in q, k, v and o
    picked = [1, 9, 17, 30]
    group_map = slices.groups(model, "head")
    edits = slices.edits_for(group_map, {space: torch.tensor(picked) for space in group_map})
    rows = {e.name: len(e.index) for e in edits}
    kv_rows = len({(i // hd // (n // kv)) * hd + i % hd for i in picked})
    with interventions.applied(model, edits):
        captured = qkv_per_head(model, arch, ids)
        for q, k, v in captured:
            for i in range(n * hd):
                h, p = divmod(i, hd)
                cut = i in picked
                assert constant_over_tokens(q[0, h, :, p]) == cut, (i, "q")
                g = h // (n // kv)
                cut_kv = any(j // hd // (n // kv) == g and j % hd == p for j in picked)
                assert constant_over_tokens(k[0, g, :, p]) == cut_kv, (i, "k")
                assert constant_over_tokens(v[0, g, :, p]) == cut_kv, (i, "v")
        for layer in range(2):
            (o,) = by_role[layer, "o"]
            z, z2 = differ_at(picked[0], (1, 5, n * hd))
            mod = module_of(model, o.name)
            assert torch.equal(mod(z), mod(z2))  # o no longer reads the cut head dimension
    assert sum(rows.values()) == 2 * (2 * len(picked) + 2 * kv_rows) * HIDDEN  # q, o and k, v of both layers
    assert_bits_equal(model, before)

    # feature+ffn: residual dimension d is neither read nor written by attention or the MLP (MoE: experts,
    # shared expert and router alike)
    d = 20
    group_map = slices.groups(model, "feature+ffn")
    edits = slices.edits_for(group_map, {"residual": torch.tensor([d])})
    with interventions.applied(model, edits):
        for layer in range(2):
            x, x2 = differ_at(d)
            for role in ("q", "k", "v"):
                mod = module_of(model, by_role[layer, role][0].name)
                assert torch.equal(mod(x), mod(x2)), role
            (o,) = by_role[layer, "o"]
            z = torch.randn(1, 5, n * hd)
            assert constant_over_tokens(module_of(model, o.name)(z)[0, :, d])
            mlp = module_of(model, by_role[layer, "down"][0].name.removesuffix(".weight"))
            if arch in MOE or mlp.__class__.__name__.endswith("Experts"):
                mlp = model.get_submodule(by_role[layer, "down"][0].name.split(".experts.")[0])
            extra = (torch.zeros_like(x),) if arch == "bloom" else ()  # BLOOM's MLP adds the residual itself
            y, y2 = mlp(x, *extra), mlp(x2, *extra)
            y, y2 = (y[0], y2[0]) if isinstance(y, tuple) else (y, y2)
            assert torch.equal(y, y2)  # the MLP does not read d
            assert constant_over_tokens(y[0, :, d])  # nor write it
            others = [c for c in range(HIDDEN) if c != d]
            assert not constant_over_tokens(y[0, :, others].T)
    assert_bits_equal(model, before)


# --- an architecture lingregion does not know -------------------------------------------------------------
class FooForCausalLM(LlamaForCausalLM):
    """A LLaMA whose attention output projection and input norm have names no mapping knows."""


def foo_model():
    torch.manual_seed(0)
    model = FooForCausalLM(CONFIGS["llama"]())
    for layer in model.model.layers:
        layer.self_attn.wo = layer.self_attn.o_proj
        del layer.self_attn.o_proj
        layer.pre_attn_norm = layer.input_layernorm
        del layer.input_layernorm
    return model


def test_unknown_architecture_says_what_is_missing_and_how_to_register_it(monkeypatch):
    model = foo_model()
    with pytest.raises(LingregionError) as e:
        slices.slices(model, "feature")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("cannot find the attention output projection of layer 0 in FooForCausalLM")
    assert "self_attn.wo" in msg and "lingregion.architectures.register(SUFFIX, 'o')" in msg
    with pytest.raises(LingregionError, match=r"input \(pre-attention\) norm of layer 0 in FooForCausalLM") as e:
        architectures.input_norms(model)
    assert "pre_attn_norm" in str(e.value) and "register(SUFFIX, 'input_norm')" in str(e.value)

    monkeypatch.setattr(architectures, "MAPPINGS", dict(architectures.MAPPINGS))  # registrations end with the test
    architectures.register("self_attn.wo", "o")
    architectures.register("pre_attn_norm", "input_norm")
    assert architectures.input_norms(model) == [f"model.layers.{i}.pre_attn_norm.weight" for i in range(2)]
    edits = slices.dimension_removal(model, [7])
    wo = {e.name: e.index for e in edits}["model.layers.1.self_attn.wo.weight"]
    assert torch.equal(wo, torch.arange(7 * HIDDEN, 8 * HIDDEN))  # row 7 of o: what attention writes into 7

    with pytest.raises(LingregionError, match="unknown role"):
        architectures.register("mlp.w9", "feed")
    with pytest.raises(LingregionError, match="suffix"):
        architectures.register("self_attn.wo.weight", "o")


def test_an_unmapped_extra_matrix_is_named(monkeypatch):
    model = make_model("llama")
    model.model.layers[1].mlp.w_extra = torch.nn.Linear(HIDDEN, HIDDEN, bias=False)
    with pytest.raises(LingregionError, match=r"layer 1 has a matrix 'mlp.w_extra' that no mapping places") as e:
        architectures.role_matrices(model)
    assert "\n" not in str(e.value)
    monkeypatch.setattr(architectures, "MAPPINGS", dict(architectures.MAPPINGS))
    architectures.register("mlp.w_extra", "other")  # leave it out of the structural families
    assert "model.layers.1.mlp.w_extra.weight" not in {b.name for b in architectures.role_matrices(model)}


def test_router_choice_is_visible_and_switchable(monkeypatch, tokenizer):
    model = make_model("mixtral")
    routers = architectures.routers(model)
    assert routers == [f"model.layers.{i}.mlp.gate.weight" for i in range(2)]
    assert set(routers) <= set(models.scored_names(model))
    monkeypatch.setattr(models, "ROUTER_SCORED", False)
    assert not set(routers) & set(models.scored_names(model))
    assert "router" in models.ROUTER_NOTE and architectures.routers(make_model("llama")) == []


def test_router_note_reaches_the_provenance(tmp_path, tokenizer):
    model = make_model("qwen2_moe")
    model.save_pretrained(tmp_path / "moe")
    tokenizer.save_pretrained(tmp_path / "moe")
    m = models.load(str(tmp_path / "moe"))
    assert m.info["router"] == models.ROUTER_NOTE
    assert "model.layers.0.mlp.shared_expert_gate.weight" in m.names


def test_gemma2_caps_its_logits_and_removes_its_four_norms_at_minus_one(tokenizer):
    """Gemma 2's output layer is soft-capped, and lingregion's own output pass applies the same cap; each of its
    four (1 + w) norms per layer is removed at w = −1."""
    m = handle("gemma2", tokenizer)
    head, cap = evaluation.output_layer(m.module)
    assert cap == 0.25
    ids = windows(tokenizer).input_ids[0][None]
    with torch.no_grad():
        hidden, targets = evaluation.hidden_and_targets(m.module, ids)
        logits = m.module(input_ids=ids).logits[0, :-1].float()
        assert logits.abs().max() <= cap  # the cap bites: uncapped logits of this model exceed it
        assert head(hidden).abs().max() > cap
        want = F.cross_entropy(logits, targets, reduction="none")
        torch.testing.assert_close(evaluation.token_nll(m.module, hidden, targets), want, rtol=1e-5, atol=1e-5)
    norms = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
    for layer in range(2):
        for norm in norms:
            assert m.removed[f"model.layers.{layer}.{norm}.weight"] == -1.0
