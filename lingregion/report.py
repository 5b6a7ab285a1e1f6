"""Saved results → Markdown tables and a short report, without recomputing anything."""
from __future__ import annotations

import math
from pathlib import Path

from .store import LingregionError, read_json, write_text


def fmt(x: float) -> str:
    if math.isinf(x) or math.isnan(x):
        return str(x)
    return f"{x:.3f}" if x < 1e4 else f"{x:.3g}"


def removal_table(result: dict, metric: str = "ppl") -> str:
    settings, table = result["settings"], result["table"]
    head = ["Language"] + [s.replace("@", " ") if s != "base" else "Base" for s in settings]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for lang in result["languages"]:
        lines.append("| " + " | ".join([lang] + [fmt(table[s][lang][metric]) for s in settings]) + " |")
    return "\n".join(lines)


def _ratio(result: dict, setting: str) -> list[float]:
    t = result["table"]
    return [t[setting][lang]["ppl"] / t["base"][lang]["ppl"] for lang in result["languages"]]


def findings(result: dict) -> list[str]:
    """Headline sentences computed from the numbers."""
    out = []
    for setting in result["settings"]:
        if setting == "base":
            continue
        r = _ratio(result, setting)
        out.append(f"Removing {setting.replace('@', ' ')} multiplies perplexity by {fmt(min(r))}–{fmt(max(r))} "
                   f"(median {fmt(sorted(r)[len(r) // 2])}) across {len(r)} languages.")
    share = result["share_already_at_removed_value"]
    out.append(f"{share:.2%} of the scored parameters already sit at their removed value (exactly-zero weights from "
               "the 4-bit source, or norm weights at −1), so their importance is 0: a Bottom region is drawn "
               "from them first, and removing them changes nothing.")
    for setting, info in result["regions"].items():
        if setting.startswith("bottom"):
            out.append(f"Of the {setting.replace('@', ' ')} region's {info['entries']:,} entries, "
                       f"{info['already_at_removed_value']:.1%} were already at their removed value.")
    return out


def write(run_dir: Path) -> str:
    """(Re)build report.md and removal.md in a run folder from its saved results."""
    run_dir = Path(run_dir)
    summary = run_dir / "results" / "removal-summary.json"
    if not summary.is_file():
        raise LingregionError(f"{run_dir}: no saved results (results/removal-summary.json); run 'lingregion reproduce --out {run_dir}' first")
    run = read_json(run_dir / "run.json") if (run_dir / "run.json").is_file() else {}
    result = read_json(summary)
    model = result["model"]
    cfg = run.get("config", {})
    ppl, bpb = removal_table(result, "ppl"), removal_table(result, "bpb")
    write_text(run_dir / "removal.md", f"## Perplexity\n\n{ppl}\n\n## Bits per byte\n\n{bpb}\n")
    proto = result["protocol"]
    lines = [
        "# lingregion report",
        "",
        "## What was run",
        f"- Model: `{model['name']}` ({model['class']}, {model['parameters']:,} parameters, fingerprint "
        f"`{model['fingerprint']}`), dtype {model['dtype']}, device {model['device']}",
        f"- Revision: `{model['revision']}`",
        f"- Scored languages: {', '.join(result['score_windows'])}; "
        f"{cfg.get('score_tokens', '?')} tokens each; estimator |(θ − θ_removed) ⊙ Σg| in fp32",
        f"- Regions: per-{cfg.get('scope', 'matrix')} Top / Bottom / Random (seed {cfg.get('seed', 0)}) over "
        f"{result['scored_parameters']:,} transformer-layer parameters",
        f"- Evaluation: {proto['weighting']}; windows {proto['windows']}; seq_len {proto['seq_len']}",
        f"- Versions: {result['environment']}",
        f"- Time taken: {run.get('seconds', '?')} s",
        "",
        "## Findings",
        *[f"- {s}" for s in findings(result)],
        "",
        "## Removal (the paper's Table 1): perplexity",
        "Top should wipe out every language; Bottom and Random should stay near Base.",
        "",
        ppl,
        "",
        "## Removal: bits per byte",
        "Comparable across languages, unlike per-token perplexity.",
        "",
        bpb,
        "",
    ]
    text = "\n".join(lines)
    write_text(run_dir / "report.md", text)
    return text
