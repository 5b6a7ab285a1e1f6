"""The paper's Table 8 (perturb one input-norm parameter, remove one residual dimension), with a scan that
finds the outlier dimensions behind it instead of taking them as given. The perturbations are defined in
`lingregion.slices`."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .. import architectures, figures, markup, slices, uncertainty
from ..regions import Region
from ..run import Run
from ..store import write_bytes
from .ranking import FACTOR, RESULTS, eval_budget, geometric_ratio, validate_structure

NAME = "outliers"
KIND_LABELS = {"reset": "Reset", "x10": "Mul 10"}
TITLE = "Single dimensions and single parameters (the paper's Table 8) and the outlier scan"
PAPER_TABLE8_RATIO = 83224.078 / 5.865  # Reset L1-N2100 over base, LLaMA-2-13B, Chinese (the paper's Table 8)
validate = validate_structure  # the same rules as the structural experiment


def _controls(scan: slices.Scan, candidates: list[tuple[int, int]], k: int, seed: int) -> list[tuple[int, int]]:
    """k seeded random (layer, dim) pairs among the scanned entries, none of them a candidate."""
    hidden = scan.peak.shape[1]
    g = torch.Generator().manual_seed(seed)
    pairs = [
        (scan.layers[int(i) // hidden], int(i) % hidden) for i in torch.randperm(len(scan.layers) * hidden, generator=g)
    ]
    return [p for p in pairs if p not in candidates][:k]


def measure(run: Run) -> dict:
    """Scan for the input-norm entries whose perturbation would most change what attention reads, confirm the
    top few (and random controls) by perplexity, and remove the most massive residual dimensions whole."""
    cfg, model = run.cfg, run.model
    langs, budget = cfg.struct_langs, eval_budget(cfg)
    try:
        norms = architectures.input_norms(model)
    except architectures.NotApplicable as e:  # a post-norm model: the run goes on, and the report says why not
        result = {"experiment": "outliers", "languages": langs, "not_applicable": str(e), "verdicts": []}
        run.save("outliers", result)
        return result
    layers = list(range(min(cfg.outlier_layers, len(norms))))
    scan = _scan(run, layers)
    region, core, core_rank = _core_dimensions(run)
    base = run.evaluate(RESULTS, "base", [], langs, budget)
    massive, score = scan.massive(), scan.score()
    candidates = scan.top(cfg.outlier_confirm)
    controls = _controls(scan, candidates, cfg.outlier_controls, cfg.seed)
    confirmed = _confirm(run, scan, norms, region, core_rank, massive, score, candidates + controls)
    cands, ctrls = confirmed[: len(candidates)], confirmed[len(candidates) :]
    dims = _dimensions(run, scan, massive, core, core_rank)
    densest = slices.ranking(core)[:10].tolist()
    comparisons = _comparisons(base, cands, ctrls, dims, langs, cfg.seed)
    base = _without_blocks(base, confirmed, dims, langs, cfg.seed)
    result = {
        "experiment": "outliers",
        "languages": langs,
        "layers": layers,
        "scan_tokens": scan.tokens,
        "hidden": massive.shape[0],
        "ratio": cfg.struct_ratio,
        "seed": cfg.seed,
        "base": base,
        "candidates": cands,
        "controls": ctrls,
        "dimensions": dims,
        "score_median": float(score.median()),
        "score_max": float(score.max()),
        "massive_profile": massive.tolist(),
        "massive_layer": scan.peak.argmax(dim=0).tolist(),
        "core_counts": core.tolist(),
        "densest": densest,
        "massive_top": [
            {"dim": int(d), "massive": float(massive[d]), "core_rank": core_rank[int(d)]}
            for d in slices.ranking(massive)[:10]
        ],
        "comparisons": comparisons,
        "ci95_method": uncertainty.method_record(seed=cfg.seed),
        "verdict_rule": uncertainty.RULE,
        **run.eval_record(langs, budget),
        "figures": ["figures/outliers.png"],
    }
    result["verdicts"] = verdicts(result)
    write_bytes(run.out / "figures" / "outliers.png", outlier_chart(result))
    run.save("outliers", result)
    return result


def _scan(run: Run, layers: list[int]) -> slices.Scan:
    """One pass over the struct languages' scoring windows: the input-norm entries' perturbation scores of
    `layers` and every layer's residual-stream peaks."""
    cfg = run.cfg
    return slices.scan(
        run.model,
        [run.windows(lang, "score", cfg.outlier_scan_tokens) for lang in cfg.struct_langs],
        layers,
        cfg.batch_size,
        run.progress,
    )


def _core_dimensions(run: Run) -> tuple[Region, torch.Tensor, dict[int, int]]:
    """The core Top region, its entries per residual dimension (feature+ffn rows and columns, common index)
    and each dimension's rank by that count (1 = densest)."""
    region = run.core_region("top", run.cfg.struct_ratio)
    core = slices.ranked(run.model, region, "feature+ffn", "common").counts["residual"]
    core_rank = {int(d): r + 1 for r, d in enumerate(slices.ranking(core))}
    return region, core, core_rank


def _confirm(
    run: Run,
    scan: slices.Scan,
    norms: list[str],
    region: Region,
    core_rank: dict[int, int],
    massive: torch.Tensor,
    score: torch.Tensor,
    pairs: list[tuple[int, int]],
) -> list[dict]:
    """Each (layer, dim) input-norm entry with its scan numbers, weight, place in the core region and massive
    activation, and the perplexity with it Reset and multiplied by 10."""
    model, langs, budget = run.model, run.cfg.struct_langs, eval_budget(run.cfg)
    out = []
    for layer, dim in tqdm(pairs, desc="perturbations", disable=not run.progress):
        j, name = scan.layers.index(layer), norms[layer]
        out.append(
            {
                "layer": layer,
                "dim": dim,
                "label": slices.label(layer, dim),
                "score": float(score[j, dim]),
                **{f"{k}_change": float(scan.change[k][j, dim]) for k in slices.PERTURBATIONS},
                "weight": float(model.get_parameter(name).detach()[dim]),
                "offset_norm": slices.is_offset(model, name),
                "in_core_top": bool(slices.in_region(region, name, torch.tensor([dim]))[0])
                if name in region.shapes
                else None,
                "massive": float(massive[dim]),
                "core_rank": core_rank[dim],
                "ppl": {
                    k: run.evaluate(
                        RESULTS,
                        f"{k}/{slices.label(layer, dim)}",
                        slices.perturbation(model, layer, dim, k),
                        langs,
                        budget,
                    )
                    for k in slices.PERTURBATIONS
                },
            }
        )
    return out


def _dimensions(
    run: Run, scan: slices.Scan, massive: torch.Tensor, core: torch.Tensor, core_rank: dict[int, int]
) -> list[dict]:
    """The most massive residual dimensions and as many seeded random ones, each removed from every matrix:
    its massive activation, the layer of its peak, its core Top entries and the perplexity without it."""
    cfg, model, langs, budget = run.cfg, run.model, run.cfg.struct_langs, eval_budget(run.cfg)
    big = slices.ranking(massive)[: cfg.outlier_dims].tolist()
    g = torch.Generator().manual_seed(cfg.seed + 1)
    others = [int(d) for d in torch.randperm(massive.shape[0], generator=g) if int(d) not in big][: cfg.outlier_dims]
    return [
        {
            "dim": d,
            "kind": kind,
            "massive": float(massive[d]),
            "massive_layer": int(scan.peak[:, d].argmax()),
            "core_rank": core_rank[d],
            "core_count": int(core[d]),
            "ppl": run.evaluate(RESULTS, f"dimension/{d}", slices.dimension_removal(model, [d]), langs, budget),
        }
        for kind, ds in (("massive", big), ("control", others))
        for d in ds
    ]


def _without_blocks(base: dict, confirmed: list[dict], dims: list[dict], langs: list[str], seed: int) -> dict:
    """The summary keeps intervals, not blocks: drops the per-block numbers from the confirmed entries' and the
    removed dimensions' evaluations (in place) and returns Base without them."""
    for e in confirmed:
        e["ppl"] = {k: {lang: uncertainty.without_blocks(r[lang], seed) for lang in langs} for k, r in e["ppl"].items()}
    for d in dims:
        d["ppl"] = {lang: uncertainty.without_blocks(d["ppl"][lang], seed) for lang in langs}
    return {lang: uncertainty.without_blocks(base[lang], seed) for lang in langs}


def _comparisons(base: dict, cands: list[dict], ctrls: list[dict], dims: list[dict], langs: list[str], seed: int):
    """Paired 95% intervals (all settings are evaluated on the same text) of what the findings claim, added to
    the entries as "ratio" (to Base) and returned as the two comparisons with random controls:

    - "worst": the candidate perturbation with the largest geometric-mean ratio (picked by point estimate,
      so its ratio is a little optimistic), its ratio to Base, and its ratio to every perturbation of every
      random control entry;
    - "massive": for each massive dimension, its removal's ratio to every random dimension's removal."""
    for e in cands + ctrls:
        e["ratio"] = {
            k: {lang: uncertainty.ratio_entry(r[lang], base[lang], seed) for lang in langs} for k, r in e["ppl"].items()
        }
    for d in dims:
        d["ratio"] = {lang: uncertainty.ratio_entry(d["ppl"][lang], base[lang], seed) for lang in langs}
    out = {}
    if cands:
        worst = max(cands, key=lambda e: _worst(e, langs, base)[1])
        kind = _worst(worst, langs, base)[0]
        out["worst"] = {
            "label": worst["label"],
            "kind": kind,
            "vs_base": worst["ratio"][kind],
            "vs_controls": {
                lang: [
                    {
                        "control": c["label"],
                        "kind": k,
                        **uncertainty.ratio_entry(worst["ppl"][kind][lang], c["ppl"][k][lang], seed),
                    }
                    for c in ctrls
                    for k in slices.PERTURBATIONS
                ]
                for lang in langs
            },
        }
    controls = [d for d in dims if d["kind"] == "control"]
    out["massive"] = {
        str(d["dim"]): {
            lang: [
                {"control": c["dim"], **uncertainty.ratio_entry(d["ppl"][lang], c["ppl"][lang], seed)} for c in controls
            ]
            for lang in langs
        }
        for d in dims
        if d["kind"] == "massive"
    }
    return out


def verdicts(result: dict) -> list[dict]:
    """The findings as verdicts per language, each from paired 95% intervals (uncertainty.RULE, threshold FACTOR):

    - "worst perturbation": the worst single-parameter perturbation raises perplexity more than FACTOR× Base;
    - "worst vs controls": and more than FACTOR× each perturbation of each random control (all must hold);
    - "massive dimension D": removing it raises perplexity more than FACTOR× Base;
    - "massive dimension D vs controls": and more than FACTOR× removing each random dimension.
    A result without intervals (or without controls to compare with) is inconclusive, with the reason."""
    comp, langs, out = result.get("comparisons"), result["languages"], []

    def add(claim, lang, verdict, reason=None, **numbers):
        out.append(
            {"claim": claim, "lang": lang, "verdict": verdict, **numbers, **({"reason": reason} if reason else {})}
        )

    if comp is None:
        for lang in langs:
            add("worst perturbation", lang, uncertainty.INCONCLUSIVE, uncertainty.NO_BLOCKS)
        return out
    if "worst" in comp:
        w = comp["worst"]
        for lang in langs:
            e = w["vs_base"][lang]
            add(
                "worst perturbation",
                lang,
                uncertainty.verdict_of(e, FACTOR, "above"),
                e.get("reason"),
                value=e["value"],
                ci95=e["ci95"],
            )
            vs = w["vs_controls"][lang]
            add(
                "worst vs controls",
                lang,
                uncertainty.all_of([uncertainty.verdict_of(c, FACTOR, "above") for c in vs]),
                None if vs else "no random controls (outlier_controls = 0)",
                ci95=[c["ci95"] for c in vs],
            )
    for d in result["dimensions"]:
        if d["kind"] != "massive" or "ratio" not in d:
            continue
        for lang in langs:
            e, vs = d["ratio"][lang], comp["massive"][str(d["dim"])][lang]
            add(
                f"massive dimension {d['dim']}",
                lang,
                uncertainty.verdict_of(e, FACTOR, "above"),
                e.get("reason"),
                value=e["value"],
                ci95=e["ci95"],
            )
            add(
                f"massive dimension {d['dim']} vs controls",
                lang,
                uncertainty.all_of([uncertainty.verdict_of(c, FACTOR, "above") for c in vs]),
                None if vs else "no random dimensions to compare with",
                ci95=[c["ci95"] for c in vs],
            )
    return out


def outlier_chart(result: dict) -> bytes:
    """PNG: per residual dimension, its massive-activation peak above its core Top entries; top three marked."""
    fig, (top, bottom) = figures.subplots(2, 1, figsize=(9, 5), sharex=True)
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
    return max(((k, geometric_ratio(entry["ppl"][k], base, langs)) for k in slices.PERTURBATIONS), key=lambda x: x[1])


def outliers_table(result: dict) -> tuple[list[str], list[list[str]]]:
    """Table 8's layout (perturbation, parameter, perplexity), one perplexity column per language."""
    langs, base, fmt = result["languages"], result["base"], markup.fmt
    head = ["Perturbation", "Parameter", "Chosen as", "Scan score"] + [f"PPL {lang}" for lang in langs]
    rows = [["-", "-", "", ""] + [fmt(base[lang]["ppl"]) for lang in langs]]
    for k in slices.PERTURBATIONS:
        for i, e in enumerate(result["candidates"] + result["controls"]):
            chosen = f"candidate {i + 1}" if i < len(result["candidates"]) else "random control"
            rows.append(
                [KIND_LABELS[k], e["label"], chosen, fmt(e["score"])]
                + [fmt(e["ppl"][k][lang]["ppl"]) for lang in langs]
            )
    for d in result["dimensions"]:
        chosen = f"massive ({fmt(d['massive'])}×)" if d["kind"] == "massive" else "random control"
        rows.append(
            ["Remove dim", f"D{d['dim']} (all matrices)", chosen, ""] + [fmt(d["ppl"][lang]["ppl"]) for lang in langs]
        )
    return head, rows


def findings(result: dict) -> list[str]:
    """The worst single-parameter perturbation against random controls, and what removing a massive dimension does,
    each with its verdicts from paired 95% intervals."""
    if "not_applicable" in result:
        return [f"Outliers: not applicable to this model ({result['not_applicable']})."]
    langs, base, fmt, out = result["languages"], result["base"], markup.fmt, []
    cands, ctrls = result["candidates"], result["controls"]
    by_claim: dict[str, dict[str, str]] = {}
    for v in verdicts(result):
        by_claim.setdefault(v["claim"], {})[v["lang"]] = v["verdict"]
    missing = "" if result.get("comparisons") else f" ({uncertainty.NO_BLOCKS})"
    worst = max(cands, key=lambda e: _worst(e, langs, base)[1])
    kind, r = _worst(worst, langs, base)
    line = (
        f"The worst single-parameter perturbation found is {KIND_LABELS[kind]} at {worst['label']}: "
        f"perplexity ×{fmt(r)} "
        f"(geometric mean over {', '.join(langs)})"
    )
    if ctrls:
        line += f"; random controls ({len(ctrls)}) reach at most ×{fmt(max(_worst(e, langs, base)[1] for e in ctrls))}"
    out.append(line + f" (the paper's L1-N2100 on LLaMA-2-13B: ×{fmt(PAPER_TABLE8_RATIO)}).")
    out.append(
        f"It raises perplexity more than ×{FACTOR:g} (95% paired interval of its ratio to Base above {FACTOR:g}): "
        f"{uncertainty.grouped(by_claim['worst perturbation'])}{missing}"
        + (
            f"; and more than ×{FACTOR:g} every perturbation of every random control: "
            f"{uncertainty.grouped(by_claim['worst vs controls'])}."
            if "worst vs controls" in by_claim and ctrls
            else "."
        )
    )
    massive = [d for d in result["dimensions"] if d["kind"] == "massive"]
    control = [d for d in result["dimensions"] if d["kind"] == "control"]
    for d in massive:
        claim = f"massive dimension {d['dim']}"
        line = (
            f"Removing residual dimension {d['dim']} (massive activation, {fmt(d['massive'])}× the median "
            f"dimension's peak) from every matrix multiplies perplexity by "
            f"×{fmt(geometric_ratio(d['ppl'], base, langs))}; "
            f"it ranks #{d['core_rank']} of {result['hidden']} residual dimensions by core Top entries."
        )
        if claim in by_claim:
            line += f" More than ×{FACTOR:g} Base: {uncertainty.grouped(by_claim[claim])}"
            if control:
                vs = uncertainty.grouped(by_claim[claim + " vs controls"])
                line += f"; more than ×{FACTOR:g} each random dimension's removal: {vs}"
            line += " (95% paired intervals)."
        out.append(line)
    if control:
        out.append(
            "Removing a random residual dimension instead: "
            f"×{fmt(max(geometric_ratio(d['ppl'], base, langs) for d in control))} at most."
        )
    return out


def ratio_table(result: dict) -> tuple[list[str], list[list[str]]]:
    """Perplexity ratio to Base with its 95% interval, per perturbation or removed dimension and language."""
    langs = result["languages"]
    head = ["Perturbation", "Parameter", "Chosen as"] + [f"ratio {lang}" for lang in langs]
    rows = []
    for k in slices.PERTURBATIONS:
        for i, e in enumerate(result["candidates"] + result["controls"]):
            chosen = f"candidate {i + 1}" if i < len(result["candidates"]) else "random control"
            rows.append([KIND_LABELS[k], e["label"], chosen] + [markup.cell(e["ratio"][k][lang]) for lang in langs])
    for d in result["dimensions"]:
        chosen = "massive" if d["kind"] == "massive" else "random control"
        rows.append(["Remove dim", f"D{d['dim']}", chosen] + [markup.cell(d["ratio"][lang]) for lang in langs])
    return head, rows


def section(result: dict) -> list:
    """Report blocks: Table 8's perturbations, the massive and core-densest dimensions, and their removal."""
    if "not_applicable" in result:
        return [markup.heading(TITLE), markup.text(f"Not applicable to this model: {result['not_applicable']}.")]
    langs, cands = result["languages"], result["candidates"]
    layers = ", ".join(f"L{i + 1}" for i in result["layers"])
    return [
        markup.heading(TITLE),
        markup.text(
            f"Scan: {result['scan_tokens']:,} tokens ({', '.join(langs)}, scoring split) pass through the model "
            f"once; for each input-norm entry of layers {layers} (1-based, as the paper's L1) the scan "
            f"computes max over tokens of |x̂_d · (s′_d − s_d)| / ‖y‖: how much Reset (effective scale to "
            f"1, its initial value: w = 1 for a plain norm, w = 0 for Gemma's (1 + w)) or Mul 10 (effective "
            f"scale × 10) would change the norm's output. The top {len(cands)} are confirmed by perplexity, "
            f"with {len(result['controls'])} seeded random entries as controls. Separately, the most massive "
            "residual dimensions (and random ones as controls) are removed from every attention and MLP "
            f"matrix (feature+ffn family, common index). Perplexity on {result['protocol']['seq_len']}-token "
            "windows, token-weighted."
        ),
        markup.table(
            *outliers_table(result),
            caption="Table 8's layout. A real outlier dimension shows perplexity far "
            "above the base row; the random controls should stay near it.",
        ),
        markup.table(
            *ratio_table(result),
            caption="Perplexity ratio to Base with its 95% interval (paired block bootstrap: Base and the setting "
            f"resample the same blocks of text). A finding holds where the interval lies above {FACTOR:g}. "
            + uncertainty.RULE,
        )
        if result.get("comparisons")
        else markup.text(""),
        markup.bullets(_scan_bullets(result)),
        markup.figure(
            "figures/outliers.png",
            "Top: each residual dimension's peak activation over the median "
            "dimension's (log). Bottom: core Top entries per residual dimension. Dashed: the three most "
            "massive dimensions; see whether they line up with tall bars.",
        ),
    ]


def _scan_bullets(result: dict) -> list[str]:
    """The massive and core-densest dimensions, whether they coincide, the scan scores and the candidates."""
    fmt, langs, base, cands = markup.fmt, result["languages"], result["base"], result["candidates"]
    in_top = [c for c in cands if c["in_core_top"]]
    densest = result["densest"][:5]
    massive_top = result["massive_top"][:5]
    coincide = [m["dim"] for m in massive_top if m["dim"] in densest]
    return [
        "Massive activations (peak |x| of the residual stream over all layers, in units of the median dimension's "
        "peak): "
        + "; ".join(f"dim {m['dim']} {fmt(m['massive'])}× (core rank #{m['core_rank']})" for m in massive_top)
        + ".",
        "Densest residual dimensions of the core Top region (feature+ffn rows/columns): "
        f"{', '.join(map(str, densest))}; "
        + (
            f"dims {', '.join(map(str, coincide))} are also among the five most massive."
            if coincide
            else "none of them is among the five most massive dimensions."
        ),
        f"Scan scores (largest relative change of what attention reads): median {fmt(result['score_median'])}, "
        f"maximum {fmt(result['score_max'])}; candidates confirmed: "
        + ", ".join(f"{c['label']} (score {fmt(c['score'])}, worst ×{fmt(_worst(c, langs, base)[1])})" for c in cands)
        + ".",
        f"{len(in_top)} of {len(cands)} candidate input-norm entries are in the core Top region"
        + (f" ({', '.join(c['label'] for c in in_top)})." if in_top else "."),
    ]
