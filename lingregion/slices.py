"""Whole rows and columns, single dimensions and single parameters: the paper's structural removal
(Tables 3–4), its single-parameter perturbation (Table 8), and a scan for the outlier dimensions behind it.

Layout. Everything is said in the Hugging Face layout of a linear layer, weight [out_features,
in_features]: a *row* is one output unit, a *column* one input feature. A `Block` names the part of one
stored matrix that plays one role (q, k, v, o, gate, up, down, router) in one layer, and hides how it is
stored: GPT-2's Conv1D holds the transpose, [in, out]; fused matrices hold several roles along `out`, side by
side (GPT-2 c_attn and Phi-3 qkv_proj: all q rows, then k, then v; Phi-3 gate_up_proj and MoE experts:
gate, then up) or interleaved per head (GPT-NeoX/Pythia and BLOOM query_key_value: head h's q, k and v rows
together); mixture-of-experts experts are one [experts, out, in] parameter, and each expert's matrix is a
block of its own.

Mappings. Which matrix plays which role is read from its path inside the layer through MAPPINGS (suffix →
role); `register(suffix, role)` adds one for an architecture lingregion does not know. A layer that lacks a
role, or holds a matrix no mapping places, gets a one-line error naming it and the `register` call to make.
MoE routers are mapped to "router": scored like any matrix (models.ROUTER_SCORED), and in feature+ffn their
column at d is removed with the MLP's, since the MoE block reads d through them too.

Families (the rows and columns that make up one "dimension"):
- feature: a residual-stream dimension d: row d of Attn.o and column d of Attn.q/k/v (what attention
  writes into d and reads from it);
- feature+ffn: the same plus row d of FFN.down and column d of FFN.gate/up (what the MLP writes and
  reads). The paper's table says "FFN.down (column)"; the column of down in HF layout is an MLP neuron,
  not a residual dimension, so the residual-stream reading (down's row) is used;
- head: a head dimension i (head i // head_dim, position i % head_dim): column i of Attn.o and row i of
  Attn.q/k/v. Under grouped-query attention k and v have fewer rows; query head h reads k/v head
  h // (n_heads / n_kv_heads), so i is mapped to that head's row (which then serves the whole group).
Only weight matrices change: biases and norm weights are not rows or columns (the paper's LLaMA has
no biases), and rows/columns are removed by setting them to 0, a weight's θ_removed.

Common index or one per matrix. `mode="common"` removes the same index from every matrix that shares
the space the index lives in: the residual stream is one space for the whole model, so a feature index
goes from every layer; head dimensions are a space per layer, so each layer picks its own. The index is
ranked by the Top-region entries summed over those matrices. `mode="matrix"` ranks and picks within each
matrix (each role of a fused matrix counts as one) separately. "common" is the default because a
residual dimension exists only as the same index in every matrix that touches it, and it is how the
paper describes its single-dimension removal (the common dimensions 2100 and 4743 in all matrices);
the paper's wording for Tables 3–4 ("rows or columns for each matrix") fits "matrix" too, hence both.

Perturbation of one parameter (Table 8) acts on a layer's input-norm weight at one dimension: "reset"
sets it to its initial value, 1 for a plain norm weight and 0 for Gemma's (1 + w) kind (both an
effective scale of 1); "x10" multiplies the *effective* scale by 10: w → 10 w for a plain weight, and
1 + w → 10 (1 + w), i.e. w → 10 w + 9, for the (1 + w) kind, so that both kinds mean the same thing.
A post-norm model (OLMo-2) has no input norm: perturbation raises NotApplicable with the reason, while the
massive-activation scan, which reads each layer's input, still applies.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm

from . import interventions, models
from .corpus import Windows
from .evaluation import batches
from .interventions import Edit
from .regions import Region
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
    # LLaMA, Llama 3, Mistral, Qwen2/3, Gemma 3, OLMo-2, Mixtral/Qwen-MoE/OLMoE attention and dense MLPs
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
FAMILIES = {
    "feature": (("o", "row"), ("q", "col"), ("k", "col"), ("v", "col")),
    "feature+ffn": (
        ("o", "row"),
        ("q", "col"),
        ("k", "col"),
        ("v", "col"),
        ("down", "row"),
        ("gate", "col"),
        ("up", "col"),
        ("router", "col"),  # a mixture-of-experts block reads d through its router too
    ),
    "head": (("o", "col"), ("q", "row"), ("k", "row"), ("v", "row")),
}
FAMILY_LABELS = {
    "feature": "Attn.o (row), Attn.q/k/v (column)",
    "feature+ffn": "Attn.o (row), Attn.q/k/v (column), FFN.down (row), FFN.gate/up (column), MoE router (column)",
    "head": "Attn.o (column), Attn.q/k/v (row)",
}
OPTIONAL = {"gate", "router"}  # roles a layer may lack (GPT-2, NeoX and BLOOM MLPs have no gate; dense: no router)
PICKS = ("top", "middle", "bottom", "random")
MODES = ("common", "matrix")
PERTURBATIONS = ("reset", "x10")


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


def _inside_layer(name: str, prefix: str) -> tuple[int, str]:
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


# --- where the rows and columns are ---------------------------------------------------------------------
@dataclass(frozen=True)
class Block:
    """One role's part of a stored matrix, seen as a [rows, cols] matrix in HF layout ([out, in]).

    Row r of the block is row offset + (r // chunk) · period + r % chunk of the stored matrix: a contiguous
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
        """The rows of the (HF-layout) stored matrix that rows `rows` of the block are."""
        if not self.chunk:
            return self.offset + rows
        return self.offset + torch.div(rows, self.chunk, rounding_mode="floor") * self.period + rows % self.chunk

    def flat(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Flat indices into the stored parameter of every (row, col) pair of the block (HF layout)."""
        r, c = torch.meshgrid(self.stored_rows(rows), cols, indexing="ij")
        return self.base + (c * self.width + r if self.conv1d else r * self.width + c).reshape(-1)

    def hf(self, t: torch.Tensor) -> torch.Tensor:
        """The block of a tensor shaped like the parameter, as a [rows, cols] tensor in HF layout."""
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


def _parts(role: str, name: str, out_f: int, n: int, kv: int, hd: int) -> list[tuple[str, int, int, int, int]]:
    """(role, offset, rows, chunk, period) of each part of a matrix with `out_f` output rows."""
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


def blocks(model) -> list[Block]:
    """Every weight matrix of every layer split into its roles' parts; experts of a stack one by one.

    Raises a one-line error naming a matrix no mapping places (register it with `register`)."""
    from transformers.pytorch_utils import Conv1D

    prefix = models.layer_prefix(model)
    n, kv, hd = heads(model)
    out, unknown = [], []
    for name, p in model.named_parameters():
        if not name.startswith(prefix) or p.dim() < 2:
            continue
        layer, path = _inside_layer(name, prefix)
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
            for part, offset, rows, chunk, period in _parts(role, name, out_f, n, kv, hd):
                block = Block(name, part, layer, conv1d, offset, rows, in_f, p.shape[-1], chunk, period, expert)
                out.append(replace(block, base=max(expert, 0) * per_expert))
    if unknown:  # a role that no matrix plays says more than the name of a matrix that plays none
        require(model, out, ("q", "k", "v", "o", "up", "down"))
        layer, path = unknown[0]
        raise LingregionError(
            f"{type(model).__name__}: layer {layer} has a matrix {path!r} that no mapping places; say which "
            f"role it plays: lingregion.slices.register({path!r}, ROLE), ROLE one of {', '.join(ROLES)}"
        )
    return out


def require(model, found: list[Block], roles) -> None:
    """A one-line error naming the first role of `roles` (OPTIONAL ones aside) missing from some layer,
    and how to register the matrix that plays it."""
    n_layers = len(model.get_submodule(models.layer_prefix(model)[:-1]))
    have: dict[int, set[str]] = {}
    for b in found:
        have.setdefault(b.layer, set()).add(b.role)
    for layer in range(n_layers):
        for role in roles:
            if role not in OPTIONAL and role not in have.get(layer, set()):
                prefix = models.layer_prefix(model)
                mats = [
                    _inside_layer(nm, prefix)[1]
                    for nm, p in model.named_parameters()
                    if nm.startswith(f"{prefix}{layer}.") and p.dim() >= 2
                ]
                raise LingregionError(
                    f"cannot find the {ROLES[role]} of layer {layer} in {type(model).__name__} (its matrices: "
                    f"{', '.join(mats) or 'none'}); name it with lingregion.slices.register(SUFFIX, {role!r})"
                )


@dataclass(frozen=True, eq=False)
class Slice:
    """The rows or columns of one block that a family removes, and how the indices of the space they are
    ranked in (the residual stream, a layer's heads, or the block itself) map onto them."""

    block: Block
    axis: str  # "row" or "col"
    space: str
    to_own: torch.Tensor  # to_own[i] = the row/column of this block that index i of the space means

    def counts(self, mask: torch.Tensor) -> torch.Tensor:
        """Selected entries in each of this block's rows (or columns), for a mask shaped like the parameter."""
        return self.block.hf(mask).sum(dim=1 if self.axis == "row" else 0, dtype=torch.int64)

    def flat(self, space_index: torch.Tensor) -> torch.Tensor:
        """Flat indices into the stored parameter of the rows (columns) meant by some indices of the space."""
        own = self.to_own[space_index].unique()
        if self.axis == "row":
            return self.block.flat(own, torch.arange(self.block.cols))
        return self.block.flat(torch.arange(self.block.rows), own)


def slices(model, family: str, mode: str = "common") -> list[Slice]:
    """The Slices of every block that `family` removes, with the index space each is ranked in under `mode`."""
    if family not in FAMILIES:
        raise LingregionError(f"unknown family {family!r}; use one of {', '.join(FAMILIES)}")
    if mode not in MODES:
        raise LingregionError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    n, kv, hd = heads(model)
    hidden = model.config.hidden_size
    out = []
    found = blocks(model)
    require(model, found, [role for role, _ in FAMILIES[family]])
    for b in found:
        for role, axis in FAMILIES[family]:
            if b.role != role:
                continue
            size = b.rows if axis == "row" else b.cols
            expected = hidden if family != "head" else (n * hd if role in ("q", "o") else kv * hd)
            if size != expected:
                raise LingregionError(
                    f"{b.name}: {role} has {size} {axis}s where the config implies {expected}; "
                    f"the {family} family does not fit this architecture"
                )
            if mode == "matrix":
                expert = f":expert{b.expert}" if b.expert >= 0 else ""  # each expert's matrix is a matrix
                space, to_own = f"{b.name}{expert}:{role}:{axis}", torch.arange(size)
            elif family == "head":
                i = torch.arange(n * hd)  # query head i // hd reads k/v head (i // hd) // (n / kv)
                space, to_own = f"layer{b.layer}", (i // hd // (n // kv)) * hd + i % hd if role in ("k", "v") else i
            else:
                space, to_own = "residual", torch.arange(size)
            out.append(Slice(b, axis, space, to_own))
    return out


def groups(model, family: str, mode: str = "common") -> dict[str, list[Slice]]:
    """Slices that share one index space, by space: the unit within which indices are ranked and picked."""
    out: dict[str, list[Slice]] = {}
    for s in slices(model, family, mode):
        out.setdefault(s.space, []).append(s)
    return out


# --- ranking by Top-region entries and picking -------------------------------------------------------
def counts(region: Region, group: list[Slice]) -> torch.Tensor:
    """Top-region entries held by each index of the group's space, summed over the group's slices."""
    masks: dict[str, torch.Tensor] = {}
    total = torch.zeros(len(group[0].to_own), dtype=torch.int64)
    for s in group:
        if s.block.name not in region.shapes:
            raise LingregionError(
                f"the region does not cover {s.block.name}; locate it with the attention and "
                "MLP matrices scored (drop --include/--exclude)"
            )
        if s.block.name not in masks:
            masks[s.block.name] = region.mask(s.block.name)
        total += s.counts(masks[s.block.name])[s.to_own]
    return total


def ranking(count: torch.Tensor) -> torch.Tensor:
    """Indices by count, most first; equal counts in index order."""
    return torch.sort(-count, stable=True).indices


def pick(count: torch.Tensor, n: int, how: str, seed: int = 0, key: str = "") -> torch.Tensor:
    """`n` indices, sorted: the first (top), central (middle) or last (bottom) `n` of the ranking, or a
    seeded uniform draw (random; `key` names the space, so every space gets its own draw)."""
    size = len(count)
    if how not in PICKS:
        raise LingregionError(f"unknown pick {how!r}; use one of {', '.join(PICKS)}")
    if not 1 <= n <= size:
        raise LingregionError(f"cannot remove {n} of {size} dimensions; pass N_d between 1 and {size}")
    if how == "random":
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
        return torch.randperm(size, generator=g)[:n].sort().values
    start = {"top": 0, "middle": (size - n) // 2, "bottom": size - n}[how]
    return ranking(count)[start : start + n].sort().values


def edits_for(group_map: dict[str, list[Slice]], chosen: dict[str, torch.Tensor]) -> list[Edit]:
    """Edits setting to 0 the rows/columns that the chosen indices of each space mean, one per parameter
    (sorted flat indices; a row and a column that cross, or q/k/v parts of one fused matrix, merge)."""
    parts: dict[str, list[torch.Tensor]] = {}
    for space, index in chosen.items():
        for s in group_map[space]:
            parts.setdefault(s.block.name, []).append(s.flat(index))
    return [Edit(name, torch.cat(p).unique(), 0.0) for name, p in parts.items()]


@dataclass
class Ranked:
    """A family's index spaces and the Top-region entries each index holds: count once, pick many times."""

    groups: dict[str, list[Slice]]
    counts: dict[str, torch.Tensor]

    def removal(self, model, n: int, how: str, seed: int = 0) -> tuple[list[Edit], dict[str, list[int]]]:
        """Edits removing `n` indices of every space, picked by `how`, and the picks."""
        chosen = {space: pick(c, n, how, seed, space) for space, c in self.counts.items()}
        return edits_for(self.groups, chosen), {space: idx.tolist() for space, idx in chosen.items()}


def ranked(model, region: Region, family: str, mode: str = "common") -> Ranked:
    """The family's index spaces with the Top-region entries each index holds, ready to pick from."""
    group_map = groups(model, family, mode)
    return Ranked(group_map, {space: counts(region, g) for space, g in group_map.items()})


def removal(
    model, region: Region, family: str, n: int, how: str, mode: str = "common", seed: int = 0
) -> tuple[list[Edit], dict[str, list[int]]]:
    """Edits removing `n` dimensions of `family` per space, picked by Top-region counts, and the picks."""
    return ranked(model, region, family, mode).removal(model, n, how, seed)


def in_region(region: Region, name: str, index: torch.Tensor) -> torch.Tensor:
    """Whether each flat index of `name` is in the region, read from the packed bits (no unpacking)."""
    byte = region.packed[name][index // 8].to(torch.int64)
    return ((byte >> (7 - index % 8)) & 1).bool()


def dimension_removal(model, dims: list[int]) -> list[Edit]:
    """Residual dimensions `dims` removed from every matrix of every layer (feature+ffn, common index)."""
    hidden = model.config.hidden_size
    if not all(0 <= d < hidden for d in dims):
        raise LingregionError(f"dimension out of range in {dims}; the model has {hidden} hidden dimensions")
    group_map = groups(model, "feature+ffn", "common")
    return edits_for(group_map, {"residual": torch.tensor(sorted(set(dims)))})


# --- single parameters in the input norms --------------------------------------------------------------
def input_norms(model) -> list[str]:
    """The weight of each layer's input (pre-attention) norm, in layer order.

    Raises NotApplicable, with the reason, for a known architecture without one (NO_INPUT_NORM), and a
    one-line error naming the layer's norms and how to register the right one otherwise."""
    prefix = models.layer_prefix(model)
    found: dict[int, str] = {}
    norms: dict[int, list[str]] = {}
    for name, p in model.named_parameters():
        if not name.startswith(prefix) or p.dim() != 1 or not name.endswith(".weight"):
            continue
        layer, path = _inside_layer(name, prefix)
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
            "lingregion.slices.register(SUFFIX, 'input_norm')"
        )
    return [found[i] for i in range(n_layers)]


def is_offset(model, name: str) -> bool:
    """True for a norm weight w that scales by (1 + w) (Gemma), false for a plain scale w."""
    return models.removed_values(model, [name])[name] == -1.0


def effective_scale(w: torch.Tensor, offset: bool) -> torch.Tensor:
    """The scale a norm weight applies, in fp32: 1 + w for the (1 + w) kind (Gemma), else w."""
    return w.float() + 1.0 if offset else w.float()


def perturbed_scale(scale: torch.Tensor, kind: str) -> torch.Tensor:
    """The effective scale after a perturbation: 1 (its initial value) for reset, 10× for x10."""
    if kind not in PERTURBATIONS:
        raise LingregionError(f"unknown perturbation {kind!r}; use one of {', '.join(PERTURBATIONS)}")
    return torch.ones_like(scale) if kind == "reset" else 10.0 * scale


def perturbation(model, layer: int, dim: int, kind: str) -> list[Edit]:
    """One Edit on layer `layer`'s input-norm weight at `dim` (both 0-based)."""
    norms = input_norms(model)
    if not 0 <= layer < len(norms):
        raise LingregionError(f"layer {layer} out of range; the model has layers 0..{len(norms) - 1}")
    name = norms[layer]
    w = model.get_parameter(name)
    if not 0 <= dim < w.numel():
        raise LingregionError(f"dimension {dim} out of range; {name} has {w.numel()} entries")
    offset = is_offset(model, name)
    new = perturbed_scale(effective_scale(w.detach()[dim : dim + 1], offset), kind)
    return [Edit(name, torch.tensor([dim]), new - 1.0 if offset else new)]


def label(layer: int, dim: int) -> str:
    """The paper's parameter name: L1-N2100 = first layer's input norm, dimension 2100 (layers 1-based)."""
    return f"L{layer + 1}-N{dim}"


def parse_label(text: str) -> tuple[int, int]:
    """L1-N2100 → (layer 0, dimension 2100)."""
    m = re.fullmatch(r"L(\d+)-N(\d+)", text.strip())
    if not m or int(m.group(1)) < 1:
        raise LingregionError(f"{text!r} is not a parameter name like L1-N2100 (layer from 1, then the dimension)")
    return int(m.group(1)) - 1, int(m.group(2))


# --- outlier scan -------------------------------------------------------------------------------------
@dataclass
class Scan:
    """Cheap candidate scores for single-parameter perturbation of the input norms, and the massive
    activations of the residual stream, from a few windows.

    change[kind][j, d]: the largest relative change a perturbation of layer layers[j]'s input-norm
    entry d makes to a token's norm output, max_t |x̂_td · (s'_d − s_d)| / ‖y_t‖ (x̂ the normalised
    input, s the effective scale, y the norm's output: what attention reads).
    peak[l, d]: max_t |x_td| of the residual stream entering layer l; massive activations are
    dimensions whose peak is many times the median dimension's.
    """

    layers: list[int]
    change: dict[str, torch.Tensor]
    peak: torch.Tensor
    tokens: int

    def score(self) -> torch.Tensor:
        """[len(layers), hidden]: the larger of the two perturbations' changes."""
        return torch.maximum(*(self.change[k] for k in PERTURBATIONS))

    def top(self, k: int) -> list[tuple[int, int]]:
        """The k (layer, dim) pairs with the largest score."""
        s = self.score()
        flat = ranking(s.reshape(-1))[:k]
        return [(self.layers[int(i) // s.shape[1]], int(i) % s.shape[1]) for i in flat]

    def massive(self) -> torch.Tensor:
        """[hidden]: each dimension's peak over layers, in units of its layer's median dimension peak."""
        return (self.peak / self.peak.median(dim=1, keepdim=True).values.clamp_min(1e-30)).amax(dim=0)


@torch.no_grad()
def scan(model, windows: list[Windows], layers: list[int], batch_size: int = 4, progress: bool = True) -> Scan:
    """Capture the residual stream entering each layer over `windows`; score the input-norm entries of
    `layers` by how much each perturbation would change what attention reads.

    The peaks are read at each layer's own input, so the massive-activation scan (layers=[]) needs no
    input norm and works for post-norm models (OLMo-2) too."""
    stack = model.get_submodule(models.layer_prefix(model)[:-1])
    n_layers = len(stack)
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise LingregionError(f"layer {bad[0]} out of range; the model has layers 0..{n_layers - 1}")
    norms = input_norms(model) if layers else []
    modules = {i: model.get_submodule(norms[i].rpartition(".")[0]) for i in layers}
    hidden = model.config.hidden_size
    peak = torch.zeros(n_layers, hidden)
    inputs: dict[int, list[torch.Tensor]] = {i: [] for i in layers}

    def at_layer(i):
        def hook(_module, args, kwargs):
            x = (args[0] if args else kwargs["hidden_states"]).detach().reshape(-1, hidden)
            peak[i] = torch.maximum(peak[i], x.abs().amax(dim=0).float().cpu())

        return hook

    def at_norm(i):
        def hook(_module, args):
            inputs[i].append(args[0].detach().reshape(-1, hidden))

        return hook

    hooks = [layer.register_forward_pre_hook(at_layer(i), with_kwargs=True) for i, layer in enumerate(stack)]
    hooks += [modules[i].register_forward_pre_hook(at_norm(i)) for i in modules]
    device = next(model.parameters()).device
    tokens = 0
    try:
        for w in tqdm(windows, desc="outlier scan", disable=not progress, leave=False):
            for ids in batches(w, batch_size):
                model.base_model(input_ids=ids.to(device))
                tokens += ids.numel()
    finally:
        for h in hooks:
            h.remove()
    change = {k: torch.zeros(len(layers), hidden) for k in PERTURBATIONS}
    for j, i in enumerate(layers):
        for k, c in _changes(model, norms[i], modules[i], torch.cat(inputs.pop(i))).items():
            change[k][j] = c
    return Scan(list(layers), change, peak, tokens)


def _changes(model, name: str, module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """max over tokens of |x̂_d · (s'_d − s_d)| / ‖y‖ for each perturbation, with x̂ computed by the norm
    module itself at unit scale (so eps, dtype and mean-centring are the model's own)."""
    offset = is_offset(model, name)
    y = module(x).float()
    unit = [Edit(name, torch.arange(module.weight.numel()), 0.0 if offset else 1.0)]
    if getattr(module, "bias", None) is not None:
        unit.append(Edit(name.rpartition(".")[0] + ".bias", torch.arange(module.bias.numel()), 0.0))
    with interventions.applied(model, unit):
        xhat = module(x).float()
    scale = effective_scale(module.weight.detach(), offset)
    norm = y.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return {k: (xhat.abs() * (perturbed_scale(scale, k) - scale).abs() / norm).amax(dim=0).cpu() for k in PERTURBATIONS}
