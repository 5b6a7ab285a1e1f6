"""The elements of a report: headings, text, bullets, tables and figures, as plain dicts.

Experiments describe their part of the report with these; `report` renders the same elements as Markdown
and as HTML, so the two never disagree.
"""

from __future__ import annotations

import math


def fmt(x: float) -> str:
    """A number for a table cell: three decimals, or three significant digits when large (inf and nan as is)."""
    if math.isinf(x) or math.isnan(x):
        return str(x)
    return f"{x:.3f}" if abs(x) < 1e4 else f"{x:.3g}"


def heading(text: str, level: int = 2) -> dict:
    """A section heading; `level` 2 for an experiment's section, 3 for a part of it."""
    return {"kind": "heading", "text": text, "level": level}


def text(markdown: str) -> dict:
    """A paragraph; `code` and **bold** are the only inline markup."""
    return {"kind": "text", "text": markdown}


def bullets(items: list[str]) -> dict:
    """A bulleted list; each item takes the same inline markup as `text`."""
    return {"kind": "bullets", "items": list(items)}


def table(head: list[str], rows: list[list[str]], caption: str | None = None) -> dict:
    """A table of strings with an optional caption; every row must have as many cells as the head."""
    if any(len(r) != len(head) for r in rows):
        raise ValueError(f"table rows must have {len(head)} cells like its head")
    return {
        "kind": "table",
        "head": [str(h) for h in head],
        "rows": [[str(c) for c in r] for r in rows],
        "caption": caption,
    }


def figure(path: str, caption: str) -> dict:
    """A PNG under the run folder, referenced by its relative path."""
    return {"kind": "figure", "path": path, "caption": caption}


def perplexity_table(
    table: dict, languages: list[str], metric: str = "ppl", settings: list[str] | None = None
) -> tuple[list[str], list[list[str]]]:
    """(head, rows) of one metric per language and setting ({setting: {lang: result}}), in the order of
    `settings` (default: the table's), Base first: the paper's Table 1 layout, used by the removal experiment
    and the evaluate and perturb commands. A saved summary's keys come back sorted, hence `settings`."""
    settings = list(table) if settings is None else settings
    head = ["Language"] + [s.replace("@", " ") if s != "base" else "Base" for s in settings]
    return head, [[lang] + [fmt(table[s][lang][metric]) for s in settings] for lang in languages]


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured Markdown table, with `|` and line breaks in the cells escaped."""
    lines = ["| " + " | ".join(map(_md_cell, head)) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(map(_md_cell, r)) + " |" for r in rows])


def interval_cell(entry: dict, prefix: str = "×") -> str:
    """A value and its interval, compactly: ×3.91 [2.8, 5.6]."""
    lo, hi = entry["ci95"]
    return f"{prefix}{_short(entry['value'])} [{_short(lo)}, {_short(hi)}]"


def _short(x: float) -> str:
    return f"{x:.3g}" if math.isfinite(x) else str(x)


def cell(entry: dict, prefix: str = "×") -> str:
    """A ratio and its interval (×3.91 [2.8, 5.6]), or the ratio alone marked as having none."""
    if entry.get("ci95") is None:
        return f"{prefix}{entry['value']:.3g} [no interval]"
    return interval_cell(entry, prefix)
