import base64
from html.parser import HTMLParser
from pathlib import Path

import pytest

from lingregion import markup, report
from lingregion.figures import png

VOID = {"meta", "img", "br", "hr", "link", "input"}


class Checker(HTMLParser):
    """Collects tags and fails on any element closed out of order or left open."""

    def __init__(self):
        super().__init__()
        self.stack, self.tags, self.attrs = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += attrs
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()


def check_html(doc: str, run_dir: Path) -> Checker:
    """Well-formed, self-contained (no external URL), and every figure of the run embedded."""
    assert doc.startswith("<!DOCTYPE html>")
    c = Checker()
    c.feed(doc)
    c.close()
    assert c.stack == [], f"unclosed: {c.stack}"
    for name, value in c.attrs:
        if name in ("src", "href"):
            assert value.startswith("data:"), f"external reference {name}={value[:60]}"
    assert "http://" not in doc and "https://" not in doc
    for f in (run_dir / "figures").glob("*.png"):
        assert base64.b64encode(f.read_bytes()).decode() in doc, f"{f.name} is not embedded"
    return c


def test_blocks_render_to_both_documents(tmp_path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([1, 2])
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "a.png").write_bytes(png(fig))
    parts = [
        markup.heading("Title <x>", 1),
        markup.text("uses `code` and **bold** & more"),
        markup.bullets(["one", "two | three"]),
        markup.table(["lang", "ppl"], [["ru", "1.5"], ["a|b", "2"]], caption="what to look for"),
        markup.figure("figures/a.png", "a line"),
        markup.figure("figures/missing.png", "never drawn"),
    ]
    md = report.to_markdown(parts, tmp_path)
    assert md.startswith("# Title <x>\n")
    assert "| lang | ppl |\n|---|---|\n| ru | 1.5 |\n| a\\|b | 2 |" in md
    assert "*what to look for*" in md and "![a line](figures/a.png)" in md and "missing" not in md
    doc = report.to_html(parts, tmp_path, "t")
    c = check_html(doc, tmp_path)
    assert "<h1>Title &lt;x&gt;</h1>" in doc and "<code>code</code>" in doc and "<strong>bold</strong>" in doc
    assert "&amp; more" in doc and "<caption>what to look for</caption>" in doc
    assert c.tags.count("img") == 1 and c.tags.count("tr") == 3 and c.tags.count("li") == 2


def test_table_rows_must_match_head():
    with pytest.raises(ValueError, match="2 cells"):
        markup.table(["a", "b"], [["1"]])


def test_report_needs_saved_results(tmp_path):
    from lingregion.store import LingregionError

    with pytest.raises(LingregionError, match="no saved results"):
        report.write(tmp_path)
