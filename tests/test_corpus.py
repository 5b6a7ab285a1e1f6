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


# --- the larger, parallel corpus (issue 16) -------------------------------------------------------------
def _aligned_files(tmp_path):
    en = [{"id": f"doc{u}#{p}", "text": f"Sentence {u}.{p}: " + TEXT[0]} for u in range(20) for p in range(2)]
    ru = [{"id": r["id"], "text": r["id"] + " " + TEXT[1]} for r in en if r["id"] != "doc7#1"]
    ru.reverse()  # another order: parallel windows must still come out in one order
    ru.append({"id": "only-ru#0", "text": "Только по-русски. " + TEXT[1]})
    for name, rows in (("en", en), ("ru", ru)):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    return {"en": str(tmp_path / "en.jsonl"), "ru": str(tmp_path / "ru.jsonl")}


def test_parallel_windows_cover_the_same_ids_in_the_same_order(tmp_path, tokenizer):
    texts = _aligned_files(tmp_path)
    metas = {}
    for lang in ("en", "ru"):
        rows, _ = corpus.read_records(lang, "score", texts[lang])
        # a user's id decides the split by its unit, the same in every language
        assert all(r["split"] == corpus.corpus_sources.split_of(r["id"]) for r in rows)
        w = corpus.load_windows(
            tokenizer, lang, "score", 32, 10_000, texts[lang], parallel=True, parallel_with=["en", "ru"], texts=texts
        )
        metas[lang] = w.meta["parallel"]
    assert metas["en"] == metas["ru"]
    assert metas["en"]["first_id"].startswith("doc0#") and "doc7#1" not in str(metas)
    rows, _ = corpus.read_records("en", "score", texts["en"])
    ids = [r["id"] for r in rows if r["id"] != "doc7#1"]
    assert metas["en"]["documents"] == len(ids)
    assert metas["en"]["ids_sha256"] == corpus.sha256_bytes("\n".join(ids).encode("utf-8"))
    with pytest.raises(LingregionError, match="parallel_with"):
        corpus.load_windows(tokenizer, "en", "score", 32, 64, texts["en"], parallel=True)


def test_builtin_parallel_windows_and_genres(tokenizer):
    ws = {
        lang: corpus.load_windows(
            tokenizer, lang, "eval", 64, 256, parallel=True, parallel_with=["ar", "zh", "uk"], genres=["legal"]
        )
        for lang in ("ar", "zh", "uk")
    }
    assert len({w.meta["parallel"]["ids_sha256"] for w in ws.values()}) == 1
    assert all(set(w.meta["genres"]) == {"legal"} and w.meta["genre_filter"] == ["legal"] for w in ws.values())
    with pytest.raises(LingregionError, match="no eval text of genre"):
        corpus.load_windows(tokenizer, "zh", "eval", 64, 256, genres=["scripture"])
    w = corpus.load_windows(tokenizer, "ru", "score", 64, 128)  # the default: every genre, format-1 text first
    assert w.meta["parallel"] is None and "generated-prose" in w.meta["genres"]


def test_language_table(tokenizer):
    table = corpus.language_table(tokenizer, ["ta"])
    for split in ("score", "eval"):
        entry = table["ta"][split]
        assert set(entry) == {"documents", "bytes", "tokens"} and min(entry.values()) > 0
    json.dumps(table)  # what `lingregion languages --json` prints


def test_text_files_are_read_a_chunk_at_a_time_as_if_whole(tmp_path, monkeypatch):
    """Documents come out exactly as the whole text's split on blank lines (\\r\\n read as \\n, as before), however
    the chunks fall; with a character budget each is cut to it, the rest of a long one skipped unread."""
    text = "a\n\n\nb\r\n\r\nc\n\n\n\nd" + "e" * 50 + "\n\nf\n"
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8", newline="")
    whole = path.read_text(encoding="utf-8").split("\n\n")
    for chunk in (1, 2, 3, 7, 1 << 20):
        monkeypatch.setattr(corpus, "READ_CHUNK", chunk)
        assert list(corpus._txt_documents(path, None)) == whole, chunk
        assert list(corpus._txt_documents(path, 10)) == [d[:10] for d in whole], chunk


def test_a_long_single_line_is_cut_to_the_budget_before_tokenizing(tmp_path, tokenizer):
    """A one-line file of megabytes makes its windows from the budget's worth of text, not from all of it, and
    they are the windows the whole line gives."""
    line = " ".join(TEXT) + " "
    (tmp_path / "big.txt").write_text(line * 20_000, encoding="utf-8")  # 5 MB, one line
    lengths = []

    def spy(text, **kw):
        lengths.append(len(text))
        return tokenizer(text, **kw)

    spy.bos_token_id = tokenizer.bos_token_id
    w = corpus.load_windows(spy, "xx", "score", 16, 32, str(tmp_path / "big.txt"))
    assert len(lengths) == 1 and lengths[0] <= corpus.MAX_CHARS_PER_TOKEN * 32  # of 5 MB
    uncut = corpus.make_windows(tokenizer, [line * 100], 16, 32)
    assert [x.tolist() for x in w.input_ids] == [x.tolist() for x in uncut.input_ids]
    assert w.n_bytes == uncut.n_bytes


def test_a_parquet_file_without_a_text_column_is_one_line(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["Квантовая механика."]}), tmp_path / "t.parquet")
    with pytest.raises(LingregionError, match=r"t.parquet: no 'text' column \(columns: body\)"):
        corpus.read_documents("xx", "score", str(tmp_path / "t.parquet"))
    (tmp_path / "n.parquet").write_text("not parquet")
    with pytest.raises(LingregionError, match="n.parquet: not a readable parquet file"):
        corpus.read_documents("xx", "score", str(tmp_path / "n.parquet"))


def test_fetch_stages_beside_the_cache_and_rebuilds_what_does_not_match(tmp_path, monkeypatch):
    """With TMPDIR on tmpfs the files are still renamed into place (staged beside the cache, on its filesystem);
    a fetch over files with the manifest's hashes returns at once, and a corrupt one is rebuilt."""
    import os
    import tempfile
    from pathlib import Path

    from lingregion import corpus_sources

    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs a tmpfs apart from the test's temporary folder")
    tmpdir = Path(tempfile.mkdtemp(dir=shm))
    try:
        monkeypatch.setenv("TMPDIR", str(tmpdir))
        monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
        monkeypatch.setenv("LINGREGION_CACHE", str(tmp_path / "cache"))
        (tmp_path / "data").mkdir()
        (tmp_path / "data" / "xx.jsonl.gz").write_bytes(corpus_sources.gz_lines([{"text": "Old.", "source": "x"}]))
        monkeypatch.setattr(corpus, "_data_dir", lambda: tmp_path / "data")
        docs = {"xx": [("bible", f"bible:GEN.{c}#1", f"Verse {c}.") for c in range(1, 40)]}
        built = corpus_sources.write_tier(corpus_sources.assemble(docs, {"xx": ["Old."]}), "full", str(tmp_path / "x"))
        m = {"version": 99, "languages": {"xx": {"iso639_3": "xxx", "full": {"sha256": built["xx"]["sha256"]}}}}
        monkeypatch.setattr(corpus, "manifest", lambda: m)
        fetched = []
        monkeypatch.setattr(corpus_sources, "fetch_sources", lambda dl: fetched.append(dl) or {})
        monkeypatch.setattr(corpus_sources, "collect", lambda src, iso3: (docs, {}))

        target = corpus.fetch(progress=lambda s: None)
        assert target == tmp_path / "cache" / "corpus" / "v99" and len(fetched) == 1
        assert sha256_file(target / "xx.jsonl.gz") == built["xx"]["sha256"]
        assert not fetched[0].startswith(str(tmpdir)) and not os.listdir(tmpdir)  # nothing staged on tmpfs
        assert os.listdir(tmp_path / "cache" / "corpus") == ["v99"]  # the staging folder is gone
        assert corpus.fetch(progress=lambda s: None) == target and len(fetched) == 1  # checked, not rebuilt
        (target / "xx.jsonl.gz").write_bytes(b"corrupt")
        corpus.fetch(progress=lambda s: None)
        assert len(fetched) == 2 and sha256_file(target / "xx.jsonl.gz") == built["xx"]["sha256"]
    finally:
        import shutil

        shutil.rmtree(tmpdir, ignore_errors=True)
