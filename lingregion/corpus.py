"""Text → token windows.

Each language's documents are joined into one stream, tokenized once, and cut into disjoint windows of
`seq_len` tokens: a BOS token followed by `seq_len - 1` text tokens, every one of which is predicted.
Long documents are split across windows, never dropped. Each window also knows how many UTF-8 bytes of
text its predicted tokens cover, for bits per byte.

The built-in corpus ships inside the package (see data/corpus/SOURCES.md); `score` and `eval` splits are
disjoint sets of documents. User text goes through the same split (every 5th document to `eval`).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

import torch

from .store import LingregionError, sha256_bytes

SPLITS = ("score", "eval")
MIN_TOKENS = 32
SEPARATOR = "\n\n"


def _data_dir() -> Path:
    return Path(str(files("lingregion").joinpath("data", "corpus")))


def manifest() -> dict:
    """The built-in corpus's manifest.json: its version, sources and languages (documents, sizes, hashes)."""
    return json.loads((_data_dir() / "manifest.json").read_text(encoding="utf-8"))


def builtin_languages() -> list[str]:
    """The codes of the languages the built-in corpus has, sorted."""
    return sorted(manifest()["languages"])


def _split(records: list[tuple[str, str]], split: str) -> list[str]:
    """records: (split, text) pairs; user text has split None and is divided like the built-in corpus."""
    out = []
    for i, (s, text) in enumerate(records):
        s = s or ("eval" if i % 5 == 4 else "score")
        if s == split:
            out.append(text)
    return out


def read_documents(lang: str, split: str, path: str | None = None) -> tuple[list[str], str]:
    """The documents of one language and split, and a description of where they came from.

    path: None for the built-in corpus; a .txt (documents separated by blank lines), .jsonl (a "text"
    field per line) or .parquet (a "text" column) file; or "hf:NAME[:CONFIG]" for a Hugging Face dataset.
    """
    if split not in SPLITS:
        raise LingregionError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if path is None:
        f = _data_dir() / f"{lang}.jsonl.gz"
        if not f.is_file():
            raise LingregionError(
                f"unknown language {lang!r}; built-in languages are {', '.join(builtin_languages())}, "
                f"or pass your own text as --lang {lang}=PATH"
            )
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            rows = [json.loads(line) for line in fh]
        return _split([(r["split"], r["text"]) for r in rows], split), f"builtin:{lang}"
    return _split([(None, t) for t in _read_user_text(lang, path)], split), path


def _read_user_text(lang: str, path: str) -> list[str]:
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
        return [t for t in ds["text"] if t and t.strip()]
    p = Path(path).expanduser()
    if not p.is_file():
        raise LingregionError(f"text for {lang} not found at {path}; pass an existing .txt, .jsonl or .parquet file")
    try:
        if p.suffix == ".txt":
            docs = p.read_text(encoding="utf-8").split("\n\n")
        elif p.suffix == ".jsonl":
            docs = [json.loads(line)["text"] for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
        elif p.suffix == ".parquet":
            import pyarrow.parquet as pq

            docs = pq.read_table(p, columns=["text"]).column("text").to_pylist()
        else:
            raise LingregionError(f"{path}: unsupported file type {p.suffix!r}; use .txt, .jsonl or .parquet")
    except UnicodeDecodeError:
        raise LingregionError(f"{path}: not UTF-8 text; convert it to UTF-8") from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise LingregionError(f'{path}: each line must be a JSON object with a "text" field') from None
    except ImportError:
        raise LingregionError("reading .parquet needs pyarrow; pip install 'lingregion[data]'") from None
    return [d.strip() for d in docs if d and d.strip()]


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


def load_windows(tokenizer, lang: str, split: str, seq_len: int, max_tokens: int, path: str | None = None) -> Windows:
    docs, source = read_documents(lang, split, path)
    if not docs:
        raise LingregionError(f"no {split} text for {lang} in {source}; pass more documents")
    return make_windows(tokenizer, docs, seq_len, max_tokens, lang, split, source)
    """One language's split (built-in, or the text at `path`) cut into windows of `seq_len`, up to `max_tokens`."""
