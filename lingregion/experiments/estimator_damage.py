"""The estimators experiment's damage: the capped ln perplexity ratio, the damage curves, each control region
against the core region, and the specificity answer read from them.

Damage is the ln perplexity ratio per language, capped where the model does worse than a uniform guess over
its vocabulary. The answer to whether the core region is specific to language is read at the smallest k
where the core region clearly does something beyond Random (MIN_EFFECT)."""

from __future__ import annotations

import math

import numpy as np

from .. import figures
from ..regions import Region

CORE = "taylor"  # the paper's estimator: its region is the core region the controls are compared with

MIN_EFFECT = 0.1  # ln perplexity ratio (about +10%) the core region must do beyond Random for a comparison


def cap(base: dict, vocab: int) -> dict[str, float]:
    """The largest damage counted per language: up to a uniform guess over the vocabulary (ln ppl = ln V)."""
    return {lang: max(math.log(vocab) - b["nll"] / b["tokens"], 0.0) for lang, b in base.items()}


def damage(base: dict, removed: dict, vocab: int) -> dict[str, float]:
    """ln(ppl_removed / ppl_base) per language, from the summed NLLs (finite even when perplexity is not),
    capped where the model does worse than a uniform guess over its vocabulary: past that point a larger
    number says how confidently wrong the model is, not that more of it was destroyed."""
    limit = cap(base, vocab)
    return {lang: min((removed[lang]["nll"] - b["nll"]) / b["tokens"], limit[lang]) for lang, b in base.items()}


def mean(values) -> float:
    """The arithmetic mean of a non-empty iterable."""
    values = list(values)
    return sum(values) / len(values)


def pct(r: str | float) -> str:
    """A share as a percentage with two significant digits and no exponent (0.0001%, 0.25%, 1%)."""
    return np.format_float_positional(100 * float(r), precision=2, fractional=False, trim="-") + "%"


def compare(compared: dict[str, tuple[Region, str]], per_lang: dict) -> dict:
    """Each region against the core one: overlap, and damage as a share of the core's above Random's."""
    core = compared["core"][0]
    out = {}
    for label, (region, setting) in compared.items():
        out[label] = {
            "setting": setting,
            "entries": region.count(),
            "jaccard_core": region.jaccard(core),
            "share_in_core": (region & core).count() / max(region.count(), 1),
            "damage": mean(per_lang[setting].values()),
        }
    lo, hi = out["random"]["damage"], out["core"]["damage"]
    for s in out.values():
        s["relative_damage"] = (s["damage"] - lo) / (hi - lo) if hi != lo else math.nan
    return out


def saturated(result: dict) -> dict[str, list[str]]:
    """Per k, the estimators whose removal leaves every language worse than a uniform guess (at the cap),
    where damage can no longer say which region matters more."""
    by_lang, limit = result["damage_by_language"], result["cap"]
    return {
        r: [n for n in result["estimators"] if all(0 < limit[lang] <= by_lang[f"{n}@{r}"][lang] for lang in limit)]
        for r in result["ratios"]
    }


def leaders(result: dict, r: str) -> list[str]:
    """The estimators whose region does the most damage at k = r (several when they tie, e.g. at the cap)."""
    d = {n: v[r] for n, v in result["damage"].items() if n != "random"}
    top = max(d.values())
    return [n for n, v in d.items() if v >= top - 1e-9]


def answer_ratio(result: dict) -> str | None:
    """The smallest k at which the core region does clearly more damage than Random (MIN_EFFECT)."""
    spec = result["specificity"]
    return next(
        (r for r in result["ratios"] if spec[r]["core"]["damage"] - spec[r]["random"]["damage"] >= MIN_EFFECT), None
    )


def answer(result: dict) -> str:
    """The specificity answer, from the numbers, with the rule that decides it stated in the text. It is
    read at the smallest k where the core region clearly does something (`answer_ratio`): the larger k, the
    more likely removal destroys the model whatever was removed."""
    r0, control, spec = answer_ratio(result), f"{result['control_language']}-only", result["specificity"]
    if r0 is None:
        return (
            f"Removing the core region (Taylor over {', '.join(result['score_languages'])}) does less than "
            f"{MIN_EFFECT} ln perplexity beyond Random at every k tried, so the controls cannot be compared with it "
            "on this model and data; try larger k or more evaluation tokens."
        )
    en, sh = spec[r0][control]["relative_damage"] + 0.0, spec[r0]["shuffled"]["relative_damage"] + 0.0
    parts = [
        f"At Top {pct(r0)}, the core region (Taylor over {', '.join(result['score_languages'])}) is {_verdict(en, sh)}."
    ]
    if CORE in saturated(result)[r0]:
        parts.append(
            "At this k removing it already leaves every language worse than a uniform guess, so a control "
            "at 100% destroys the model as thoroughly, and smaller k would separate them further."
        )
    parts += _control_parts(result, r0, en, sh)
    parts += _other_k_parts(result, r0)
    parts.append(
        f"Rule: read at the smallest k where the core region does at least {MIN_EFFECT} ln perplexity more "
        "damage than Random; a control that does at least half of the core region's damage above Random "
        "counts as finding it."
    )
    return " ".join(parts)


def _verdict(en: float, sh: float) -> str:
    """What the core region is, from the shares of its damage above Random that the control-language region
    (`en`) and the token-shuffled one (`sh`) do: a control doing at least half of it finds the region."""
    if en >= 0.5:
        return (
            "mostly the model's generally important parameters: neither the six languages nor word order is "
            "needed to find most of it"
            if sh >= 0.5
            else "not specific to the six languages, but tied to structured text: a language none of the six finds "
            "most of it, their token-shuffled text does not"
        )
    return (
        "tied to the six languages' tokens rather than their word order: their token-shuffled text finds "
        "most of it, another language does not"
        if sh >= 0.5
        else "specific to the scored languages in large part: neither another language nor shuffled text finds "
        "most of it"
    )


def _control_parts(result: dict, r0: str, en: float, sh: float) -> list[str]:
    """At k = r0, what each control region shares with the core region and how much of its damage it does."""
    control, s, parts = f"{result['control_language']}-only", result["specificity"][r0], []
    parts.append(
        f"A region of the same size found from {result['control_language']} text alone shares "
        f"{s[control]['jaccard_core']:.1%} of entries with it by Jaccard (chance about "
        f"{pct(float(r0) / (2 - float(r0)))}) and does {en:.0%} of its damage above Random; one from "
        f"token-shuffled windows shares {s['shuffled']['jaccard_core']:.1%} and does {sh:.0%}."
    )
    if "magnitude" in s:
        parts.append(
            f"Weight magnitude, with no data, shares {s['magnitude']['jaccard_core']:.1%} and does "
            f"{s['magnitude']['relative_damage']:.0%}."
        )
    if "outlier-dims" in s:
        od = s["outlier-dims"]
        parts.append(
            f"The outlier dimensions {', '.join(map(str, result['outlier_dims']))} ({od['entries']:,} entries, "
            f"{od['entries'] / result['scored_parameters']:.2%} of the parameters) hold {od['share_in_core']:.1%} "
            f"of their entries in the core region ({pct(r0)} expected by chance) and removing them does "
            f"{od['relative_damage']:.0%} of its damage."
        )
    return parts


def _other_k_parts(result: dict, r0: str) -> list[str]:
    """The control-language and shuffled regions at the other k, and the k where every estimator's region
    leaves the model past a uniform guess."""
    control, spec, parts = f"{result['control_language']}-only", result["specificity"], []
    others = [r for r in result["ratios"] if r != r0]
    if others:
        parts.append(
            f"At the other k the {result['control_language']}-only and shuffled regions do "
            + ", ".join(
                f"{spec[r][control]['relative_damage'] + 0.0:.0%} and "
                f"{spec[r]['shuffled']['relative_damage'] + 0.0:.0%} "
                f"({pct(r)})"
                for r in others
            )
            + " of the core region's damage above Random."
        )
    full = [r for r, names in saturated(result).items() if len(names) == len(result["estimators"])]
    if full:
        parts.append(
            f"At {', '.join(map(pct, full))} every estimator's region leaves the model worse than a uniform "
            f"guess over its {result['vocab']:,} tokens, so those points cannot tell the regions apart."
        )
    return parts


def damage_chart(result: dict) -> bytes:
    """Damage against the share of parameters removed, one line per estimator, Random dashed."""
    ratios = [float(r) for r in result["ratios"]]
    fig, ax = figures.subplots(figsize=(6.5, 4.2))
    for name, curve in result["damage"].items():
        style = {"color": "#888888", "ls": "--"} if name == "random" else {}
        ax.plot([100 * r for r in ratios], [curve[f"{r:g}"] for r in ratios], marker="o", label=name, **style)
    ax.axhline(mean(result["cap"].values()), color="#bbbbbb", ls=":", label="cap: worse than a uniform guess")
    ax.set_xscale("log")
    ax.set_xticks([100 * r for r in ratios], [pct(r) for r in ratios])
    ax.minorticks_off()
    ax.set(
        xlabel="Top k% of parameters removed",
        ylabel="mean ln(perplexity ratio), capped",
        title=f"Damage over {', '.join(result['eval_languages'])}",
    )
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return figures.png(fig)
