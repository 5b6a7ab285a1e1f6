"""Export of a region-removed model: a plain Hugging Face folder that reloads bit-identical with the same
perplexity, its model card and record, refusal to replace anything but an earlier export, and the `export` command."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lingregion import corpus, evaluation, export, interventions, models
from lingregion.cli import main
from lingregion.regions import select
from lingregion.store import LingregionError, sha256_file, write_tensors

from conftest import make_model


def _region_on(m, tmp_path, with_scores=True):
    names = models.scored_names(m.module)
    params = dict(m.module.named_parameters())
    scores = {n: params[n].detach().float().abs() for n in names}
    run = tmp_path / "run"
    if with_scores:
        for lang in ("ru", "es"):
            write_tensors(
                run / "scores" / f"{lang}.safetensors",
                scores,
                {
                    "format": "lingregion-scores-v1",
                    "lang": lang,
                    "model_fingerprint": m.info["fingerprint"],
                    "estimator": "taylor",
                    "made_of": {"windows": {"tokens": 64, "windows": 4, "seq_len": 16, "text_sha256": "ab" * 32}},
                },
            )
    region = select(
        scores,
        0.05,
        "top",
        meta={"model": m.info["fingerprint"], "languages": ["ru", "es"], "estimator": "taylor", "label": "core"},
    )
    path = run / "regions" / "core-top-0.05.safetensors"
    region.save(path)
    return region, path, models.removed_values(m.module, names)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_export_then_reload_is_bit_identical_with_the_same_perplexity(tiny_folder, tmp_path, dtype):
    m = models.load(str(tiny_folder), dtype)  # loaded as lingregion loads any model (buffers included)
    before = {k: v.clone() for k, v in m.module.state_dict().items()}
    region, path, removed = _region_on(m, tmp_path)
    edits = interventions.removal(region, removed)
    record = export.region_record(region, path, m.module, removed)
    out = export.export(m.module, m.tokenizer, tmp_path / "exported", edits, {**record, "base_model": m.info})
    assert all(torch.equal(before[k], v) for k, v in m.module.state_dict().items())  # restored in memory
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".exported")]

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=models.DTYPES[dtype]).eval()
    windows = corpus.make_windows(m.tokenizer, ["Квантовая механика описывает природу. " * 12], 16, 64, "ru")
    with interventions.applied(m.module, edits):
        edited = m.module.state_dict()
        assert set(reloaded.state_dict()) == set(edited)
        for k, v in reloaded.state_dict().items():
            assert v.dtype == edited[k].dtype and torch.equal(v, edited[k]), k
        ppl = evaluation.perplexity(m.module, windows, 2, progress=False)
    assert evaluation.perplexity(reloaded, windows, 2, progress=False) == ppl
    assert ppl != evaluation.perplexity(m.module, windows, 2, progress=False)  # the removal matters
    assert AutoTokenizer.from_pretrained(out)("мир").input_ids == m.tokenizer("мир").input_ids

    card = (out / "README.md").read_text(encoding="utf-8")
    rec = json.loads((out / export.RECORD).read_text(encoding="utf-8"))
    assert f"{region.count():,} of {region.total():,}" in card and sha256_file(path) in card and str(path) in card
    assert rec["region"]["entries"] == region.count() == rec["edits"]["entries"]
    assert rec["region"]["parameters"] == {
        n: {
            "entries": region.count(n),
            "of": before[n].numel(),
            "set_to": removed[n],
            "already_at_value": int((before[n].reshape(-1)[region.indices(n)] == removed[n]).sum()),
        }
        for n in region.packed
        if region.count(n)
    }
    assert set(rec["scores"]) == {"ru", "es"} and rec["scores"]["ru"]["sha256"][:16] in card
    assert rec["base_model"]["fingerprint"] == m.info["fingerprint"]


def test_force_replaces_only_an_earlier_export(loaded, tmp_path):
    m = loaded()
    region, path, removed = _region_on(m, tmp_path, with_scores=False)
    out = tmp_path / "exported"
    (out / "old.txt").parent.mkdir()
    (out / "old.txt").write_text("x")
    record = export.region_record(region, path, m.module, removed)
    assert record["scores"] == {}
    with pytest.raises(LingregionError, match="not empty"):
        export.export(m.module, m.tokenizer, out, [], record)
    with pytest.raises(LingregionError, match="holds files but no lingregion-export.json"):
        export.export(m.module, m.tokenizer, out, [], record, force=True)  # a folder of other files is never replaced
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    (out / "old.txt").unlink()
    export.export(m.module, m.tokenizer, out, [], record)  # an empty folder is filled
    export.export(m.module, m.tokenizer, out, interventions.removal(region, removed), record, force=True)
    assert (out / "model.safetensors").is_file() and (out / export.RECORD).is_file()  # an earlier export: replaced
    assert "were not found" in (out / "README.md").read_text(encoding="utf-8")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary or old folder left


@pytest.mark.parametrize("where", ["model's folder", "its parent", "the current directory"])
def test_export_never_replaces_the_model_or_the_current_directory(where, tiny_folder, tmp_path, capsys, monkeypatch):
    m = models.load(str(tiny_folder))
    _, path, _ = _region_on(m, tmp_path)
    (tiny_folder / export.RECORD).write_text("{}")  # even a folder that looks like an earlier export
    (tmp_path / export.RECORD).write_text("{}")
    work = tmp_path / "work"
    (work / export.RECORD).parent.mkdir()
    (work / export.RECORD).write_text("{}")
    monkeypatch.chdir(work)
    out = {"model's folder": tiny_folder, "its parent": tmp_path, "the current directory": work}[where]
    before = sorted(tmp_path.rglob("*"))
    capsys.readouterr()  # the load above reports its progress
    code = main(["export", "--model", str(tiny_folder), "--remove", str(path), "--out", str(out), "--force"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("lingregion: error:")
    assert ("contains the current directory" if where == "the current directory" else "holds the model") in err
    assert sorted(tmp_path.rglob("*")) == before


def test_export_command(tiny_folder, tmp_path, capsys):
    m = models.load(str(tiny_folder))
    region, path, removed = _region_on(m, tmp_path)
    out = tmp_path / "cli-export"
    assert main(["export", "--model", str(tiny_folder), "--remove", str(path), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    again = models.load(str(out))
    with interventions.applied(m.module, interventions.removal(region, removed)):
        assert again.info["fingerprint"] == models.fingerprint(m.module)
    assert main(["export", "--model", str(tiny_folder), "--remove", str(path), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    other = _fake_region_for_another_model(tmp_path)
    assert main(["export", "--model", str(tiny_folder), "--remove", str(other), "--out", str(tmp_path / "x")]) == 2
    assert "locate the region again" in capsys.readouterr().err and not (tmp_path / "x").exists()


def _fake_region_for_another_model(tmp_path):
    other = make_model("gemma3", seed=1)
    names = models.scored_names(other)
    r = select(
        {n: p.detach().abs() for n, p in other.named_parameters() if n in names},
        0.05,
        "top",
        meta={"model": models.fingerprint(other)},
    )
    path = tmp_path / "other.safetensors"
    r.save(path)
    return path
