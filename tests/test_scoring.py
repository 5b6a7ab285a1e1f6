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


# --- split halves --------------------------------------------------------------------------------------
def test_halves_off_scores_are_the_previous_computation(tiny, tokenizer):
    """halves=False gives bit for bit what one fp32 accumulator taking the batches in order gives, the
    loop as it was before halves existed."""
    from lingregion.evaluation import batches

    model = tiny("llama")
    w = windows(tokenizer, seq_len=8)
    names = models.scored_names(model)
    removed = models.removed_values(model, names)
    params = dict(model.named_parameters())
    for n, p in params.items():
        p.requires_grad_(n in names)
    acc = {}
    for ids in batches(w, 2):
        scoring._backward(model, ids, w.n_tokens)
        for n in names:
            g, params[n].grad = params[n].grad, None
            acc[n] = acc[n].add_(g) if n in acc else g
    for p in params.values():
        p.requires_grad_(True)
    want = scoring.taylor_importance(model, acc, removed)
    got = scoring.score(model, w, names, removed, batch_size=2, progress=False)
    assert all(torch.equal(got[n], want[n]) for n in names)


def test_half_sums_add_up_to_the_full_sum_and_are_the_even_and_odd_windows(tiny, tokenizer):
    import dataclasses

    model = tiny("gemma3")
    w = windows(tokenizer, seq_len=8)
    assert len(w.input_ids) >= 6  # batches of 2 would mix the halves if they could
    names = models.scored_names(model)
    removed = models.removed_values(model, names)
    _, a, b = scoring.gradient_sum(model, w, names, batch_size=2, progress=False, halves=True)
    split = scoring.score(model, w, names, removed, batch_size=2, progress=False, halves=True)
    full = scoring.taylor_importance(model, {n: a[n] + b[n] for n in names}, removed)
    alone = scoring.score(model, w, names, removed, batch_size=2, progress=False)
    for n in names:
        assert torch.equal(split.full[n], full[n])  # the stored scores are those of A + B, bit for bit
        assert torch.equal(split.a[n], scoring.taylor_importance(model, {n: a[n]}, removed)[n])
        assert torch.equal(split.b[n], scoring.taylor_importance(model, {n: b[n]}, removed)[n])
        torch.testing.assert_close(split.full[n], alone[n], rtol=1e-5, atol=1e-7)  # rounding apart
    # A is the even-numbered windows' gradient, B the odd ones', each a share of the mean over all windows
    for half, parity in ((a, 0), (b, 1)):
        part = dataclasses.replace(w, input_ids=w.input_ids[parity::2])
        want = scoring.gradient_sum(model, part, names, batch_size=2, progress=False)
        for n in names:
            torch.testing.assert_close(half[n], want[n] * (part.n_tokens / w.n_tokens), rtol=1e-4, atol=1e-7)


def test_halving_a_sample_of_matrices_keeps_their_halves_and_one_sum_for_the_rest(tiny, tokenizer):
    """halves=names: those names get the halves that halves=True gives them, bit for bit (on the CPU), the
    others one accumulator; every full sum is the sum over all windows."""
    model = tiny("llama")
    w = windows(tokenizer, seq_len=8)
    names = models.scored_names(model)
    halved = names[1::3]
    every = scoring.gradient_sum(model, w, names, progress=False, halves=True)
    some = scoring.gradient_sum(model, w, names, progress=False, halves=halved)
    plain = scoring.gradient_sum(model, w, names, progress=False)
    assert list(some.a) == list(some.b) == halved and list(some.full) == names
    for n in halved:
        assert torch.equal(some.a[n], every.a[n]) and torch.equal(some.b[n], every.b[n])
        assert torch.equal(some.full[n], every.full[n])
        assert torch.equal(some.full[n], (some.a[n] + some.b[n]).to(some.full[n].device))
    for n in names:
        torch.testing.assert_close(some.full[n], plain[n], rtol=1e-5, atol=1e-7)  # rounding apart


def test_with_two_windows_halved_scores_are_the_plain_scores_bit_for_bit(tiny, tokenizer):
    """One window per half: A + B adds the same two gradients in the same order as one accumulator."""
    import dataclasses

    model = tiny("gemma3")
    w = windows(tokenizer, seq_len=8)
    w = dataclasses.replace(w, input_ids=w.input_ids[:2])
    names = models.scored_names(model)
    removed = models.removed_values(model, names)
    split = scoring.score(model, w, names, removed, progress=False, halves=names[::2])
    plain = scoring.score(model, w, names, removed, progress=False)
    assert all(torch.equal(split.full[n], plain[n]) for n in names)


class _Killed(Exception):
    pass


def test_halves_resume_from_a_checkpoint_bit_identical(tiny, tokenizer, tmp_path, monkeypatch):
    from lingregion import checkpoint
    from lingregion.store import read_tensors

    model = tiny("llama")
    w = windows(tokenizer, seq_len=8)
    names = models.scored_names(model)
    want = scoring.gradient_sum(model, w, names, progress=False, halves=True)
    path = tmp_path / "score.safetensors"
    real = checkpoint.Checkpoint.update

    def update_then_die(self, sums, batches, n_windows):
        real(self, sums, batches, n_windows)
        if self.saved_at == n_windows:
            raise _Killed

    monkeypatch.setattr(checkpoint.Checkpoint, "update", update_then_die)
    with pytest.raises(_Killed):
        scoring.gradient_sum(model, w, names, progress=False, checkpoint=path, every=2, halves=True)
    saved, meta = read_tensors(path)
    assert meta["windows"] == 2 and {k[:2] for k in saved} == {"a/", "b/"}  # one window of each half
    monkeypatch.setattr(checkpoint.Checkpoint, "update", real)
    got = scoring.gradient_sum(model, w, names, progress=False, checkpoint=path, every=2, halves=True)
    assert all(torch.equal(g[n], h[n]) for g, h in zip(got, want) for n in names)
    assert not path.exists()


def test_halves_follow_the_global_window_number_across_processes(tiny, tokenizer, monkeypatch):
    """Three ranks, the all-reduce simulated: a window's half is its parity among all windows, so each
    rank's A and B add up to the single process's."""
    from lingregion import distributed

    model = tiny("llama")
    w = windows(tokenizer, seq_len=8)
    names = models.scored_names(model)
    want = scoring.gradient_sum(model, w, names, progress=False, halves=True)
    sent = {}
    for rank in (1, 2):
        monkeypatch.setattr(distributed, "world", lambda rank=rank: (rank, 3))
        monkeypatch.setattr(
            distributed, "sum_", lambda ts, rank=rank: sent.setdefault(rank, []).append([t.clone() for t in ts])
        )
        scoring.gradient_sum(model, w, names, progress=False, halves=True)
    calls = iter(range(2))

    def all_reduce(ts):
        i = next(calls)
        for j, t in enumerate(ts):
            t += sent[1][i][j] + sent[2][i][j]

    monkeypatch.setattr(distributed, "world", lambda: (0, 3))
    monkeypatch.setattr(distributed, "sum_", all_reduce)
    got = scoring.gradient_sum(model, w, names, progress=False, halves=True)
    for g, h in zip(got, want):
        for n in names:
            torch.testing.assert_close(g[n], h[n], rtol=1e-5, atol=1e-7)
