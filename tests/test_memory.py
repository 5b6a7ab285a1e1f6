"""memory.estimate against a direct count on the full model: parameters, and the bytes autograd saves."""

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from lingregion import corpus, memory, models


def saved_bytes(model, seq_len, batch_size):
    """Distinct storages autograd keeps for backward, weights excluded, with only scored params training."""
    names = set(models.scored_names(model))
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in weights:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hidden = model.base_model(input_ids=torch.randint(3, 64, (batch_size, seq_len)))[0]
    del hidden
    return sum(seen.values())


def test_estimate_matches_the_full_model():
    # widths divisible by 8, so the estimate measures an 8-fold narrower copy and scales it back
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        head_dim=16,
        max_position_embeddings=64,
    )
    est = memory.estimate(config, seq_len=32, batch_size=2, dtype="float32")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    params = dict(model.named_parameters())
    scored = models.scored_names(model)
    assert est["parameters"] == sum(p.numel() for p in params.values())
    assert est["scored_parameters"] == sum(params[n].numel() for n in scored)
    assert est["accumulators"] == 4 * est["scored_parameters"]
    assert est["weights"] == 4 * est["parameters"]
    real = saved_bytes(model, 32, 2)
    assert abs(est["activations"] - real) <= 0.05 * real
    assert est["scoring_peak"] == sum(
        est[k] for k in ("weights", "accumulators", "split_halves", "activations", "output_chunk", "transient_gradient")
    )
    assert est["output_chunk"] == 2 * 31 * 64 * 4  # one fp32 logits buffer for the 62 predicting positions
    assert est["evaluation_block"] == 2 * 31 * 64 * 4  # the whole (small) vocabulary in one block
    assert est["evaluation_peak"] == est["weights"] + est["evaluation_block"] + est["evaluation_layer"]


def test_split_halves_cost_what_scoring_holds_and_at_most_fifteen_percent(tokenizer, monkeypatch):
    """The accumulators scoring actually holds at the end of a pass with the default split halves (counted
    as they are all-reduced, before the halves leave for the host) are what the estimate says: one fp32
    copy of every scored parameter, and one more of the sampled matrices only."""
    from lingregion import distributed, scoring, uncertainty
    from lingregion.config import Config

    from conftest import TEXT

    config = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=16,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    names = models.scored_names(model)
    share = Config().split_half_share
    est = memory.estimate(config, seq_len=16, batch_size=1, dtype="float32", split_half_share=share)
    held = []
    monkeypatch.setattr(distributed, "sum_", lambda ts: held.extend(t.numel() * t.element_size() for t in ts))
    w = corpus.make_windows(tokenizer, TEXT, 16, 64, "xx", "score")
    scoring.gradient_sum(model, w, names, progress=False, halves=uncertainty.matrix_sample(names, share))
    assert sum(held) == est["accumulators"] + est["split_halves"]
    assert 0 < est["split_halves"] <= 0.15 * est["accumulators"]
    off = memory.estimate(config, seq_len=16, batch_size=1, dtype="float32", split_half_share=None)
    assert off["split_halves"] == 0 and off["scoring_peak"] == est["scoring_peak"] - est["split_halves"]


def test_llama2_7b_scoring_fits_64_gb_with_the_default_split_halves():
    e = memory.estimate(memory.llama2("7B"), seq_len=2048, batch_size=1, dtype="bfloat16")
    assert 0 < e["split_halves"] <= 0.15 * e["accumulators"]
    assert e["scoring_peak"] < 64e9  # an 80 GB GPU with 20% headroom
