"""Model + windows → importance of every scored parameter (the paper's first-order Taylor estimate).

I = |(θ − θ_removed) ⊙ g|, with g the gradient of the mean token loss over a language's whole token
budget: gradients are summed over all windows first and multiplied by (θ − θ_removed) once at the end,
as in the paper's code, but summed in fp32 whatever the model's dtype.

Only the scored parameters require gradients, so no weight gradient is computed for the embedding or
the LM head. Each gradient is folded into its fp32 accumulator as soon as autograd produces it and then
dropped, so no full set of `.grad` buffers is ever alive. Peak memory is the weights, one fp32
accumulator per scored parameter, the activations of one batch and one output-layer chunk.

Under torchrun each process sums its share of the windows and the sums are all-reduced once; with a
checkpoint path the sums are saved every few windows and a rerun resumes from them (see checkpoint.py).
"""

from __future__ import annotations

import hashlib
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import distributed
from .checkpoint import CHECKPOINT_EVERY, Checkpoint, windows_digest
from .corpus import Windows
from .evaluation import (
    LOGIT_CHUNK,
    batches,
    check_output_layer,
    hidden_and_targets,
    output_layer,
)
from .models import fingerprint, input_device
from .store import LingregionError


@contextmanager
def _folded_into(params: dict[str, torch.nn.Parameter], acc: dict[str, torch.Tensor | None]):
    """Within the block only the parameters of `acc` require grad, and each gradient autograd makes is
    added to its accumulator and dropped at once; flags are restored afterwards. An accumulator that is
    still None takes over the first (fp32) gradient itself, which spares zero-filling and one addition."""

    def fold(name):
        def hook(p):
            g, p.grad = p.grad, None
            if acc[name] is None:
                acc[name] = g if g.dtype == torch.float32 else g.float()
            else:
                acc[name].add_(g)

        return hook

    flags = {n: p.requires_grad for n, p in params.items()}
    hooks = [params[n].register_post_accumulate_grad_hook(fold(n)) for n in acc]
    for n, p in params.items():
        p.requires_grad_(n in acc)
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        for n, p in params.items():
            p.requires_grad_(flags[n])
            if n in acc:
                p.grad = None


def _output_backward(head, cap: float | None, hidden: torch.Tensor, targets: torch.Tensor, total: int) -> None:
    """Backpropagate Σ NLL / total of one output-layer chunk into `hidden`.

    The gradient of the loss with respect to the logits, (softmax − one-hot) / total, is formed in place
    in the logits buffer (the linear layer's backward does not need its output), so a chunk costs one
    fp32 logits buffer where autograd's cross-entropy would hold four (three with soft-capping)."""
    z = head(hidden).float()
    with torch.no_grad():
        g = torch.tanh(z / cap) * cap if cap else z.detach()
        slope = 1 - (g / cap) ** 2 if cap else None  # d(c·tanh(z/c))/dz
        g.sub_(g.amax(1, keepdim=True)).exp_()
        g.div_(g.sum(1, keepdim=True) * total)
        g[torch.arange(len(targets), device=g.device), targets.to(g.device)] -= 1 / total
        if cap:
            g.mul_(slope)
    z.backward(g)


def _backward(model, ids: torch.Tensor, total: int) -> None:
    """Backpropagate Σ NLL(ids) / total into the parameters that require grad.

    The output layer is backpropagated chunk by chunk into a detached copy of the hidden states, so
    full-vocabulary logits never exist for more than one chunk; the transformer's backward then runs
    once from the summed hidden-state gradient."""
    head, cap = output_layer(model)
    hidden, targets = hidden_and_targets(model, ids)
    leaf = hidden.detach().requires_grad_(True)
    for i in range(0, len(targets), LOGIT_CHUNK):
        _output_backward(head, cap, leaf[i : i + LOGIT_CHUNK], targets[i : i + LOGIT_CHUNK], total)
    hidden.backward(leaf.grad)


def gradient_sum(
    model,
    windows: Windows,
    names: list[str],
    batch_size: int = 1,
    progress: bool = True,
    checkpoint: Path | None = None,
    every: int = CHECKPOINT_EVERY,
) -> dict[str, torch.Tensor]:
    """Σ over windows of ∂(mean token NLL over all windows)/∂θ for each named parameter, in fp32.

    checkpoint: a file to save the running sums to every `every` windows; a rerun of the same job
    resumes from it, and it is deleted once the sums are complete."""
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise LingregionError(
            f"parameters not in this model: {', '.join(missing[:3])}; were the scores made for another model?"
        )
    total = windows.n_tokens  # the mean runs over all windows, whichever process takes which
    ckpt = state = None
    if checkpoint:
        shapes = hashlib.sha256(repr([(n, tuple(params[n].shape)) for n in names]).encode()).hexdigest()[:16]
        ckpt = Checkpoint(
            checkpoint,
            {
                "job": "gradient_sum",
                "model": fingerprint(model),
                "names": shapes,
                "windows": windows_digest(windows),
                "batch_size": batch_size,
            },
            every,
        )
        state = ckpt.load()
    saved = state[0] if state else {}
    acc = {n: saved[n].to(params[n].device) if n in saved else None for n in names}
    start = state[1] if state else 0
    check_output_layer(model)
    device = input_device(model)
    mine = distributed.shard(windows)
    show = progress and distributed.is_main()
    bar = tqdm(total=len(mine.input_ids), desc=f"score {windows.lang}", unit="win", disable=not show, leave=False)
    done = 0
    with _folded_into(params, acc):
        for b, ids in enumerate(batches(mine, batch_size)):
            done += len(ids)
            bar.update(len(ids))
            if b < start:  # already in the checkpoint's sums
                continue
            if b == start and start and show:
                tqdm.write(
                    f"score {windows.lang}: resumed after {done - len(ids)} windows from {ckpt.path}", file=sys.stderr
                )
            _backward(model, ids.to(device), total)
            if ckpt:
                ckpt.update({n: t for n, t in acc.items() if t is not None}, b + 1, done)
    bar.close()
    for n, t in acc.items():  # a parameter the loss does not depend on (or a process without windows)
        if t is None:
            acc[n] = torch.zeros(params[n].shape, dtype=torch.float32, device=params[n].device)
    distributed.sum_(acc.values())
    if ckpt:
        ckpt.remove()
    return acc


def taylor_importance(
    model, grads: dict[str, torch.Tensor], removed: dict[str, float], inplace: bool = False
) -> dict[str, torch.Tensor]:
    """|(θ − θ_removed) ⊙ g| in fp32. inplace=True overwrites `grads` with the result, so that no
    second full-size fp32 copy is ever alive."""
    params = dict(model.named_parameters())
    out = grads if inplace else {n: g.clone() for n, g in grads.items()}
    for n, g in out.items():
        theta = params[n].detach()
        g.mul_(theta.float() - removed[n] if removed[n] else theta).abs_()  # θ − 0 is θ: skip that pass
    return out


def score(
    model,
    windows: Windows,
    names: list[str],
    removed: dict[str, float],
    batch_size: int = 1,
    progress: bool = True,
    checkpoint: Path | None = None,
    every: int = CHECKPOINT_EVERY,
) -> dict[str, torch.Tensor]:
    """The paper's importance I = |(θ − θ_removed) ⊙ g| of every scored parameter over one language's windows."""
    grads = gradient_sum(model, windows, names, batch_size, progress, checkpoint, every)
    return taylor_importance(model, grads, removed, inplace=True)


def accumulate(total: dict[str, torch.Tensor], scores: dict[str, torch.Tensor]) -> None:
    """total += scores, in place (the core-region score is the sum over languages)."""
    for n, t in scores.items():
        total[n] = total[n].add_(t) if n in total else t.clone()
