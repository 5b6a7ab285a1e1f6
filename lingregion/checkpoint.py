"""Resumable loops: the running sums of a scoring or evaluation job, saved every few windows.

A checkpoint holds the sums and how many batches they cover, written atomically, so a job killed at
any moment (SIGKILL included) and restarted with the same command continues from the last save. The
sums are restored exactly and continue over the same batches in the same order, so the result is bit
for bit that of an uninterrupted run (on CPU, in fp32; GPU kernels need not be deterministic).

A checkpoint is used only by the very job that wrote it: the model, the parameters, the token windows,
the batch size and the number of processes are part of its key. Anything else is ignored and replaced; a file
that cannot be read is moved aside with a warning (`store.read_cached`), as every cached file of a run is.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from . import distributed
from .corpus import Windows
from .store import LingregionError, read_cached, read_tensors, write_tensors

CHECKPOINT_EVERY = 4  # windows; one save writes one fp32 copy of the sums (0.4 GB for the default model)


def windows_digest(windows: Windows) -> str:
    """Identifies the token windows themselves (not just their description)."""
    h = hashlib.sha256()
    for w in windows.input_ids:
        h.update(len(w).to_bytes(4, "little"))
        h.update(w.numpy().tobytes())
    return h.hexdigest()[:16]


class Checkpoint:
    """`path` for one process; under torchrun each rank keeps its own file beside it."""

    def __init__(self, path: Path, key: dict, every: int = CHECKPOINT_EVERY):
        if every < 1:
            raise LingregionError(f"checkpoint interval {every} must be at least 1 window")
        rank, size = distributed.world()
        path = Path(path)
        if size > 1:
            path = path.with_name(f"{path.stem}.rank{rank}of{size}{path.suffix}")
        self.path, self.every = path, every
        self.key = dict(key, world_size=size, rank=rank)
        self.saved_at = 0  # windows covered by the file on disk

    def load(self) -> tuple[dict[str, torch.Tensor], int] | None:
        """(sums, batches covered) if this job saved a checkpoint, else None."""
        loaded = read_cached(self.path, read_tensors)
        if loaded is None:
            return None
        tensors, meta = loaded
        if meta.get("key") != self.key:
            return None
        self.saved_at = meta["windows"]
        return tensors, meta["batches"]

    def update(self, sums: dict[str, torch.Tensor], batches: int, windows: int) -> None:
        """Save if `every` windows have passed since the last save."""
        if windows - self.saved_at >= self.every:
            write_tensors(
                self.path,
                {n: t.cpu() for n, t in sums.items()},
                {"format": "lingregion-checkpoint-v1", "key": self.key, "batches": batches, "windows": windows},
            )
            self.saved_at = windows

    def remove(self) -> None:
        """Delete this process's checkpoint file: the job finished, and its result is kept elsewhere."""
        self.path.unlink(missing_ok=True)
