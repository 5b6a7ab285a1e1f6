"""Apply a change to some entries of a loaded model, and undo it exactly, bit for bit.

Every experiment that alters weights goes through `apply`: removing a region, and later rows, columns,
single parameters or scalings. Only the touched entries are saved, so switching between settings in a
sweep costs a gather and a scatter, never a model reload.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .regions import Region


@dataclass
class Edit:
    """Set the entries `index` (flat) of parameter `name` to `value` (a scalar or one value per entry)."""

    name: str
    index: torch.Tensor
    value: float | torch.Tensor


class Applied:
    """Handle returned by `apply`; `undo()` restores the saved entries in reverse order."""

    def __init__(self, saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
        self._saved = saved

    @torch.no_grad()
    def undo(self) -> None:
        """Put back the saved entries, bit for bit; a second call does nothing."""
        for flat, index, original in reversed(self._saved):
            flat[index] = original
        self._saved = []


@torch.no_grad()
def apply(model, edits: list[Edit]) -> Applied:
    """Apply `edits` in place, saving only the touched entries; `undo()` on the result restores them."""
    params = dict(model.named_parameters())
    saved = []
    for e, index in zip(edits, _indices_on_devices(edits, params)):
        flat = params[e.name].data.view(-1)
        saved.append((flat, index, flat[index].clone()))
        value = e.value.to(flat.device, flat.dtype) if isinstance(e.value, torch.Tensor) else e.value
        flat[index] = value
    return Applied(saved)


def _indices_on_devices(edits: list[Edit], params: dict) -> list[torch.Tensor]:
    """Each edit's index on its parameter's device, moved in one transfer per device (one per matrix
    would make switching a region on a GPU cost more than the edits themselves)."""
    out: list[torch.Tensor | None] = [e.index for e in edits]
    by_device: dict[torch.device, list[int]] = {}
    for i, e in enumerate(edits):
        device = params[e.name].device
        if e.index.device != device:
            by_device.setdefault(device, []).append(i)
    for device, group in by_device.items():
        moved = torch.cat([edits[i].index.reshape(-1) for i in group]).to(device)
        for i, index in zip(group, moved.split([edits[i].index.numel() for i in group])):
            out[i] = index
    return out


def removal(region: Region, removed: dict[str, float]) -> list[Edit]:
    """Edits that set every entry of the region to its parameter's θ_removed."""
    return [Edit(n, region.indices(n), removed[n]) for n in region.packed if region.count(n)]


@contextmanager
def applied(model, edits: list[Edit]):
    """Context manager: the model with `edits` applied inside the block, restored exactly on leaving it."""
    handle = apply(model, edits)
    try:
        yield model
    finally:
        handle.undo()
