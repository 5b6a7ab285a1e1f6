"""The paper's Tables 3–4 (remove whole rows/columns ranked by Top-region entries) and Table 8 (perturb one
input-norm parameter, remove one residual dimension), with a scan that finds the outlier dimensions behind
Table 8 instead of taking them as given. The definitions (families, common index, perturbations) are in
`lingregion.structure`."""
from __future__ import annotations

import math
import weakref

import torch
from tqdm.auto import tqdm

from .. import corpus, figures, report
from .. import structure as st
from ..store import LingregionError, write_bytes
from . import Experiment, Run

import matplotlib.pyplot as plt  # noqa: E402  (after figures: the Agg backend is chosen there)

RESULTS = "structure.json"  # both experiments share it, so the base perplexity is measured once
PICK_LABELS = {"top": "Top", "middle": "Middle", "bottom": "Bottom", "random": "Random"}
KIND_LABELS = {"reset": "Reset", "x10": "Mul 10"}
PAPER_TABLE8_RATIO = 83224.078 / 5.865  # Reset L1-N2100 over base, LLaMA-2-13B, Chinese (the paper's Table 8)


def validate(cfg) -> None:
    bad = [f for f in cfg.struct_families if f not in st.FAMILIES]
    if bad:
        raise LingregionError(f"unknown structural family {bad[0]!r}; use some of {', '.join(st.FAMILIES)}")
    if cfg.struct_mode not in st.MODES:
        raise LingregionError(f"unknown struct_mode {cfg.struct_mode!r}; use one of {', '.join(st.MODES)}")
    if not cfg.struct_dims or any(not isinstance(n, int) or n < 1 for n in cfg.struct_dims):
        raise LingregionError(f"struct_dims {cfg.struct_dims} must be whole numbers ≥ 1, such as 1,3,5,10")
    if not 0 < cfg.struct_ratio < 1:
        raise LingregionError(f"struct_ratio {cfg.struct_ratio} is outside (0, 1); pass a fraction such as 0.03")
    builtin = set(corpus.builtin_languages())
    unknown = [lang for lang in cfg.struct_langs if lang not in builtin and lang not in cfg.texts]
    if unknown or not cfg.struct_langs:
        raise LingregionError(f"struct_langs must name built-in languages (or ones given as --lang L=PATH); "
                              f"{unknown[0] if unknown else 'none'} is not one")
    if min(cfg.struct_eval_tokens, cfg.outlier_scan_tokens, cfg.outlier_layers, cfg.outlier_confirm,
           cfg.outlier_dims) < 1 or cfg.outlier_controls < 0:
        raise LingregionError("struct_eval_tokens, outlier_scan_tokens, outlier_layers, outlier_confirm and "
                              "outlier_dims must be ≥ 1, outlier_controls ≥ 0")


def _budget(cfg) -> int:
    """Evaluation tokens per language and setting: struct_eval_tokens, never more than eval_tokens."""
    return min(cfg.struct_eval_tokens, cfg.eval_tokens)


_REGIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _top_region(run: Run):
    """The core Top region that ranks rows/columns, selected once per run: both experiments use it, and
    summing the languages' scores and selecting cost more than a few evaluations on a CPU."""
    cached = _REGIONS.setdefault(run, {})
    if run.cfg.struct_ratio not in cached:
        cached[run.cfg.struct_ratio] = run.region(run.core_scores(), "top", run.cfg.struct_ratio)
    return cached[run.cfg.struct_ratio]


def _ratio(r: dict, base: dict, langs: list[str]) -> float:
    """Geometric mean over languages of perplexity / base perplexity."""
    logs = [math.log(r[lang]["ppl"]) - math.log(base[lang]["ppl"]) for lang in langs]
    return math.exp(sum(logs) / len(logs))


# --- Tables 3 and 4 -------------------------------------------------------------------------------------
def run_structural(run: Run) -> dict:
    """Remove N_d rows/columns of each family, picked Top / Middle / Bottom / Random by how many entries
    of the core Top region they hold, and measure perplexity."""
    cfg, model = run.cfg, run.m.model
    langs, budget = cfg.struct_langs, _budget(cfg)
    region = _top_region(run)
    base = run.evaluate(RESULTS, "base", [], langs, budget)
    families = {}
    for family in cfg.struct_families:
        ranked = st.ranked(model, region, family, cfg.struct_mode)
        cells = {}
        for n in tqdm(cfg.struct_dims, desc=f"structural {family}", disable=not run.progress):
            for how in st.PICKS:
                edits, picks = ranked.removal(model, n, how, cfg.seed)
                removed = sum(len(e.index) for e in edits)
                in_top = sum(int(st.in_region(region, e.name, e.index).sum()) for e in edits)
                cells[f"{n}/{how}"] = {
                    "ppl": run.evaluate(RESULTS, f"structural/{family}/{cfg.struct_mode}/{n}/{how}", edits, langs, budget),
                    "picks": picks, "removed": removed, "top_share": in_top / max(removed, 1)}
        sizes = sorted({len(c) for c in ranked.counts.values()})
        families[family] = {"label": st.FAMILY_LABELS[family], "spaces": len(ranked.counts),
                            "space_size": f"{sizes[0]}" if len(sizes) == 1 else f"{sizes[0]}–{sizes[-1]}", "cells": cells}
    result = {
        "experiment": "structural", "model_name": run.m.info["name"], "score_tokens": cfg.score_tokens,
        "score_langs": cfg.score_langs, "mode": cfg.struct_mode, "ratio": cfg.struct_ratio, "dims": cfg.struct_dims,
        "seed": cfg.seed, "langs": langs, "base": base, "families": families,
        "region": {"entries": region.count(), "of": region.total()},
        **run.eval_record(langs, budget),
        "figures": ["figures/structural.png"],
    }
    write_bytes(run.out / "figures" / "structural.png", structural_chart(result))
    run.save("structural", result)
    return result


def structural_chart(result: dict) -> bytes:
    fams = result["families"]
    fig, axes = plt.subplots(1, len(fams), figsize=(4.2 * len(fams), 3.4), sharey=True, squeeze=False)
    colours = {"top": "#d62728", "middle": "#2ca02c", "bottom": "#1f77b4", "random": "#ff7f0e"}
    for ax, (family, info) in zip(axes[0], fams.items()):
        for how in st.PICKS:
            ys = [_ratio(info["cells"][f"{n}/{how}"]["ppl"], result["base"], result["langs"]) for n in result["dims"]]
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
    head = ["Model", "Score tokens", "N_d", "Language", "Base"] + [PICK_LABELS[h] for h in st.PICKS]
    rows = [[result["model_name"], f"{result['score_tokens']:,}", str(n), lang, report.fmt(base[lang]["ppl"])]
            + [report.fmt(cells[f"{n}/{how}"]["ppl"][lang]["ppl"]) for how in st.PICKS]
            for n in result["dims"] for lang in result["langs"]]
    return head, rows


def structural_findings(result: dict) -> list[str]:
    n, out = max(result["dims"]), []
    fmt, langs, base = report.fmt, result["langs"], result["base"]
    for family, info in result["families"].items():
        r = {how: _ratio(info["cells"][f"{n}/{how}"]["ppl"], base, langs) for how in st.PICKS}
        others = max(r[h] for h in st.PICKS if h != "top")
        where = "" if info["spaces"] == 1 else " of every layer" if result["mode"] == "common" else " of every matrix"
        out.append(f"Removing the {n} {family} dimensions{where} densest in the core Top region multiplies perplexity "
                   f"by {fmt(r['top'])} (geometric mean over {', '.join(langs)}); Middle, Bottom and Random by at most "
                   f"{fmt(others)}.")
    return out


def structural_section(result: dict) -> list:
    mode = ("one common index per space: a residual index in every layer, a head-dimension index per layer"
            if result["mode"] == "common" else "each matrix ranks and picks its own rows/columns")
    blocks = [
        report.heading("Structural removal (the paper's Tables 3 and 4)"),
        report.text(f"Whole rows or columns are set to 0, in the Hugging Face layout [out_features, in_features] "
                    f"(GPT-2's Conv1D transposed to it). They are ranked by how many entries of the core Top "
                    f"{result['ratio']:g} region ({result['region']['entries']:,} of {result['region']['of']:,} "
                    f"entries; languages {', '.join(result['score_langs'])}) they hold; Top = the N_d densest, Middle = "
                    f"the N_d around the median, Bottom = the N_d sparsest, Random = seeded uniform "
                    f"(seed {result['seed']}). Mode: {mode}. Biases and norm weights are left alone. Perplexity on "
                    f"{result['protocol']['seq_len']}-token windows, token-weighted."),
        report.bullets([f"**{family}**: {info['label']}; {info['spaces']} index space(s) of {info['space_size']} indices"
                        for family, info in result["families"].items()]),
    ]
    n_lo, n_hi = min(result["dims"]), max(result["dims"])
    notes = []
    for family, info in result["families"].items():
        cells = info["cells"]
        if info["spaces"] == 1:  # one index for the whole model: say which dimensions Top took
            picked = {n: next(iter(cells[f"{n}/top"]["picks"].values())) for n in (n_lo, n_hi)}
            notes.append(f"{family}: Top takes dimension(s) {', '.join(map(str, picked[n_lo]))} at N_d = {n_lo}"
                         + (f" and {', '.join(map(str, picked[n_hi]))} at N_d = {n_hi}." if n_hi != n_lo else "."))
        notes.append(f"{family}, N_d = {n_hi}: share of the removed weights that are in the core Top region: "
                     + ", ".join(f"{PICK_LABELS[h]} {cells[f'{n_hi}/{h}']['top_share']:.1%}" for h in st.PICKS)
                     + f" ({cells[f'{n_hi}/top']['removed']:,} weights removed per setting).")
    blocks.append(report.bullets(notes))
    captions = {"feature": "Residual dimensions, attention only (Table 3, without FFN). Top should stand out "
                           "from Middle, Bottom and Random.",
                "feature+ffn": "Residual dimensions in attention and MLP (Table 3, with FFN.down): the paper's "
                               "most harmful family; compare Top with the other columns.",
                "head": "Head dimensions (Table 4): compare Top with the residual families above."}
    for family in result["families"]:
        blocks.append(report.table(*structural_table(result, family),
                                   caption=f"{family}: {captions[family]}"))
    blocks.append(report.figure("figures/structural.png", "Perplexity relative to base (geometric mean over languages, "
                                "log scale) against N_d: look for the Top line rising far above the others."))
    return blocks


# --- Table 8 and the outlier scan -------------------------------------------------------------------------
def _controls(scan: st.Scan, candidates: list[tuple[int, int]], k: int, seed: int) -> list[tuple[int, int]]:
    """k seeded random (layer, dim) pairs among the scanned entries, none of them a candidate."""
    hidden = scan.peak.shape[1]
    g = torch.Generator().manual_seed(seed)
    pairs = [(scan.layers[int(i) // hidden], int(i) % hidden) for i in torch.randperm(len(scan.layers) * hidden, generator=g)]
    return [p for p in pairs if p not in candidates][:k]


def run_outliers(run: Run) -> dict:
    """Scan for the input-norm entries whose perturbation would most change what attention reads, confirm the
    top few (and random controls) by perplexity, and remove the most massive residual dimensions whole."""
    cfg, model = run.cfg, run.m.model
    langs, budget = cfg.struct_langs, _budget(cfg)
    norms = st.input_norms(model)
    layers = list(range(min(cfg.outlier_layers, len(norms))))
    scan = st.scan(model, [run.windows(lang, "score", cfg.outlier_scan_tokens) for lang in langs], layers,
                   cfg.batch_size, run.progress)
    region = _top_region(run)
    core = st.ranked(model, region, "feature+ffn", "common").counts["residual"]
    core_rank = {int(d): r + 1 for r, d in enumerate(st.ranking(core))}
    base = run.evaluate(RESULTS, "base", [], langs, budget)
    massive = scan.massive()
    score = scan.score()
    hidden = massive.shape[0]

    def entry(layer: int, dim: int) -> dict:
        j, name = layers.index(layer), norms[layer]
        return {"layer": layer, "dim": dim, "label": st.label(layer, dim), "score": float(score[j, dim]),
                **{f"{k}_change": float(scan.change[k][j, dim]) for k in st.PERTURBATIONS},
                "weight": float(model.get_parameter(name).detach()[dim]), "offset_norm": st.is_offset(model, name),
                "in_core_top": bool(st.in_region(region, name, torch.tensor([dim]))[0]) if name in region.shapes else None,
                "massive": float(massive[dim]), "core_rank": core_rank[dim],
                "ppl": {k: run.evaluate(RESULTS, f"{k}/{st.label(layer, dim)}", st.perturbation(model, layer, dim, k),
                                        langs, budget) for k in st.PERTURBATIONS}}

    candidates = scan.top(cfg.outlier_confirm)
    controls = _controls(scan, candidates, cfg.outlier_controls, cfg.seed)
    pairs = tqdm(candidates + controls, desc="perturbations", disable=not run.progress)
    confirmed = [entry(layer, dim) for layer, dim in pairs]

    big = st.ranking(massive)[:cfg.outlier_dims].tolist()
    g = torch.Generator().manual_seed(cfg.seed + 1)
    others = [int(d) for d in torch.randperm(hidden, generator=g) if int(d) not in big][:cfg.outlier_dims]
    dims = [{"dim": d, "kind": kind, "massive": float(massive[d]), "massive_layer": int(scan.peak[:, d].argmax()),
             "core_rank": core_rank[d], "core_count": int(core[d]),
             "ppl": run.evaluate(RESULTS, f"dimension/{d}", st.dimension_removal(model, [d]), langs, budget)}
            for kind, ds in (("massive", big), ("control", others)) for d in ds]

    densest = st.ranking(core)[:10].tolist()
    result = {
        "experiment": "outliers", "langs": langs, "layers": layers, "scan_tokens": scan.tokens,
        "hidden": hidden, "ratio": cfg.struct_ratio, "seed": cfg.seed, "base": base,
        "candidates": confirmed[:len(candidates)], "controls": confirmed[len(candidates):], "dimensions": dims,
        "score_median": float(score.median()), "score_max": float(score.max()),
        "massive_profile": massive.tolist(), "massive_layer": scan.peak.argmax(dim=0).tolist(),
        "core_counts": core.tolist(), "densest": densest,
        "massive_top": [{"dim": int(d), "massive": float(massive[d]), "core_rank": core_rank[int(d)]}
                        for d in st.ranking(massive)[:10]],
        **run.eval_record(langs, budget),
        "figures": ["figures/outliers.png"],
    }
    write_bytes(run.out / "figures" / "outliers.png", outlier_chart(result))
    run.save("outliers", result)
    return result


def outlier_chart(result: dict) -> bytes:
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 5), sharex=True)
    dims = range(result["hidden"])
    top.plot(dims, result["massive_profile"], lw=0.8, color="#444")
    top.set_yscale("log")
    top.set_ylabel("peak |activation|\n/ median dim")
    bottom.bar(dims, result["core_counts"], width=1.0, color="#1f77b4")
    bottom.set_ylabel("core Top entries\nper residual dim")
    bottom.set_xlabel("residual dimension")
    for d in [m["dim"] for m in result["massive_top"][:3]]:
        for ax in (top, bottom):
            ax.axvline(d, color="#d62728", lw=0.8, ls="--")
        top.annotate(str(d), (d, result["massive_profile"][d]), fontsize=8, color="#d62728")
    return figures.png(fig)


def _worst(entry: dict, langs: list[str], base: dict) -> tuple[str, float]:
    """The perturbation (reset or x10) with the larger perplexity ratio, and that ratio."""
    return max(((k, _ratio(entry["ppl"][k], base, langs)) for k in st.PERTURBATIONS), key=lambda x: x[1])


def outliers_table(result: dict) -> tuple[list[str], list[list[str]]]:
    """Table 8's layout (perturbation, parameter, perplexity), one perplexity column per language."""
    langs, base, fmt = result["langs"], result["base"], report.fmt
    head = ["Perturbation", "Parameter", "Chosen as", "Scan score"] + [f"PPL {lang}" for lang in langs]
    rows = [["-", "-", "", ""] + [fmt(base[lang]["ppl"]) for lang in langs]]
    for k in st.PERTURBATIONS:
        for i, e in enumerate(result["candidates"] + result["controls"]):
            chosen = f"candidate {i + 1}" if i < len(result["candidates"]) else "random control"
            rows.append([KIND_LABELS[k], e["label"], chosen, fmt(e["score"])]
                        + [fmt(e["ppl"][k][lang]["ppl"]) for lang in langs])
    for d in result["dimensions"]:
        chosen = f"massive ({fmt(d['massive'])}×)" if d["kind"] == "massive" else "random control"
        rows.append(["Remove dim", f"D{d['dim']} (all matrices)", chosen, ""]
                    + [fmt(d["ppl"][lang]["ppl"]) for lang in langs])
    return head, rows


def outliers_findings(result: dict) -> list[str]:
    langs, base, fmt, out = result["langs"], result["base"], report.fmt, []
    cands, ctrls = result["candidates"], result["controls"]
    worst = max(cands, key=lambda e: _worst(e, langs, base)[1])
    kind, r = _worst(worst, langs, base)
    line = (f"The worst single-parameter perturbation found is {KIND_LABELS[kind]} at {worst['label']}: perplexity ×{fmt(r)} "
            f"(geometric mean over {', '.join(langs)})")
    if ctrls:
        line += f"; random controls ({len(ctrls)}) reach at most ×{fmt(max(_worst(e, langs, base)[1] for e in ctrls))}"
    out.append(line + f" (the paper's L1-N2100 on LLaMA-2-13B: ×{fmt(PAPER_TABLE8_RATIO)}).")
    massive = [d for d in result["dimensions"] if d["kind"] == "massive"]
    control = [d for d in result["dimensions"] if d["kind"] == "control"]
    for d in massive:
        out.append(f"Removing residual dimension {d['dim']} (massive activation, {fmt(d['massive'])}× the median "
                   f"dimension's peak) from every matrix multiplies perplexity by ×{fmt(_ratio(d['ppl'], base, langs))}; "
                   f"it ranks #{d['core_rank']} of {result['hidden']} residual dimensions by core Top entries.")
    if control:
        out.append(f"Removing a random residual dimension instead: ×{fmt(max(_ratio(d['ppl'], base, langs) for d in control))} at most.")
    return out


def outliers_section(result: dict) -> list:
    fmt, langs, base = report.fmt, result["langs"], result["base"]
    cands = result["candidates"]
    layers = ", ".join(f"L{i + 1}" for i in result["layers"])
    in_top = [c for c in cands if c["in_core_top"]]
    densest = result["densest"][:5]
    massive_top = result["massive_top"][:5]
    coincide = [m["dim"] for m in massive_top if m["dim"] in densest]
    bullets = [
        "Massive activations (peak |x| of the residual stream over all layers, in units of the median dimension's "
        "peak): " + "; ".join(f"dim {m['dim']} {fmt(m['massive'])}× (core rank #{m['core_rank']})" for m in massive_top) + ".",
        f"Densest residual dimensions of the core Top region (feature+ffn rows/columns): {', '.join(map(str, densest))}; "
        + (f"dims {', '.join(map(str, coincide))} are also among the five most massive." if coincide else
           "none of them is among the five most massive dimensions."),
        f"Scan scores (largest relative change of what attention reads): median {fmt(result['score_median'])}, "
        f"maximum {fmt(result['score_max'])}; candidates confirmed: "
        + ", ".join(f"{c['label']} (score {fmt(c['score'])}, worst ×{fmt(_worst(c, langs, base)[1])})" for c in cands) + ".",
        f"{len(in_top)} of {len(cands)} candidate input-norm entries are in the core Top region"
        + (f" ({', '.join(c['label'] for c in in_top)})." if in_top else "."),
    ]
    return [
        report.heading("Single dimensions and single parameters (the paper's Table 8) and the outlier scan"),
        report.text(f"Scan: {result['scan_tokens']:,} tokens ({', '.join(langs)}, scoring split) pass through the model "
                    f"once; for each input-norm entry of layers {layers} (1-based, as the paper's L1) the scan "
                    f"computes max over tokens of |x̂_d · (s′_d − s_d)| / ‖y‖: how much Reset (effective scale to "
                    f"1, its initial value: w = 1 for a plain norm, w = 0 for Gemma's (1 + w)) or Mul 10 (effective "
                    f"scale × 10) would change the norm's output. The top {len(cands)} are confirmed by perplexity, "
                    f"with {len(result['controls'])} seeded random entries as controls. Separately, the most massive "
                    "residual dimensions (and random ones as controls) are removed from every attention and MLP "
                    f"matrix (feature+ffn family, common index). Perplexity on {result['protocol']['seq_len']}-token "
                    "windows, token-weighted."),
        report.table(*outliers_table(result), caption="Table 8's layout. A real outlier dimension shows perplexity far "
                     "above the base row; the random controls should stay near it."),
        report.bullets(bullets),
        report.figure("figures/outliers.png", "Top: each residual dimension's peak activation over the median "
                      "dimension's (log). Bottom: core Top entries per residual dimension. Dashed: the three most "
                      "massive dimensions; see whether they line up with tall bars."),
    ]


EXPERIMENTS = [
    Experiment("structural", run_structural, structural_section,
               "Tables 3-4: remove N_d whole rows/columns ranked by core Top entries (feature, feature+ffn, head)",
               findings=structural_findings, validate=validate),
    Experiment("outliers", run_outliers, outliers_section,
               "Table 8 and an outlier scan: perturb single input-norm entries, remove single residual dimensions",
               findings=outliers_findings, validate=validate),
]
