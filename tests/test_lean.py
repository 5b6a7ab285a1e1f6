"""The lean passes against plain autograd on a model whose output layer soft-caps its logits (the
in-place logits gradient then carries the tanh's slope)."""

import torch
from transformers import AutoModelForCausalLM

from lingregion import corpus, evaluation, models, scoring

from conftest import CONFIGS, TEXT


def capped_gemma(cap=3.0):
    config = CONFIGS["gemma3"]()
    config.final_logit_softcapping = cap  # small, so that the cap really bends the logits
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def test_soft_capped_scores_equal_autograd(tokenizer):
    model = capped_gemma()
    w = corpus.make_windows(tokenizer, TEXT[:2], 12, 10_000, "mix", "score", "test")
    names = models.scored_names(model)
    removed = models.removed_values(model, names)
    ours = scoring.score(model, w, names, removed, batch_size=2, progress=False)
    for p in model.parameters():
        p.requires_grad_(True)
    loss = sum(model(input_ids=ids[None], labels=ids[None]).loss * (len(ids) - 1) for ids in w.input_ids) / w.n_tokens
    loss.backward()
    params = dict(model.named_parameters())
    for n in names:
        torch.testing.assert_close(
            ours[n], ((params[n].detach() - removed[n]) * params[n].grad).abs(), rtol=1e-4, atol=1e-7
        )


def test_soft_capped_perplexity_equals_the_models_loss(tokenizer):
    model = capped_gemma()
    w = corpus.make_windows(tokenizer, TEXT, 12, 10_000, "mix", "eval", "test")
    with torch.no_grad():
        want = sum(model(input_ids=ids[None], labels=ids[None]).loss.double() * (len(ids) - 1) for ids in w.input_ids)
    got = evaluation.perplexity(model, w, batch_size=3, progress=False)
    assert abs(got["nll"] - want.item()) <= 1e-6 * want.item()
