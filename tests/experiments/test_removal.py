"""The removal experiment (the paper's Table 1) on a tiny model: every cell is the perplexity of the model with
the core region removed, measured directly; Random is the geometric mean of its draws; every ratio carries
the paired interval of the same text."""

import math

import pytest

from lingregion import evaluation, interventions, models, reproduce, uncertainty
from lingregion.experiments import removal
from lingregion.run import Run

from conftest import tiny_config


def test_removal_table_equals_direct_evaluation(tiny_folder, tmp_path):
    cfg = tiny_config(tiny_folder, experiments=["removal"], random_seeds=2, ratios=[0.05])
    out = tmp_path / "run"
    r = reproduce(cfg, out, progress=False)["removal"]
    m = models.load(str(tiny_folder))
    run = Run(out, cfg, m, progress=False)

    def ppl(region, lang):
        edits = interventions.removal(region, m.removed) if region else []
        with interventions.applied(m.module, edits):
            return evaluation.perplexity(m.module, run.windows(lang, "eval"), cfg.batch_size, False)

    ratio = cfg.ratios[0]
    assert r["settings"] == ["base"] + [f"{side}@{ratio:g}" for side in cfg.sides]
    for lang in cfg.eval_langs:
        base, top = ppl(None, lang), ppl(run.core_region("top", ratio), lang)
        assert r["table"]["base"][lang]["ppl"] == pytest.approx(base["ppl"], rel=1e-12)
        assert r["table"][f"top@{ratio:g}"][lang]["ppl"] == pytest.approx(top["ppl"], rel=1e-12)
        draws = [ppl(run.core_region("random", ratio, draw=k), lang) for k in range(2)]
        geo = math.exp(sum(math.log(d["ppl"]) for d in draws) / 2)
        assert r["table"][f"random@{ratio:g}"][lang]["ppl"] == pytest.approx(geo, rel=1e-9)
        entry = r["ratio"][f"top@{ratio:g}"][lang]
        assert entry["value"] == pytest.approx(top["ppl"] / base["ppl"], rel=1e-9)
        assert entry["ci95"] == pytest.approx(list(uncertainty.paired_bootstrap(top, base, seed=cfg.seed)))
        random = removal.geometric_mean(draws)
        assert entry["vs_random"]["ci95"] == pytest.approx(list(uncertainty.paired_bootstrap(top, random)))
    assert r["regions"][f"top@{ratio:g}"]["entries"] == run.core_region("top", ratio).count()


def test_geometric_mean_of_draws_averages_nll_block_by_block():
    a = {"nll": 10.0, "tokens": 5, "bytes": 20, "ppl": math.exp(2.0), "blocks": {"size": 2, "nll": [4.0, 6.0]}}
    b = {"nll": 20.0, "tokens": 5, "bytes": 20, "ppl": math.exp(4.0), "blocks": {"size": 2, "nll": [8.0, 12.0]}}
    g = removal.geometric_mean([a, b])
    assert g["nll"] == 15.0 and g["ppl"] == pytest.approx(math.exp(3.0)) and g["draws"] == 2
    assert g["bpb"] == pytest.approx(15.0 / math.log(2) / 20)
    assert g["blocks"]["nll"] == [6.0, 9.0]
