"""Model + windows → importance of every scored parameter (the paper's first-order Taylor estimate).

I = |(θ − θ_removed) ⊙ g|, with g the gradient of the mean token loss over a language's whole token
budget: gradients are summed over all windows first and multiplied by (θ − θ_removed) once at the end,
as in the paper's code, but summed in fp32 whatever the model's dtype.

Only the scored parameters require gradients, so no weight gradient is computed for the embedding or
the LM head. Each gradient is folded into its fp32 accumulator as soon as autograd produces it and then
dropped, so no full set of `.grad` buffers is ever alive.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .corpus import Windows
from .evaluation import LOGIT_CHUNK, batches, hidden_and_targets, output_head
from .store import LingregionError


def gradient_sum(model, windows: Windows, names: list[str], batch_size: int = 1,
                 progress: bool = True) -> dict[str, torch.Tensor]:
    """Σ over windows of ∂(mean token NLL over all windows)/∂θ for each named parameter, in fp32."""
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise LingregionError(f"parameters not in this model: {', '.join(missing[:3])}; were the scores made for another model?")
    wanted = set(names)
    flags = {n: p.requires_grad for n, p in params.items()}
    acc = {n: torch.zeros(params[n].shape, dtype=torch.float32, device=params[n].device) for n in names}

    def fold(name):
        def hook(p):
            acc[name].add_(p.grad)
            p.grad = None
        return hook

    hooks = [params[n].register_post_accumulate_grad_hook(fold(n)) for n in names]
    for n, p in params.items():
        p.requires_grad_(n in wanted)
    logits_fn = output_head(model)
    device = next(model.parameters()).device
    total = windows.n_tokens
    bar = tqdm(total=len(windows.input_ids), desc=f"score {windows.lang}", unit="win", disable=not progress, leave=False)
    try:
        for ids in batches(windows, batch_size):
            hidden, targets = hidden_and_targets(model, ids.to(device))
            # Backpropagate the output layer chunk by chunk into a detached copy of the hidden states,
            # so that full-vocabulary logits never exist for more than one chunk; then run the
            # transformer's backward once from the summed hidden-state gradient.
            leaf = hidden.detach().requires_grad_(True)
            for i in range(0, len(targets), LOGIT_CHUNK):
                logits = logits_fn(leaf[i:i + LOGIT_CHUNK])
                loss = torch.nn.functional.cross_entropy(logits, targets[i:i + LOGIT_CHUNK], reduction="sum") / total
                loss.backward()
            hidden.backward(leaf.grad)
            bar.update(len(ids))
    finally:
        bar.close()
        for h in hooks:
            h.remove()
        for n, p in params.items():
            p.requires_grad_(flags[n])
            if n in wanted:
                p.grad = None
    return acc


def taylor_importance(model, grads: dict[str, torch.Tensor], removed: dict[str, float]) -> dict[str, torch.Tensor]:
    """|(θ − θ_removed) ⊙ g| in fp32."""
    params = dict(model.named_parameters())
    return {n: ((params[n].detach().float() - removed[n]) * g).abs_() for n, g in grads.items()}


def score(model, windows: Windows, names: list[str], removed: dict[str, float], batch_size: int = 1,
          progress: bool = True) -> dict[str, torch.Tensor]:
    return taylor_importance(model, gradient_sum(model, windows, names, batch_size, progress), removed)


def accumulate(total: dict[str, torch.Tensor], scores: dict[str, torch.Tensor]) -> None:
    """total += scores, in place (the core-region score is the sum over languages)."""
    for n, t in scores.items():
        total[n] = total[n].add_(t) if n in total else t.clone()
