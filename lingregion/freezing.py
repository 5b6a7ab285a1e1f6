"""Further pre-training with a region held exactly fixed, and the loop that runs it.

Freezing. Zeroing a region's gradient is not enough to keep it fixed under AdamW: decoupled weight decay
still shrinks every entry, and moments built before the freeze keep moving it (the paper's code, which
reset a bf16 copy after each step, let the fp32 master weights drift this way). Here a frozen entry gets
a zero gradient (so it takes no part in clipping and its moments stay at rest) and is written back to its
stored value right after every optimizer step. Only the frozen entries are stored: int64 flat indices and
their values, 12 bytes per frozen fp32 entry, never a copy of the whole parameter. Under bf16 autocast the
parameters stay fp32 and the write-back is exact, so frozen entries are bit-identical after any number of
steps. `freeze` attaches this to any model and torch optimizer; `FreezeCallback` does the same inside a
Hugging Face `Trainer`.

Training. `train` is causal-LM training on one language's token windows: AdamW (the paper's lr 5e-5,
betas (0.9, 0.95), weight decay 0.001; no decay on 1-D parameters, as Hugging Face and nanoGPT do), a
cosine schedule after a linear warm-up, gradient clipping, gradient accumulation, fp32 or bf16 autocast
(fp32 master weights), perplexity of several languages at chosen steps, and atomic checkpoints
(trainable parameters, optimizer, scheduler, RNG, step, data position, history) from which an interrupted
run continues with exactly the losses it would have had. Only the parameters named as trainable get
gradients: by default those inside the transformer layers, which leaves out the embedding (170M of Gemma
3 270M's 268M parameters) and the LM head tied to it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import TrainerCallback

from . import evaluation, models
from .corpus import Windows
from .regions import Region
from .store import LingregionError, read_tensors, sha256_bytes, write_tensors

TRAIN_DTYPES = ("float32", "bfloat16")
CHECKPOINT_FORMAT = "lingregion-training-checkpoint-v1"


# --- exact freezing ------------------------------------------------------------------------------------
# Path parts that wrappers put into parameter names: DDP's `module.` (leading), torch.compile's
# `_orig_mod.`, FSDP1's `_fsdp_wrapped_module.`, activation checkpointing's `_checkpoint_wrapped_module.`.
# A region is located on the plain model, so its names are matched with these parts taken out.
_WRAPPER_PARTS = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def plain_name(name: str) -> str:
    """`name` without the path parts that DDP, FSDP1, torch.compile and activation checkpointing add,
    e.g. 'module.model.layers.0.mlp.up_proj.weight' -> 'model.layers.0.mlp.up_proj.weight'."""
    parts = [p for p in name.split(".") if p not in _WRAPPER_PARTS]
    while len(parts) > 1 and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)


def named_parameters(model) -> dict[str, torch.nn.Parameter]:
    """The model's parameters by the names a region made on the plain model uses: each name as it is,
    and, where a wrapper (DDP, FSDP1, torch.compile) changed it, also under its plain name."""
    params = dict(model.named_parameters())
    for n, p in list(params.items()):
        params.setdefault(plain_name(n), p)
    return params


def local_indices(
    index: torch.Tensor, shape: tuple[int, ...], local_shape: tuple[int, ...], offset: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Of the global flat `index` (row-major, into a tensor of `shape`), the entries that lie in the block
    of `local_shape` starting at `offset` (a shard of Shard(d) placements is such a block): returns
    (which: a bool mask over `index`, local: their flat indices into the row-major local block)."""
    coords = torch.unravel_index(index, tuple(shape)) if len(shape) else ()
    which = torch.ones(index.shape, dtype=torch.bool, device=index.device)
    for c, o, n in zip(coords, offset, local_shape):
        which &= (c >= o) & (c < o + n)
    local = torch.zeros(int(which.sum()), dtype=torch.int64, device=index.device)
    for c, o, n in zip(coords, offset, local_shape):
        local = local * n + (c[which] - o)
    return which, local


def _shard_of(p, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(which, local) for a DTensor parameter: the frozen entries held on this rank and their flat indices
    into its local shard. Only Shard(d) and Replicate placements are blocks; others are refused."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    odd = [pl for pl in p.placements if not (type(pl) is Shard or isinstance(pl, Replicate))]
    if odd:
        raise LingregionError(
            f"cannot freeze entries of a parameter placed as {odd[0]}; shard with Shard(d) or Replicate "
            "placements (fully_shard's default Shard(0) works)"
        )
    local_shape, offset = compute_local_shape_and_global_offset(tuple(p.shape), p.device_mesh, p.placements)
    return local_indices(index, tuple(p.shape), tuple(local_shape), tuple(offset))


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this process holds: a DTensor's local shard (a view that shares its storage), else `t`."""
    return t.to_local() if hasattr(t, "to_local") else t


class Frozen:
    """A region's entries held at fixed values: their gradients are zeroed as autograd produces them, and
    `restore()` writes the stored values back (call it after each optimizer step; `freeze` does).

    The model may be wrapped in DDP (names with `module.`), torch.compile or FSDP1, or sharded by FSDP2's
    `fully_shard` (DTensor parameters): then each process stores, zeroes and restores only the frozen
    entries in its own shard, and `count` and `nbytes` are this process's share."""

    def __init__(self, model, region: Region, values: Mapping[str, float | torch.Tensor] | float | None = None):
        params = named_parameters(model)
        missing = [n for n in region.packed if n not in params]
        if missing:
            raise LingregionError(
                f"region covers {missing[0]}, which this model lacks; locate the region with this model"
            )
        self._entries: list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor]] = []
        self._hooks = []
        for name in region.packed:
            if not region.count(name):
                continue
            p = params[name]
            index = region.indices(name).to(p.device)
            which = None
            if hasattr(p, "device_mesh"):  # a DTensor: keep the entries this rank holds, as local indices
                which, index = _shard_of(p, index)
            if values is not None:  # e.g. Top&Freeze: set the region to its removed value, then hold it there
                value = _value_of(values, name)
                if isinstance(value, torch.Tensor):
                    value = value.to(p.device, p.dtype)
                    if value.dim() and which is not None:  # one value per frozen entry: this rank's share
                        value = value.reshape(-1)[which]
                with torch.no_grad():
                    _local(p.data).view(-1)[index] = value
            self._entries.append((p, index, _local(p.detach()).reshape(-1)[index].clone()))
            if p.requires_grad:
                self._hooks.append(p.register_post_accumulate_grad_hook(_zero_grad_at(index)))

    @torch.no_grad()
    def restore(self) -> None:
        """Write the stored values back into the frozen entries (of this process's shard)."""
        for p, index, value in self._entries:
            # view, not reshape: a copy would take the write and leave the parameter as it is
            _local(p.data).view(-1)[index] = value

    def remove(self) -> None:
        """Detach the gradient hooks; the entries keep their current values."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    @property
    def count(self) -> int:
        """Frozen entries held by this process (all of them, unless the parameters are sharded)."""
        return sum(len(i) for _, i, _ in self._entries)

    @property
    def nbytes(self) -> int:
        """Memory held: the indices and the stored values of the frozen entries."""
        return sum(i.nbytes + v.nbytes for _, i, v in self._entries)


def _value_of(values, name: str):
    return values[name] if isinstance(values, Mapping) else values


def _zero_grad_at(index: torch.Tensor):
    def hook(p):
        # Under FSDP2 the hook runs on the sharded parameter after the reduce-scatter, and the gradient is a
        # DTensor: its local shard is what the optimizer reads. Under DDP it runs before the all-reduce, and
        # every rank zeroes the same entries, so their average stays zero.
        with torch.no_grad():
            _local(p.grad).view(-1).index_fill_(0, index, 0)

    return hook


class Attached:
    """What `freeze` returns: the Frozen region and the optimizer hook that restores it; `remove()` detaches."""

    def __init__(self, frozen: Frozen, handle):
        self.frozen, self._handle = frozen, handle

    def remove(self) -> None:
        """Detach the gradient hooks and the optimizer hook; the entries keep their current values."""
        self.frozen.remove()
        self._handle.remove()


def freeze(
    model,
    optimizer: torch.optim.Optimizer,
    region: Region,
    values: Mapping[str, float | torch.Tensor] | float | None = None,
) -> Attached:
    """Keep `region` bit-identical through every `optimizer.step()`: at its current values, or first set to
    `values` (one per parameter name, or one for all, e.g. θ_removed to keep a removed region removed).

    Call it on the model as it will be trained: after wrapping it in DDP (either the wrapper or the inner
    model works) and after FSDP2's `fully_shard`, which replaces each parameter with a sharded DTensor;
    then each process holds and restores the frozen entries of its own shard."""
    frozen = Frozen(model, region, values)
    return Attached(frozen, optimizer.register_step_post_hook(lambda *_: frozen.restore()))


class FreezeCallback(TrainerCallback):
    """`Trainer(..., callbacks=[FreezeCallback(region)])`: the region stays bit-identical during training.

    The region is attached when the first step begins, and the values are written back right after each
    optimizer step (the `on_optimizer_step` event), whatever optimizer the Trainer built or wrapped. Not at
    `on_train_begin`: the Trainer calls that before accelerate wraps or shards the model, and FSDP2's
    `fully_shard` replaces every parameter with a sharded one, so hooks and stored indices taken then would
    belong to parameters no longer trained (and a checkpoint the Trainer resumes from under FSDP is loaded
    after sharding too). Under several processes each one holds its own shard of the region.
    """

    def __init__(self, region: Region, values: Mapping[str, float | torch.Tensor] | float | None = None):
        self.region, self.values, self.frozen = region, values, None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        """Forget a region attached by an earlier `train()` call; the next step attaches it afresh."""
        self._detach()

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        """Attach (once per training run) to the parameters as the Trainer has wrapped or sharded them."""
        if self.frozen is None:
            self.frozen = Frozen(model, self.region, self.values)

    def on_optimizer_step(self, args, state, control, **kwargs):
        """Write the frozen entries back right after the optimizer moved them."""
        self.frozen.restore()

    def on_train_end(self, args, state, control, **kwargs):
        """Detach the gradient hooks."""
        self._detach()

    def _detach(self) -> None:
        if self.frozen is not None:
            self.frozen.remove()
        self.frozen = None


# --- configuration and schedule -------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """One training run. A step updates the weights once, from batch_size × accumulation windows."""

    steps: int
    lr: float = 5e-5
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.001
    warmup: int = 100
    batch_size: int = 1  # windows per forward/backward
    accumulation: int = 1  # forward/backward passes per step
    clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    dtype: str = "float32"  # or "bfloat16": autocast compute, fp32 master weights and optimizer state
    seed: int = 0
    eval_steps: list[int] = field(default_factory=list)  # after these steps (0 = before training)
    eval_batch_size: int = 4
    checkpoint_every: int = 0  # steps; 0 = no checkpoints

    @property
    def samples_per_step(self) -> int:
        """Windows behind one weight update: batch_size × accumulation."""
        return self.batch_size * self.accumulation

    def validate(self) -> None:
        """Refuse a run that cannot be trained: sizes or rates out of range, unknown dtype, steps past the end."""
        if self.steps < 1 or self.batch_size < 1 or self.accumulation < 1 or self.eval_batch_size < 1:
            raise LingregionError("training steps, batch size and accumulation must be ≥ 1")
        if not (self.lr > 0 and self.weight_decay >= 0 and self.clip >= 0 and self.warmup >= 0):
            raise LingregionError("training needs lr > 0, weight decay ≥ 0, clip ≥ 0 and warm-up ≥ 0")
        if not all(0 <= b < 1 for b in self.betas) or len(self.betas) != 2:
            raise LingregionError(f"betas {self.betas} must be two numbers in [0, 1), e.g. 0.9,0.95")
        if self.dtype not in TRAIN_DTYPES:
            raise LingregionError(f"unknown training dtype {self.dtype!r}; use one of {', '.join(TRAIN_DTYPES)}")
        bad = [s for s in self.eval_steps if not 0 <= s <= self.steps]
        if bad:
            raise LingregionError(f"evaluation step {bad[0]} is outside 0..{self.steps}; choose steps within the run")
        if self.checkpoint_every < 0:
            raise LingregionError("checkpoint_every must be ≥ 0 (0 = no checkpoints)")


def lr_factor(step: int, warmup: int, steps: int) -> float:
    """Multiplier of the peak lr for update number `step` (0-based): linear warm-up to 1 over `warmup`
    updates (the first update already moves), then a half cosine that would reach 0 at update `steps`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def optimizer_for(params: dict[str, torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm weights and biases are not decayed)."""
    decay = [p for p in params.values() if p.dim() >= 2]
    rest = [p for p in params.values() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=tuple(cfg.betas))


def scheduler_for(optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule of `lr_factor` (linear warm-up, then half cosine) on `optimizer`, stepped once per update."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.warmup, cfg.steps))


# --- data -----------------------------------------------------------------------------------------------
class Stream:
    """Training windows in a seeded order that is reshuffled every epoch. Window number p of the stream
    depends only on (seed, p), so a run resumed at data position p sees exactly what it would have seen."""

    def __init__(self, windows: Windows, seed: int):
        full = max(len(w) for w in windows.input_ids)
        # A language's last window is usually short; equal lengths keep every step the same size.
        self.windows = [w for w in windows.input_ids if len(w) == full]
        self.seed, self._epoch, self._order = seed, -1, None

    def __len__(self) -> int:
        return len(self.windows)

    def take(self, position: int, n: int) -> torch.Tensor:
        """Windows `position` .. `position + n - 1` of the stream, stacked into one batch."""
        return torch.stack([self._at(p) for p in range(position, position + n)])

    def _at(self, position: int) -> torch.Tensor:
        epoch, i = divmod(position, len(self.windows))
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(len(self.windows), generator=g)
        return self.windows[int(self._order[i])]


# --- one step -------------------------------------------------------------------------------------------
def _autocast(dtype: str, device: torch.device):
    if dtype == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def backward(model, logits_fn, ids: torch.Tensor, tokens: int, dtype: str) -> float:
    """Backpropagate Σ NLL(ids) / tokens and return Σ NLL. The output layer runs LOGIT_CHUNK positions
    at a time into a detached copy of the hidden states (a 262K vocabulary makes full logits the largest
    tensor), then the transformer's backward runs once from the gathered hidden-state gradient."""
    with _autocast(dtype, ids.device):
        hidden, targets = evaluation.hidden_and_targets(model, ids)
    leaf = hidden.detach().requires_grad_(True)
    total = 0.0
    for i in range(0, len(targets), evaluation.LOGIT_CHUNK):
        with _autocast(dtype, ids.device):
            logits = logits_fn(leaf[i : i + evaluation.LOGIT_CHUNK])
        nll = F.cross_entropy(logits.float(), targets[i : i + evaluation.LOGIT_CHUNK], reduction="sum")
        (nll / tokens).backward()
        total += nll.item()
    hidden.backward(leaf.grad)
    return total


def _step(
    model,
    logits_fn,
    micro: list[torch.Tensor],
    params: list[torch.nn.Parameter],
    optimizer,
    scheduler,
    cfg: TrainConfig,
) -> tuple[float, float, float]:
    """One weight update from several micro-batches; returns (mean token loss, gradient norm, lr used)."""
    tokens = sum(ids[:, 1:].numel() for ids in micro)
    nll = sum(backward(model, logits_fn, ids, tokens, cfg.dtype) for ids in micro)
    norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip if cfg.clip > 0 else math.inf)
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return nll / tokens, float(norm), lr


# --- checkpoints ----------------------------------------------------------------------------------------
def save_checkpoint(path: Path, model, names: list[str], optimizer, scheduler, history: dict, signature: str) -> None:
    """Everything needed to continue, in one safetensors file (tensors) with JSON metadata (the rest),
    written atomically: a crash mid-write leaves the previous checkpoint intact."""
    params = dict(model.named_parameters())
    tensors = {f"param/{n}": params[n].detach() for n in names}
    opt = optimizer.state_dict()
    scalars = {}
    for i, state in opt["state"].items():
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt/{i}/{k}"] = v
            else:
                scalars[f"{i}/{k}"] = v
    tensors["rng/cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for d, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda{d}"] = s
    meta = {
        "format": CHECKPOINT_FORMAT,
        "signature": signature,
        "history": history,
        "param_groups": opt["param_groups"],
        "optimizer_scalars": scalars,
        "scheduler": scheduler.state_dict(),
    }
    write_tensors(path, tensors, meta)


def load_checkpoint(path: Path, model, optimizer, scheduler, signature: str) -> dict | None:
    """Restore a checkpoint made by the same run (same signature) and return its history; None if the file
    is absent or belongs to another run (different model, data, region or settings)."""
    if not Path(path).is_file():
        return None
    tensors, meta = read_tensors(path)
    if meta.get("format") != CHECKPOINT_FORMAT or meta.get("signature") != signature:
        return None
    params = dict(model.named_parameters())
    state: dict[int, dict] = {}
    with torch.no_grad():
        for key, t in tensors.items():
            kind, _, rest = key.partition("/")
            if kind == "param":
                params[rest].copy_(t)
            elif kind == "opt":
                i, _, k = rest.partition("/")
                state.setdefault(int(i), {})[k] = t
    for key, v in meta["optimizer_scalars"].items():
        i, _, k = key.partition("/")
        state.setdefault(int(i), {})[k] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng/cpu"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[f"rng/cuda{d}"] for d in range(torch.cuda.device_count())])
    return meta["history"]


def _signature(model, data: Windows, cfg: TrainConfig, names: list[str], frozen: Region | None, values) -> str:
    """What a checkpoint is valid for: the model as training starts, the data, the settings, the region."""
    region = None
    if frozen is not None:
        region = sha256_bytes(b"".join(frozen.packed[n].numpy().tobytes() for n in sorted(frozen.packed)))
    if isinstance(values, Mapping):
        values = {n: v.tolist() if isinstance(v, torch.Tensor) else v for n, v in values.items()}
    elif isinstance(values, torch.Tensor):
        values = values.tolist()
    blob = repr((models.fingerprint(model), data.meta, asdict(cfg), names, region, values))
    return sha256_bytes(blob.encode())[:16]


# --- the loop -------------------------------------------------------------------------------------------
def train(
    model,
    data: Windows,
    cfg: TrainConfig,
    names: list[str] | None = None,
    *,
    frozen: Region | None = None,
    frozen_values: Mapping[str, float | torch.Tensor] | float | None = None,
    evals: Mapping[str, Windows] | None = None,
    checkpoint: Path | None = None,
    progress: bool = True,
    desc: str = "train",
) -> dict:
    """Train `names` (default: the transformer-layer parameters) on `data` for cfg.steps updates, with
    `frozen` held fixed (at `frozen_values` if given). Returns the history: per-step loss, gradient norm
    and lr, and the perplexity of each `evals` language after each of cfg.eval_steps.

    With `checkpoint`, a rerun of the same call continues from the last checkpoint and gives the same
    losses as an uninterrupted run; a checkpoint of another run at that path is ignored and replaced.
    """
    cfg.validate()
    names = names if names is not None else models.scored_names(model)
    params = dict(model.named_parameters())
    _check_trainable(params, names)
    stream = _stream(data, cfg)
    evals = dict(evals or {})
    signature = _signature(model, data, cfg, names, frozen, frozen_values) if checkpoint else ""
    flags = _only_trainable(params, names)
    trainable = [params[n] for n in names]
    optimizer = optimizer_for({n: params[n] for n in names}, cfg)
    scheduler = scheduler_for(optimizer, cfg)
    history = _start(checkpoint, model, optimizer, scheduler, signature, cfg.seed)
    attached = freeze(model, optimizer, frozen, frozen_values) if frozen is not None else None
    logits_fn = evaluation.output_head(model)
    device = model.get_input_embeddings().weight.device
    bar = tqdm(total=cfg.steps, initial=history["step"], desc=desc, unit="step", disable=not progress, leave=False)
    try:
        if 0 in cfg.eval_steps and "0" not in history["evals"]:
            history["evals"]["0"] = _evaluate(model, evals, cfg, progress)
        while history["step"] < cfg.steps:
            t0 = time.time()
            loss = _next_step(model, logits_fn, stream, device, trainable, optimizer, scheduler, cfg, history)
            if history["step"] in cfg.eval_steps:
                history["evals"][str(history["step"])] = _evaluate(model, evals, cfg, progress)
            history["seconds"] += time.time() - t0
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            if checkpoint and cfg.checkpoint_every and history["step"] % cfg.checkpoint_every == 0:
                save_checkpoint(checkpoint, model, names, optimizer, scheduler, history, signature)
    finally:
        bar.close()
        _restore(model, params, flags, attached)
    return _summary(history, stream, cfg, trainable, attached)


def _check_trainable(params: dict[str, torch.nn.Parameter], names: list[str]) -> None:
    """Refuse an empty list, a name that is not a parameter of this model, and a parameter not in fp32."""
    unknown = [n for n in names if n not in params]
    if unknown or not names:
        raise LingregionError(
            f"no trainable parameter {unknown[0] if unknown else '(empty list)'} in this model; "
            "pass parameter names of this model"
        )
    low = [n for n in names if params[n].dtype != torch.float32]
    if low:
        raise LingregionError(
            f"{low[0]} is {params[low[0]].dtype}: training keeps fp32 master weights; load the "
            "model in float32 and use dtype bfloat16 for bf16 compute"
        )


def _stream(data: Windows, cfg: TrainConfig) -> Stream:
    """The training windows in their seeded order; refused when they do not fill one batch."""
    stream = Stream(data, cfg.seed)
    if len(stream) < cfg.batch_size:
        raise LingregionError(
            f"{data.lang}: {len(stream)} full training windows, fewer than the batch size "
            f"{cfg.batch_size}; pass more text or a smaller batch"
        )
    return stream


def _only_trainable(params: dict[str, torch.nn.Parameter], names: list[str]) -> dict[str, bool]:
    """Let only `names` get gradients; returns each parameter's requires_grad as it was, for `_restore`."""
    flags = {n: p.requires_grad for n, p in params.items()}
    for n, p in params.items():
        p.requires_grad_(n in names)
    return flags


def _start(checkpoint: Path | None, model, optimizer, scheduler, signature: str, seed: int) -> dict:
    """The history to continue from: the checkpoint's when it belongs to this run (model, optimizer,
    scheduler and RNG restored with it), otherwise an empty one, with the RNG seeded."""
    history = load_checkpoint(checkpoint, model, optimizer, scheduler, signature) if checkpoint else None
    if history is None:
        torch.manual_seed(seed)
        history = {"step": 0, "position": 0, "loss": [], "grad_norm": [], "lr": [], "evals": {}, "seconds": 0.0}
    return history


def _next_step(
    model,
    logits_fn,
    stream: Stream,
    device: torch.device,
    trainable: list[torch.nn.Parameter],
    optimizer,
    scheduler,
    cfg: TrainConfig,
    history: dict,
) -> float:
    """One weight update from the stream's next cfg.accumulation micro-batches, recorded in `history` (step,
    data position, loss, gradient norm, lr); returns its loss."""
    model.train()
    micro = [
        stream.take(history["position"] + j * cfg.batch_size, cfg.batch_size).to(device)
        for j in range(cfg.accumulation)
    ]
    loss, norm, lr = _step(model, logits_fn, micro, trainable, optimizer, scheduler, cfg)
    history["step"] += 1
    history["position"] += cfg.samples_per_step
    history["loss"].append(loss)
    history["grad_norm"].append(norm)
    history["lr"].append(lr)
    return loss


def _restore(model, params: dict[str, torch.nn.Parameter], flags: dict[str, bool], attached: Attached | None) -> None:
    """Leave the model as training found it, whatever stopped the loop: the freeze detached, requires_grad as
    it was, no gradients held, eval mode."""
    if attached:
        attached.remove()
    for n, p in params.items():
        p.requires_grad_(flags[n])
        p.grad = None
    model.eval()


def _summary(
    history: dict, stream: Stream, cfg: TrainConfig, trainable: list[torch.nn.Parameter], attached: Attached | None
) -> dict:
    """The history with what the run covered: windows, epochs, samples and tokens per step, the trainable
    parameters and the frozen entries."""
    return dict(
        history,
        windows=len(stream),
        epochs=history["position"] / len(stream),
        samples_per_step=cfg.samples_per_step,
        tokens_per_step=cfg.samples_per_step * (len(stream.windows[0]) - 1),
        trainable_parameters=sum(p.numel() for p in trainable),
        frozen_entries=attached.frozen.count if attached else 0,
        frozen_bytes=attached.frozen.nbytes if attached else 0,
    )


def _evaluate(model, evals: dict[str, Windows], cfg: TrainConfig, progress: bool) -> dict:
    """Perplexity of each language in the model's own dtype, without autocast."""
    model.eval()
    return {
        lang: evaluation.perplexity(model, w, cfg.eval_batch_size, progress, desc=f"eval {lang}")
        for lang, w in evals.items()
    }
