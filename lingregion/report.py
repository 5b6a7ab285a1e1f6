"""Saved results → one report, as Markdown (with PNG files beside it) and as a self-contained HTML file,
without recomputing anything.

Experiments describe their part of the report as a list of elements (heading, text, bullets, table,
figure); the two renderers below turn the same elements into both documents, so they never disagree.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from .config import Config
from .experiments.registry import EXPERIMENTS
from .markup import bullets, heading, markdown_table, text
from .store import LingregionError, locked, read_json, write_text


# --- Markdown ---------------------------------------------------------------------------------------
def to_markdown(elements: list[dict], run_dir: Path) -> str:
    """The elements as Markdown; figures are linked by their path, and left out if the PNG is missing."""
    out = []
    for b in elements:
        if b["kind"] == "heading":
            out.append("#" * b["level"] + " " + b["text"])
        elif b["kind"] == "text":
            out.append(b["text"])
        elif b["kind"] == "bullets":
            out.append("\n".join(f"- {item}" for item in b["items"]))
        elif b["kind"] == "table":
            out.append((f"*{b['caption']}*\n\n" if b["caption"] else "") + markdown_table(b["head"], b["rows"]))
        elif b["kind"] == "figure":
            if (run_dir / b["path"]).is_file():
                out.append(f"![{b['caption']}]({b['path']})\n\n*{b['caption']}*")
    return "\n\n".join(out) + "\n"


# --- HTML -------------------------------------------------------------------------------------------
STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#1b1b1b;line-height:1.45}
h1{border-bottom:2px solid #ccc;padding-bottom:.2em}h2{margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:.9em;display:block;overflow-x:auto}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right;white-space:nowrap}
th:first-child,td:first-child{text-align:left}th{background:#f3f3f3}tr:nth-child(even) td{background:#fafafa}
caption{caption-side:top;text-align:left;font-style:italic;color:#444;padding:.3em 0}
figure{margin:1em 0 2em}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-style:italic;color:#444}code{background:#f3f3f3;padding:0 .2em}
"""


def _inline(s: str) -> str:
    s = html.escape(s, quote=False)
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", s)


def to_html(elements: list[dict], run_dir: Path, title: str) -> str:
    """The elements as one self-contained HTML page, figures embedded, so that it opens offline on its own."""
    out = []
    for b in elements:
        if b["kind"] == "heading":
            out.append(f"<h{b['level']}>{_inline(b['text'])}</h{b['level']}>")
        elif b["kind"] == "text":
            out.append(f"<p>{_inline(b['text'])}</p>")
        elif b["kind"] == "bullets":
            out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b["items"]) + "</ul>")
        elif b["kind"] == "table":
            cap = f"<caption>{_inline(b['caption'])}</caption>" if b["caption"] else ""
            head = "".join(f"<th>{_inline(h)}</th>" for h in b["head"])
            rows = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in b["rows"])
            out.append(f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif b["kind"] == "figure":
            path = run_dir / b["path"]
            if path.is_file():  # embedded, so the file opens offline and can be mailed on its own
                data = base64.b64encode(path.read_bytes()).decode("ascii")
                out.append(
                    f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(b["caption"])}">'
                    f"<figcaption>{_inline(b['caption'])}</figcaption></figure>"
                )
    body = "\n".join(out)
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<title>{html.escape(title)}</title>\n'
        f"<style>{STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


# --- the report ---------------------------------------------------------------------------------------
def _revision(model: dict) -> str:
    revision = model.get("revision")
    if isinstance(revision, dict):
        source = revision.get("package") or revision["gguf_file"]  # the built-in model's package, or a user's GGUF
        return f"{source}, GGUF sha256 {revision['gguf_sha256'][:16]}…"
    return f"revision {revision}"


def header(results: dict[str, dict], run: dict, foreign: dict[str, str] | None = None) -> list[dict]:
    """What was run, from the saved provenance: the run's own model and versions (run.json's, else those of the
    first result that belongs to the run), and which results do not belong to it (`foreign`: name → why)."""
    foreign = foreign or {}
    first = next((r for name, r in results.items() if name not in foreign), next(iter(results.values())))
    model, env, cfg = (
        run.get("model") or first["model"],
        run.get("environment") or first["environment"],
        run.get("config", {}),
    )
    proto = first.get("protocol", {})
    minutes = f"{run['seconds'] / 60:.1f} min" if "seconds" in run else "unknown (run.json missing)"
    if run.get("experiment_seconds"):
        minutes += (
            " (" + ", ".join(f"{k} {v / 60:.1f}" for k, v in run["experiment_seconds"].items()) + "); "
            "a resumed run counts only its last invocation"
        )
    return [
        heading("lingregion report", 1),
        heading("What was run"),
        bullets(
            [
                f"Model: `{model['name']}` ({model['class']}, {model['parameters']:,} parameters, fingerprint "
                f"`{model['fingerprint']}`), {_revision(model)}; tokenizer `{model.get('tokenizer', '?')}`; dtype "
                f"{model['dtype']}, device {model['device']}",
                f"Experiments: {', '.join(results)}",
                f"Scoring: {cfg.get('score_tokens', '?')} tokens per language in "
                f"{cfg.get('seq_len', '?')}-token windows; "
                "estimator |(θ − θ_removed) ⊙ Σg| accumulated in fp32",
                f"Evaluation: {proto.get('weighting', '?')}; {proto.get('windows', '?')}; "
                f"seq_len {proto.get('seq_len', '?')}",
                f"Versions: lingregion {env['lingregion']}, torch {env['torch']}, transformers {env['transformers']}, "
                f"Python {env['python']}",
                f"Time taken: {minutes}",
            ]
            + [
                f"**Not from this run**: {name}, made with {why}; rerun `lingregion reproduce --config "
                "RUN/config.yaml --out RUN` with it selected to update it"
                for name, why in foreign.items()
            ]
        ),
    ]


def foreign_results(results: dict[str, dict], run_dir: Path) -> tuple[dict[str, str], dict]:
    """Which saved results were not made under the run folder's config.yaml and model ({name: why}), and
    run.json's record if it belongs to that config ({} if not, e.g. from an earlier run killed before it was
    rewritten). Without a config.yaml (a folder written through the API) every result is taken as it is."""
    run = read_json(run_dir / "run.json") if (run_dir / "run.json").is_file() else {}
    if not (run_dir / "config.yaml").is_file():
        return {}, run
    try:
        want = Config.from_dict(Config.read(run_dir / "config.yaml")).results_digest()
    except LingregionError:  # a config.yaml of an older version (a removed key, YAML 1.1 booleans): unverified
        return {}, run
    if run and _digest_of(run.get("config", {})) != want:
        run = {}
    own = [r for r in results.values() if r.get("config_digest") == want]
    model = (run.get("model") or (own[0]["model"] if own else {})).get("fingerprint")
    foreign = {}
    for name, r in results.items():
        if r.get("config_digest") != want:
            foreign[name] = (
                "another configuration than config.yaml's"
                if r.get("config_digest")
                else "a lingregion that did not record its configuration"
            )
        elif model and r["model"].get("fingerprint") != model:
            foreign[name] = f"other weights ({r['model']['name']}, fingerprint {r['model'].get('fingerprint')})"
    return foreign, run


def _digest_of(config: dict) -> str | None:
    """The results digest of a config recorded by a run, or None if this version cannot read it (an older one's)."""
    try:
        return Config.from_dict(config).results_digest()
    except LingregionError:
        return None


def build(run_dir: Path) -> list[dict]:
    """Every element of the report of a run folder, from its saved results."""
    run_dir = Path(run_dir)
    results = {
        name: read_json(run_dir / "results" / f"{name}-summary.json")
        for name in EXPERIMENTS
        if (run_dir / "results" / f"{name}-summary.json").is_file()
    }
    if not results:
        raise LingregionError(
            f"{run_dir}: no saved results (results/*-summary.json); run 'lingregion reproduce --out {run_dir}' first"
        )
    foreign, run = foreign_results(results, run_dir)
    found = [
        s
        for name, r in results.items()
        if EXPERIMENTS[name].findings and name not in foreign  # a headline must come from this run
        for s in EXPERIMENTS[name].findings(r)
    ]
    elements = header(results, run, foreign)
    if found:
        elements += [heading("Findings"), bullets(found)]
    for name, result in results.items():
        section = EXPERIMENTS[name].section(result)
        if name in foreign:  # after the section's heading: the warning is read before any of its numbers
            warning = f"**Not from this run**: this result was made with {foreign[name]}; compare it with care."
            section = section[:1] + [text(warning)] + section[1:]
        elements += section
    return elements


def write(run_dir: Path) -> str:
    """(Re)build report.md and report.html in a run folder from its saved results; returns the Markdown."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise LingregionError(f"{run_dir}: no such run folder; pass a folder written by 'lingregion reproduce'")
    with locked(run_dir):  # not while a run writes its results
        elements = build(run_dir)
        md = to_markdown(elements, run_dir)
        write_text(run_dir / "report.md", md)
        write_text(run_dir / "report.html", to_html(elements, run_dir, f"lingregion report: {run_dir.name}"))
    return md
