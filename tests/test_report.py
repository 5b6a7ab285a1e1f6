import base64
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest

from lingregion import Config, markup, report, reproduce
from lingregion.cli import main
from lingregion.figures import png

from conftest import tiny_config

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


def test_results_not_made_under_the_runs_config_or_model_are_flagged(tiny_folder, tmp_path, capsys):
    """A result of an earlier model or configuration left in the folder is marked as such, in the header and
    in its own section, and gives no headline; the header names the run's own model."""
    out = tmp_path / "run"
    cfg = tiny_config(tiny_folder, eval_langs=["ru"], ratios=[0.05], random_seeds=1, experiments=["removal"])
    reproduce(cfg, out, progress=False)
    clean = report.write(out)
    assert "Not from this run" not in clean and "## Findings" in clean
    fingerprint = json.loads((out / "run.json").read_text())["model"]["fingerprint"]
    assert f"fingerprint `{fingerprint}`" in clean

    # config.yaml now names another model (a later run into the folder, killed before its results)
    (out / "config.yaml").write_text(
        Config.from_dict({**Config.read(out / "config.yaml"), "model": "other/model"}).to_yaml()
    )
    assert main(["report", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "**Not from this run**: removal, made with another configuration than config.yaml's" in md
    assert "**Not from this run**: this result was made with another configuration" in md
    assert "## Findings" not in md  # no headline from a result that is not this run's
    assert "Not from this run" in (out / "report.html").read_text()

    # the same config, but the summary came from other weights
    (out / "config.yaml").write_text(cfg.to_yaml())
    summary = json.loads((out / "results" / "removal-summary.json").read_text())
    summary["model"]["fingerprint"] = "0123456789abcdef"
    (out / "results" / "removal-summary.json").write_text(json.dumps(summary))
    md = report.write(out)
    assert f"removal, made with other weights ({tiny_folder}, fingerprint 0123456789abcdef)" in md

    # a run.json this version cannot read (a key since removed) is not taken for the run's record
    record = json.loads((out / "run.json").read_text())
    record["config"]["a_key_since_removed"] = 1
    (out / "run.json").write_text(json.dumps(record))
    assert "Time taken: unknown" in report.write(out)
