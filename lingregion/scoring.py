"""Model + windows → importance of every scored parameter (the paper's first-order Taylor estimate).

I = |(θ − θ_removed) ⊙ g|, with g the gradient of the mean token loss over a language's whole token
budget: gradients are summed over all windows first and multiplied by (θ − θ_removed) once at the end,
as in the paper's code, but summed in fp32 whatever the model's dtype.

Only the scored parameters require gradients, so no weight gradient is computed for the embedding or
the LM head. Each gradient is folded into its fp32 accumulator as soon as autograd produces it and then
dropped, so no full set of `.grad` buffers is ever alive. Peak memory is the weights, one fp32
accumulator per scored parameter, the activations of one batch and one output-layer chunk.

Split halves (halves=True, or the names of the parameters to halve): for those parameters the gradients
of the even-numbered windows and those of the odd-numbered ones go to two fp32 accumulators A and B (a
window's parity is its index among all the language's windows, whichever process takes it), and their
full sum is A + B; every other parameter keeps one accumulator. Batches are formed within a half, so a
batch never mixes the two and no pass is added (with batch_size 1, none at all; otherwise at most one
short batch per half). A + B differs from a single accumulator by the rounding of another order of
additions (about 1e-7 relative; with two windows not at all), and halves=False computes exactly what it
did before halves existed. The scoring pass holds one extra fp32 copy of the halved parameters (a run
halves a sample of its matrices, see `uncertainty.matrix_sample`); at the end the halves are copied to
host memory and A + B is formed in A's place, so the device never holds more.

Under torchrun each process sums its share of the windows and the sums are all-reduced once; with a
checkpoint path the sums are saved every few windows and a rerun resumes from them (see checkpoint.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
from collections.abc import Collection
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

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
def _folded_into(params: dict[str, torch.nn.Parameter], base: dict, into: list[dict[str, torch.Tensor | None]]):
    """Within the block only the parameters named in the accumulators `base` require grad, and each
    gradient autograd makes is added to its accumulator and dropped at once; flags are restored afterwards.
    The accumulator is `into[0]`'s where it names the parameter, else `base`'s: the caller may put another
    set of accumulators (of some of the names) in `into[0]` between backward passes. An accumulator that is
    still None takes over the first (fp32) gradient itself, which spares zero-filling and one addition."""
    names = set(base)

    def fold(name):
        def hook(p):
            g, p.grad = p.grad, None
            acc = into[0] if name in into[0] else base
            if acc[name] is None:
                acc[name] = g if g.dtype == torch.float32 else g.float()
            else:
                acc[name].add_(g)

        return hook

    flags = {n: p.requires_grad for n, p in params.items()}
    hooks = [params[n].register_post_accumulate_grad_hook(fold(n)) for n in base]
    for n, p in params.items():
        p.requires_grad_(n in names)
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        for n, p in params.items():
            p.requires_grad_(flags[n])
            if n in names:
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


def _schedule(windows: Windows, batch_size: int, halves: bool) -> list[tuple[int, torch.Tensor]]:
    """(accumulator, batch) pairs of this process's windows in the order they are run: one accumulator,
    or with halves the even-numbered windows' batches (accumulator 0) alternating with the odd ones'
    (1), so that the two halves advance through the text together."""
    if not halves:
        return [(0, ids) for ids in batches(distributed.shard(windows), batch_size)]
    owned = distributed.owned(len(windows.input_ids))
    runs = []
    for parity in (0, 1):
        ids = [windows.input_ids[i] for i in owned if i % 2 == parity]
        runs.append([(parity, b) for b in batches(dataclasses.replace(windows, input_ids=ids), batch_size)])
    even, odd = runs
    common = min(len(even), len(odd))
    return [pair for both in zip(even, odd) for pair in both] + even[common:] + odd[common:]


def gradient_sum(
    model,
    windows: Windows,
    names: list[str],
    batch_size: int = 1,
    progress: bool = True,
    checkpoint: Path | None = None,
    every: int = CHECKPOINT_EVERY,
    halves: bool | Collection[str] = False,
    model_fingerprint: str | None = None,
) -> dict[str, torch.Tensor] | Halves:
    """Σ over windows of ∂(mean token NLL over all windows)/∂θ for each named parameter, in fp32.

    halves: True (every name) or the names to halve; returns Halves(full, A, B): the full sums of every
    name, and for the halved ones the sums over the even- and over the odd-numbered windows (each still of
    the mean over all windows, so that A + B is the full sum), on the CPU.
    checkpoint: a file to save the running sums to every `every` windows; a rerun of the same job
    resumes from it, and it is deleted once the sums are complete. Its key holds `model_fingerprint`, the
    model's `models.fingerprint` when the caller has it already (hashing every weight again costs a second
    per GB), else computed here."""
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise LingregionError(
            f"parameters not in this model: {', '.join(missing[:3])}; were the scores made for another model?"
        )
    total = windows.n_tokens  # the mean runs over all windows, whichever process takes which
    if isinstance(halves, Collection):
        wanted = set(halves)
        halved = [n for n in names if n in wanted]
    else:
        halved = names if halves else []
    ckpt = state = None
    if checkpoint:
        shapes = hashlib.sha256(repr([(n, tuple(params[n].shape)) for n in names]).encode()).hexdigest()[:16]
        ckpt = Checkpoint(
            checkpoint,
            {
                "job": "gradient_sum",
                "model": model_fingerprint or fingerprint(model),
                "names": shapes,
                "windows": windows_digest(windows),
                "batch_size": batch_size,
            }
            # Without halves the key stays what it was, and so do the checkpoints it accepts.
            | ({"halves": hashlib.sha256(repr(halved).encode()).hexdigest()[:16]} if halves else {}),
            every,
        )
        state = ckpt.load()
    saved = state[0] if state else {}
    # names of the sums in the checkpoint: sums[0] holds A of the halved names and the full sum of the others,
    # sums[1] B of the halved ones
    prefixes = ["a/", "b/"] if halves else [""]
    sums = [
        {n: saved[k + n].to(params[n].device) if k + n in saved else None for n in (halved if k == "b/" else names)}
        for k in prefixes
    ]
    start = state[1] if state else 0
    check_output_layer(model)
    device = input_device(model)
    schedule = _schedule(windows, batch_size, halves)
    show = progress and distributed.is_main()
    n_windows = sum(len(ids) for _, ids in schedule)
    bar = tqdm(total=n_windows, desc=f"score {windows.lang}", unit="win", disable=not show, leave=False)
    done = 0
    into = [sums[0]]
    with _folded_into(params, sums[0], into):
        for b, (half, ids) in enumerate(schedule):
            done += len(ids)
            bar.update(len(ids))
            if b < start:  # already in the checkpoint's sums
                continue
            if b == start and start and show:
                tqdm.write(
                    f"score {windows.lang}: resumed after {done - len(ids)} windows from {ckpt.path}", file=sys.stderr
                )
            into[0] = sums[half]
            _backward(model, ids.to(device), total)
            if ckpt:
                ckpt.update(
                    {k + n: t for k, acc in zip(prefixes, sums) for n, t in acc.items() if t is not None}, b + 1, done
                )
    bar.close()
    for acc in sums:
        for n, t in acc.items():  # a parameter the loss does not depend on (or a process without windows)
            if t is None:
                acc[n] = torch.zeros(params[n].shape, dtype=torch.float32, device=params[n].device)
        distributed.sum_(acc.values())
    if ckpt:
        ckpt.remove()
    if not halves:
        return sums[0]
    full, b = sums
    a = {}
    for n in halved:  # to the host, then A + B in A's place: the device never holds a third copy
        a[n] = full[n].to("cpu", copy=True)
        full[n].add_(b[n])
        b[n] = b[n].cpu()
    return Halves(full, a, b)


def taylor_importance(
    model, grads: dict[str, torch.Tensor], removed: dict[str, float], inplace: bool = False
) -> dict[str, torch.Tensor]:
    """|(θ − θ_removed) ⊙ g| in fp32, on g's device. inplace=True overwrites `grads` with the result, so that
    no second full-size fp32 copy is ever alive."""
    params = dict(model.named_parameters())
    out = grads if inplace else {n: g.clone() for n, g in grads.items()}
    for n, g in out.items():
        theta = params[n].detach().to(g.device)
        g.mul_(theta.float() - removed[n] if removed[n] else theta).abs_()  # θ − 0 is θ: skip that pass
    return out


class Halves(NamedTuple):
    """Gradient sums of a pass with split halves (see gradient_sum)."""

    full: dict[str, torch.Tensor]  # A + B for the halved names, the single sum for the others
    a: dict[str, torch.Tensor]  # the even-numbered windows' sums of the halved names (CPU)
    b: dict[str, torch.Tensor]  # the odd-numbered windows'


class Split(NamedTuple):
    """Importance from all of a language's windows and, for the halved parameters, from each half of them."""

    full: dict[str, torch.Tensor]  # |(θ − θ_removed) ⊙ (A + B)|, the scores a run stores
    a: dict[str, torch.Tensor]  # |(θ − θ_removed) ⊙ A|: the even-numbered windows (halved names, on the CPU)
    b: dict[str, torch.Tensor]  # |(θ − θ_removed) ⊙ B|: the odd-numbered windows


def score(
    model,
    windows: Windows,
    names: list[str],
    removed: dict[str, float],
    batch_size: int = 1,
    progress: bool = True,
    checkpoint: Path | None = None,
    every: int = CHECKPOINT_EVERY,
    halves: bool | Collection[str] = False,
    model_fingerprint: str | None = None,
) -> dict[str, torch.Tensor] | Split:
    """The paper's importance I = |(θ − θ_removed) ⊙ g| of every scored parameter over one language's windows.

    halves: True (every name) or the names to halve: a Split of the full importance and each half's
    (gradient_sum's A and B, on the CPU). The scoring pass holds one extra fp32 copy of the halved parameters."""
    if not halves:
        grads = gradient_sum(model, windows, names, batch_size, progress, checkpoint, every, False, model_fingerprint)
        return taylor_importance(model, grads, removed, inplace=True)
    sums = gradient_sum(model, windows, names, batch_size, progress, checkpoint, every, halves, model_fingerprint)
    full = taylor_importance(model, sums.full, removed, inplace=True)
    return Split(full, *(taylor_importance(model, half, removed, inplace=True) for half in (sums.a, sums.b)))


def accumulate(total: dict[str, torch.Tensor], scores: dict[str, torch.Tensor]) -> None:
    """total += scores, in place (the core-region score is the sum over languages)."""
    for n, t in scores.items():
        total[n] = total[n].add_(t) if n in total else t.clone()
