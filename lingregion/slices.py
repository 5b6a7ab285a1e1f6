"""Whole rows and columns, single dimensions and single parameters: the paper's structural removal
(Tables 3–4), its single-parameter perturbation (Table 8), and a scan for the outlier dimensions behind it.

Layout. Everything is said in the Hugging Face layout of a linear layer, weight [out_features,
in_features]: a *row* is one output unit, a *column* one input feature. GPT-2's Conv1D stores the
transpose, [in, out], and its fused `c_attn` holds q, k and v side by side along `out`; a `Block` hides
both, naming the part of one stored matrix that plays one role (q, k, v, o, gate, up, down) in one layer.

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
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from . import interventions, models
from .corpus import Windows
from .evaluation import batches
from .interventions import Edit
from .regions import Region
from .store import LingregionError

ROLE_OF = {
    "q_proj": "q",
    "k_proj": "k",
    "v_proj": "v",
    "o_proj": "o",
    "gate_proj": "gate",
    "up_proj": "up",
    "down_proj": "down",
    "attn.c_attn": "qkv",
    "attn.c_proj": "o",
    "mlp.c_fc": "up",
    "mlp.c_proj": "down",
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
    ),
    "head": (("o", "col"), ("q", "row"), ("k", "row"), ("v", "row")),
}
FAMILY_LABELS = {
    "feature": "Attn.o (row), Attn.q/k/v (column)",
    "feature+ffn": "Attn.o (row), Attn.q/k/v (column), FFN.down (row), FFN.gate/up (column)",
    "head": "Attn.o (column), Attn.q/k/v (row)",
}
PICKS = ("top", "middle", "bottom", "random")
MODES = ("common", "matrix")
PERTURBATIONS = ("reset", "x10")
INPUT_NORMS = ("input_layernorm", "ln_1", "attention_norm", "input_norm")


# --- where the rows and columns are ---------------------------------------------------------------------
@dataclass(frozen=True)
class Block:
    """The rows `offset … offset + rows` (HF layout) of parameter `name`, playing `role` in `layer`."""

    name: str
    role: str
    layer: int
    conv1d: bool  # stored as [in, out]
    offset: int
    rows: int
    cols: int
    width: int  # length of a stored row: in_features for Linear, all out_features for Conv1D

    def flat(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Flat indices into the stored parameter of every (row, col) pair of the block (HF layout)."""
        r, c = torch.meshgrid(self.offset + rows, cols, indexing="ij")
        return (c * self.width + r if self.conv1d else r * self.width + c).reshape(-1)

    def hf(self, t: torch.Tensor) -> torch.Tensor:
        """The block of a tensor shaped like the parameter, as a [rows, cols] view in HF layout."""
        return (t.T if self.conv1d else t)[self.offset : self.offset + self.rows]


def heads(model) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dimension) from the model's config."""
    c = model.config
    n = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or n
    hd = getattr(c, "head_dim", None) or c.hidden_size // n
    return n, kv, hd


def blocks(model) -> list[Block]:
    """Every attention and MLP weight matrix of every layer, split into roles."""
    from transformers.pytorch_utils import Conv1D

    prefix = models.layer_prefix(model)
    n, kv, hd = heads(model)
    out = []
    for mod_name, module in model.named_modules():
        if not mod_name.startswith(prefix) or not isinstance(module, (torch.nn.Linear, Conv1D)):
            continue
        parts = mod_name.split(".")
        role = ROLE_OF.get(".".join(parts[-2:])) or ROLE_OF.get(parts[-1])
        if role is None:
            continue
        conv1d = isinstance(module, Conv1D)
        out_f, in_f = module.weight.shape[::-1] if conv1d else module.weight.shape
        layer = int(mod_name[len(prefix) :].split(".")[0])
        if role == "qkv":  # fused: q, then k, then v along the output axis
            sizes = {"q": n * hd, "k": kv * hd, "v": kv * hd}
            if sum(sizes.values()) != out_f:
                raise LingregionError(
                    f"{mod_name}: fused q/k/v has {out_f} outputs, the config implies "
                    f"{sum(sizes.values())}; structural removal cannot split it"
                )
            offset = 0
            for r, size in sizes.items():
                out.append(Block(mod_name + ".weight", r, layer, conv1d, offset, size, in_f, module.weight.shape[1]))
                offset += size
        else:
            out.append(Block(mod_name + ".weight", role, layer, conv1d, 0, out_f, in_f, module.weight.shape[1]))
    if not {"q", "k", "v", "o"} <= {b.role for b in out}:
        raise LingregionError(
            f"{type(model).__name__}: no attention matrices named q_proj/k_proj/v_proj/o_proj "
            "(or GPT-2's c_attn/c_proj); structural removal does not know this architecture"
        )
    return out


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
    for b in blocks(model):
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
                space, to_own = f"{b.name}:{role}:{axis}", torch.arange(size)
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
    """The weight of each layer's input (pre-attention) norm, in layer order."""
    prefix = models.layer_prefix(model)
    found: dict[int, str] = {}
    for name, _ in model.named_parameters():
        parts = name[len(prefix) :].split(".")
        if name.startswith(prefix) and len(parts) == 3 and parts[1] in INPUT_NORMS and parts[2] == "weight":
            found[int(parts[0])] = name
    n_layers = len(model.get_submodule(prefix[:-1]))
    if sorted(found) != list(range(n_layers)):
        raise LingregionError(
            f"{type(model).__name__}: cannot find each layer's input norm (named one of "
            f"{', '.join(INPUT_NORMS)}); single-parameter perturbation does not know this architecture"
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
    `layers` by how much each perturbation would change what attention reads."""
    norms = input_norms(model)
    bad = [i for i in layers if not 0 <= i < len(norms)]
    if bad:
        raise LingregionError(f"layer {bad[0]} out of range; the model has layers 0..{len(norms) - 1}")
    modules = {i: model.get_submodule(norms[i].rpartition(".")[0]) for i in range(len(norms))}
    hidden = model.config.hidden_size
    peak = torch.zeros(len(norms), hidden)
    inputs: dict[int, list[torch.Tensor]] = {i: [] for i in layers}

    def capture(i):
        def hook(_module, args):
            x = args[0].detach().reshape(-1, hidden)
            peak[i] = torch.maximum(peak[i], x.abs().amax(dim=0).float().cpu())
            if i in inputs:
                inputs[i].append(x)

        return hook

    hooks = [modules[i].register_forward_pre_hook(capture(i)) for i in modules]
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
