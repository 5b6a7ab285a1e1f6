"""Export of a region-removed model, the built-in parallel multiple-choice task, and the lm-eval path."""

import gzip
import json
import math
import sys
import unicodedata
from pathlib import Path

import pytest
import torch
from tokenizers import processors
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from lingregion import corpus, evaluation, export, interventions, models, tasks
from lingregion.cli import main
from lingregion.config import PAPER_EVAL_LANGS
from lingregion.regions import select
from lingregion.store import LingregionError, sha256_file, write_tensors

from conftest import CONFIGS, TEXT

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import build_task  # noqa: E402


# --- the built-in task --------------------------------------------------------------------------------
def test_items_are_parallel_across_languages_with_exactly_one_true_continuation():
    langs = tasks.languages()
    assert len(langs) >= 12 and set(PAPER_EVAL_LANGS) <= set(langs)
    m = tasks.manifest()
    ref = tasks.load_items("en")
    assert len(ref) == m["items"] >= 40 and sorted(it["unit"] for it in ref) == list(range(m["units"]))
    for lang in langs:
        assert sha256_file(tasks.items_path(lang)) == m["languages"][lang]["sha256"], lang
        items = tasks.load_items(lang)
        # parallel: the same paragraphs, candidates and answer position in every language
        assert [(it["id"], it["article"], it["unit"], it["units"], it["label"]) for it in items] == [
            (it["id"], it["article"], it["unit"], it["units"], it["label"]) for it in ref
        ], lang
        ending = {it["unit"]: it["choices"][it["label"]] for it in items}
        for it in items:
            assert len(it["choices"]) == 4 and len(set(it["choices"])) == 4, (lang, it["id"])
            assert it["context"] and all(it["choices"]), (lang, it["id"])
            # exactly one candidate is the context's own ending: the others end other paragraphs
            assert [u == it["unit"] for u in it["units"]].count(True) == 1 and it["units"][it["label"]] == it["unit"]
            assert [c == ending[it["unit"]] for c in it["choices"]].count(True) == 1, (lang, it["id"])
            assert all(c == ending[u] for u, c in zip(it["units"], it["choices"])), (lang, it["id"])
            others = {ref[u]["article"] for u in it["units"] if u != it["unit"]}
            assert it["article"] not in others, (lang, it["id"])


def _paragraph(lang, a, p):
    words = " ".join(f"w{a}x{p}y{k}" for k in range(3 + (7 * a + 3 * p) % 9))
    return (
        f"{lang} article {a} paragraph {p}: {words}."
        if lang not in build_task.UNSPACED
        else f"{lang}第{a}条第{p}段、" + "字" * (5 + (7 * a + 3 * p) % 9) + "。"
    )


def _fake_udhr(root: Path, paragraphs_per_article) -> Path:
    """A udhr-shaped package: every language's declaration with the given paragraphs per article."""
    decl = root / "declaration"
    decl.mkdir(parents=True)
    (root / "package.json").write_text(json.dumps({"version": "6.0.0"}))
    for lang, code in build_task.FILES.items():
        arts = "".join(
            f'<article data-number="{a}"><h2>{a}</h2>'
            + "".join(f"<p>{_paragraph(lang, a, p)}</p>" for p in range(paragraphs_per_article(lang, a)))
            + "</article>"
            for a in build_task.ARTICLES
        )
        (decl / f"{code}.html").write_text(
            f"<html><body><header><p>{lang} preamble</p></header>{arts}</body></html>", encoding="utf-8"
        )
    return root


def test_build_script_is_deterministic_and_refuses_unaligned_translations(tmp_path):
    per_article = lambda lang, a: 1 + (a % 3 == 0)  # noqa: E731
    src = _fake_udhr(tmp_path / "udhr", per_article)
    assert build_task.main(["--udhr", str(src), "--out", str(tmp_path / "a")]) == 0
    assert build_task.main(["--udhr", str(src), "--out", str(tmp_path / "b")]) == 0
    for f in sorted((tmp_path / "a").iterdir()):
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes(), f.name
    paragraphs = [(a, p) for a in build_task.ARTICLES for p in range(per_article("", a))]
    for lang in ("ru", "zh"):
        with gzip.open(tmp_path / "a" / f"{lang}.jsonl.gz", "rt", encoding="utf-8") as f:
            items = [json.loads(line) for line in f]
        assert len(items) == len(paragraphs)
        for it in items:
            a, p = paragraphs[it["unit"]]
            assert it["context"] + it["choices"][it["label"]] == _paragraph(lang, a, p)  # the true ending
            assert "preamble" not in it["context"]
            for u, c in zip(it["units"], it["choices"]):
                assert _paragraph(lang, *paragraphs[u]).endswith(c)
                assert u == it["unit"] or paragraphs[u][0] != a  # distractors end other articles
    bad = _fake_udhr(tmp_path / "bad", lambda lang, a: 2 if (lang, a) == ("ja", 5) else 1)
    assert build_task.main(["--udhr", str(bad), "--out", str(tmp_path / "c")]) == 2
    assert not (tmp_path / "c").exists()


def test_cut_keeps_the_text_and_graphemes():
    assert build_task.cut("one two three four five", "en") == ("one two three ", "four five")
    ctx, end = build_task.cut("甲乙丙丁戊、己庚辛壬癸", "zh")
    assert (ctx, end) == ("甲乙丙丁戊、", "己庚辛壬癸")
    thai = "ภาษาไทยไม่มีช่องว่างระหว่างคำเลย"
    ctx, end = build_task.cut(thai, "th")
    assert ctx + end == thai and not unicodedata.category(end[0]).startswith("M")


# --- scoring ------------------------------------------------------------------------------------------
@pytest.fixture
def bos_tokenizer(tokenizer):
    """The tiny tokenizer, adding BOS as Gemma's does."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend_tokenizer.__class__.from_str(tokenizer.backend_tokenizer.to_str()),
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
    )
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tok.bos_token_id)]
    )
    return tok


def long_model(family="gemma3"):
    """A tiny model with room for a paragraph of byte-level tokens."""
    cfg = CONFIGS[family]()
    cfg.max_position_embeddings = cfg.n_positions = 2048
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def reference_loglik(model, tokenizer, context, choice, max_length=None):
    """log p(choice | context), one sequence at a time, from the model's own full logits: the context's
    own tokens, then the tokens of context + choice past them (lm-eval's split), the start of the context
    dropped if the whole does not fit."""
    ctx = tokenizer(context.rstrip()).input_ids
    cont = tokenizer(context + choice).input_ids[len(ctx) :]
    seq = ctx + cont
    if max_length and len(seq) - 1 > max_length:
        seq = seq[len(seq) - 1 - max_length :]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([seq])).logits[0].double(), -1)
    return sum(logp[i - 1, seq[i]].item() for i in range(len(seq) - len(cont), len(seq)))


@pytest.mark.parametrize("family", ["gemma3", "gpt2"])
def test_direct_evaluator_matches_a_plain_computation(family, bos_tokenizer):
    model = long_model(family)
    items = tasks.load_items("ru", 3) + tasks.load_items("ja", 2)
    got = tasks.loglikelihoods(model, bos_tokenizer, items, batch_size=3)  # batches cut across items
    for it, lls in zip(items, got):
        ref = [reference_loglik(model, bos_tokenizer, it["context"], c) for c in it["choices"]]
        assert lls == pytest.approx(ref, rel=1e-5, abs=1e-3)
    r = tasks.accuracy(items, got)
    acc = [max(range(4), key=lambda k: ll[k]) == it["label"] for it, ll in zip(items, got)]
    norm = [max(range(4), key=lambda k: ll[k] / len(it["choices"][k])) == it["label"] for it, ll in zip(items, got)]
    assert r["acc"] == sum(acc) / 5 and r["acc_norm"] == sum(norm) / 5 and r["items"] == 5 and r["chance"] == 0.25
    p = sum(acc) / 5
    assert r["acc_stderr"] == pytest.approx(math.sqrt(sum((a - p) ** 2 for a in acc) / 4 / 5))


def test_long_items_lose_the_start_of_their_context(tiny, bos_tokenizer):
    model = tiny("gemma3")  # 128 positions
    items = [
        {"id": k, "context": TEXT[1] * 3 + " " + TEXT[k], "choices": [t[:30] for t in TEXT[:4]], "label": k}
        for k in range(2)
    ]
    assert all(len(bos_tokenizer(it["context"]).input_ids) > 150 for it in items)
    got = tasks.loglikelihoods(model, bos_tokenizer, items, batch_size=8)
    for it, lls in zip(items, got):
        ref = [reference_loglik(model, bos_tokenizer, it["context"], c, 128) for c in it["choices"]]
        assert lls == pytest.approx(ref, rel=1e-5, abs=1e-3)
    long = [{"id": 0, "context": "a", "choices": ["b " * 200] * 4, "label": 0}]
    assert tasks.longest_candidate(bos_tokenizer, long) > 128 == tasks.max_length(model)
    with pytest.raises(LingregionError, match="does not fit the model's 128 positions"):
        tasks.loglikelihoods(model, bos_tokenizer, long)


def test_accuracy_counts_the_right_answers():
    items = [{"choices": ["a", "bb", "ccc", "d"], "label": k} for k in (0, 2, 1)]
    lls = [[-1.0, -2.0, -3.0, -4.0], [-9.0, -8.0, -6.0, -7.0], [-5.0, -5.0, -8.0, -9.0]]  # tie → first
    r = tasks.accuracy(items, lls)
    assert r["acc"] == pytest.approx(2 / 3)
    # per character: [-1, -1, -1, -4] → 0 (tie), [-9, -4, -2, -7] → 2, [-5, -2.5, -2.67, -9] → 1: all right
    assert r["acc_norm"] == 1.0


def test_bad_task_inputs():
    with pytest.raises(LingregionError, match="has no language 'xx'"):
        tasks.load_items("xx")


def test_lmeval_in_process_agrees_with_the_direct_evaluator(tiny, bos_tokenizer, tmp_path):
    pytest.importorskip("lm_eval")
    model = long_model()
    names = dict(model.named_parameters())
    scored = models.scored_names(model)
    region = select({n: names[n].detach().abs() for n in scored}, 0.2, "top")
    edits = interventions.removal(region, models.removed_values(model, scored))
    task = tasks.LMEVAL_PREFIX + "ru"
    base_ll = None
    for setting in ([], edits):  # base, then the same model object with a region removed
        with interventions.applied(model, setting):
            ours = tasks.evaluate(model, bos_tokenizer, "ru", limit=6)
            theirs = tasks.lmeval(model, bos_tokenizer, [task], limit=6, samples=True)[task]
        for a, b in zip(ours["loglik"], theirs["loglik"]):
            assert a == pytest.approx(b, rel=1e-4, abs=1e-2)
        assert theirs["acc"] == ours["acc"] and theirs["acc_norm"] == ours["acc_norm"]
        assert theirs["target"] == [it["label"] for it in tasks.load_items("ru", 6)]
        if setting:
            assert ours["loglik"] != base_ll  # the removal reached lm-eval's forward passes
        base_ll = ours["loglik"]
    # contexts longer than the model's 128 positions lose their start in both
    short = tiny("gemma3")
    items = [
        {"id": k, "context": TEXT[1] * 3 + " " + TEXT[k], "choices": [t[:30] for t in TEXT[:4]], "label": k}
        for k in range(3)
    ]
    (tmp_path / "long.jsonl").write_text(
        "\n".join(json.dumps(it, ensure_ascii=False) for it in items), encoding="utf-8"
    )
    config = {**tasks.lmeval_config("ru", tmp_path / "long.jsonl"), "task": "long_contexts"}
    theirs = tasks.lmeval(short, bos_tokenizer, [config], samples=True)["long_contexts"]
    for a, b in zip(tasks.evaluate(short, bos_tokenizer, "ru", items)["loglik"], theirs["loglik"]):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-2)
    with pytest.raises(LingregionError, match="lm-eval: .*no_such_task"):
        tasks.lmeval(model, bos_tokenizer, ["no_such_task"], limit=1)
    with pytest.raises(LingregionError, match="no task or group 'no_such_task'"):
        tasks.check_lmeval_tasks(["mmlu", "lingregion_udhr_next_ru", "no_such_task"])
    with pytest.raises(LingregionError, match="has no language 'xx'"):
        tasks.check_lmeval_tasks(["lingregion_udhr_next_xx"])


def test_lmeval_yaml_files(tmp_path):
    yaml = pytest.importorskip("yaml")
    paths = tasks.write_lmeval_tasks(tmp_path, ["ru", "zh"])
    cfg = yaml.safe_load(paths[1].read_text(encoding="utf-8"))
    assert cfg == tasks.lmeval_config("zh") and cfg["task"] == "lingregion_udhr_next_zh"
    assert Path(cfg["dataset_kwargs"]["data_files"]["test"]) == tasks.items_path("zh")


# --- export -------------------------------------------------------------------------------------------
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


def test_export_refuses_to_overwrite_and_replaces_with_force(loaded, tmp_path):
    m = loaded()
    region, path, removed = _region_on(m, tmp_path, with_scores=False)
    out = tmp_path / "exported"
    (out / "old.txt").parent.mkdir()
    (out / "old.txt").write_text("x")
    record = export.region_record(region, path, m.module, removed)
    assert record["scores"] == {}
    with pytest.raises(LingregionError, match="not empty"):
        export.export(m.module, m.tokenizer, out, [], record)
    assert (out / "old.txt").is_file()
    export.export(m.module, m.tokenizer, out, interventions.removal(region, removed), record, force=True)
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()
    assert "were not found" in (out / "README.md").read_text(encoding="utf-8")


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
    from conftest import make_model

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


# --- the downstream experiment ------------------------------------------------------------------------
DOWN = [
    "--seq-len",
    "16",
    "--score-tokens",
    "32",
    "--eval-tokens",
    "32",
    "--score-langs",
    "ru,es",
    "--eval-langs",
    "ru,en",
    "--ratios",
    "0.05",
    "--batch-size",
    "2",
    "--experiments",
    "downstream",
]


def test_downstream_experiment_matches_a_direct_evaluation_and_resumes(bos_tokenizer, tmp_path, capsys, monkeypatch):
    pytest.importorskip("lm_eval")
    folder = tmp_path / "tiny-long"
    long_model().save_pretrained(folder)
    bos_tokenizer.save_pretrained(folder)
    out = tmp_path / "run"
    m = models.load(str(folder))
    names = models.scored_names(m.module)
    mono = select(
        {
            n: torch.rand(p.shape, generator=torch.Generator().manual_seed(1))
            for n, p in m.module.named_parameters()
            if n in names
        },
        0.03,
        "top",
        meta={"model": m.info["fingerprint"], "label": "monolingual-ru"},
    )
    mono.save(out / "regions" / "monolingual-ru-0.03.safetensors")  # as the monolingual experiment leaves it
    (tmp_path / "cfg.yaml").write_text(
        "down_langs: [ru, en]\ndown_items: 3\ndown_ratio: 0.05\ndown_batch: 5\n"
        "down_lmeval_tasks: [lingregion_udhr_next_ru]\ndown_lmeval_limit: 3\n"
    )
    argv = ["reproduce", "--model", str(folder), "--out", str(out), "--config", str(tmp_path / "cfg.yaml"), *DOWN]
    assert main(argv) == 0, capsys.readouterr().err
    res = json.loads((out / "results" / "downstream-summary.json").read_text())
    assert res["settings"] == ["base", "top@0.05", "bottom@0.05", "random@0.05", "mono-ru"]
    assert res["items"] == {"ru": 3, "en": 3} and res["model"]["fingerprint"] == m.info["fingerprint"]
    removed = models.removed_values(m.module, names)
    from lingregion.regions import Region

    for setting, file in [("base", None), ("top@0.05", "core-top-0.05"), ("mono-ru", "monolingual-ru-0.03")]:
        edits = interventions.removal(Region.load(out / "regions" / f"{file}.safetensors"), removed) if file else []
        with interventions.applied(m.module, edits):
            for lang in ("ru", "en"):
                direct = tasks.evaluate(m.module, m.tokenizer, lang, limit=3)
                assert res["accuracy"][setting][lang]["acc"] == direct["acc"], (setting, lang)
                assert res["accuracy"][setting][lang]["acc_norm"] == direct["acc_norm"], (setting, lang)
            lm = res["lmeval"][setting]["lingregion_udhr_next_ru"]
            assert lm["acc"] == res["accuracy"][setting]["ru"]["acc"]  # lm-eval on the same model object agrees
    ppl = json.loads((out / "results" / "removal.json").read_text())["entries"]
    assert res["perplexity"]["top@0.05"]["ru"]["ratio"] == ppl["top@0.05/ru"]["ppl"] / ppl["base/ru"]["ppl"]
    assert "mono-ru/ru" in json.loads((out / "results" / "monolingual.json").read_text())["entries"]
    report_md = (out / "report.md").read_text(encoding="utf-8")
    assert "Downstream: multiple-choice accuracy" in report_md and (out / "figures" / "downstream.png").is_file()
    assert "first_chosen" in report_md

    def fail(*a, **k):
        raise AssertionError("recomputed a cached result")

    monkeypatch.setattr(tasks, "loglikelihoods", fail)
    monkeypatch.setattr(tasks, "lmeval", fail)
    assert main(argv + ["--mono-focus", "uk"]) == 0  # a rerun (other experiments' settings changed) resumes
    assert json.loads((out / "results" / "downstream-summary.json").read_text())["accuracy"] == res["accuracy"]


def test_downstream_is_skipped_for_a_model_too_short_for_the_items(tiny_folder, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["reproduce", "--model", str(tiny_folder), "--out", str(out), *DOWN]
    assert main(argv) == 0, capsys.readouterr().err
    res = json.loads((out / "results" / "downstream-summary.json").read_text())
    assert "128 positions" in res["skipped"] and "Not run: the model takes 128" in (out / "report.md").read_text()


def test_downstream_config_is_checked_before_anything_runs(tiny_folder, tmp_path, capsys):
    (tmp_path / "cfg.yaml").write_text("down_langs: [ru, xx]\n")
    argv = [
        "reproduce",
        "--model",
        str(tiny_folder),
        "--out",
        str(tmp_path / "run"),
        "--config",
        str(tmp_path / "cfg.yaml"),
        *DOWN,
    ]
    assert main(argv) == 2 and "down_langs xx" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_every_command_and_option_has_help_text():
    import argparse

    from lingregion.cli import parser

    sub = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    summaries = {c.dest: c.help for c in sub._choices_actions}
    for name, p in sub.choices.items():
        assert summaries[name] and p.description, name
        for a in p._actions:
            assert a.help or isinstance(a, argparse._HelpAction), (name, a.option_strings or a.dest)


def test_evaluate_command_runs_lmeval_tasks_on_the_region_removed_model(bos_tokenizer, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    folder = tmp_path / "tiny-long"
    long_model().save_pretrained(folder)
    bos_tokenizer.save_pretrained(folder)
    m = models.load(str(folder))
    region, path, removed = _region_on(m, tmp_path)
    argv = ["evaluate", "--model", str(folder), "--lmeval-tasks", "lingregion_udhr_next_en", "--lmeval-limit", "4"]
    assert main(argv + ["--remove", str(path)]) == 0
    out = capsys.readouterr().out
    with interventions.applied(m.module, interventions.removal(region, removed)):
        direct = tasks.evaluate(m.module, m.tokenizer, "en", limit=4)
    assert f"| lingregion_udhr_next_en | acc | {direct['acc']:.3f} |" in out
    assert main(["evaluate", "--model", str(folder)]) == 2
    assert "--lmeval-tasks" in capsys.readouterr().err


@pytest.mark.integration
def test_real_model_solves_the_task_and_lmeval_agrees_with_its_tokenizer():
    """Gemma's tokenizer adds BOS: the direct evaluator and lm-eval must condition on it alike."""
    pytest.importorskip("lm_eval")
    m = models.load()
    ours = tasks.evaluate(m.module, m.tokenizer, "en", limit=3)
    theirs = tasks.lmeval(m.module, m.tokenizer, [tasks.LMEVAL_PREFIX + "en"], limit=3, samples=True)
    for a, b in zip(ours["loglik"], theirs[tasks.LMEVAL_PREFIX + "en"]["loglik"]):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-3)
    assert ours["acc"] >= 2 / 3  # 95% on the first 20 English items: far above chance (25%)
    assert tasks.encode(m.tokenizer, "Hello ", "world")[0][0] == m.tokenizer.bos_token_id
