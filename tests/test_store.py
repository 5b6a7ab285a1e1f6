"""Files on disk: atomic writes that leave nothing half-written, reads that name the broken file, and
safetensors that keep their tensors' order and provenance."""

import json

import pytest
import torch

from lingregion import store
from lingregion.store import LingregionError


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "a" / "result.json"
    store.write_json(path, {"b": 1, "a": "ä"})
    assert path.read_text(encoding="utf-8") == '{\n "a": "ä",\n "b": 1\n}\n'  # sorted keys, non-ASCII kept

    def fail(tmp):
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        store._atomic(path, fail)
    assert json.loads(path.read_text(encoding="utf-8")) == {"a": "ä", "b": 1}
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]


def test_read_json_names_a_missing_or_corrupt_file(tmp_path):
    with pytest.raises(LingregionError, match="file not found"):
        store.read_json(tmp_path / "none.json")
    (tmp_path / "cut.json").write_text('{"a": ')
    with pytest.raises(LingregionError, match=r"cut.json: not valid JSON .* recreate it"):
        store.read_json(tmp_path / "cut.json")


def test_tensors_keep_their_order_and_provenance(tmp_path):
    tensors = {"z": torch.arange(3.0), "a": torch.ones(2, 2), "m": torch.zeros(1)}
    store.write_tensors(tmp_path / "t.safetensors", tensors, {"made_of": [1, 2]})
    back, meta = store.read_tensors(tmp_path / "t.safetensors")
    assert list(back) == ["z", "a", "m"] and meta == {"made_of": [1, 2]}
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(LingregionError, match="corrupt or truncated"):
        store.read_tensors(tmp_path / "bad.safetensors")


def test_hashes_and_environment(tmp_path):
    (tmp_path / "f").write_bytes(b"abc")
    digest = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # SHA-256("abc")
    assert store.sha256_file(tmp_path / "f") == store.sha256_bytes(b"abc") == digest
    env = store.environment()
    assert set(env) == {"lingregion", "torch", "transformers", "python", "platform"}
    assert env["lingregion"] == store.__version__
