"""Data-parallel scoring and evaluation under `torchrun`.

`torchrun --nproc_per_node N $(which lingregion) ...` starts N copies of the same command. Each copy
takes every N-th window (window i goes to rank i mod N), sums its own gradients (fp32) or losses (fp64),
and the sums are all-reduced once, at the end of a language. Every process then holds the same totals
as a single-process run, up to the order of the floating-point additions (within 1e-6 relative).
The process group uses gloo for CPU tensors and NCCL for CUDA tensors.

Because every process continues with the same numbers, all of them take the same decisions (which
cached result to reuse) and write the same files; the writes are atomic, and each rank's write of a
result happens only after the collective that produced it, so no rank ever reads an older state.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist

from .corpus import Windows


def active() -> bool:
    """True inside a multi-process torchrun job."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def world() -> tuple[int, int]:
    """(rank, world size); joins the process group on first use inside torchrun, (0, 1) outside."""
    if not active():
        return 0, 1
    if not dist.is_initialized():
        gpus = torch.cuda.is_available() and dist.is_nccl_available()
        dist.init_process_group("cpu:gloo,cuda:nccl" if gpus else "gloo")
    return dist.get_rank(), dist.get_world_size()


def is_main() -> bool:
    """The process that shows progress bars (rank 0)."""
    return world()[0] == 0


def local_device(device: str) -> str:
    """Under torchrun, 'cuda' means this process's own GPU (cuda:LOCAL_RANK)."""
    if active() and device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return device


def owned(n: int) -> range:
    """Indices, among n windows, of this process's share: every world-size-th one, from its rank."""
    rank, size = world()
    return range(rank, n, size)


def shard(windows: Windows) -> Windows:
    """This process's share of the windows (see owned).

    Striding keeps the windows in order, so a language's one short window stays last in its shard."""
    rank, size = world()
    if size == 1:
        return windows
    per_token = windows.token_bytes
    return dataclasses.replace(
        windows,
        input_ids=windows.input_ids[rank::size],
        n_bytes=windows.n_bytes[rank::size],
        token_bytes=per_token[rank::size] if per_token is not None else None,
    )


def sum_(tensors) -> None:
    """In-place sum over all processes of each tensor (a no-op in a single process)."""
    if world()[1] == 1:
        return
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
