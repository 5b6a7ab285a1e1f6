import pytest
import torch

from lingregion import corpus, models, scoring

from conftest import TEXT


def windows(tokenizer, seq_len=12):
    # the text runs out before the budget, so the last window is shorter than the others
    return corpus.make_windows(tokenizer, TEXT[:2], seq_len, 10_000, "mix", "score", "test")


def reference_importance(model, w, names, removed):
    """Independent computation: the HF loss of every window, token-weighted into one mean, one backward
    with every parameter requiring grad, then |(θ − θ_removed) · g|."""
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(True)
    total = w.n_tokens
    loss = sum(model(input_ids=ids[None], labels=ids[None]).loss * (len(ids) - 1) for ids in w.input_ids) / total
    loss.backward()
    params = dict(model.named_parameters())
    return {n: ((params[n].detach() - removed[n]) * params[n].grad).abs() for n in names}


@pytest.mark.parametrize("family", ["gemma3", "llama", "qwen2", "gpt2"])
def test_scores_equal_independent_autograd(tiny, tokenizer, family):
    model = tiny(family)
    w = windows(tokenizer)
    assert len(w.input_ids) >= 3 and len(w.input_ids[-1]) < len(w.input_ids[0])  # a short last window too
    names = models.scored_names(model)
    removed = models.removed_values(model, names)
    ours = scoring.score(model, w, names, removed, batch_size=2, progress=False)
    ref = reference_importance(model, w, names, removed)
    assert set(ours) == set(names)
    for n in names:
        assert ours[n].dtype == torch.float32
        torch.testing.assert_close(ours[n], ref[n], rtol=1e-4, atol=1e-7)


def test_only_scored_parameters_get_gradients(tiny, tokenizer):
    model = tiny("gemma3")
    names = models.scored_names(model)
    seen = []
    emb = model.get_input_embeddings().weight
    emb.register_hook(lambda g: seen.append(g))
    scoring.gradient_sum(model, windows(tokenizer), names, progress=False)
    assert seen == []  # no weight gradient for the embedding / tied LM head
    assert all(p.grad is None for p in model.parameters())  # nothing left behind
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_gemma_norms_are_removed_at_minus_one(tiny):
    gemma, llama = tiny("gemma3"), tiny("llama")
    g = models.removed_values(gemma, models.scored_names(gemma))
    norms = [n for n in g if "norm" in n]
    assert norms and all(g[n] == -1.0 for n in norms)
    assert all(v == 0.0 for n, v in g.items() if "norm" not in n)
    ll = models.removed_values(llama, models.scored_names(llama))
    assert all(v == 0.0 for v in ll.values())
    # θ_removed really switches the norm off: its output is exactly zero
    norm = gemma.model.layers[0].input_layernorm
    with torch.no_grad():
        norm.weight.fill_(-1.0)
        assert norm(torch.randn(3, 32)).abs().max() == 0


def test_bf16_model_accumulates_in_fp32(tiny, tokenizer):
    model = tiny("llama", dtype=torch.bfloat16)
    names = models.scored_names(model)
    g = scoring.gradient_sum(model, windows(tokenizer), names, progress=False)
    assert all(t.dtype == torch.float32 for t in g.values())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_default_scope_is_transformer_layers(tiny):
    for family in ["gemma3", "llama", "qwen2", "gpt2"]:
        model = tiny(family)
        names = models.scored_names(model)
        assert names and all(".layers." in n or ".h." in n for n in names)
        assert not any("embed" in n or "wte" in n or "lm_head" in n for n in names)
    model = tiny("llama")
    only_mlp = models.scored_names(model, include=r"mlp\.", exclude="down_proj")
    assert only_mlp and all("mlp" in n and "down" not in n for n in only_mlp)
