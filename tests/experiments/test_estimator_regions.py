"""The estimators experiment's pass: the shuffled-token control keeps each window's tokens and BOS, seeded."""

import torch

from conftest import TEXT, lang_windows


# --- the experiment ----------------------------------------------------------------------------------
def test_shuffled_windows_keep_bos_and_tokens_and_are_seeded(tokenizer):
    from lingregion.experiments import estimator_regions as exp

    w = lang_windows(tokenizer, TEXT[:3], "ru")
    a, b, c = exp.shuffled(w, 0), exp.shuffled(w, 0), exp.shuffled(w, 1)
    assert all(torch.equal(x, y) for x, y in zip(a.input_ids, b.input_ids))
    assert any(not torch.equal(x, y) for x, y in zip(a.input_ids, c.input_ids))
    for orig, s in zip(w.input_ids, a.input_ids):
        assert s[0] == orig[0] == tokenizer.bos_token_id
        assert sorted(s.tolist()) == sorted(orig.tolist())
    assert any(not torch.equal(x, y) for x, y in zip(a.input_ids, w.input_ids))
    assert a.n_bytes == w.n_bytes and a.n_tokens == w.n_tokens
