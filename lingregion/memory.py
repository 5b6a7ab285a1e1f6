"""How much memory scoring and evaluation need for a model, from its config alone (no weights loaded).

Scoring holds the weights, one fp32 accumulator per scored parameter and a second one for each matrix
of the split-half sample (`uncertainty.matrix_sample`; the halves go to host memory after the pass), the
activations autograd saves for one batch, one scored parameter's transient gradient, and one
output-layer chunk of fp32 logits (whose buffer becomes their gradient; three buffers with soft-capping,
plus the head's own output in the model's dtype when that is not fp32). Evaluation holds the weights,
one layer's intermediates and one output-layer tile (evaluation.TILES: positions × vocabulary entries,
in the model's dtype, plus its fp32 copy when that is not fp32).

Parameter counts come from the model built on the "meta" device (no memory). Activations are measured,
not guessed: a 1- and a 2-layer copy of the architecture, narrowed k-fold (fewer heads and channels,
same head size, so every tensor shrinks k-fold), runs one batch on the CPU while saved-tensor hooks sum
the distinct storages autograd keeps; the difference is one layer, the rest the embedding and head side.
"""

from __future__ import annotations

import copy

import torch

from .config import Config
from .evaluation import LOGIT_CHUNK, tiles
from .models import DTYPES, scored_names
from .uncertainty import matrix_sample

GB = 1e9
SPLIT_HALF_SHARE = Config.__dataclass_fields__["split_half_share"].default  # what a run halves by default


def _narrow(config, k: int, layers: int):
    cfg = copy.deepcopy(config)
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads"):
        if getattr(cfg, key, None):
            setattr(cfg, key, getattr(cfg, key) // k)
    if getattr(cfg, "head_dim", None) is None and hasattr(cfg, "head_dim"):
        cfg.head_dim = config.hidden_size // config.num_attention_heads
    cfg.num_hidden_layers = layers
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = list(config.layer_types[:layers])
    cfg.vocab_size = 64  # the output layer is accounted for separately
    cfg.tie_word_embeddings = getattr(config, "tie_word_embeddings", False)
    return cfg


def _width_divisor(config) -> int:
    """The largest k in 8, 4, 2, 1 that divides every width that is narrowed."""
    widths = [
        getattr(config, key, None)
        for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
    ]
    return next(k for k in (8, 4, 2, 1) if all(w % k == 0 for w in widths if w))


def _saved_bytes(config, layers: int, k: int, seq_len: int, batch_size: int, dtype: torch.dtype) -> int:
    """Bytes of distinct storages autograd saves in a forward pass of the narrowed model, with only the
    transformer layers' parameters requiring grad, as in scoring."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_narrow(config, k, layers), dtype=dtype)
    wanted = set(scored_names(model))
    for name, p in model.named_parameters():
        p.requires_grad_(name in wanted)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in weights:  # a weight (or a transposed view of one) is no activation
            saved[s.data_ptr()] = s.nbytes()  # alive while the graph is, so no address is reused
        return t

    ids = torch.randint(3, 64, (batch_size, seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hidden = model.base_model(input_ids=ids)[0]
    del hidden
    return sum(saved.values())


def estimate(
    config,
    seq_len: int,
    batch_size: int,
    dtype: str = "bfloat16",
    device: str = "cuda",
    split_half_share: float | None = SPLIT_HALF_SHARE,
) -> dict:
    """Bytes needed to score (the peak of one backward pass) and to evaluate a model of this config
    on a device of this type ("cuda" or "cpu": they differ in evaluation's output-layer tile).
    split_half_share: the share of matrices scoring keeps split halves for (Config.split_half_share; None:
    split halves off)."""
    from transformers import AutoModelForCausalLM

    torch_dtype = DTYPES[dtype]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    ordered = scored_names(model)
    names = set(ordered)
    params = dict(model.named_parameters())
    halved = matrix_sample(ordered, split_half_share) if split_half_share else []
    total = sum(p.numel() for p in params.values())
    scored = sum(params[n].numel() for n in names)
    largest = max(params[n].numel() for n in names)
    k = _width_divisor(config)
    one, two = (_saved_bytes(config, n, k, seq_len, batch_size, torch_dtype) * k for n in (1, 2))
    per_layer = two - one
    activations = one + per_layer * (config.num_hidden_layers - 1)
    size = torch.finfo(torch_dtype).bits // 8
    positions = min(LOGIT_CHUNK, batch_size * (seq_len - 1)) * config.vocab_size
    capped = bool(getattr(config, "final_logit_softcapping", None))
    head_output = positions * size if size != 4 else 0  # the head's own output before its fp32 copy
    out = {
        "parameters": total,
        "scored_parameters": scored,
        "weights": total * size,
        "accumulators": scored * 4,
        "split_halves": sum(params[n].numel() for n in halved) * 4,
        "activations": activations,
        "output_chunk": positions * 4 * (3 if capped else 1) + head_output,
        "transient_gradient": largest * size,
        "evaluation_layer": per_layer,
    }
    out["scoring_peak"] = sum(
        out[key]
        for key in ("weights", "accumulators", "split_halves", "activations", "output_chunk", "transient_gradient")
    )
    rows, cols = tiles(device.split(":")[0])
    block = min(rows, batch_size * (seq_len - 1)) * min(cols, config.vocab_size)
    out["evaluation_block"] = block * (size + (4 if size != 4 else 0))
    out["evaluation_peak"] = out["weights"] + out["evaluation_block"] + per_layer
    return out


def llama2(size: str):
    """The published LLaMA-2 7B / 13B / 70B configurations (no download)."""
    from transformers import LlamaConfig

    dims = {"7B": (4096, 11008, 32, 32, 32), "13B": (5120, 13824, 40, 40, 40), "70B": (8192, 28672, 80, 64, 8)}
    hidden, inter, layers, heads, kv = dims[size]
    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=32000,
        max_position_embeddings=4096,
        attn_implementation="sdpa",
    )
