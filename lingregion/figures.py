"""Figures of regions and removal results, each returned as PNG bytes.

Bytes rather than files: the report embeds them in HTML (base64) and also writes them beside it.
"""

from __future__ import annotations

import io
import math
import re

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter

from .regions import Region
from .store import LingregionError

KINDS = ("q", "k", "v", "o", "gate", "up", "down", "norm")
DENSITY_LABEL = "share of region in 3×3 neighbourhood"
_LAYER = re.compile(r"\.(?:layers|h)\.(\d+)\.")
_SIDE_COLOURS = {"top": "#d62728", "bottom": "#1f77b4", "random": "#ff7f0e"}


def subplots(*args, **kwargs):
    """`pyplot.subplots` without pyplot: a Figure that no GUI backend or global state ever sees, so figures
    are the same on a server, in CI and in a notebook, whatever was imported first."""
    fig = Figure(figsize=kwargs.pop("figsize", None))
    return fig, fig.subplots(*args, **kwargs)


def colormap(name: str):
    """A registered matplotlib colour map by name."""
    return matplotlib.colormaps[name]


def png(fig) -> bytes:
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def neighbourhood_density(mask: torch.Tensor) -> torch.Tensor:
    """Share of region members among the existing cells of each entry's 3×3 neighbourhood (itself included)."""
    x = mask.bool().float()[None, None]
    # count_include_pad=False divides by the cells that exist: 4 at corners, 6 at edges, 9 inside
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)[0, 0]


def reduce_for_display(x: torch.Tensor, max_side: int = 256) -> torch.Tensor:
    """Area-average down to at most `max_side` per side, keeping the aspect ratio.

    Averaging (not striding) so that a single full row or column stays visible at 1/factor strength.
    """
    h, w = x.shape
    scale = max_side / max(h, w)
    if scale >= 1:
        return x.float()
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    return F.adaptive_avg_pool2d(x.float()[None, None], size)[0, 0]


def layer_of(name: str) -> int | None:
    """The layer number in a parameter name (`.layers.N.` or GPT-2's `.h.N.`), or None outside the layers."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def kind_of(name: str) -> str:
    """The kind of matrix a parameter name denotes (q, k, v, o, gate, up, down, norm), else "other"."""
    if "norm" in name:
        return "norm"
    for kind in KINDS[:-1]:
        if f"{kind}_proj" in name:
            return kind
    return "other"


def _density_image(region: Region, name: str, max_side: int) -> torch.Tensor:
    if len(region.shapes[name]) != 2:
        raise LingregionError(f"{name} is not a matrix (shape {region.shapes[name]}); heat maps need 2-D parameters")
    return reduce_for_display(neighbourhood_density(region.mask(name)), max_side)


def region_heatmap(region: Region, name: str, head_dim: int | None = None) -> bytes:
    """PNG of one matrix's region density (rows = outputs), with head boundaries marked when `head_dim` is given."""
    img = _density_image(region, name, 256)
    h, w = region.shapes[name]
    side = max(img.shape)
    # image area follows the matrix shape, but never so thin that the title and ticks collide
    fig, ax = subplots(
        figsize=(min(max(6 * img.shape[1] / side, 3.5), 6) + 1.5, min(max(6 * img.shape[0] / side, 3), 6) + 0.8)
    )
    # extent in original indices, so ticks and head lines read as real rows and columns
    im = ax.imshow(
        img.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto", interpolation="nearest", extent=(0, w, h, 0)
    )
    if head_dim:
        if any(p in name for p in ("q_proj", "k_proj", "v_proj")):
            for r in range(head_dim, h, head_dim):
                ax.axhline(r, color="white", lw=0.6, alpha=0.8)
        elif "o_proj" in name:
            for c in range(head_dim, w, head_dim):
                ax.axvline(c, color="white", lw=0.6, alpha=0.8)
    ax.set(title=name, ylabel="output (rows)", xlabel="input (columns)")
    fig.colorbar(im, ax=ax, label=DENSITY_LABEL)
    return png(fig)


def region_grid(
    region: Region,
    layers: list[int] | None = None,
    kinds=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
) -> bytes:
    """Overview: one small density map per (layer, matrix type); types the model lacks are left out."""
    cells: dict[tuple[int, str], str] = {}
    for name, shape in region.shapes.items():
        layer = layer_of(name)
        kind = next((k for k in kinds if f".{k}." in name), None)
        if layer is not None and kind and len(shape) == 2 and (layers is None or layer in layers):
            cells.setdefault((layer, kind), name)
    if not cells:
        fig, ax = subplots(figsize=(6, 1.5))
        ax.axis("off")
        ax.text(0.5, 0.5, f"no matrices of types {', '.join(kinds)} in this region", ha="center", va="center")
        return png(fig)
    rows = sorted({layer for layer, _ in cells})
    cols = [k for k in kinds if k in {c for _, c in cells}]
    images = {key: _density_image(region, name, 64) for key, name in cells.items()}
    # one shared scale up to the densest cell: at 64 px a full row of a 2048-row matrix is only 1/32,
    # which a fixed 0..1 scale would hide
    vmax = max(float(img.max()) for img in images.values()) or 1.0
    fig, axes = subplots(len(rows), len(cols), figsize=(1.3 * len(cols) + 1.5, 1.1 * len(rows) + 0.8), squeeze=False)
    for i, layer in enumerate(rows):
        for j, kind in enumerate(cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if (layer, kind) in images:
                im = ax.imshow(
                    images[layer, kind].numpy(),
                    vmin=0,
                    vmax=vmax,
                    cmap="viridis",
                    aspect="auto",
                    interpolation="nearest",
                )
            else:
                ax.set_facecolor("#eeeeee")
            if i == 0:
                ax.set_title(kind.removesuffix("_proj"), fontsize=10)
            if j == 0:
                ax.set_ylabel(f"layer {layer}", fontsize=9)
    fig.colorbar(im, ax=axes.ravel().tolist(), label=DENSITY_LABEL, shrink=min(1.0, 6 / len(rows)))
    return png(fig)


def region_distribution(region: Region) -> dict:
    """Share of the region's entries in each layer and each matrix type."""
    by_layer: dict[int, int] = {}
    by_kind = dict.fromkeys(KINDS, 0)
    for name in region.shapes:
        n = region.count(name)
        layer = layer_of(name)
        if layer is not None:
            by_layer[layer] = by_layer.get(layer, 0) + n
        kind = kind_of(name)
        by_kind[kind] = by_kind.get(kind, 0) + n
    if not by_kind.get("other"):
        by_kind.pop("other", None)
    total = region.count() or 1  # an empty region: all shares 0
    return {
        "by_layer": {k: v / total for k, v in sorted(by_layer.items())},
        "by_kind": {k: v / total for k, v in by_kind.items()},
    }


def _grouped_bars(ax, groups: list[str], series: dict[str, dict], colours=None, rotation=0) -> list[float]:
    """One cluster per group, one bar per series; returns the bar offsets within a cluster."""
    width = 0.8 / max(1, len(series))
    offsets = [-0.4 + width * (i + 0.5) for i in range(len(series))]
    x = np.arange(len(groups))
    for off, (label, values) in zip(offsets, series.items()):
        ax.bar(
            x + off, [values.get(g, 0.0) for g in groups], width, label=label, color=colours[label] if colours else None
        )
    ax.set_xticks(x, groups, rotation=rotation)
    ax.set_xlim(-0.6, len(groups) - 0.4)
    return offsets


def distribution_plot(dists: dict[str, dict]) -> bytes:
    """By layer and by matrix type, one bar colour per labelled region; shares in percent."""
    # JSON turns int layer keys into strings; normalise so regions from files and memory line up
    by_layer = {lab: {str(k): 100 * v for k, v in d["by_layer"].items()} for lab, d in dists.items()}
    by_kind = {lab: {k: 100 * v for k, v in d["by_kind"].items()} for lab, d in dists.items()}
    layers = sorted({k for d in by_layer.values() for k in d}, key=int)
    kinds = [k for k in (*KINDS, "other") if any(k in d for d in by_kind.values())]
    fig, (a1, a2) = subplots(
        1,
        2,
        figsize=(max(8, 0.35 * len(layers) + 2) + 5, 4.5),
        gridspec_kw={"width_ratios": [max(1.5, len(layers) / 8), 1]},
    )
    _grouped_bars(a1, layers, by_layer, rotation=90 if len(layers) > 40 else 0)
    _grouped_bars(a2, kinds, by_kind)
    a1.set(xlabel="layer", ylabel="share of region entries (%)", title="by layer")
    a2.set(xlabel="matrix type", ylabel="share of region entries (%)", title="by matrix type")
    fig.legend(
        *a1.get_legend_handles_labels(),
        loc="lower center",
        bbox_to_anchor=(0.5, 1.0),
        ncol=min(len(dists), 4),
        frameon=False,
    )
    fig.tight_layout()
    return png(fig)


def _setting_colours(settings: list[str]) -> dict[str, tuple]:
    """Base grey; each side its own hue, paler for a smaller ratio (hues stay apart at every shade)."""
    ratios: dict[str, list[float]] = {}
    for s in settings:
        if "@" in s:
            side, r = s.split("@")
            ratios.setdefault(side, []).append(float(r))
    colours = {}
    for s in settings:
        if "@" not in s:
            colours[s] = to_rgb("#888888")
            continue
        side, r = s.split("@")
        ranks = sorted(set(ratios[side]))
        pale = 0.0 if len(ranks) == 1 else 0.55 * (1 - ranks.index(float(r)) / (len(ranks) - 1))
        colours[s] = tuple(c + (1 - c) * pale for c in to_rgb(_SIDE_COLOURS.get(side, "#2ca02c")))
    return colours


def removal_chart(result: dict) -> bytes:
    """Perplexity and bits per byte per language, one bar per setting; infinite values drawn clipped."""
    settings, langs, table = result["settings"], result["languages"], result["table"]
    colours = _setting_colours(settings)
    per_lang = max(0.2, 0.035 * len(settings) + 0.06)  # inches: room for every bar and a vertical label
    width = 2 * (max(per_lang * len(langs), 3.5) + 1.5)
    fig, axes = subplots(1, 2, figsize=(width, 5))
    for ax, metric, label in zip(axes, ("ppl", "bpb"), ("perplexity (log scale)", "bits per byte (log scale)")):
        values = {s: {lang: table.get(s, {}).get(lang, {}).get(metric, math.nan) for lang in langs} for s in settings}
        finite = [v for d in values.values() for v in d.values() if math.isfinite(v) and v > 0]
        lo, hi = (min(finite), max(finite)) if finite else (1.0, 10.0)
        top = hi * 3
        # an infinite result is drawn as a bar to the axis top, marked, instead of breaking the scale
        clipped = {s: {lang: top if v == math.inf else v for lang, v in d.items()} for s, d in values.items()}
        offsets = _grouped_bars(ax, langs, clipped, colours, rotation=90 if len(langs) > 12 else 0)
        xs = [
            j + off for off, s in zip(offsets, settings) for j, lang in enumerate(langs) if values[s][lang] == math.inf
        ]
        if xs:
            ax.plot(
                xs,
                [top] * len(xs),
                "v",
                color="black",
                ms=5,
                ls="none",
                clip_on=False,
                label="infinite (clipped at the top)",
            )
        ax.set_yscale("log")
        ax.set_ylim(lo / 1.5, top)
        # plain numbers (2, 300), not 2×10⁰: bits per byte often spans less than one decade
        ax.yaxis.set_major_formatter(LogFormatter())
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))
        ax.set(ylabel=label, xlabel="language", title=label.split(" (")[0])
        ax.grid(axis="y", which="major", alpha=0.3)
    legend: dict[str, object] = {}
    for ax in axes:  # both panels: either may be the only one with an infinite value
        for handle, lab in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(lab, handle)
    legend = {lab: legend[lab] for lab in sorted(legend, key=lambda lab: lab not in settings)}
    fig.legend(
        list(legend.values()),
        list(legend),
        loc="lower center",
        bbox_to_anchor=(0.5, 1.0),
        ncol=min(len(legend), max(2, int(width / 2))),
        frameon=False,
        title="setting (side@share of parameters removed)",
    )
    fig.tight_layout()
    return png(fig)


def matrix_heatmap(
    rows: list[str],
    cols: list[str],
    values: list[list[float]],
    title: str,
    label: str,
    row_title: str,
    col_title: str,
    log: bool = False,
) -> bytes:
    """A labelled languages × languages table as a heat map, each cell annotated with its value."""
    data = np.array(values, dtype=float)
    fig, ax = subplots(figsize=(1.0 + 0.55 * len(cols), 1.0 + 0.45 * len(rows)))
    shown = np.log10(np.clip(data, 1e-12, None)) if log else data
    im = ax.imshow(shown, cmap="magma_r" if log else "viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=90 if len(cols) > 12 else 0)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel(col_title)
    ax.set_ylabel(row_title)
    ax.set_title(title)
    for i in range(len(rows)):
        for j in range(len(cols)):
            ax.text(
                j,
                i,
                f"{data[i, j]:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if shown[i, j] > np.nanmean(shown) else "black",
            )
    fig.colorbar(im, ax=ax, label=("log10 " if log else "") + label)
    return png(fig)
