"""Where a model keeps its parts: every fact about an architecture that lingregion reads from parameter names.

A transformer's layers sit in one ModuleList (`layer_prefix`); inside a layer, the path of a parameter says
which *role* it plays (q, k, v, o, gate, up, down, fused ones, a router, the input norm) through MAPPINGS,
which `register` extends for an architecture lingregion does not know. `role_matrices` splits every weight
matrix into one `RoleMatrix` per role, in the Hugging Face layout ([out_features, in_features]: a row is an
output unit, a column an input feature), hiding how each is stored: GPT-2's Conv1D holds the transpose,
[in, out]; fused matrices hold several roles along `out`, side by side (GPT-2 c_attn and Phi-3 qkv_proj: all
q rows, then k, then v; Phi-3 gate_up_proj and MoE experts: gate, then up) or interleaved per head
(GPT-NeoX/Pythia and BLOOM query_key_value: head h's q, k and v rows together); mixture-of-experts experts
are one [experts, out, in] parameter, and each expert's matrix is a role matrix of its own. A layer that
lacks a role, or holds a matrix no mapping places, gets a one-line error naming it and the `register` call
to make.

What is done with these matrices (structural removal, norm perturbations, the outlier scan) is in `slices`;
loading a model and choosing what to score is in `models`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from .store import LingregionError

# --- which matrix plays which role ---------------------------------------------------------------------
# A parameter's role is found from its path inside its layer (layer index and ".weight" left out, e.g.
# "self_attn.q_proj", "mlp.experts.down_proj"): the longest key of MAPPINGS that is that path or a dotted
# ending of it decides. Fused matrices have a role of their own that says how they split into parts.
ROLES = {
    "q": "attention query projection",
    "k": "attention key projection",
    "v": "attention value projection",
    "o": "attention output projection",
    "gate": "MLP gate projection",
    "up": "MLP up projection",
    "down": "MLP down projection",
    "qkv": "fused attention q|k|v projection (all q rows, then all k rows, then all v rows)",
    "qkv_heads": "fused attention q/k/v projection interleaved per head (head h's q, k, v rows side by side)",
    "gate_up": "fused MLP gate|up projection (all gate rows, then all up rows)",
    "router": "mixture-of-experts router",
    "other": "matrix that no structural family touches",
    "input_norm": "input (pre-attention) norm",
}
MAPPINGS: dict[str, str] = {
    # LLaMA, Llama 3, Mistral, Qwen2/3, Gemma 2/3, OLMo-2, Mixtral/Qwen-MoE/OLMoE attention and dense MLPs
    "q_proj": "q",
    "k_proj": "k",
    "v_proj": "v",
    "o_proj": "o",
    "gate_proj": "gate",
    "up_proj": "up",
    "down_proj": "down",
    # GPT-2 (Conv1D, [in, out])
    "attn.c_attn": "qkv",
    "attn.c_proj": "o",
    "mlp.c_fc": "up",
    "mlp.c_proj": "down",
    # Phi-3
    "self_attn.qkv_proj": "qkv",
    "mlp.gate_up_proj": "gate_up",
    # GPT-NeoX / Pythia and BLOOM
    "attention.query_key_value": "qkv_heads",
    "self_attention.query_key_value": "qkv_heads",
    "attention.dense": "o",
    "self_attention.dense": "o",
    "mlp.dense_h_to_4h": "up",
    "mlp.dense_4h_to_h": "down",
    # mixture of experts: stacked experts [experts, out, in] (transformers 5), routers
    "experts.gate_up_proj": "gate_up",
    "experts.down_proj": "down",
    "mlp.gate": "router",
    "block_sparse_moe.gate": "router",
    "mlp.shared_expert_gate": "router",
    # input norms
    "input_layernorm": "input_norm",
    "ln_1": "input_norm",
    "attention_norm": "input_norm",
    "input_norm": "input_norm",
}
# Why a model has no input norm, by config.model_type: single-parameter perturbation does not apply to it.
NO_INPUT_NORM = {
    "olmo2": "OLMo-2 normalises each sublayer's output (post-norm) and q/k, never the residual stream the "
    "layer reads, so no norm weight scales residual dimension d on its way into attention",
    "olmo3": "OLMo-3 normalises each sublayer's output (post-norm) and q/k, never the residual stream the "
    "layer reads, so no norm weight scales residual dimension d on its way into attention",
}

OPTIONAL = {"gate", "router"}  # roles a layer may lack (GPT-2, NeoX and BLOOM MLPs have no gate; dense: no router)


class NotApplicable(LingregionError):
    """An experiment that does not apply to this architecture, with the reason."""


def register(suffix: str, role: str) -> None:
    """Tell lingregion which role the matrix (or norm) at `suffix` plays in every layer.

    suffix: the parameter's path inside its layer, or a dotted ending of it, without ".weight", e.g.
    "attn.wo" for model.layers.3.attn.wo.weight. role: one of ROLES (q, k, v, o, gate, up, down, the fused
    qkv, qkv_heads, gate_up, router, other to leave a matrix out of the structural families, input_norm).
    A registration applies to models loaded afterwards and overrides a built-in mapping of the same suffix."""
    if role not in ROLES:
        raise LingregionError(f"unknown role {role!r}; use one of {', '.join(ROLES)}")
    if not suffix or suffix.startswith(".") or suffix.endswith((".", ".weight")):
        raise LingregionError(f"{suffix!r} is not a module path suffix like 'attn.wo' (no '.weight')")
    MAPPINGS[suffix] = role


def inside_layer(name: str, prefix: str) -> tuple[int, str]:
    """(layer index, path inside the layer without a trailing .weight) of a parameter under `prefix`."""
    layer, _, rest = name[len(prefix) :].partition(".")
    return int(layer), rest.removesuffix(".weight")


def role_of(path: str) -> str | None:
    """The role of a path inside a layer (see MAPPINGS): the longest matching suffix decides."""
    parts = path.split(".")
    for i in range(len(parts)):
        role = MAPPINGS.get(".".join(parts[i:]))
        if role is not None:
            return role
    return None


def layer_prefix(model: nn.Module) -> str:
    """Name of the ModuleList holding the transformer layers (model.layers, transformer.h, ...)."""
    n = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return name + "."
    raise LingregionError(f"{type(model).__name__}: cannot find its list of {n} transformer layers")


def routers(model: nn.Module) -> list[str]:
    """Names of the mixture-of-experts router parameters inside the layers (none for a dense model)."""
    prefix = layer_prefix(model)
    return [
        n
        for n, _ in model.named_parameters()
        if n.startswith(prefix) and role_of(inside_layer(n, prefix)[1]) == "router"
    ]


# --- each stored matrix split into one matrix per role ----------------------------------------------------
@dataclass(frozen=True)
class RoleMatrix:
    """The rows of a stored matrix that one role owns, seen as a [rows, cols] matrix in HF layout ([out, in]).

    Row r of this matrix is row offset + (r // chunk) · period + r % chunk of the stored matrix: a contiguous
    part (q|k|v, gate|up) has chunk = rows; a per-head interleaved one (GPT-NeoX, BLOOM) chunk = head_dim and
    period = 3 · head_dim. `expert` ≥ 0 picks one matrix of a stack [experts, out, in] (MoE), whose entries
    start at flat index `base` of the parameter."""

    name: str
    role: str
    layer: int
    conv1d: bool  # stored as [in, out]
    offset: int
    rows: int
    cols: int
    width: int  # length of a stored row: in_features for Linear, all out_features for Conv1D
    chunk: int = 0  # 0: the rows are contiguous
    period: int = 0
    expert: int = -1
    base: int = 0

    def stored_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """The rows of the (HF-layout) stored matrix that rows `rows` of this matrix are."""
        if not self.chunk:
            return self.offset + rows
        return self.offset + torch.div(rows, self.chunk, rounding_mode="floor") * self.period + rows % self.chunk

    def flat(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Flat indices into the stored parameter of every (row, col) pair of this matrix (HF layout)."""
        r, c = torch.meshgrid(self.stored_rows(rows), cols, indexing="ij")
        return self.base + (c * self.width + r if self.conv1d else r * self.width + c).reshape(-1)

    def hf(self, t: torch.Tensor) -> torch.Tensor:
        """This matrix's share of a tensor shaped like the parameter, as a [rows, cols] tensor in HF layout."""
        m = t[self.expert] if self.expert >= 0 else t
        m = m.T if self.conv1d else m
        if not self.chunk:
            return m[self.offset : self.offset + self.rows]
        return m[self.stored_rows(torch.arange(self.rows, device=m.device))]


def heads(model) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dimension) from the model's config."""
    c = model.config
    n = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or n
    hd = getattr(c, "head_dim", None) or c.hidden_size // n
    if n % kv:
        raise LingregionError(f"{n} query heads do not split into groups of {kv} key/value heads; check the config")
    return n, kv, hd


def _split(role: str, name: str, out_f: int, n: int, kv: int, hd: int) -> list[tuple[str, int, int, int, int]]:
    """(role, offset, rows, chunk, period) of each role's rows in a matrix with `out_f` output rows."""
    if role == "qkv":
        sizes = {"q": n * hd, "k": kv * hd, "v": kv * hd}
        if sum(sizes.values()) != out_f:
            raise LingregionError(
                f"{name}: fused q/k/v has {out_f} outputs, the config implies {sum(sizes.values())}; "
                "structural removal cannot split it"
            )
        offsets = [0, n * hd, (n + kv) * hd]
        return [(r, o, s, 0, 0) for (r, s), o in zip(sizes.items(), offsets)]
    if role == "qkv_heads":
        if kv != n or 3 * n * hd != out_f:
            raise LingregionError(
                f"{name}: per-head interleaved q/k/v has {out_f} outputs, the config implies 3 × {n} heads × "
                f"{hd} with {kv} key/value heads; structural removal cannot split it"
            )
        return [(r, i * hd, n * hd, hd, 3 * hd) for i, r in enumerate("qkv")]
    if role == "gate_up":
        if out_f % 2:
            raise LingregionError(f"{name}: fused gate|up has an odd number of outputs ({out_f}); cannot split it")
        return [("gate", 0, out_f // 2, 0, 0), ("up", out_f // 2, out_f // 2, 0, 0)]
    return [(role, 0, out_f, 0, 0)]


def role_matrices(model) -> list[RoleMatrix]:
    """Every weight matrix of every layer split into one matrix per role; experts of a stack one by one.

    Raises a one-line error naming a matrix no mapping places (register it with `register`)."""
    from transformers.pytorch_utils import Conv1D

    prefix = layer_prefix(model)
    n, kv, hd = heads(model)
    out, unknown = [], []
    for name, p in model.named_parameters():
        if not name.startswith(prefix) or p.dim() < 2:
            continue
        layer, path = inside_layer(name, prefix)
        role = role_of(path)
        if role is None or p.dim() > 3:
            unknown.append((layer, path))
            continue
        if role in ("other", "input_norm"):
            continue
        mod_name, _, leaf = name.rpartition(".")
        conv1d = leaf == "weight" and isinstance(model.get_submodule(mod_name), Conv1D)
        out_f, in_f = (p.shape[-1], p.shape[-2]) if conv1d else (p.shape[-2], p.shape[-1])
        per_expert = p.shape[-2] * p.shape[-1]
        for expert in range(p.shape[0]) if p.dim() == 3 else [-1]:
            for own_role, offset, rows, chunk, period in _split(role, name, out_f, n, kv, hd):
                m = RoleMatrix(name, own_role, layer, conv1d, offset, rows, in_f, p.shape[-1], chunk, period, expert)
                out.append(replace(m, base=max(expert, 0) * per_expert))
    if unknown:  # a role that no matrix plays says more than the name of a matrix that plays none
        require(model, out, ("q", "k", "v", "o", "up", "down"))
        layer, path = unknown[0]
        raise LingregionError(
            f"{type(model).__name__}: layer {layer} has a matrix {path!r} that no mapping places; say which "
            f"role it plays: lingregion.architectures.register({path!r}, ROLE), ROLE one of {', '.join(ROLES)}"
        )
    return out


def require(model, found: list[RoleMatrix], roles) -> None:
    """A one-line error naming the first role of `roles` (OPTIONAL ones aside) missing from some layer,
    and how to register the matrix that plays it."""
    n_layers = len(model.get_submodule(layer_prefix(model)[:-1]))
    have: dict[int, set[str]] = {}
    for b in found:
        have.setdefault(b.layer, set()).add(b.role)
    for layer in range(n_layers):
        for role in roles:
            if role not in OPTIONAL and role not in have.get(layer, set()):
                prefix = layer_prefix(model)
                mats = [
                    inside_layer(nm, prefix)[1]
                    for nm, p in model.named_parameters()
                    if nm.startswith(f"{prefix}{layer}.") and p.dim() >= 2
                ]
                raise LingregionError(
                    f"cannot find the {ROLES[role]} of layer {layer} in {type(model).__name__} (its matrices: "
                    f"{', '.join(mats) or 'none'}); name it with lingregion.architectures.register(SUFFIX, {role!r})"
                )


# --- single parameters in the input norms --------------------------------------------------------------
def input_norms(model) -> list[str]:
    """The weight of each layer's input (pre-attention) norm, in layer order.

    Raises NotApplicable, with the reason, for a known architecture without one (NO_INPUT_NORM), and a
    one-line error naming the layer's norms and how to register the right one otherwise."""
    prefix = layer_prefix(model)
    found: dict[int, str] = {}
    norms: dict[int, list[str]] = {}
    for name, p in model.named_parameters():
        if not name.startswith(prefix) or p.dim() != 1 or not name.endswith(".weight"):
            continue
        layer, path = inside_layer(name, prefix)
        norms.setdefault(layer, []).append(path)
        if role_of(path) == "input_norm":
            found[layer] = name
    n_layers = len(model.get_submodule(prefix[:-1]))
    missing = [i for i in range(n_layers) if i not in found]
    if missing:
        cls, layer = type(model).__name__, missing[0]
        reason = NO_INPUT_NORM.get(getattr(model.config, "model_type", ""))
        if reason and not found:
            raise NotApplicable(f"{cls}: single-parameter perturbation of the input norm does not apply: {reason}")
        raise LingregionError(
            f"cannot find the {ROLES['input_norm']} of layer {layer} in {cls} (its 1-D weights: "
            f"{', '.join(norms.get(layer, [])) or 'none'}); name it with "
            "lingregion.architectures.register(SUFFIX, 'input_norm')"
        )
    return [found[i] for i in range(n_layers)]
