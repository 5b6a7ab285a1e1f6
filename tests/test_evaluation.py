"""Perplexity and bits per byte against a hand computation, and the blocked output layer against a full
log-softmax."""

import math

import pytest
import torch

from lingregion import corpus, evaluation

from conftest import TEXT, VOCAB


@pytest.mark.parametrize("family", ["gemma3", "gpt2"])
def test_perplexity_equals_hand_computation(tiny, tokenizer, family):
    model = tiny(family)
    w = corpus.make_windows(tokenizer, TEXT, 16, 10_000, "mix", "eval", "test")
    got = evaluation.perplexity(model, w, batch_size=3, progress=False)
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for ids in w.input_ids:
            logp = torch.log_softmax(model(input_ids=ids[None]).logits[0, :-1].double(), -1)
            nll -= logp.gather(1, ids[1:, None]).sum().item()
            tokens += len(ids) - 1
    assert got["tokens"] == tokens
    assert got["nll"] == pytest.approx(nll, rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    total_bytes = len(corpus.SEPARATOR.join(TEXT).encode())  # every token is predicted, all text used
    assert got["bytes"] == total_bytes
    assert got["bpb"] == pytest.approx(nll / math.log(2) / total_bytes, rel=1e-5)


@pytest.mark.parametrize("case", ["gemma3-softcap", "llama-bias", "gemma3-bf16"])
def test_blocked_token_nll_equals_full_log_softmax(tiny, monkeypatch, case):
    """Blocks of 5 positions × 7 vocabulary entries (partial last blocks on both axes) give every
    position's −log p(target) from the model's own logits."""
    family = case.split("-")[0]
    model = tiny(family, dtype=torch.bfloat16 if case.endswith("bf16") else torch.float32)
    if case.endswith("softcap"):
        model.config.final_logit_softcapping = 3.0
    if case.endswith("bias"):
        head = torch.nn.Linear(32, VOCAB, bias=True)
        with torch.no_grad():
            head.weight.copy_(model.lm_head.weight)
            head.bias.normal_(0.0, 2.0)
        model.lm_head = head
    monkeypatch.setitem(evaluation.TILES, "cpu", (5, 7))
    ids = torch.randint(3, VOCAB, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden, targets = evaluation.hidden_and_targets(model, ids)
        got = evaluation.token_nll(model, hidden, targets)
        logits = model(input_ids=ids).logits[:, :-1].reshape(-1, VOCAB).float().double()
    want = -torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)
    if case.endswith("softcap"):  # the cap is applied: uncapped logits give a different answer
        model.config.final_logit_softcapping = None
        with torch.no_grad():
            assert not torch.allclose(evaluation.token_nll(model, hidden, targets).double(), want, atol=1e-3)
