import gzip
import json

import pytest

from lingregion import corpus
from lingregion.config import PAPER_EVAL_LANGS, PAPER_SCORE_LANGS
from lingregion.store import LingregionError, sha256_file

from conftest import TEXT


def test_builtin_corpus_covers_the_paper_languages_with_disjoint_splits():
    langs = corpus.builtin_languages()
    assert len(langs) >= 30
    assert set(PAPER_SCORE_LANGS + PAPER_EVAL_LANGS) <= set(langs)
    m = corpus.manifest()
    for lang in langs:
        score, _ = corpus.read_documents(lang, "score")
        ev, _ = corpus.read_documents(lang, "eval")
        assert score and ev, lang
        assert not set(score) & set(ev), lang
        info = m["languages"][lang]
        assert info["sources"] and all(s in m["sources"] for s in info["sources"])
        assert sha256_file(corpus._data_dir() / f"{lang}.jsonl.gz") == info["sha256"]
    assert all(src["licence"] for src in m["sources"].values())


def test_long_documents_are_split_not_dropped(tokenizer):
    long_doc = " ".join(TEXT * 4)
    n = len(tokenizer(long_doc, add_special_tokens=False)["input_ids"])
    w = corpus.make_windows(tokenizer, [long_doc], 16, 10_000)
    assert w.n_tokens == n  # every token of the document is predicted somewhere
    assert all(ids[0] == tokenizer.bos_token_id for ids in w.input_ids)
    assert [len(ids) for ids in w.input_ids[:-1]] == [16] * (len(w.input_ids) - 1)
    joined = [t for ids in w.input_ids for t in ids[1:].tolist()]
    assert joined == tokenizer(long_doc, add_special_tokens=False)["input_ids"]


def test_budget_counts_window_positions(tokenizer):
    w = corpus.make_windows(tokenizer, TEXT * 5, 16, 64)
    assert len(w.input_ids) == 4 and w.n_tokens == 4 * 15
    assert w.meta["tokens"] == w.n_tokens and w.meta["windows"] == 4 and w.meta["seq_len"] == 16


def test_user_text_formats(tmp_path, tokenizer):
    docs = [f"Document number {i}. " + TEXT[i % len(TEXT)] for i in range(10)]
    (tmp_path / "a.txt").write_text("\n\n".join(docs), encoding="utf-8")
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs), encoding="utf-8")
    for f in ("a.txt", "a.jsonl"):
        score, source = corpus.read_documents("xx", "score", str(tmp_path / f))
        ev, _ = corpus.read_documents("xx", "eval", str(tmp_path / f))
        assert ev == [docs[4], docs[9]] and score == [d for i, d in enumerate(docs) if i % 5 != 4]
        assert source.endswith(f)


def test_bad_text_inputs(tmp_path, tokenizer):
    with pytest.raises(LingregionError, match="unknown language 'xx'"):
        corpus.read_documents("xx", "score")
    with pytest.raises(LingregionError, match="not found"):
        corpus.read_documents("xx", "score", str(tmp_path / "missing.txt"))
    (tmp_path / "short.txt").write_text("tiny", encoding="utf-8")
    with pytest.raises(LingregionError, match="too short"):
        corpus.make_windows(tokenizer, ["tiny"], 16, 64, "xx")
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n', encoding="utf-8")
    with pytest.raises(LingregionError, match='"text" field'):
        corpus.read_documents("xx", "score", str(tmp_path / "bad.jsonl"))
    (tmp_path / "x.csv").write_text("a,b", encoding="utf-8")
    with pytest.raises(LingregionError, match="unsupported file type"):
        corpus.read_documents("xx", "score", str(tmp_path / "x.csv"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(LingregionError, match="not UTF-8"):
        corpus.read_documents("xx", "score", str(tmp_path / "latin1.txt"))


def test_corpus_files_are_plain_json_lines():
    with gzip.open(corpus._data_dir() / "ru.jsonl.gz", "rt", encoding="utf-8") as f:
        first = json.loads(f.readline())
    assert set(first) == {"split", "source", "text"}
