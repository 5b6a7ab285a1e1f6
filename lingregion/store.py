"""Files on disk: atomic writes, safe reads, and the provenance record every result carries.

Only safetensors and JSON are ever read, so no file can run code when loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .version import __version__


class LingregionError(Exception):
    """A problem the user can fix; the CLI prints it as one line and exits with code 2."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
        raise LingregionError(f"{path}: not valid JSON ({e}); the file is corrupt or truncated, recreate it") from None


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
        raise LingregionError(
            f"{path}: not a readable safetensors file ({e}); it is corrupt or truncated, recreate it"
        ) from None
    if meta is None:
        raise LingregionError(f"{path}: has no lingregion metadata; it was not written by lingregion")
    return tensors, meta


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
