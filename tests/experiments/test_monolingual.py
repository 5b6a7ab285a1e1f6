import json

import pytest
import torch

from lingregion import Config, evaluation, reproduce
from lingregion.experiments.runfolder import Run
from lingregion.regions import Region, matching, monolingual, select
from lingregion.store import LingregionError


def test_set_difference_hand_case():
    # one 2×4 matrix; each language's Top 25% (2 entries) written out by hand
    scores = {
        "ru": {"w": torch.tensor([[9.0, 8, 0, 0], [0, 0, 0, 0]])},  # Top {0, 1}
        "uk": {"w": torch.tensor([[0.0, 8, 9, 0], [0, 0, 0, 0]])},  # Top {1, 2}
        "es": {"w": torch.tensor([[0.0, 0, 0, 0], [9, 8, 0, 0]])},  # Top {4, 5}
    }
    tops = {lang: select(s, 0.25, "top") for lang, s in scores.items()}
    assert tops["ru"].indices("w").tolist() == [0, 1]
    assert monolingual(tops, "ru").indices("w").tolist() == [0]  # 1 is shared with uk
    assert monolingual(tops, "uk").indices("w").tolist() == [2]
    assert monolingual(tops, "es").indices("w").tolist() == [4, 5]  # shares nothing


def test_monolingual_regions_are_disjoint_from_every_other_top_set():
    g = torch.Generator().manual_seed(0)
    langs = ["ar", "es", "ru", "zh"]
    tops = {
        lang: select({"a": torch.rand(40, 30, generator=g), "b": torch.rand(77, generator=g)}, 0.1, "top")
        for lang in langs
    }
    for lang in langs:
        mono = monolingual(tops, lang)
        for n in mono.packed:
            assert mono.count(n) <= round(0.1 * mono.mask(n).numel())
            assert not (mono.mask(n) & ~tops[lang].mask(n)).any()
        for other in langs:
            if other != lang:
                assert (mono & tops[other]).count() == 0
    with pytest.raises(LingregionError):
        monolingual({"ru": tops["ru"]}, "ru")


def test_matching_control_has_the_same_size_per_matrix():
    g = torch.Generator().manual_seed(1)
    scores = {"a": torch.rand(20, 10, generator=g), "b": torch.rand(50, generator=g)}
    like = Region.from_masks({"a": torch.rand(20, 10, generator=g) < 0.2, "b": torch.rand(50, generator=g) < 0.5})
    bottom = matching(scores, like, "bottom")
    for n in scores:
        assert bottom.count(n) == like.count(n)
        chosen = scores[n][bottom.mask(n)]
        assert chosen.max() <= scores[n][~bottom.mask(n)].min()


def test_interaction_matrix_uses_the_core_evaluation(tiny_folder, tmp_path, tokenizer):
    cfg = Config(
        model=str(tiny_folder),
        seq_len=16,
        score_tokens=32,
        eval_tokens=32,
        mono_eval_tokens=32,
        score_langs=["ru", "es"],
        eval_langs=["ru", "uk", "es"],
        mono_langs=["ru", "uk", "es"],
        mono_ratio=0.1,
        experiments=["monolingual"],
        gen_tokens=3,
    )
    out = tmp_path / "run"
    res = reproduce(cfg, out, progress=False)["monolingual"]
    # each entry equals the shared evaluation function applied by hand to the same model and region
    from lingregion import interventions, models

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
    assert set(res["generations"]) == {"base", "mono-ru", "mono-uk", "mono-es"}
    assert set(res["table5"]) == {"full", "quarter"}
    saved = json.loads((out / "results" / "monolingual-summary.json").read_text())
    assert saved["jaccard"]["ru"]["ru"] == 1.0
    for f in ["interaction.png", "jaccard.png", "distribution.png"]:
        assert (out / "figures" / f).read_bytes().startswith(b"\x89PNG")
    assert "## Monolingual regions" in (out / "report.md").read_text()
