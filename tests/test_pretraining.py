"""`lingregion train` on the tiny model: the Trainer run with a region frozen bit for bit, the tracked perplexities
against a direct evaluation, the output folder as a plain Hugging Face model, the comparison's forgetting and
verdict read off the shared intervals, resuming after a kill, two processes on gloo, and one-line errors."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import lingregion as lr
from lingregion import evaluation, freezing, models, pretraining, uncertainty
from lingregion.cli import main
from lingregion.regions import Region
from lingregion.store import read_json

from conftest import make_model

TINY = ["--seq-len", "16", "--eval-tokens", "32", "--score-langs", "ru,es", "--score-tokens", "32"]
SHORT = ["--steps", "4", "--lr", "1e-2", "--warmup", "1", "--batch", "2", "--save-steps", "1"]


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One intra-op thread, and the same in the subprocesses: tiny matrices gain nothing from a second."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def region_file(tiny_folder, path):
    """A Top 5% region of random scores on the tiny model, saved as `lingregion locate` would."""
    m = models.load(str(tiny_folder))
    g = torch.Generator().manual_seed(1)
    scores = {n: torch.rand(dict(m.module.named_parameters())[n].shape, generator=g) for n in m.names}
    region = lr.core(scores, 0.05)
    region.meta["model"] = m.info["fingerprint"]
    region.save(path)
    return region


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def assert_frozen_as_source(region, trained: dict, source: dict, moved_share: float = 0.5):
    """Every region entry bit-identical to the source; most other entries of the same matrices moved."""
    for n in region.packed:
        mask = region.mask(n)
        assert torch.equal(trained[n][mask].view(torch.uint8), source[n][mask].view(torch.uint8)), n
        assert (trained[n][~mask] != source[n][~mask]).float().mean() > moved_share, n


def test_train_writes_a_plain_model_with_the_region_bit_identical(tiny_folder, tmp_path, capsys):
    region = region_file(tiny_folder, tmp_path / "top.safetensors")
    out = tmp_path / "out"
    argv = ["train", "--model", str(tiny_folder), "--text", "ru", "--eval-langs", "es,zh"]
    assert main([*argv, "--freeze", str(tmp_path / "top.safetensors"), *TINY, *SHORT, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| Language | step 0 | step 2 | step 4 | after / before (95% interval) |" in printed

    # a plain Hugging Face folder: transformers loads it, and the frozen entries are the source's bit for bit
    trained = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    source = {n: p.detach() for n, p in make_model("gemma3").named_parameters()}
    assert_frozen_as_source(region, dict(trained.named_parameters()), source)
    embed = "model.embed_tokens.weight"  # outside the layers: not trained
    assert torch.equal(dict(trained.named_parameters())[embed], source[embed])
    summary = read_json(out / "train-summary.json")
    assert summary["frozen"] | {"region": None} == {
        "region": None,
        "values": "current",
        "entries": region.count(),
        "moved": 0,
        "bit_identical": True,
    }
    assert len(summary["history"]["loss"]) == 4 and sorted(summary["evals"], key=int) == ["0", "2", "4"]
    # the experiments' schedule (the first update already moves), not the Trainer's warm-up from lr 0
    assert summary["history"]["learning_rate"] == [1e-2 * freezing.lr_factor(s, 1, 4) for s in range(4)]

    # the step-0 perplexities are the source model's, and each change is the ratio of the saved results
    m = models.load(str(tiny_folder))
    for lang in ("ru", "es", "zh"):
        w = lr.windows(m, lang, "eval", 32, 16)
        assert summary["evals"]["0"][lang] == evaluation.perplexity(m.module, w, 4, False)
        want = uncertainty.ratio_entry(summary["evals"]["4"][lang], summary["evals"]["0"][lang], 0)
        assert summary["change"][lang] == want
    # provenance: model, text hash, tokens, seed, version
    assert summary["model"]["fingerprint"] == m.info["fingerprint"] and summary["seed"] == 0
    assert summary["train_text"]["text_sha256"] and summary["tokens_trained"] == 4 * 2 * 15
    assert summary["environment"]["lingregion"] == lr.__version__
    assert "bit-identical" in (out / "README.md").read_text() and (out / "figures" / "train.png").is_file()
    assert (out / "report.html").is_file() and not (out / "checkpoints").exists()

    # the same command again returns the finished run without training
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert main([*argv, "--freeze", str(tmp_path / "top.safetensors"), *TINY, *SHORT, "--out", str(out)]) == 0
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    # another run into the same folder is refused, not written over it
    assert (
        main([*argv, "--freeze", str(tmp_path / "top.safetensors"), *TINY, *SHORT, "--lr", "2e-2", "--out", str(out)])
        == 2
    )
    assert "already holds a model trained with other settings" in capsys.readouterr().err


def test_train_with_the_core_region_scored_first_and_held_removed(tiny_folder, tmp_path):
    out = tmp_path / "out"
    argv = ["train", "--model", str(tiny_folder), "--text", "ru", "--freeze", "core:top:0.05"]
    assert main([*argv, "--freeze-values", "removed", *TINY, *SHORT, "--out", str(out)]) == 0
    run = out / "run"
    region = Region.load(run / "regions" / "core-top-0.05.safetensors")
    assert region.meta["languages"] == ["ru", "es"] and (run / "scores" / "ru.safetensors").is_file()
    m = models.load(str(tiny_folder))
    trained = weights(out)
    for n in region.packed:
        assert torch.all(trained[n][region.mask(n)] == m.removed[n]), n  # held at θ_removed (−1 for (1 + w) norms)
    assert read_json(out / "train-summary.json")["frozen"]["bit_identical"]


def test_the_api_verb_trains_in_memory(loaded, tokenizer):
    m = loaded("gemma3")
    w = lr.windows(m, "ru", "score", 64, 16)
    evals = {"es": lr.windows(m, "es", "eval", 32, 16)}
    g = torch.Generator().manual_seed(0)
    region = lr.core({n: torch.rand(p.shape, generator=g) for n, p in m.module.named_parameters() if n in m.names})
    source = {n: p.detach().clone() for n, p in m.module.named_parameters()}
    m.module.model.layers[0].mlp.up_proj.weight.requires_grad_(False)  # a caller's flag, trained, then put back
    flags = {n: p.requires_grad for n, p in m.module.named_parameters()}
    summary = lr.train(m, w, freeze=region, eval=evals, steps=2, lr=1e-2, batch_size=2, progress=False)
    assert summary["frozen"]["bit_identical"] and sorted(summary["evals"]) == ["0", "1", "2"]
    assert_frozen_as_source(region, {n: p.detach() for n, p in m.module.named_parameters()}, source)
    assert {n: p.requires_grad for n, p in m.module.named_parameters()} == flags and not m.module.training


def test_compare_reports_forgetting_with_the_shared_intervals(tiny_folder, tmp_path, capsys):
    region = region_file(tiny_folder, tmp_path / "top.safetensors")
    out = tmp_path / "cmp"
    argv = [
        "train",
        "--model",
        str(tiny_folder),
        "--text",
        "ru",
        "--eval-langs",
        "es,zh",
        "--compare",
        "none,core,random",
    ]
    assert main([*argv, "--freeze", str(tmp_path / "top.safetensors"), *TINY, *SHORT, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| Setting | ru (trained) | es | zh | forgetting (geo. mean, untrained) |" in printed
    assert "Freezing the region reduces forgetting:" in printed
    result = read_json(out / "compare-summary.json")
    runs = {s: read_json(out / s / "train-summary.json") for s in ("none", "core", "random")}
    start = runs["none"]["evals"]["0"]
    assert all(r["evals"]["0"] == start for r in runs.values())  # every setting starts from the same weights
    ends = {s: r["evals"]["4"] for s, r in runs.items()}
    assert result["intervals"] == json.loads(json.dumps(pretraining.forgetting_intervals(start, ends, ["es", "zh"], 0)))
    assert result["verdict"]["verdict"] in (uncertainty.HOLDS, uncertainty.FAILS, uncertainty.INCONCLUSIVE)
    assert runs["none"]["frozen"] is None and runs["core"]["frozen"]["bit_identical"]
    random = runs["random"]["frozen"]
    assert random["bit_identical"] and random["entries"] == region.count() and random["region"]["side"] == "random"
    source = {n: p.detach() for n, p in make_model("gemma3").named_parameters()}
    assert_frozen_as_source(region, weights(out / "core"), source)


def test_train_on_your_own_text_tracks_its_held_out_documents(tiny_folder, tmp_path):
    from conftest import TEXT

    (tmp_path / "mine.txt").write_text("\n\n".join(TEXT * 4), encoding="utf-8")  # every 5th document held out
    out = tmp_path / "out"
    argv = ["train", "--model", str(tiny_folder), "--text", str(tmp_path / "mine.txt"), "--eval-langs", "es"]
    assert main([*argv, *TINY, *SHORT, "--out", str(out)]) == 0
    summary = read_json(out / "train-summary.json")
    assert summary["languages"] == ["text", "es"] and summary["train_text"]["source"] == str(tmp_path / "mine.txt")
    assert summary["eval_windows"]["text"]["split"] == "eval" and summary["frozen"] is None


def test_random_like_matches_the_region_parameter_by_parameter():
    model = make_model("llama")
    g = torch.Generator().manual_seed(0)
    region = lr.core({n: torch.rand(p.shape, generator=g) for n, p in model.named_parameters() if p.dim() == 2}, 0.1)
    control = pretraining.random_like(region, seed=3)
    assert all(control.count(n) == region.count(n) for n in region.packed)
    assert control.jaccard(region) < 0.5 and control.jaccard(pretraining.random_like(region, seed=3)) == 1.0


KILLED = """
import os, sys
from lingregion import pretraining
from lingregion.cli import main
step_end = pretraining.Track.on_step_end
def dying(self, args, state, control, **kw):
    if state.global_step == 3:  # after checkpoint-2 is on disk, before step 3 is saved: as a SIGKILL would
        os._exit(9)
    return step_end(self, args, state, control, **kw)
pretraining.Track.on_step_end = dying
sys.exit(main(sys.argv[1:]))
"""


def test_a_killed_run_resumes_from_its_last_checkpoint(tiny_folder, tmp_path):
    region_file(tiny_folder, tmp_path / "top.safetensors")
    argv = ["train", "--model", str(tiny_folder), "--text", "ru", "--eval-langs", "es"]
    argv += ["--freeze", str(tmp_path / "top.safetensors"), *TINY, *SHORT, "--steps", "5", "--eval-steps", "0,1,3,5"]
    assert main([*argv, "--out", str(tmp_path / "straight")]) == 0
    cut = tmp_path / "cut"
    done = subprocess.run([sys.executable, "-c", KILLED, *argv, "--out", str(cut)], capture_output=True, text=True)
    assert done.returncode == 9, done.stderr[-2000:]
    assert sorted(p.name for p in (cut / "checkpoints").iterdir() if p.name.startswith("checkpoint-")) == [
        "checkpoint-2"
    ]
    assert not (cut / "config.json").exists()  # no model until the run finishes
    assert main([*argv, "--out", str(cut)]) == 0
    straight, resumed = read_json(tmp_path / "straight" / "train-summary.json"), read_json(cut / "train-summary.json")
    assert resumed["resumed_from_step"] == 2 and straight["resumed_from_step"] is None
    assert resumed["evals"] == straight["evals"] and resumed["history"] == straight["history"]
    a, b = weights(tmp_path / "straight"), weights(cut)
    assert all(torch.equal(a[n], b[n]) for n in a)  # the same weights as an uninterrupted run, bit for bit


def test_checkpoints_of_another_run_are_refused(tiny_folder, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoints" / "checkpoint-2" / "trainer_state.json").write_text("{}")
    argv = ["train", "--model", str(tiny_folder), "--text", "ru", *TINY, *SHORT, "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the model's loading bar
    assert err.startswith("lingregion: error: ") and "checkpoints of another training run" in err


def test_two_processes_on_gloo_hold_the_region(tiny_folder, tmp_path):
    region = region_file(tiny_folder, tmp_path / "top.safetensors")
    out = tmp_path / "dist"
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    argv = ["-m", "lingregion.cli", "train", "--model", str(tiny_folder), "--text", "ru", "--eval-langs", "es"]
    argv += ["--freeze", str(tmp_path / "top.safetensors"), *TINY, *SHORT, "--out", str(out)]
    done = subprocess.run([*launcher, *argv], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = read_json(out / "train-summary.json")
    assert summary["frozen"]["bit_identical"] and len(summary["history"]["loss"]) == 4
    assert summary["evals"]["0"] == read_json(out / "train-summary.json")["evals"]["0"]
    source = {n: p.detach() for n, p in make_model("gemma3").named_parameters()}
    assert_frozen_as_source(region, weights(out), source)
    # the two ranks evaluated the windows between them: step 0 equals a single-process evaluation
    m = models.load(str(tiny_folder))
    assert summary["evals"]["0"]["es"]["ppl"] == pytest.approx(
        evaluation.perplexity(m.module, lr.windows(m, "es", "eval", 32, 16), 4, False)["ppl"], rel=1e-9
    )


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--freeze", "core:top:lots"], "'lots' is not a ratio"),
        (["--freeze", "nowhere.safetensors"], "not a region file, 'none', 'core:top:0.01' or 'mono:ru'"),
        (["--compare", "none,core"], "--compare needs a region to freeze"),
        (["--compare", "none,odd", "--freeze", "core:top:0.05"], "name settings among none, core, random"),
        (["--text", "klingon"], "--text klingon: neither a built-in language"),
        (["--freeze-values", "removed", "--lr", "-1"], "training needs lr > 0"),
    ],
)
def test_bad_input_is_one_line(tiny_folder, tmp_path, capsys, extra, message):
    argv = ["train", "--model", str(tiny_folder), "--text", "ru", *TINY, *SHORT, "--out", str(tmp_path / "o")]
    assert main([*argv, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the model's loading bar, if it loaded
    assert err.startswith("lingregion: error: ") and message in err
