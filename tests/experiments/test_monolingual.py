"""The monolingual experiment end to end on a tiny model: the interaction matrix is the shared evaluation
applied by hand to the same model and region, and the summary, figures and report section are written."""

import json

import pytest

from lingregion import evaluation, interventions, models, reproduce
from lingregion.regions import Region
from lingregion.run import Run

from conftest import tiny_config


def test_interaction_matrix_uses_the_core_evaluation(tiny_folder, tmp_path, tokenizer):
    cfg = tiny_config(
        tiny_folder,
        mono_eval_tokens=32,
        eval_langs=["ru", "uk", "es"],
        mono_langs=["ru", "uk", "es"],
        mono_ratio=0.1,
        experiments=["monolingual"],
        gen_tokens=3,
    )
    out = tmp_path / "run"
    res = reproduce(cfg, out, progress=False)["monolingual"]
    # each entry equals the shared evaluation function applied by hand to the same model and region
    m = models.load(str(tiny_folder))
    run = Run(out, cfg, m, progress=False)
    for lang in ["ru", "es"]:
        region = Region.load(out / "regions" / f"monolingual-{lang}-0.1.safetensors")
        with interventions.applied(m.module, interventions.removal(region, run.removed)):
            for e in cfg.eval_langs:
                ppl = evaluation.perplexity(m.module, run.windows(e, "eval", 32), cfg.batch_size, False)["ppl"]
                assert res["removed"][lang][e]["ppl"] == pytest.approx(ppl, rel=1e-9)
                assert res["ppl_ratio"][lang][e] == pytest.approx(ppl / res["base"][e]["ppl"], rel=1e-9)
    assert set(res["related"]["ru"]["related"]) == {"uk"}
    assert res["related"]["ru"]["verdict"]["uk"] in ("holds", "does not hold", "inconclusive")
    for lang in res["languages"]:
        for e in res["eval_languages"]:
            lo, hi = res["ppl_ratio_ci95"][lang][e]
            assert lo <= res["ppl_ratio"][lang][e] <= hi
    # every language's own split-half overlap against the closest other language's, matrix by matrix
    for lang, r in res["resolution"].items():
        assert r["closest"] != lang and r["ci95"][0] <= r["difference"] <= r["ci95"][1]
        assert r["difference"] == pytest.approx(r["within"] - r["between"][r["closest"]], abs=1e-9)
    assert set(res["generations"]) == {"base", "mono-ru", "mono-uk", "mono-es"}
    assert set(res["table5"]) == {"full", "quarter"}
    saved = json.loads((out / "results" / "monolingual-summary.json").read_text())
    assert saved["jaccard"]["ru"]["ru"] == 1.0
    for f in ["interaction.png", "jaccard.png", "distribution.png"]:
        assert (out / "figures" / f).read_bytes().startswith(b"\x89PNG")
    assert "## Monolingual regions" in (out / "report.md").read_text()


def test_the_interaction_matrix_evaluates_the_paper_languages_of_eval_langs():
    from lingregion.config import MORE_EVAL_LANGS, PAPER_EVAL_LANGS, Config
    from lingregion.experiments import monolingual
    from lingregion.store import LingregionError

    assert monolingual.interaction_langs(Config()) == PAPER_EVAL_LANGS  # the removal table's 30, less the 18
    assert len(Config().eval_langs) == 30 and set(MORE_EVAL_LANGS).isdisjoint(monolingual.interaction_langs(Config()))
    quick = Config.quick()
    assert monolingual.interaction_langs(quick) == quick.eval_langs  # --quick: all five, as before
    assert monolingual.interaction_langs(Config(eval_langs=["fr", "ru"], mono_eval_langs=["ru", "fr"])) == ["fr", "ru"]
    with pytest.raises(LingregionError, match="none of eval_langs"):
        monolingual.validate(Config(eval_langs=["fr"]))
