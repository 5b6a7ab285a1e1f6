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


def test_a_write_is_fsynced_before_and_after_its_rename(tmp_path, monkeypatch):
    synced = []
    real = store.os.fsync
    monkeypatch.setattr(
        store.os, "fsync", lambda fd: synced.append(store.os.readlink(f"/proc/self/fd/{fd}")) or real(fd)
    )
    store.write_text(tmp_path / "a.txt", "x")
    assert len(synced) == 2 and synced[0].startswith(str(tmp_path / ".a.txt.")) and synced[1] == str(tmp_path)


def test_a_cache_file_that_cannot_be_read_is_moved_aside_and_recomputed(tmp_path):
    path = tmp_path / "removal.json"
    path.write_text('{"entries": ')
    with pytest.warns(
        store.LingregionWarning, match=r"removal.json: not valid JSON .*moved it to removal.json.corrupt"
    ):
        assert store.read_cached(path, store.read_json) is None
    assert not path.exists() and (tmp_path / "removal.json.corrupt").read_text() == '{"entries": '
    assert store.read_cached(path, store.read_json) is None  # missing: nothing to say
    store.write_json(path, {"a": 1})
    assert store.read_cached(path, store.read_json) == {"a": 1}


HOLD = """
import sys, time
from lingregion.store import locked
with locked(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_run_folder_is_locked_by_one_process_at_a_time(tmp_path, monkeypatch):
    import subprocess
    import sys

    folder = tmp_path / "run"
    (folder / "scores").mkdir(parents=True)
    (folder / "scores" / ".ru.safetensors.abc123.tmp").write_bytes(b"half")  # a killed writer's
    (folder / "scores" / ".ru.partial.safetensors").write_bytes(b"resumable")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert not (folder / "scores" / ".ru.safetensors.abc123.tmp").exists()  # swept under the lock
        assert (folder / "scores" / ".ru.partial.safetensors").exists()  # a checkpoint is kept to resume
        with pytest.raises(LingregionError, match=rf"in use by another lingregion run \(PID {holder.pid}\)"):
            with store.locked(folder):
                pass
        with monkeypatch.context() as env:  # another process of the holder's torchrun job: rank 0 holds it for all
            env.setenv("WORLD_SIZE", "2")
            env.setenv("RANK", "1")
            with store.locked(folder):
                pass
    finally:
        holder.kill()
        holder.wait()
    with store.locked(folder):  # the system released the killed holder's lock
        with store.locked(folder):  # nested calls of one process share it
            pass
    with pytest.raises(RuntimeError), store.locked(tmp_path / "new"):
        raise RuntimeError("failed before writing anything")
    assert not (tmp_path / "new").exists()  # a folder the lock made is not left behind
    (tmp_path / "file").write_text("x")
    with pytest.raises(LingregionError, match="cannot use .* as a run folder"), store.locked(tmp_path / "file" / "run"):
        pass
