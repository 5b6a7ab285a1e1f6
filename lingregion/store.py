"""Files on disk: atomic writes, safe reads, the run folder's lock, and the provenance record every result carries.

Only safetensors and JSON are ever read, so no file can run code when loaded. Every write goes to a temporary
file in the target's folder, is fsynced, renamed into place and the folder fsynced, so that a reader, a kill or a
power loss leaves the old file or the new one, never a partial one. A run folder is written by one process at a
time (`locked`); a file of its cache that cannot be read is moved aside and recomputed (`read_cached`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .version import __version__


class LingregionError(Exception):
    """A problem the user can fix; the CLI prints it as one line and exits with code 2."""


class Corrupt(LingregionError):
    """A file that exists but cannot be read back: truncated, overwritten, or not written by lingregion."""

    def __init__(self, path: Path, problem: str):
        super().__init__(f"{path}: {problem}; recreate it")
        self.problem = problem


class LingregionWarning(UserWarning):
    """Something the user should know that does not stop the run; the CLI prints it as one line."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


TMP_SUFFIX = ".tmp"  # a temporary file is .NAME.RANDOM.tmp beside NAME; `locked` sweeps orphans of killed runs


def fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic(path: Path, write: Callable[[str], object]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; results are meant to be shared
        fsync(tmp)  # the data reaches the disk before the name points at it
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync(path.parent)  # and the rename itself survives a power loss


def write_text(path: Path, text: str) -> None:
    """Write UTF-8 text atomically: a reader sees the old file or the new one, never a partial one."""
    _atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_bytes(path: Path, data: bytes) -> None:
    """Write bytes atomically (PNG figures and the like)."""
    _atomic(path, lambda tmp: Path(tmp).write_bytes(data))


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically, with sorted keys and non-ASCII kept, so that reruns produce identical files."""
    write_text(path, json.dumps(obj, indent=1, ensure_ascii=False, sort_keys=True) + "\n")


def read_json(path: Path) -> Any:
    """Parse a JSON file, or raise a LingregionError naming the file if it is missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise LingregionError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Corrupt(path, f"not valid JSON ({e}); the file is corrupt or truncated") from None


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Safetensors with the provenance record as JSON under the metadata key 'lingregion'. The tensors'
    order is kept too (safetensors sorts names), since ties and edits follow parameter order."""
    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    metadata = {"lingregion": json.dumps(meta, sort_keys=True), "order": json.dumps(list(tensors))}
    _atomic(path, lambda tmp: save_file(contiguous, tmp, metadata=metadata))


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors in their saved order, provenance record) of a file written by `write_tensors`; refuses others."""
    path = Path(path)
    if not path.is_file():
        raise LingregionError(f"{path}: file not found")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("lingregion", "null"))
            order = json.loads((f.metadata() or {}).get("order", "[]"))
        tensors = load_file(str(path))
        if sorted(order) == sorted(tensors):
            tensors = {k: tensors[k] for k in order}
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as e:
        raise Corrupt(path, f"not a readable safetensors file ({e}); it is corrupt or truncated") from None
    if meta is None:
        raise Corrupt(path, "has no lingregion metadata; it was not written by lingregion")
    return tensors, meta


T = TypeVar("T")


def read_cached(path: Path, read: Callable[[Path], T]) -> T | None:
    """`read(path)` of a file a run keeps for reuse, or None when it is missing. One that cannot be read
    (truncated, or from another version) is moved aside to PATH.corrupt with a warning, so that the caller
    recomputes it and the bad file can still be inspected; a corrupt *input* the user named is an error instead."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return read(path)
    except LingregionError as e:
        aside = path.with_name(path.name + ".corrupt")
        os.replace(path, aside)
        problem = e.problem if isinstance(e, Corrupt) else str(e)
        warnings.warn(f"{path}: {problem}; moved it to {aside.name} and recomputing", LingregionWarning, stacklevel=2)
        return None


# --- the run folder's lock ----------------------------------------------------------------------------
LOCK = ".lock"
_held: dict[Path, int] = {}  # folders this process holds, with how many nested `locked` calls hold each


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[Path]:
    """Hold FOLDER/.lock exclusively while writing into a run folder, so that two runs never interleave their
    writes (a second one is refused, naming the holder's PID). The lock is an flock: the system releases it
    when the holder exits, SIGKILL included, so a stale .lock file never blocks anything. On taking it, the
    temporary files that killed runs left behind are removed. Nested calls in one process share the lock.
    A folder this call created is removed again if the block fails before writing anything into it.

    Under torchrun the N processes of one job write the same files: rank 0 holds the lock for all of them,
    and the others must wait for it by joining the process group inside the block (`distributed.world()`),
    which rank 0 joins only once it holds the lock."""
    folder = Path(folder).resolve()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) != 0:
        yield folder
        return
    if folder in _held:
        _held[folder] += 1
        try:
            yield folder
        finally:
            _held[folder] -= 1
        return
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise LingregionError(
            f"cannot use {folder} as a run folder ({e.strerror}); pass --out a folder path, new or from an earlier run"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise LingregionError(
            f"{folder} is in use by another lingregion run (PID {holder}); wait for it to finish, or pass another --out"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[folder] = 1
    ok = False
    try:
        for orphan in folder.rglob(f".*{TMP_SUFFIX}"):
            if orphan.is_file():  # only a killed writer leaves one: every live writer holds this lock
                orphan.unlink()
        yield folder
        ok = True
    finally:
        del _held[folder]
        if created and not ok and [p.name for p in folder.iterdir()] == [LOCK]:
            (folder / LOCK).unlink()
            folder.rmdir()
        os.close(fd)  # releases the lock


def digest(obj) -> str:
    """A short, stable hash of any JSON-able value: the key under which cached results are kept."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of some bytes: identifies a text by its content."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks so that model weights need not fit in memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def environment() -> dict:
    """Versions of lingregion, torch, transformers and Python, and the platform: part of every provenance record."""
    import transformers

    return {
        "lingregion": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
