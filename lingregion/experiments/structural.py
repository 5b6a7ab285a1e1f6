"""The paper's Tables 3–4: remove whole rows/columns ranked by how many core Top-region entries they hold.
The definitions (families, common index) are in `lingregion.slices`."""

from __future__ import annotations

from tqdm.auto import tqdm

from .. import figures, markup, slices, uncertainty
from ..run import Run
from ..store import write_bytes
from .ranking import FACTOR, RESULTS, eval_budget, geometric_ratio, validate_structure

NAME = "structural"
validate = validate_structure  # the same rules as the outliers experiment


PICK_LABELS = {"top": "Top", "middle": "Middle", "bottom": "Bottom", "random": "Random"}


def measure(run: Run) -> dict:
    """Remove N_d rows/columns of each family, picked Top / Middle / Bottom / Random by how many entries
    of the core Top region they hold, and measure perplexity."""
    cfg, model = run.cfg, run.model
    langs, budget = cfg.struct_langs, eval_budget(cfg)
    region = run.core_region("top", run.cfg.struct_ratio)
    base = run.evaluate(RESULTS, "base", [], langs, budget)
    families = {}
    for family in cfg.struct_families:
        ranked = slices.ranked(model, region, family, cfg.struct_mode)
        cells = {}
        for n in tqdm(cfg.struct_dims, desc=f"structural {family}", disable=not run.progress):
            for how in slices.PICKS:
                edits, picks = ranked.removal(model, n, how, cfg.seed)
                removed = sum(len(e.index) for e in edits)
                in_top = sum(int(slices.in_region(region, e.name, e.index).sum()) for e in edits)
                cells[f"{n}/{how}"] = {
                    "ppl": run.evaluate(
                        RESULTS, f"structural/{family}/{cfg.struct_mode}/{n}/{how}", edits, langs, budget
                    ),
                    "picks": picks,
                    "removed": removed,
                    "top_share": in_top / max(removed, 1),
                }
        sizes = sorted({len(c) for c in ranked.counts.values()})
        families[family] = {
            "label": slices.FAMILY_LABELS[family],
            "spaces": len(ranked.counts),
            "space_size": f"{sizes[0]}" if len(sizes) == 1 else f"{sizes[0]}–{sizes[-1]}",
            "cells": cells,
        }
    base = _with_intervals(base, families, langs, cfg.seed)
    result = {
        "experiment": "structural",
        "model_name": run.info["name"],
        "score_tokens": cfg.score_tokens,
        "score_langs": cfg.score_langs,
        "mode": cfg.struct_mode,
        "ratio": cfg.struct_ratio,
        "dims": cfg.struct_dims,
        "seed": cfg.seed,
        "languages": langs,
        "base": base,
        "families": families,
        "region": {"entries": region.count(), "of": region.total()},
        "ci95_method": uncertainty.method_record(seed=cfg.seed),
        "verdict_rule": uncertainty.RULE,
        **run.eval_record(langs, budget),
        "figures": ["figures/structural.png"],
    }
    result["verdicts"] = verdicts(result)
    write_bytes(run.out / "figures" / "structural.png", structural_chart(result))
    run.save("structural", result)
    return result


def _with_intervals(base: dict, families: dict, langs: list[str], seed: int) -> dict:
    """Each cell's perplexity ratio to Base ("ratio") and, for Top, to each other pick at the same N_d ("vs"),
    with paired 95% intervals (every setting is evaluated on the same text); the cells' results keep their
    intervals instead of their blocks. Returns Base the same way."""
    for info in families.values():
        cells = info["cells"]
        for key, c in cells.items():
            n, how = key.split("/")
            c["ratio"] = {lang: uncertainty.ratio_entry(c["ppl"][lang], base[lang], seed) for lang in langs}
            if how == "top":
                c["vs"] = {
                    other: {
                        lang: uncertainty.ratio_entry(c["ppl"][lang], cells[f"{n}/{other}"]["ppl"][lang], seed)
                        for lang in langs
                    }
                    for other in slices.PICKS
                    if other != "top"
                }
        for c in cells.values():  # after every comparison: they read the blocks
            c["ppl"] = {lang: uncertainty.without_blocks(c["ppl"][lang], seed) for lang in langs}
    return {lang: uncertainty.without_blocks(base[lang], seed) for lang in langs}


def verdicts(result: dict) -> list[dict]:
    """Per family, at the largest N_d, per other pick and language: does removing the Top dimensions raise
    perplexity at least FACTOR times more than removing the other pick's? Decided by the paired 95% interval
    of ppl(Top) / ppl(other) (uncertainty.RULE); inconclusive where the result has no interval."""
    n, out = max(result["dims"]), []
    for family, info in result["families"].items():
        vs = info["cells"][f"{n}/top"].get("vs", {})
        for other in (h for h in slices.PICKS if h != "top"):
            for lang in result["languages"]:
                entry = vs.get(other, {}).get(lang)
                out.append(
                    {
                        "family": family,
                        "n": n,
                        "against": other,
                        "lang": lang,
                        "claim": f"ppl(Top) / ppl({PICK_LABELS[other]}) > {FACTOR:g}",
                        "verdict": uncertainty.verdict_of(entry, FACTOR, "above"),
                        **({"value": entry["value"], "ci95": entry["ci95"]} if entry else {"ci95": None}),
                        **(
                            {"reason": (entry or {}).get("reason") or uncertainty.NO_BLOCKS}
                            if not (entry or {}).get("ci95")
                            else {}
                        ),
                    }
                )
    return out


def ratio_table(result: dict) -> tuple[list[str], list[list[str]]]:
    """Top's perplexity ratio to Base and to each other pick, with 95% intervals, per family, N_d and language."""
    others = [h for h in slices.PICKS if h != "top"]
    head = ["Family", "N_d", "Language", "Top / Base"] + [f"Top / {PICK_LABELS[h]}" for h in others]
    rows = []
    for family, info in result["families"].items():
        for n in result["dims"]:
            top = info["cells"][f"{n}/top"]
            for lang in result["languages"]:
                rows.append(
                    [family, str(n), lang, markup.cell(top["ratio"][lang])]
                    + [markup.cell(top["vs"][h][lang]) for h in others]
                )
    return head, rows


def structural_chart(result: dict) -> bytes:
    """PNG: perplexity over base against N_d, one panel per family, one line per pick (Top, Middle, ...)."""
    fams = result["families"]
    fig, axes = figures.subplots(1, len(fams), figsize=(4.2 * len(fams), 3.4), sharey=True, squeeze=False)
    colours = {"top": "#d62728", "middle": "#2ca02c", "bottom": "#1f77b4", "random": "#ff7f0e"}
    for ax, (family, info) in zip(axes[0], fams.items()):
        for how in slices.PICKS:
            ys = [
                geometric_ratio(info["cells"][f"{n}/{how}"]["ppl"], result["base"], result["languages"])
                for n in result["dims"]
            ]
            ax.plot(result["dims"], ys, marker="o", label=PICK_LABELS[how], color=colours[how])
        ax.set_yscale("log")
        ax.set_xlabel("N_d (dimensions removed)")
        ax.set_title(family, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("perplexity / base (geo-mean)")
    axes[0][-1].legend(fontsize=8)
    return figures.png(fig)


def structural_table(result: dict, family: str) -> tuple[list[str], list[list[str]]]:
    """The paper's layout: model, budget, N_d × Top / Middle / Bottom / Random (one row per language)."""
    cells, base = result["families"][family]["cells"], result["base"]
    head = ["Model", "Score tokens", "N_d", "Language", "Base"] + [PICK_LABELS[h] for h in slices.PICKS]
    rows = [
        [result["model_name"], f"{result['score_tokens']:,}", str(n), lang, markup.fmt(base[lang]["ppl"])]
        + [markup.fmt(cells[f"{n}/{how}"]["ppl"][lang]["ppl"]) for how in slices.PICKS]
        for n in result["dims"]
        for lang in result["languages"]
    ]
    return head, rows


def findings(result: dict) -> list[str]:
    """Per family: the damage of removing the N_d densest dimensions against the other picks at the largest N_d,
    and whether Top stands out from each other pick, as verdicts from paired 95% intervals."""
    n, out = max(result["dims"]), []
    fmt, langs, base = markup.fmt, result["languages"], result["base"]
    by_family: dict[str, dict[str, dict[str, str]]] = {}
    for v in verdicts(result):
        by_family.setdefault(v["family"], {}).setdefault(v["against"], {})[v["lang"]] = v["verdict"]
    for family, info in result["families"].items():
        r = {how: geometric_ratio(info["cells"][f"{n}/{how}"]["ppl"], base, langs) for how in slices.PICKS}
        others = max(r[h] for h in slices.PICKS if h != "top")
        where = "" if info["spaces"] == 1 else " of every layer" if result["mode"] == "common" else " of every matrix"
        claims = "; ".join(
            f"vs {PICK_LABELS[h]}: {uncertainty.grouped(v)}" for h, v in by_family.get(family, {}).items()
        )
        missing = "" if "vs" in info["cells"][f"{n}/top"] else f" ({uncertainty.NO_BLOCKS})"
        out.append(
            f"Removing the {n} {family} dimensions{where} densest in the core Top region multiplies perplexity "
            f"by {fmt(r['top'])} (geometric mean over {', '.join(langs)}); Middle, Bottom and Random by at most "
            f"{fmt(others)}. Top removal raises perplexity at least ×{FACTOR:g} more than the other pick "
            f"(95% paired bootstrap interval of ppl(Top) / ppl(other) above {FACTOR:g}) — {claims}{missing}."
        )
    return out


def section(result: dict) -> list:
    """Report blocks: the method, the families, one table per family (Tables 3 and 4), and the chart."""
    mode = (
        "one common index per space: a residual index in every layer, a head-dimension index per layer"
        if result["mode"] == "common"
        else "each matrix ranks and picks its own rows/columns"
    )
    out = [
        markup.heading("Structural removal (the paper's Tables 3 and 4)"),
        markup.text(
            f"Whole rows or columns are set to 0, in the Hugging Face layout [out_features, in_features] "
            f"(GPT-2's Conv1D transposed to it). They are ranked by how many entries of the core Top "
            f"{result['ratio']:g} region ({result['region']['entries']:,} of {result['region']['of']:,} "
            f"entries; languages {', '.join(result['score_langs'])}) they hold; Top = the N_d densest, Middle = "
            f"the N_d around the median, Bottom = the N_d sparsest, Random = seeded uniform "
            f"(seed {result['seed']}). Mode: {mode}. Biases and norm weights are left alone. Perplexity on "
            f"{result['protocol']['seq_len']}-token windows, token-weighted."
        ),
        markup.bullets(
            [
                f"**{family}**: {info['label']}; {info['spaces']} index space(s) of {info['space_size']} indices"
                for family, info in result["families"].items()
            ]
        ),
    ]
    n_lo, n_hi = min(result["dims"]), max(result["dims"])
    notes = []
    for family, info in result["families"].items():
        cells = info["cells"]
        if info["spaces"] == 1:  # one index for the whole model: say which dimensions Top took
            picked = {n: next(iter(cells[f"{n}/top"]["picks"].values())) for n in (n_lo, n_hi)}
            notes.append(
                f"{family}: Top takes dimension(s) {', '.join(map(str, picked[n_lo]))} at N_d = {n_lo}"
                + (f" and {', '.join(map(str, picked[n_hi]))} at N_d = {n_hi}." if n_hi != n_lo else ".")
            )
        notes.append(
            f"{family}, N_d = {n_hi}: share of the removed weights that are in the core Top region: "
            + ", ".join(f"{PICK_LABELS[h]} {cells[f'{n_hi}/{h}']['top_share']:.1%}" for h in slices.PICKS)
            + f" ({cells[f'{n_hi}/top']['removed']:,} weights removed per setting)."
        )
    out.append(markup.bullets(notes))
    captions = {
        "feature": "Residual dimensions, attention only (Table 3, without FFN). Top should stand out "
        "from Middle, Bottom and Random.",
        "feature+ffn": "Residual dimensions in attention and MLP (Table 3, with FFN.down): the paper's "
        "most harmful family; compare Top with the other columns.",
        "head": "Head dimensions (Table 4): compare Top with the residual families above.",
    }
    for family in result["families"]:
        out.append(markup.table(*structural_table(result, family), caption=f"{family}: {captions[family]}"))
    if all("vs" in info["cells"][f"{n_hi}/top"] for info in result["families"].values()):
        out.append(
            markup.table(
                *ratio_table(result),
                caption="Top's perplexity ratio to Base and to each other pick at the same N_d, with its 95% "
                "interval (paired block bootstrap: both settings resample the same blocks of text). "
                f"Top stands out where the interval lies above {FACTOR:g}. {uncertainty.RULE}",
            )
        )
    out.append(
        markup.figure(
            "figures/structural.png",
            "Perplexity relative to base (geometric mean over languages, "
            "log scale) against N_d: look for the Top line rising far above the others.",
        )
    )
    return out
