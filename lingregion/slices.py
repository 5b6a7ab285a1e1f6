"""Whole rows and columns, single dimensions and single parameters: the paper's structural removal
(Tables 3–4), its single-parameter perturbation (Table 8), and a scan for the outlier dimensions behind it.

Layout. Everything is said in the Hugging Face layout of a linear layer, weight [out_features,
in_features]: a *row* is one output unit, a *column* one input feature. Which matrix plays which role,
and how a stored matrix splits into one matrix per role (`architectures.RoleMatrix`), is in `architectures`. MoE
routers are scored like any matrix (models.ROUTER_SCORED), and in feature+ffn their column at d is removed
with the MLP's, since the MoE block reads d through them too.

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
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from . import interventions, models
from .architectures import RoleMatrix, heads, input_norms, layer_prefix, require, role_matrices
from .corpus import Windows
from .evaluation import batches
from .interventions import Edit
from .regions import Region
from .store import LingregionError

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
PICKS = ("top", "middle", "bottom", "random")
MODES = ("common", "matrix")
PERTURBATIONS = ("reset", "x10")


@dataclass(frozen=True, eq=False)
class Slice:
    """The rows or columns of one role matrix that a family removes, and how the indices of the space they are
    ranked in (the residual stream, a layer's heads, or the matrix itself) map onto them."""

    matrix: RoleMatrix
    axis: str  # "row" or "col"
    space: str
    to_own: torch.Tensor  # to_own[i] = the row/column of this matrix that index i of the space means

    def counts(self, mask: torch.Tensor) -> torch.Tensor:
        """Selected entries in each of this matrix's rows (or columns), for a mask shaped like the parameter."""
        return self.matrix.hf(mask).sum(dim=1 if self.axis == "row" else 0, dtype=torch.int64)

    def flat(self, space_index: torch.Tensor) -> torch.Tensor:
        """Flat indices into the stored parameter of the rows (columns) meant by some indices of the space."""
        own = self.to_own[space_index].unique()
        if self.axis == "row":
            return self.matrix.flat(own, torch.arange(self.matrix.cols))
        return self.matrix.flat(torch.arange(self.matrix.rows), own)


def slices(model, family: str, mode: str = "common") -> list[Slice]:
    """The Slices of every role matrix that `family` removes, with the index space each is ranked in under `mode`."""
    if family not in FAMILIES:
        raise LingregionError(f"unknown family {family!r}; use one of {', '.join(FAMILIES)}")
    if mode not in MODES:
        raise LingregionError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    n, kv, hd = heads(model)
    hidden = model.config.hidden_size
    out = []
    found = role_matrices(model)
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
        if s.matrix.name not in region.shapes:
            raise LingregionError(
                f"the region does not cover {s.matrix.name}; locate it with the attention and "
                "MLP matrices scored (drop --include/--exclude)"
            )
        if s.matrix.name not in masks:
            masks[s.matrix.name] = region.mask(s.matrix.name)
        total += s.counts(masks[s.matrix.name])[s.to_own]
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
            parts.setdefault(s.matrix.name, []).append(s.flat(index))
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
    stack = model.get_submodule(layer_prefix(model)[:-1])
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
