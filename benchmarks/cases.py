"""What the benchmarks measure: lingregion's way of doing each job and the baseline it is compared with.

Every case is a function of a `Setup` (model, data, scores) that does the whole job once.
"""

from __future__ import annotations

import importlib.util
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lingregion import corpus, evaluation, interventions, models, scoring, uncertainty
from lingregion.config import Config
from lingregion.regions import select
from lingregion.run import Run


@dataclass
class Setup:
    m: models.Model
    score_windows: corpus.Windows
    eval_windows: corpus.Windows
    names: list[str]
    removed: dict[str, float]
    scores: dict[str, torch.Tensor] = field(default_factory=dict)


def setup(
    seq_len: int,
    score_windows: int,
    eval_windows: int,
    device: str = "cpu",
    dtype: str = "float32",
    model: str | None = None,
) -> Setup:
    m = models.load(model, dtype, device)
    names = models.scored_names(m.module)
    return Setup(
        m,
        _windows(m.tokenizer, "score", seq_len, score_windows),
        _windows(m.tokenizer, "eval", seq_len, eval_windows),
        names,
        models.removed_values(m.module, names),
    )


def _windows(tokenizer, split: str, seq_len: int, n: int) -> corpus.Windows:
    """n full-length windows of Spanish text, then of further languages where Spanish runs out."""
    ids, n_bytes, token_bytes, langs = [], [], [], []
    for lang in ("es", "en", "pt", "it", "ru", "uk", "ar", "zh", "ja", "ko", "vi"):
        w = corpus.load_windows(tokenizer, lang, split, seq_len, seq_len * (n - len(ids)))
        full = [i for i, x in enumerate(w.input_ids) if len(x) == seq_len]
        ids += [w.input_ids[i] for i in full]
        n_bytes += [w.n_bytes[i] for i in full]
        token_bytes += [w.token_bytes[i] for i in full]
        langs.append(lang)
        if len(ids) >= n:
            break
    meta = {"seq_len": seq_len, "bos": True}
    return corpus.Windows("+".join(langs), split, ids[:n], n_bytes[:n], meta, token_bytes[:n])


# --- scoring -------------------------------------------------------------------------------------------


def score_lean(s: Setup):
    """lingregion: only scored parameters require grad, gradients folded into fp32 sums as they appear."""
    return scoring.score(s.m.module, s.score_windows, s.names, s.removed, batch_size=1, progress=False)


def gradient_halves(s: Setup):
    """The gradient pass alone, with the default split-half sample (what a run's scoring pass does)."""
    halved = uncertainty.matrix_sample(s.names, Config().split_half_share)
    return scoring.gradient_sum(s.m.module, s.score_windows, s.names, progress=False, halves=halved)


def gradient_plain(s: Setup):
    """The gradient pass alone, one accumulator per parameter."""
    return scoring.gradient_sum(s.m.module, s.score_windows, s.names, progress=False)


def score_language(s: Setup, model_name: str | None):
    """What a run does for one language, end to end, into a fresh run folder: the gradient pass with split
    halves, the importance, the split-half statistics and regions, and the compact score file written."""
    seq_len = len(s.score_windows.input_ids[0])
    cfg = Config(model=model_name, seq_len=seq_len, score_tokens=seq_len * len(s.score_windows.input_ids))
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(Path(tmp) / "run", cfg, s.m, progress=False)
        run._windows[("es", "score", cfg.score_tokens)] = s.score_windows
        run.scores("es")


@contextmanager
def _requires_grad(model, names):
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    try:
        yield
    finally:
        model.zero_grad(set_to_none=True)
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])


def score_bare(s: Setup):
    """A bare forward and backward of the model's own loss through the same parameters; nothing kept."""
    device = s.m.device
    with _requires_grad(s.m.module, set(s.names)):
        for ids in s.score_windows.input_ids:
            s.m.module(input_ids=ids[None].to(device), labels=ids[None].to(device)).loss.backward()
            s.m.module.zero_grad(set_to_none=True)


def score_naive(s: Setup):
    """The straightforward way: every parameter requires grad, `.grad` accumulates, multiply at the end."""
    model, device, total = s.m.module, s.m.device, s.score_windows.n_tokens
    params = dict(model.named_parameters())
    with _requires_grad(model, set(params)):
        for ids in s.score_windows.input_ids:
            loss = model(input_ids=ids[None].to(device), labels=ids[None].to(device)).loss
            (loss * (len(ids) - 1) / total).backward()
        return {n: ((params[n].detach().float() - s.removed[n]) * params[n].grad.float()).abs() for n in s.names}


def score_fp64(s: Setup):
    """The reference for both: the same importance with the model and the cross-entropy in fp64."""
    model, device, total = s.m.module, s.m.device, s.score_windows.n_tokens
    dtype, params = next(model.parameters()).dtype, dict(model.named_parameters())
    head, cap = evaluation.output_layer(model.double())
    try:
        with _requires_grad(model, set(s.names)):
            for ids in s.score_windows.input_ids:
                hidden, targets = evaluation.hidden_and_targets(model, ids[None].to(device))
                logits = torch.tanh(head(hidden) / cap) * cap if cap else head(hidden)
                (torch.nn.functional.cross_entropy(logits, targets, reduction="sum") / total).backward()
            return {n: ((params[n].detach() - s.removed[n]) * params[n].grad).abs() for n in s.names}
    finally:
        model.to(dtype)  # exact: every value came from `dtype`


# --- perplexity ----------------------------------------------------------------------------------------


def ppl_lean(s: Setup, batch_size: int = 4) -> float:
    """Σ NLL by lingregion's perplexity."""
    return evaluation.perplexity(s.m.module, s.eval_windows, batch_size, progress=False)["nll"]


@torch.inference_mode()
def ppl_naive(s: Setup, batch_size: int = 4) -> float:
    """Σ NLL by model(input_ids, labels=...): full-vocabulary logits for the whole batch."""
    nll = 0.0
    for ids in evaluation.batches(s.eval_windows, batch_size):
        ids = ids.to(s.m.device)
        nll += s.m.module(input_ids=ids, labels=ids).loss.double().item() * ids.shape[0] * (ids.shape[1] - 1)
    return nll


@torch.inference_mode()
def nll_exact(s: Setup, batch_size: int = 4) -> float:
    """Σ NLL with the fp32 logits' log-softmax taken in fp64: the reference both methods are held to."""
    logits_fn, nll = evaluation.output_head(s.m.module), 0.0
    for ids in evaluation.batches(s.eval_windows, batch_size):
        hidden, targets = evaluation.hidden_and_targets(s.m.module, ids.to(s.m.device))
        for i in range(0, len(targets), evaluation.LOGIT_CHUNK):
            logits = logits_fn(hidden[i : i + evaluation.LOGIT_CHUNK]).double()
            nll += torch.nn.functional.cross_entropy(
                logits, targets[i : i + evaluation.LOGIT_CHUNK], reduction="sum"
            ).item()
    return nll


def lmeval_available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def lmeval_harness(s: Setup, batch_size: int = 4):
    """lm-eval's Hugging Face backend, rolling windows of the same length over the same text."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    seq_len = len(s.eval_windows.input_ids[0])
    lm = HFLM(pretrained=s.m.module, tokenizer=s.m.tokenizer, batch_size=batch_size, max_length=seq_len)
    text = s.m.tokenizer.decode(torch.cat([w[1:] for w in s.eval_windows.input_ids]))
    request = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)
    return lambda: lm.loglikelihood_rolling([request], disable_tqdm=True)[0]


def lmeval_tokens(s: Setup) -> int:
    """Tokens lm-eval predicts for that text (its tokenization of the decoded windows)."""
    text = s.m.tokenizer.decode(torch.cat([w[1:] for w in s.eval_windows.input_ids]))
    return len(s.m.tokenizer(text, add_special_tokens=False)["input_ids"])


# --- regions -------------------------------------------------------------------------------------------


def region_switch(s: Setup, region) -> dict:
    """Seconds to build the edits of a region, to apply them and to undo them."""
    t0 = time.perf_counter()
    edits = interventions.removal(region, s.removed)
    t1 = time.perf_counter()
    handle = interventions.apply(s.m.module, edits)
    t2 = time.perf_counter()
    handle.undo()
    t3 = time.perf_counter()
    return {"build": t1 - t0, "apply": t2 - t1, "undo": t3 - t2, "entries": region.count(), "of": region.total()}


def select_lean(s: Setup, scope: str, side: str = "top", ratio: float = 0.03):
    return select(s.scores, ratio, side, scope)


def select_sort(s: Setup, scope: str, ratio: float = 0.03):
    """The baseline: a full descending sort (of each matrix, or of all scores concatenated)."""
    groups = [[n] for n in s.scores] if scope == "matrix" else [list(s.scores)]
    out = []
    for group in groups:
        flat = torch.cat([s.scores[n].reshape(-1) for n in group])
        order = torch.sort(flat, descending=True, stable=True).indices
        out.append(order[: round(ratio * flat.numel())])
    return out


# --- bfloat16 beside float32, and score storage --------------------------------------------------------


def region_agreement(reference: dict, other: dict, ratios=(0.01, 0.03), sides=("top", "bottom")) -> dict:
    """Jaccard of the per-matrix regions of `other` scores against those of `reference`, and whether they
    are the same entries, for each side and ratio."""
    out = {}
    for side in sides:
        for ratio in ratios:
            a, b = select(reference, ratio, side), select(other, ratio, side)
            same = all(torch.equal(a.packed[n], b.packed[n]) for n in a.packed)
            out[f"{side} {ratio:g}"] = {"jaccard": a.jaccard(b), "identical": same}
    return out


def score_file_roundtrip(scores: dict, path, precision: str) -> dict:
    """Write `scores` as a score file at `precision` and read it back: size, seconds and the scores read."""
    from lingregion import scorefile

    t0 = time.perf_counter()
    scorefile.save(path, scores, {"lang": "benchmark", "model_fingerprint": "benchmark"}, precision)
    t1 = time.perf_counter()
    back, meta = scorefile.load(path)
    t2 = time.perf_counter()
    n = sum(t.numel() for t in scores.values())
    size = path.stat().st_size
    return {
        "bytes": size,
        "bytes_per_parameter": size / n,
        "exact_share": scorefile.exact_share(meta),
        "save_seconds": t1 - t0,
        "load_seconds": t2 - t1,
        "scores": back,
    }
