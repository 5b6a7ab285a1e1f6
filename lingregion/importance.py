"""Importance estimators, selected by name, all producing per-parameter fp32 scores (higher = removing
the entry matters more) that regions, interventions and evaluation consume unchanged.

An estimator is one function of the statistics (`Stats`) that passes over the scored languages' windows
collect; its core score sums over the languages, as the paper sums per-language Taylor scores:

- taylor         Σ_L |(θ − θ_r) ⊙ g_L|            the paper's (= Σ_L scoring.score), g_L = Σ_w g_w over L's windows
- taylor-window  Σ_L Σ_w |(θ − θ_r) ⊙ g_w|        per-window first-order terms (LLM-Pruner's elementwise Taylor)
- fisher         ½ Σ_L Σ_w g_w² (θ − θ_r)²        second-order term with the diagonal empirical Fisher
- magnitude      |θ − θ_r|                        no data
- wanda          Σ_L |θ − θ_r| · ‖a‖₂             a = the activation the entry multiplies, over L's positions
- lape           neuron activation-probability entropy over the languages (Tang et al. 2024), mapped to
                 the neuron's rows and columns

g_w is the gradient of window w's share of its language's mean token loss (the window's summed NLL / all
predicted tokens of the language), so g_L is exactly the paper's gradient. θ_r is the value removal sets
(models.removed_values). Every estimator above factors as |θ − θ_r|^p times a statistic that adds up over
languages, so the statistics are summed as the passes go and each estimator is computed once at the end.
One pass per language collects every statistic the requested estimators need: several estimators cost
one forward and one backward per window. Adding an estimator is one decorated function (and its test).

With `groups` G > 1 a pass also keeps its additive sums per group of windows (window i in group i mod G, a
`Part` each), so that any union of groups, e.g. the odd and the even windows, can be scored on its own
without another forward or backward pass. A language's full sums are the sums of its groups, added as a
binary tree over the window index's low bits: full = even + odd, even = (0 mod 4) + (2 mod 4) and so on,
so each half of a split adds up to the full statistic bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from . import scoring
from .corpus import Windows
from .evaluation import check_output_layer, hidden_and_targets
from .store import LingregionError

STATS = ("lang_abs", "window_abs", "window_sq", "act_norm", "active")
ADDITIVE = ("grad", "window_abs", "window_sq", "energy", "active")  # the sums a `Part` holds


@dataclass
class Stats:
    """Statistics of the passes over several languages' windows: fp32 sums over languages, int64 counts."""

    tokens: dict[str, int] = field(default_factory=dict)  # language → predicted tokens (its mean loss's denominator)
    lang_abs: dict[str, torch.Tensor] = field(default_factory=dict)  # Σ_L |g_L|
    window_abs: dict[str, torch.Tensor] = field(default_factory=dict)  # Σ_L Σ_w |g_w|
    window_sq: dict[str, torch.Tensor] = field(default_factory=dict)  # Σ_L Σ_w g_w²
    act_norm: dict[str, torch.Tensor] = field(default_factory=dict)  # Σ_L ‖a‖₂, broadcastable to the parameter
    active: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # language → MLP act → positions > 0
    seen: dict[str, dict[str, int]] = field(default_factory=dict)  # language → MLP act → positions


@dataclass
class Part:
    """Additive sums of one group of a language's windows: any union of groups is their sum, and the
    estimator statistics (`Stats`) are functions of these sums (`part_stats`)."""

    windows: int = 0
    tokens: int = 0  # predicted tokens of these windows
    grad: dict[str, torch.Tensor] = field(default_factory=dict)  # Σ_w share_w g_w, signed
    window_abs: dict[str, torch.Tensor] = field(default_factory=dict)  # Σ_w |share_w g_w|
    window_sq: dict[str, torch.Tensor] = field(default_factory=dict)  # Σ_w (share_w g_w)²
    energy: dict[str, torch.Tensor] = field(default_factory=dict)  # Σ_positions a², broadcastable
    active: dict[str, torch.Tensor] = field(default_factory=dict)  # MLP act → positions > 0
    seen: dict[str, int] = field(default_factory=dict)  # MLP act → positions
    # Statistics of a one-window group that are not stored but read off its gradient when asked for
    # (|g|, g²): a group of one window then costs one model-sized accumulator instead of three.
    derived: set[str] = field(default_factory=set)

    def item(self, k: str, n: str) -> torch.Tensor | None:
        """Statistic k of parameter n (a derived one is a fresh tensor)."""
        if k in self.derived:
            g = self.grad.get(n)
            return None if g is None else (g.abs() if k == "window_abs" else g * g)
        return getattr(self, k).get(n)

    def keys(self, k: str) -> list[str]:
        """The parameters statistic k holds."""
        return list(self.grad if k in self.derived else getattr(self, k))

    def __add__(self, other: Part) -> Part:
        """The sums of both groups (fresh tensors; neither operand changes)."""
        out = Part(self.windows + other.windows, self.tokens + other.tokens)
        for k in ADDITIVE:
            d = getattr(out, k)
            for n in dict.fromkeys(self.keys(k) + other.keys(k)):
                a, b = self.item(k, n), other.item(k, n)
                d[n] = a + b if a is not None and b is not None else (a if b is None else b).clone()
        out.seen = {n: self.seen.get(n, 0) + other.seen.get(n, 0) for n in {**self.seen, **other.seen}}
        return out

    def add_(self, other: Part) -> Part:
        """self += other in place: the same bits as `self + other`, without another copy."""
        for k in sorted(self.derived):  # read |g| and g² off the gradient before it changes
            setattr(self, k, {n: self.item(k, n) for n in self.keys(k)})
        self.derived = set()
        self.windows, self.tokens = self.windows + other.windows, self.tokens + other.tokens
        for k in ADDITIVE:
            d = getattr(self, k)
            for n in other.keys(k):
                t = other.item(k, n)
                d[n] = d[n].add_(t) if n in d else t.clone()
        for n, c in other.seen.items():
            self.seen[n] = self.seen.get(n, 0) + c
        return self


def subset(parts: Sequence[Part], residue: int = 0, modulus: int = 1) -> Part:
    """The sums over the windows whose index is `residue` mod `modulus` (a power of two ≤ len(parts)),
    added as the binary tree `collect` uses for the full sums: subset(parts, 0, 1) is bit for bit the
    language's full statistic, and it is exactly subset(parts, 0, 2) + subset(parts, 1, 2)."""
    if modulus == len(parts):
        return parts[residue]
    if modulus > len(parts) or len(parts) % modulus:
        raise ValueError(f"modulus {modulus} does not divide the {len(parts)} groups")
    return subset(parts, residue, 2 * modulus) + subset(parts, residue + modulus, 2 * modulus)


def combine(parts: Sequence[Part]) -> Part:
    """The sums over any groups (a random half-split), added in the given order."""
    out = parts[0]
    for p in parts[1:]:
        out = out + p
    return out if len(parts) > 1 else out + Part()


def _tree_(parts: list[Part]) -> Part:
    """subset(parts, 0, 1) computed in place in the groups' own tensors (the parts are spent)."""
    m = len(parts) // 2
    while m:
        for r in range(m):
            parts[r].add_(parts[r + m])
            parts[r + m] = Part()  # its tensors may be freed as soon as they have been added
        m //= 2
    return parts[0]


def part_stats(lang: str, part: Part) -> Stats:
    """The estimator statistics of one language's windows in `part`, as if they were all it had."""
    return Stats(
        tokens={lang: part.tokens},
        lang_abs={n: g.abs() for n, g in part.grad.items()},
        window_abs={n: part.item("window_abs", n) for n in part.keys("window_abs")},
        window_sq={n: part.item("window_sq", n) for n in part.keys("window_sq")},
        act_norm={n: e.sqrt() for n, e in part.energy.items()},
        active={lang: dict(part.active)} if part.active else {},
        seen={lang: dict(part.seen)} if part.seen else {},
    )


def per_language(name: str) -> bool:
    """Whether an estimator scores one language's text on its own (every one but those, like LAPE,
    whose score compares the languages with each other)."""
    return "active" not in get(name).needs


@dataclass
class Target:
    """The parameters being scored and the values removal would set them to."""

    model: nn.Module
    names: list[str]
    removed: dict[str, float]

    def delta(self, name: str) -> torch.Tensor:
        """θ − θ_r in fp32 (a fresh tensor, safe to modify in place)."""
        return self.model.get_parameter(name).detach().float() - self.removed[name]


@dataclass(frozen=True)
class Estimator:
    """A registered estimator: its function, the statistics its passes must collect, and its own scope, if any."""

    name: str
    fn: Callable[[Stats, Target], dict[str, torch.Tensor]]
    needs: frozenset[str]
    scope: str | None  # the selection scope the method itself prescribes; None: the user's choice
    doc: str


ESTIMATORS: dict[str, Estimator] = {}


def estimator(name: str, needs: Sequence[str] = (), scope: str | None = None):
    """Decorator registering an estimator under `name`; its docstring becomes the definition in the report."""
    unknown = set(needs) - set(STATS)
    if unknown:
        raise ValueError(f"estimator {name}: unknown statistics {sorted(unknown)}")

    def register(fn):
        ESTIMATORS[name] = Estimator(name, fn, frozenset(needs), scope, (fn.__doc__ or "").strip())
        return fn

    return register


def get(name: str) -> Estimator:
    """The estimator registered as `name`, or a LingregionError listing the known ones."""
    if name not in ESTIMATORS:
        raise LingregionError(f"unknown estimator {name!r}; choose from {', '.join(ESTIMATORS)}")
    return ESTIMATORS[name]


# --- the estimators -------------------------------------------------------------------------------
@estimator("taylor", needs=["lang_abs"])
def taylor(stats: Stats, t: Target) -> dict[str, torch.Tensor]:
    """Σ_L |(θ − θ_r) ⊙ g_L|: the paper's first-order Taylor estimate, each language's gradient summed over
    its windows before the product."""
    return {n: t.delta(n).abs_().mul_(stats.lang_abs[n]) for n in t.names}


@estimator("taylor-window", needs=["window_abs"])
def taylor_window(stats: Stats, t: Target) -> dict[str, torch.Tensor]:
    """Σ_w |(θ − θ_r) ⊙ g_w|: per-window terms, so windows whose gradients disagree in sign do not cancel."""
    return {n: t.delta(n).abs_().mul_(stats.window_abs[n]) for n in t.names}


@estimator("fisher", needs=["window_sq"])
def fisher(stats: Stats, t: Target) -> dict[str, torch.Tensor]:
    """½ Σ_w g_w² (θ − θ_r)²: the second-order term of the loss change with the diagonal empirical Fisher."""
    return {n: t.delta(n).square_().mul_(stats.window_sq[n]).mul_(0.5) for n in t.names}


@estimator("magnitude")
def magnitude(stats: Stats, t: Target) -> dict[str, torch.Tensor]:
    """|θ − θ_r|: no data at all, the floor any data-driven estimator should beat."""
    return {n: t.delta(n).abs_() for n in t.names}


@estimator("wanda", needs=["act_norm"])
def wanda(stats: Stats, t: Target) -> dict[str, torch.Tensor]:
    """|θ − θ_r| · ‖a‖₂ over positions, a the activation the entry multiplies: input feature j for W_ij of a
    linear layer (Wanda's |W|·‖X_j‖₂), 1 for a bias, the normalized input x̂_c for a norm's weight. It is the
    ℓ2 size of the change of the module's output when that one entry is removed."""
    return {n: t.delta(n).abs_().mul_(stats.act_norm[n]) for n in t.names}


@estimator("lape", needs=["active"], scope="global")
def lape(stats: Stats, t: Target) -> dict[str, torch.Tensor]:
    """Per MLP neuron: its mean activation probability over languages × the entropy of its normalized
    activation probabilities (LAPE), written on the neuron's parameters (gate/up rows, down column, the
    producing bias); other parameters score 0. Neurons are ranked across layers (scope global), as Tang
    et al. select them. High = fires often and evenly in every language."""
    langs = list(stats.active)
    if len(langs) < 2:
        raise LingregionError("lape compares languages: score at least two languages")
    params = {n: t.model.get_parameter(n) for n in t.names}
    out = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}
    for act in stats.active[langs[0]]:
        probs = torch.stack([stats.active[lang][act].double() / stats.seen[lang][act] for lang in langs], dim=1)
        neuron = lape_neuron_scores(probs).float()
        for name, axis in neuron_parameters(t.model, act, len(neuron), t.names):
            shape = [-1 if d == axis else 1 for d in range(out[name].dim())]
            out[name] = neuron.to(params[name].device).reshape(shape).expand(out[name].shape).clone()
    return out


def lape_neuron_scores(probs: torch.Tensor) -> torch.Tensor:
    """probs: neurons × languages activation probabilities → mean probability × LAPE entropy (nats).

    Tang et al. rank neurons by the entropy of p normalized over languages after dropping rarely firing
    neurons; weighting by the mean probability keeps silent neurons low without a threshold parameter.
    A neuron that never fires scores 0."""
    total = probs.sum(dim=1, keepdim=True)
    q = torch.where(total > 0, probs / total.clamp_min(1e-300), torch.zeros_like(probs))
    entropy = -(q * torch.where(q > 0, q.log(), torch.zeros_like(q))).sum(dim=1)
    return probs.mean(dim=1) * entropy


# --- one pass over a language's windows ------------------------------------------------------------
def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def _in_axis(module: nn.Module) -> int:
    """The weight axis along the input features (nn.Linear stores out × in, GPT-2's Conv1D in × out)."""
    return 0 if isinstance(module, Conv1D) else 1


def _by_module(names: Iterable[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for n in names:
        mod, _, leaf = n.rpartition(".")
        out.setdefault(mod, []).append(leaf)
    return out


def _energy_hooks(t: Target, box: list[Part]) -> list:
    """Hooks adding Σ_positions a² for each scored parameter (see `wanda`) to the energy of the group
    in box[0]."""
    modules = dict(t.model.named_modules())
    handles = []
    for mod, leaves in _by_module(t.names).items():
        module = modules[mod]
        if _is_linear(module):
            handles.append(module.register_forward_pre_hook(_linear_energy(module, mod, leaves, box)))
            continue
        wide = [leaf for leaf in leaves if module.get_parameter(leaf).dim() != 1]
        if wide:
            raise LingregionError(
                f"wanda: {mod}.{wide[0]} belongs to a {type(module).__name__}, not a linear layer "
                "or a norm; leave it out with --exclude"
            )
        handles.append(
            module.register_forward_hook(_channel_energy(module, mod, leaves, t.removed, box), with_kwargs=True)
        )
    return handles


def _linear_energy(module, mod: str, leaves: list[str], box: list[Part]):
    axis = _in_axis(module)

    def hook(_, args):
        energy = box[0].energy
        x = args[0].detach().float()
        sq = x.pow(2).reshape(-1, x.shape[-1]).sum(0)
        for leaf in leaves:
            if leaf == "weight":
                add = sq[None, :] if axis == 1 else sq[:, None]
            else:  # a bias multiplies the constant 1 at every position
                add = torch.tensor([x.numel() / x.shape[-1]], dtype=torch.float32, device=x.device)
            key = f"{mod}.{leaf}"
            energy[key] = energy[key].add_(add) if key in energy else add.clone()

    return hook


def _channel_energy(module, mod: str, leaves: list[str], removed, box: list[Part]):
    """For a norm's 1-D parameters: a = y(θ_c = θ_r + 1) − y(θ_c = θ_r), the output channel's slope in its
    own parameter. Norms are affine in each of their parameters channel by channel, so this is exact."""
    busy = []

    def hook(_, args, kwargs, output):
        if busy:  # our own functional calls below pass through this hook again
            return
        busy.append(True)
        energy = box[0].energy
        try:
            with torch.no_grad():
                for leaf in leaves:
                    p = module.get_parameter(leaf)
                    key = f"{mod}.{leaf}"
                    at = {v: torch.full_like(p, removed[key] + v) for v in (0.0, 1.0)}
                    a = (
                        torch.func.functional_call(module, {leaf: at[1.0]}, args, kwargs).float()
                        - torch.func.functional_call(module, {leaf: at[0.0]}, args, kwargs).float()
                    )
                    if not isinstance(output, torch.Tensor) or a.shape[-1] != p.numel():
                        raise LingregionError(
                            f"wanda: {key} does not scale the last axis of its module's output "
                            "channel by channel; leave it out with --exclude"
                        )
                    sq = a.pow(2).reshape(-1, p.numel()).sum(0)
                    energy[key] = energy[key].add_(sq) if key in energy else sq
        finally:
            busy.clear()

    return hook


def activation_modules(model: nn.Module, names: list[str]) -> list[str]:
    """MLP activation-function modules whose parent holds scored linear layers (the neurons LAPE counts)."""
    scored = set(_by_module(names))
    modules = dict(model.named_modules())
    out = []
    for name, m in modules.items():
        kind = type(m).__module__
        if kind.startswith(("transformers.activations", "torch.nn.modules.activation")) and not any(m.parameters()):
            parent = name.rpartition(".")[0]
            if any(c.startswith(parent + ".") and _is_linear(modules[c]) for c in scored):
                out.append(name)
    return out


def neuron_parameters(model: nn.Module, act: str, n: int, names: list[str]) -> list[tuple[str, int]]:
    """(parameter, axis) pairs of the scored parameters that belong to the `n` neurons after `act`: rows
    of the layers producing them (and their biases), columns of the layers consuming them."""
    parent = act.rpartition(".")[0]
    modules = dict(model.named_modules())
    out = []
    for mod, leaves in _by_module(names).items():
        module = modules[mod]
        if not (mod.startswith(parent + ".") and _is_linear(module)):
            continue
        w = module.weight
        i_ax = _in_axis(module)
        produces, consumes = w.shape[1 - i_ax] == n, w.shape[i_ax] == n
        if produces and consumes:
            raise LingregionError(
                f"lape: {mod} is square ({n}×{n}), so which side holds the neurons is unknown; "
                "leave it out with --exclude"
            )
        for leaf in leaves:
            if leaf == "weight" and (produces or consumes):
                out.append((f"{mod}.weight", 1 - i_ax if produces else i_ax))
            elif leaf == "bias" and produces:
                out.append((f"{mod}.bias", 0))
    return out


def _activation_hooks(model: nn.Module, acts: list[str], box: list[Part]) -> list:
    """Hooks counting, per MLP activation, the positions where each neuron is > 0 (in box[0]'s group)."""
    modules = dict(model.named_modules())

    def counter(act):
        def hook(_, args, output):
            active, seen = box[0].active, box[0].seen
            on = (output.detach() > 0).reshape(-1, output.shape[-1]).sum(0)
            active[act] = active[act].add_(on) if act in active else on
            seen[act] = seen.get(act, 0) + output.numel() // output.shape[-1]

        return hook

    return [modules[a].register_forward_hook(counter(a)) for a in acts]


def _zeros(t: Target, acc: dict[str, torch.Tensor]) -> None:
    """fp32 zero accumulators for the scored parameters that `acc` does not hold yet."""
    for n in t.names:
        if n not in acc:
            p = t.model.get_parameter(n)
            acc[n] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)


def _add(total: dict[str, torch.Tensor], name: str, t: torch.Tensor) -> None:
    """total[name] += t, taking t itself (not a copy) the first time."""
    total[name] = total[name].add_(t) if name in total else t


def collect(
    t: Target,
    windows: Windows,
    needs: Iterable[str],
    stats: Stats | None = None,
    progress: bool = True,
    groups: int = 1,
    visit: Callable[[str, list[Part]], None] | None = None,
) -> Stats:
    """Add one language's pass over its windows, one window at a time, to `stats` (new if None).

    groups: up to this many groups of windows (a power of two; fewer when the language has fewer windows)
    keep their own sums, window i in group i mod G; `visit(lang, parts)` reads them before they are added
    up into the language's full statistics (see `subset`). groups=1 is one running sum, as ever."""
    needs, stats = set(needs), stats if stats is not None else Stats()
    lang, model = windows.lang, t.model
    if lang in stats.tokens:
        raise LingregionError(f"language {lang!r} is given twice; pass each language's windows once")
    if groups < 1 or groups & (groups - 1):
        raise ValueError(f"groups must be a power of two, not {groups}")
    n_win = len(windows.input_ids)
    while groups > 1 and groups > n_win:
        groups //= 2
    stats.tokens[lang] = windows.n_tokens
    gradients = needs & {"lang_abs", "window_abs", "window_sq"}
    parts = [Part() for _ in range(groups)]
    for i, part in enumerate(parts):
        single = groups > 1 and len(range(i, n_win, groups)) == 1
        part.derived = {k for k in ("window_abs", "window_sq") if k in gradients} if single else set()
        stored = {"grad"} if single or "lang_abs" in gradients else set()
        for k in ({"window_abs", "window_sq"} & gradients) - part.derived | (stored if gradients else set()):
            _zeros(t, getattr(part, k))
    check_output_layer(model)  # its one-time forward must run before the hooks below count anything
    box = [parts[0]]  # the group the window being run belongs to: the hooks add to its sums
    handles = _energy_hooks(t, box) if "act_norm" in needs else []
    if "active" in needs:
        acts = activation_modules(model, t.names)
        if not acts:
            raise LingregionError("lape: no scored MLP layer with an activation function; include the MLP weights")
        handles += _activation_hooks(model, acts, box)
    bar = tqdm(total=n_win, desc=f"estimators {lang}", unit="win", disable=not progress, leave=False)
    try:
        for i, (ids, n_bytes) in enumerate(zip(windows.input_ids, windows.n_bytes)):
            part = box[0] = parts[i % groups]
            part.windows += 1
            part.tokens += len(ids) - 1
            if gradients:
                g = scoring.gradient_sum(
                    model, replace(windows, input_ids=[ids], n_bytes=[n_bytes]), t.names, progress=False
                )
                _fold(part, g, (len(ids) - 1) / windows.n_tokens)
            else:
                with torch.no_grad():
                    hidden_and_targets(model, ids[None].to(model.get_input_embeddings().weight.device))
            bar.update(1)
    finally:
        bar.close()
        for h in handles:
            h.remove()
    if visit is not None:
        visit(lang, parts)
    full = _tree_(parts)
    if "lang_abs" in gradients:
        for n in t.names:
            _add(stats.lang_abs, n, full.grad.pop(n).abs_())
    for k in ("window_abs", "window_sq"):
        if k in gradients:
            for n in t.names:
                _add(getattr(stats, k), n, full.item(k, n))
                getattr(full, k).pop(n, None)
    for n, e in full.energy.items():
        _add(stats.act_norm, n, e.sqrt_())
    if "active" in needs:
        stats.active[lang], stats.seen[lang] = full.active, full.seen
    return stats


def _fold(part: Part, g: dict[str, torch.Tensor], share: float) -> None:
    """Add one window's gradient to its group: gradient_sum gives that of the window's own mean loss;
    `share` (its tokens / the language's tokens) turns it into the gradient of the window's part of the
    language's. A sum the group does not hold is not needed (or is derived from `grad`)."""
    for n, gw in g.items():
        if n in part.window_abs:
            part.window_abs[n].add_(gw.abs(), alpha=share)
        if n in part.window_sq:
            part.window_sq[n].addcmul_(gw, gw, value=share * share)
        if n in part.grad:
            part.grad[n].add_(gw, alpha=share)


# --- several estimators, several languages ---------------------------------------------------------
def iter_estimates(
    t: Target,
    windows: Iterable[Windows],
    which: Sequence[str],
    progress: bool = True,
    groups: int = 1,
    visit: Callable[[str, list[Part]], None] | None = None,
) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """(name, core scores) of each estimator in `which`, one at a time so that the caller can drop each
    before the next is made; one pass per language serves all of them. `groups` and `visit`: see
    `collect` (visit is called once per language that needs a pass)."""
    chosen = [get(name) for name in dict.fromkeys(which)]
    needs = set().union(*(e.needs for e in chosen))
    stats = Stats()
    for w in windows:
        if needs:
            collect(t, w, needs, stats, progress, groups, visit)
        else:
            stats.tokens[w.lang] = w.n_tokens
    if not stats.tokens:
        raise LingregionError("no languages to score; pass at least one language's windows")
    for i, e in enumerate(chosen):
        scores = e.fn(stats, t)
        for name in e.needs - set().union(*(later.needs for later in chosen[i + 1 :])):
            getattr(stats, name).clear()  # each statistic is as large as the model: free it once read
        yield e.name, scores


def estimate(
    t: Target, windows: Iterable[Windows], which: Sequence[str], progress: bool = True
) -> dict[str, dict[str, torch.Tensor]]:
    """Core scores of each estimator in `which`, from one pass over each language's windows."""
    return dict(iter_estimates(t, windows, which, progress))


def score(name: str, t: Target, windows: Iterable[Windows], progress: bool = True) -> dict[str, torch.Tensor]:
    """One estimator's core score."""
    return estimate(t, windows, [name], progress)[name]
