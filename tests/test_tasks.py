"""The built-in parallel multiple-choice task (its items and the script that builds them), the direct
evaluator against a plain computation, and the in-process lm-eval path, also through `lingregion evaluate`."""

import gzip
import json
import math
import sys
import unicodedata
from pathlib import Path

import pytest
import torch

from lingregion import interventions, models, tasks
from lingregion.cli import main
from lingregion.config import PAPER_EVAL_LANGS
from lingregion.regions import select
from lingregion.store import LingregionError, sha256_file

from conftest import TEXT, long_model

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


def test_evaluate_command_runs_lmeval_tasks_on_the_region_removed_model(bos_tokenizer, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    folder = tmp_path / "tiny-long"
    long_model().save_pretrained(folder)
    bos_tokenizer.save_pretrained(folder)
    m = models.load(str(folder))
    names = models.scored_names(m.module)
    params = dict(m.module.named_parameters())
    region = select(
        {n: params[n].detach().float().abs() for n in names}, 0.05, "top", meta={"model": m.info["fingerprint"]}
    )
    path = tmp_path / "core-top-0.05.safetensors"
    region.save(path)
    removed = models.removed_values(m.module, names)
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
