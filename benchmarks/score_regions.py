"""Every region a run makes, from score files read back at a precision, against the same regions from the
fp32 scores: on the fp32 score files of a `--quick` run folder of the built-in model (1024 scoring tokens
per language, 256 for the monolingual experiment's quarter budget).

    python benchmarks/score_regions.py RUN/scores compact[,bfloat16]

Prints the Jaccard of each region per precision and writes score-regions.json beside this file's results.
"""

import json
import os
import sys
import tempfile
import time

import torch

from lingregion import scorefile
from lingregion.regions import matching, monolingual, select

RUN = sys.argv[1]
SCORE_LANGS = ["ar", "es", "ru", "zh", "ko", "vi"]  # the core (config order)
MONO_LANGS = ["ar", "zh", "ru", "uk", "es", "pt"]  # --quick monolingual languages
FOCUS = "ru"
precisions = sys.argv[2].split(",")
tmp = tempfile.mkdtemp()


def add(total, s):
    """total += s, matrix by matrix (the core sum)."""
    for k, t in s.items():
        total[k] = total[k].add_(t) if k in total else t.clone()


def same(a, b):
    """Jaccard of two regions, whether they are the same entries, and their size."""
    return {
        "jaccard": a.jaccard(b),
        "identical": all(torch.equal(a.packed[k], b.packed[k]) for k in a.packed),
        "entries": a.count(),
    }


def fp32(lang, budget=None):
    """One language's fp32 scores from the run folder (at the quarter budget with `budget`)."""
    return scorefile.load(f"{RUN}/{lang}{'-' + str(budget) if budget else ''}.safetensors")[0]


res = {"source": RUN, "score_langs": SCORE_LANGS, "mono_langs": MONO_LANGS, "focus": FOCUS}
for prec in precisions:
    r, t = {}, {"save": [], "load": []}

    def roundtrip(s, name, prec=prec, r=r, t=t):
        """Write `s` at `prec`, read it back, and record the file's size and the seconds each way."""
        p = f"{tmp}/{name}.safetensors"
        t0 = time.time()
        scorefile.save(p, s, {"lang": name}, prec)
        t["save"].append(time.time() - t0)
        r.setdefault("bytes_per_param", os.path.getsize(p) / sum(x.numel() for x in s.values()))
        t0 = time.time()
        out = scorefile.load(p)[0]
        t["load"].append(time.time() - t0)
        os.unlink(p)
        return out

    # core: sum of fp32 scores (what the run stores once), against the sum of stored language files
    core, core_of_files = {}, {}
    for lang in SCORE_LANGS:
        s = fp32(lang)
        add(core, s)
        del s
    core_back = roundtrip(core, "core")
    for side in ("top", "bottom", "random"):
        for ratio in (0.01, 0.03):
            ref = select(core, ratio, side)
            r[f"core {side} {ratio:g}"] = same(ref, select(core_back, ratio, side))
    del core, core_back, core_of_files
    # monolingual, at the full and the quarter budget
    for label, budget in (("full", None), ("quarter", 256)):
        ref_tops, tops, mono_sum, mono_sum_back, mono_sum_run = {}, {}, {}, {}, {}
        for lang in MONO_LANGS:
            s = fp32(lang, budget)
            back = roundtrip(s, lang)
            ref_tops[lang], tops[lang] = select(s, 0.03, "top"), select(back, 0.03, "top")
            r[f"{label}: top 0.03 {lang}"] = same(ref_tops[lang], tops[lang])
            if lang == FOCUS:
                focus_fp, focus_back = s, back
            if budget is None:
                add(mono_sum, s)
                add(mono_sum_back, back)
                # in a default run the core's languages are read back from their files, the others are fresh
                add(mono_sum_run, back if lang in SCORE_LANGS else s)
            del s, back
        for lang in MONO_LANGS:
            r[f"{label}: monolingual {lang}"] = same(monolingual(ref_tops, lang), monolingual(tops, lang))
        r[f"{label}: matching bottom {FOCUS}"] = same(
            matching(focus_fp, monolingual(ref_tops, FOCUS), "bottom"),
            matching(focus_back, monolingual(tops, FOCUS), "bottom"),
        )
        del focus_fp, focus_back
        if budget is None:
            ref = select(mono_sum, 0.03, "top")
            r["full: top 0.03 of the monolingual languages' sum (distribution figure), as a run reads it"] = same(
                ref, select(mono_sum_run, 0.03, "top")
            )
            r["full: top 0.03 of the monolingual languages' sum, every language from its file"] = same(
                ref, select(mono_sum_back, 0.03, "top")
            )
        del mono_sum, mono_sum_back, mono_sum_run
    r["seconds_per_file"] = {k: round(sum(v) / len(v), 2) for k, v in t.items()}
    res[prec] = r
    print(
        prec,
        json.dumps(
            {k: (round(v["jaccard"], 6) if isinstance(v, dict) and "jaccard" in v else v) for k, v in r.items()},
            indent=0,
        ),
        flush=True,
    )
json.dump(res, open(os.path.join(os.path.dirname(__file__), "results", "score-regions.json"), "w"), indent=1)
