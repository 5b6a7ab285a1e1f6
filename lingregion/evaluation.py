"""Perplexity and bits per byte, token-weighted over disjoint windows.

The output layer is applied one block of positions × vocabulary at a time: with a 262K-token vocabulary,
logits for a whole batch would be the largest tensor in the run. Losses are summed in fp32/fp64 whatever the dtype.

Besides the totals, the NLL is kept per block of consecutive predicted tokens (64 by default; a block
never spans two windows), the unit that uncertainty.py resamples for confidence intervals. The total
NLL is the exactly rounded sum of the block sums (math.fsum), so blocks and totals agree to the last bit
whichever process computed which block.

Under torchrun each process evaluates its share of the windows; each fills its blocks' places in one
vector of all blocks (zeros elsewhere), and that vector and the token count are all-reduced once, which
adds nothing but zeros to any block. With a checkpoint path the sums are saved every few windows and a
rerun resumes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import distributed
from .checkpoint import CHECKPOINT_EVERY, Checkpoint, windows_digest
from .corpus import Windows
from .models import input_device, sample_fingerprint
from .store import LingregionError

LOGIT_CHUNK = 256  # positions per output-layer call with gradients: 256 × 262K fp32 logits ≈ 270 MB
# Positions × vocabulary entries per output-layer call without gradients. 2048 × 2048 fp32 logits (16 MB)
# stay in a CPU's cache while their log-sum-exp is taken; a GPU wants fewer, larger calls.
TILES = {"cpu": (2048, 2048), "cuda": (8192, 8192)}
NLL_BLOCK = 64  # predicted tokens per resampling unit of the bootstrap: --quick's one window still gives several


def batches(windows: Windows, batch_size: int) -> Iterator[torch.Tensor]:
    """Stacks of equal-length windows (all but a language's last window have the same length)."""
    group: list[torch.Tensor] = []
    for w in windows.input_ids:
        if group and (len(group) == batch_size or len(w) != len(group[0])):
            yield torch.stack(group)
            group = []
        group.append(w)
    if group:
        yield torch.stack(group)


def output_layer(model) -> tuple[torch.nn.Module, float | None]:
    """The linear output layer and the soft-capping constant c, if any: logits = c · tanh(head(h) / c)."""
    return model.get_output_embeddings(), getattr(model.config, "final_logit_softcapping", None)


def _logits(head, cap: float | None, hidden: torch.Tensor) -> torch.Tensor:
    out = head(hidden).float()
    return torch.tanh(out / cap) * cap if cap else out


def check_output_layer(model) -> None:
    """Refuse a model whose logits are more than its linear output layer and soft-capping, which is all
    that lingregion's own output-layer passes compute (checked once per model, on a few positions)."""
    if getattr(model, "_lingregion_head_checked", False):
        return
    head, cap = output_layer(model)
    ids = torch.arange(1, 9, device=input_device(model)).unsqueeze(0)
    with torch.no_grad():
        ref = model(input_ids=ids).logits.float()
        ours = _logits(head, cap, model.base_model(input_ids=ids)[0])
    if not torch.allclose(ref, ours, rtol=1e-3, atol=1e-3 * ref.abs().max().item()):
        raise LingregionError(
            f"{type(model).__name__}: its output layer does more than a linear map and "
            "soft-capping, which lingregion does not model yet; please open an issue"
        )
    model._lingregion_head_checked = True


def output_head(model):
    """hidden states → fp32 logits, exactly as the model's own forward computes them (checked once)."""
    check_output_layer(model)
    head, cap = output_layer(model)
    return lambda hidden: _logits(head, cap, hidden)


def tiles(device_type: str) -> tuple[int, int]:
    """Positions × vocabulary entries per output-layer call without gradients on this kind of device."""
    return TILES.get(device_type, TILES["cuda"])


def hidden_and_targets(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states of the positions that predict a token, flattened, and those tokens."""
    hidden = model.base_model(input_ids=ids)[0]
    return hidden[:, :-1].reshape(-1, hidden.shape[-1]), ids[:, 1:].reshape(-1)


def token_nll(model, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """−log p(target) per position (fp32), from the very logits the model's forward computes, without
    ever forming the logits of every position over the whole vocabulary.

    The output layer runs on a block of positions × a slice of the vocabulary at a time, and a running
    log-sum-exp carries each position's normaliser from slice to slice. The tiles are small enough
    for a CPU to keep them in cache between the product and the reductions over them, so this is faster
    than one full-vocabulary product (BENCHMARKS.md), and the weight is read once per block of positions.
    """
    head, cap = output_layer(model)
    weight, bias = head.weight, head.bias
    rows, cols = tiles(weight.device.type)
    hidden, targets = hidden.to(weight.device), targets.to(weight.device)
    out = torch.empty(len(targets), dtype=torch.float32, device=weight.device)
    buffer = torch.empty(min(rows, len(targets)) * min(cols, len(weight)), dtype=weight.dtype, device=weight.device)
    for i in range(0, len(targets), rows):
        h, t = hidden[i : i + rows], targets[i : i + rows]
        top = torch.full((len(h),), -math.inf, device=weight.device)
        total = torch.zeros(len(h), device=weight.device)
        picked = torch.zeros(len(h), device=weight.device)
        for v in range(0, len(weight), cols):
            w = weight[v : v + cols]
            logits = torch.mm(h, w.t(), out=buffer[: len(h) * len(w)].view(len(h), len(w)))
            if bias is not None:
                logits += bias[v : v + cols]
            logits = logits.float()
            if cap:
                logits.div_(cap).tanh_().mul_(cap)
            mine = (t >= v) & (t < v + len(w))
            picked += logits.gather(1, (t - v).clamp_(0, len(w) - 1)[:, None]).squeeze(1).where(mine, 0)
            new_top = torch.maximum(top, logits.amax(1))
            total.mul_((top - new_top).exp_()).add_(logits.sub_(new_top[:, None]).exp_().sum(1))
            top = new_top
        out[i : i + rows] = total.log_().add_(top).sub_(picked)
    return out


def summed_nll(
    model, hidden: torch.Tensor, targets: torch.Tensor, block: int | None = None, rows: int = 1
) -> torch.Tensor:
    """Σ −log p(target) over positions, in fp64.

    With `block`: the positions are `rows` equal-length windows laid end to end, and the result is a
    rows × ⌈T/block⌉ tensor of the sums over each window's consecutive `block` positions (a window's last
    block may be shorter)."""
    nll = token_nll(model, hidden, targets).double()
    if block is None:
        return nll.sum()
    per_row = nll.view(rows, -1)
    # Zero padding fills the short last block; adding 0.0 leaves an fp64 sum unchanged.
    padded = torch.nn.functional.pad(per_row, (0, -per_row.shape[1] % block))
    return padded.view(rows, -1, block).sum(2)


def block_layout(windows: Windows, block: int) -> tuple[list[int], list[int], list[int]]:
    """Where each window's blocks start in the vector of all blocks, and each block's predicted tokens
    and UTF-8 bytes (these depend on the windows alone, not on the model)."""
    per_token = windows.token_bytes
    if per_token is None or [len(b) for b in per_token] != [len(w) - 1 for w in windows.input_ids]:
        raise LingregionError(
            "these windows carry no per-token byte counts (or stale ones); make them with corpus.make_windows"
        )
    starts, tokens, n_bytes = [], [], []
    for b in per_token:
        starts.append(len(tokens))
        for i in range(0, len(b), block):
            tokens.append(len(b[i : i + block]))
            n_bytes.append(int(b[i : i + block].sum()))
    return starts, tokens, n_bytes


@torch.inference_mode()
def perplexity(
    model,
    windows: Windows,
    batch_size: int = 4,
    progress: bool = True,
    desc: str = "",
    checkpoint: Path | None = None,
    every: int = CHECKPOINT_EVERY,
    block: int = NLL_BLOCK,
) -> dict:
    """Token-weighted perplexity exp(Σ NLL / Σ tokens) and bits per byte Σ NLL / (ln 2 · Σ bytes).

    Returns {"ppl", "bpb", "nll", "tokens", "bytes", "blocks"}, where blocks = {"size": block, "nll": [...],
    "tokens": [...], "bytes": [...]} lists each block of `block` consecutive predicted tokens of a window
    (windows in order; a window's last block may be shorter): its summed NLL (fp64), predicted tokens and
    UTF-8 bytes. nll == math.fsum(blocks["nll"]); tokens and bytes are the sums of theirs.

    checkpoint: a file to save the running sums to every `every` windows; a rerun of the same job
    resumes from it, and it is deleted once the sums are complete. It records only a sampled check of the
    model (a full fingerprint on every call would read all weights), so name the file by what the model is,
    as the run folder does (its fingerprint and the edits applied)."""
    if block < 1:
        raise LingregionError(f"block {block} must be at least 1 token")
    check_output_layer(model)
    device = input_device(model)
    starts, block_tokens, block_bytes = block_layout(windows, block)
    ckpt = state = None
    if checkpoint:
        ckpt = Checkpoint(
            checkpoint,
            {
                "job": "perplexity",
                "model": sample_fingerprint(model),
                "windows": windows_digest(windows),
                "batch_size": batch_size,
                "block": block,
            },
            every,
        )
        state = ckpt.load()
    sums = state[0] if state else {}
    nll_blocks = sums.get("blocks", torch.zeros(len(block_tokens), dtype=torch.float64))
    counted = sums.get("tokens", torch.zeros(1, dtype=torch.float64))  # predicted tokens evaluated
    start = state[1] if state else 0
    owned = distributed.owned(len(windows.input_ids))
    mine = distributed.shard(windows)
    bar = tqdm(
        total=len(mine.input_ids),
        desc=desc or f"eval {windows.lang}",
        unit="win",
        disable=not progress or not distributed.is_main(),
        leave=False,
    )
    done = 0
    for b, ids in enumerate(batches(mine, batch_size)):
        done += len(ids)
        bar.update(len(ids))
        if b < start:  # already in the checkpoint's sums
            continue
        hidden, targets = hidden_and_targets(model, ids.to(device))
        per_window = summed_nll(model, hidden, targets, block, len(ids)).cpu()
        for row, w in zip(per_window, owned[done - len(ids) : done]):
            nll_blocks[starts[w] : starts[w] + len(row)] = row
        counted += len(targets)
        if ckpt:
            ckpt.update({"blocks": nll_blocks, "tokens": counted}, b + 1, done)
    bar.close()
    distributed.sum_([nll_blocks, counted])
    if ckpt:
        ckpt.remove()
    tokens, n_bytes = windows.n_tokens, sum(windows.n_bytes)
    if counted.item() != tokens:
        raise RuntimeError(f"evaluated {counted.item():.0f} tokens of {tokens}: the processes saw different windows")
    per_block = nll_blocks.tolist()
    nll = math.fsum(per_block)
    return {
        "ppl": math.exp(nll / tokens) if nll / tokens < 700 else math.inf,
        "bpb": nll / math.log(2) / n_bytes,
        "nll": nll,
        "tokens": tokens,
        "bytes": n_bytes,
        "blocks": {"size": block, "nll": per_block, "tokens": block_tokens, "bytes": block_bytes},
    }


def protocol(windows: Windows, dtype: str) -> dict:
    """What a perplexity number depends on, stored beside it."""
    return {
        "windows": "disjoint, no stride overlap; each window = BOS + (seq_len-1) text tokens, all predicted",
        "seq_len": windows.meta.get("seq_len"),
        "bos": windows.meta.get("bos"),
        "weighting": "token-weighted: exp(total NLL / total predicted tokens)",
        "bits_per_byte": "total NLL / ln 2 / UTF-8 bytes of the predicted tokens",
        "dtype": dtype,
        "accumulation": "fp32 logits, fp64 sums",
    }


def generate(model, tokenizer, prompts: dict[str, str], max_new_tokens: int) -> dict[str, str]:
    """Greedy continuations of fixed prompts (the new text only)."""
    device = next(model.parameters()).device
    out = {}
    for lang, prompt in prompts.items():
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
        with torch.inference_mode():
            new = model.generate(
                ids,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            )
        out[lang] = tokenizer.decode(new[0, ids.shape[1] :], skip_special_tokens=True)
    return out
