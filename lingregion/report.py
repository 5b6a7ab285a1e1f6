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


def lang_table(rows: list[str], cols: list[str], cell, corner: str = "") -> str:
    lines = ["| " + " | ".join([corner] + cols) + " |", "|" + "---|" * (len(cols) + 1)]
    lines += ["| " + " | ".join([r] + [cell(r, c) for c in cols]) + " |" for r in rows]
    return "\n".join(lines)


def monolingual_section(res: dict) -> list[str]:
    langs, evals, ratio = res["languages"], res["eval_languages"], res["ppl_ratio"]
    out = ["## Monolingual regions (the paper's Table 5, and beyond)",
           f"S_L* = S_L − ∪ S_L', S_L the per-matrix Top {res['ratio']:g} of L's own score, over {', '.join(langs)}.", ""]
    out += [lang_table(["entries", "share of parameters"], langs, lambda r, c: (
        f"{res['sizes'][c]['entries']:,}" if r == "entries" else f"{res['sizes'][c]['share']:.3%}")), ""]
    out += ["### Interaction matrix: perplexity ratio (removed / base)",
            "Rows: whose region is removed; columns: evaluation language. A language's own column should stand out.", "",
            lang_table(langs, evals, lambda r, c: f"{ratio[r][c]:.3f}", "removed ↓ / eval →"), "",
            "![interaction](figures/interaction.png)", ""]
    out += ["### Related languages", "Does removing L's region hurt a related language more than the others?", ""]
    for lang, rel in res["related"].items():
        kin = ", ".join(f"{k} ×{v:.3f}" for k, v in rel["related"].items())
        verdict = "yes" if all(v > rel["others_median"] for v in rel["related"].values()) else "no"
        own = f"own ×{rel['own']:.3f}, " if rel["own"] is not None else ""
        out.append(f"- remove {lang}: {own}related {kin}; median of the others ×{rel['others_median']:.3f} → {verdict}")
    focus, t5 = res["focus"], res["table5"]
    out += ["", f"### Table 5 layout: the {focus} monolingual region (Top) against Bottom of the same size", ""]
    cols = ["Base"] + [f"{side} ({t5[b]['score_tokens']} tok)" for b in t5 for side in ("Top", "Bottom")]
    cells = {"Base": lambda e: res["base"][e]["ppl"]}
    for b in t5:
        for side in ("Top", "Bottom"):
            cells[f"{side} ({t5[b]['score_tokens']} tok)"] = (lambda b=b, k=side.lower(): lambda e: t5[b][k][e]["ppl"])()
    out += [lang_table(evals, cols, lambda r, c: fmt(cells[c](r)), "Language"), ""]
    out += ["### Generation cases (greedy)", "Which language's output breaks when each region is removed?", ""]
    gens = res["generations"]
    out += [lang_table(list(gens), list(res["prompts"]),
                       lambda r, c: gens[r][c].replace("|", "\\|").replace("\n", " ").strip() or "∅", "setting"), ""]
    out += ["### Overlap and location", f"Jaccard overlap of the languages' Top {res['ratio']:g} sets:", "",
            lang_table(langs, langs, lambda r, c: f"{res['jaccard'][r][c]:.3f}"), "",
            "![jaccard](figures/jaccard.png)", "", "Share of each region by matrix type:", ""]
    dist = res["distribution"]
    kinds = list(next(iter(dist.values()))["by_kind"])
    out += [lang_table(list(dist), kinds, lambda r, c: f"{dist[r]['by_kind'][c]:.1%}", "region"), "",
            "![distribution](figures/distribution.png)", ""]
    return out


def write(run_dir: Path) -> str:
    """(Re)build report.md (and removal.md) in a run folder from its saved results."""
    run_dir = Path(run_dir)
    results = {name: read_json(run_dir / "results" / f"{name}-summary.json")
               for name in ("removal", "monolingual") if (run_dir / "results" / f"{name}-summary.json").is_file()}
    if not results:
        raise LingregionError(f"{run_dir}: no saved results (results/*-summary.json); run 'lingregion reproduce --out {run_dir}' first")
    run = read_json(run_dir / "run.json") if (run_dir / "run.json").is_file() else {}
    first = next(iter(results.values()))
    model, cfg = first["model"], run.get("config", {})
    revision = model["revision"]
    if isinstance(revision, dict):
        revision = f"{revision['package']}, GGUF sha256 {revision['gguf_sha256'][:16]}…"
    env = first["environment"]
    lines = [
        "# lingregion report",
        "",
        "## What was run",
        f"- Model: `{model['name']}` ({model['class']}, {model['parameters']:,} parameters, fingerprint "
        f"`{model['fingerprint']}`), {revision}; dtype {model['dtype']}, device {model['device']}",
        f"- Experiments: {', '.join(results)}; scoring {cfg.get('score_tokens', '?')} tokens per language, "
        f"estimator |(θ − θ_removed) ⊙ Σg| accumulated in fp32",
        f"- Evaluation: {first['protocol']['weighting']}; {first['protocol']['windows']}; "
        f"seq_len {first['protocol']['seq_len']}",
        f"- Versions: lingregion {env['lingregion']}, torch {env['torch']}, transformers {env['transformers']}, "
        f"Python {env['python']}",
        f"- Time taken: {run.get('seconds', '?')} s",
        "",
    ]
    if "removal" in results:
        result = results["removal"]
        ppl, bpb = removal_table(result, "ppl"), removal_table(result, "bpb")
        write_text(run_dir / "removal.md", f"## Perplexity\n\n{ppl}\n\n## Bits per byte\n\n{bpb}\n")
        lines += [
            "## Findings",
            *[f"- {s}" for s in findings(result)],
            "",
            f"## Removal (the paper's Table 1): perplexity, core region of {', '.join(result['score_windows'])}",
            f"Per-{cfg.get('scope', 'matrix')} Top / Bottom / Random (seed {cfg.get('seed', 0)}) over "
            f"{result['scored_parameters']:,} transformer-layer parameters. "
            "Top should wipe out every language; Bottom and Random should stay near Base.",
            "",
            ppl,
            "",
            "![removal](figures/removal.png)",
            "",
            "Where the largest Top region sits (share of region members in each 3×3 neighbourhood; rows are "
            "outputs, columns inputs): it lines up with whole rows, columns and heads rather than being uniform.",
            "",
            "![core region grid](figures/core-grid.png)",
            "",
            "![core region, first q_proj](figures/core-q_proj.png)",
            "",
            "## Removal: bits per byte",
            "Comparable across languages, unlike per-token perplexity.",
            "",
            bpb,
            "",
        ]
    if "monolingual" in results:
        lines += monolingual_section(results["monolingual"])
    text = "\n".join(lines)
    write_text(run_dir / "report.md", text)
    return text
