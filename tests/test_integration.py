"""The real default model (Gemma 3 270M base): a few windows, real text, the paper's headline effect."""

import pytest

from lingregion import corpus, evaluation, interventions, models, scoring
from lingregion.regions import select

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gemma():
    return models.load()


def test_default_model_is_gemma3_with_offset_norms(gemma):
    assert gemma.info["class"] == "Gemma3ForCausalLM"
    assert gemma.info["revision"]["gguf_sha256"]
    names = models.scored_names(gemma.module)
    removed = models.removed_values(gemma.module, names)
    assert {removed[n] for n in names if n.endswith("norm.weight")} == {-1.0}


def test_top_region_removal_breaks_the_model_bottom_less_than_random(gemma):
    m, tok = gemma.module, gemma.tokenizer
    names = models.scored_names(m)
    removed = models.removed_values(m, names)
    total = None
    for lang in ["ru", "zh"]:
        w = corpus.load_windows(tok, lang, "score", 128, 128)
        s = scoring.score(m, w, names, removed, progress=False)
        total = s if total is None else {n: total[n] + s[n] for n in names}
    evals = [corpus.load_windows(tok, lang, "eval", 128, 128) for lang in ["es", "ja"]]

    def ppl(edits):
        with interventions.applied(m, edits):
            return [evaluation.perplexity(m, w, progress=False)["ppl"] for w in evals]

    base = ppl([])
    top, bottom, random = (
        ppl(interventions.removal(select(total, 0.01, side, seed=0), removed)) for side in ("top", "bottom", "random")
    )
    for b, t, lo, r in zip(base, top, bottom, random):
        assert t >= 100 * b
        assert abs(lo / b - 1) < abs(r / b - 1)
    assert ppl([]) == base  # undone exactly


def test_monolingual_region_hurts_its_language_more_than_bottom(gemma):
    from lingregion.regions import matching, monolingual

    m, tok = gemma.module, gemma.tokenizer
    names = models.scored_names(m)
    removed = models.removed_values(m, names)
    scores, tops = {}, {}
    for lang in ["ru", "es", "zh", "ko"]:
        scores[lang] = scoring.score(
            m, corpus.load_windows(tok, lang, "score", 256, 256), names, removed, progress=False
        )
        tops[lang] = select(scores[lang], 0.03, "top")
    mono = monolingual(tops, "ru")
    assert mono.count() > 0
    bottom = matching(scores["ru"], mono, "bottom")
    w = corpus.load_windows(tok, "ru", "eval", 256, 256)
    base = evaluation.perplexity(m, w, progress=False)["ppl"]
    results = {}
    for label, region in (("mono", mono), ("bottom", bottom)):
        with interventions.applied(m, interventions.removal(region, removed)):
            results[label] = evaluation.perplexity(m, w, progress=False)["ppl"]
    assert results["mono"] > results["bottom"] and results["mono"] > base
