"""Edits applied to a loaded model and undone bit for bit: region removal, overlapping edits, errors."""

import pytest
import torch

from lingregion import corpus, evaluation, interventions, models
from lingregion.regions import select

from conftest import TEXT


def state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_then_undo_is_bit_identical(tiny, dtype):
    model = tiny("gemma3", dtype=dtype)
    before = state(model)
    names = models.scored_names(model)
    removed = models.removed_values(model, names)
    sc = {n: torch.rand(before[n].shape) for n in names}
    region = select(sc, 0.3, "top")
    edits = interventions.removal(region, removed)
    # overlapping edits on the same entries too: undo must run in reverse order
    edits += [interventions.Edit(names[0], torch.arange(5), torch.full((5,), 7.0))]
    handle = interventions.apply(model, edits)
    params = dict(model.named_parameters())
    for n in names[1:]:
        assert torch.all(params[n].reshape(-1)[region.indices(n)] == removed[n])
        untouched = ~region.mask(n)
        assert torch.equal(params[n][untouched], before[n][untouched])  # nothing else moved
    assert torch.all(params[names[0]].reshape(-1)[:5] == 7.0)
    handle.undo()
    for n, p in model.named_parameters():  # compare raw bits, so -0.0 vs 0.0 or NaN payloads would show
        assert torch.equal(p.detach().view(torch.uint8), before[n].view(torch.uint8))


def test_context_manager_restores_on_error(tiny):
    model = tiny("llama")
    before = state(model)
    name = models.scored_names(model)[0]
    with pytest.raises(RuntimeError):
        with interventions.applied(model, [interventions.Edit(name, torch.arange(3), 0.0)]):
            raise RuntimeError("boom")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_removal_changes_perplexity_and_undo_restores_it(tiny, tokenizer):
    model = tiny("llama")
    w = corpus.make_windows(tokenizer, TEXT, 16, 64, "mix", "eval", "test")
    base = evaluation.perplexity(model, w, progress=False)["nll"]
    names = models.scored_names(model)
    region = select({n: p.detach().abs() for n, p in model.named_parameters() if n in names}, 0.5, "top")
    with interventions.applied(model, interventions.removal(region, models.removed_values(model, names))):
        assert evaluation.perplexity(model, w, progress=False)["nll"] != base
    assert evaluation.perplexity(model, w, progress=False)["nll"] == base
