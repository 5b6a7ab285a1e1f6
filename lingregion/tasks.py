"""Multiple-choice accuracy: the built-in parallel task, and any lm-eval task, on a model held in memory.

The built-in task `udhr_next` (data/tasks/udhr_next/SOURCES.md) gives the first ~60% of a paragraph of the
Universal Declaration of Human Rights and asks which of four endings completes it; the distractors are the
endings of paragraphs of other articles of the same translation. The items are parallel: the same
paragraphs, candidates and answer position in 41 languages, so accuracies are comparable across languages.

Scoring follows lm-eval's `multiple_choice` exactly, so that the direct evaluator here and lm-eval agree:
a candidate's score is the summed log-probability (fp32 logits, fp64 sums) of its tokens given the context.
Context + candidate is tokenized as one string (with the tokenizer's own special tokens), the candidate's
tokens are those past the context's own tokenization, and a space ending the context moves to the
candidate. `acc` takes the highest sum; `acc_norm` the highest sum per character of the candidate.

lm-eval runs in process: `lmeval(model, tokenizer, tasks)` hands the model object, with whatever region is
removed at that moment, to lm-eval's Hugging Face backend; nothing is written to disk.
"""

from __future__ import annotations

import functools
import gzip
import json
import math
from importlib.resources import files
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import evaluation
from .models import input_device
from .store import LingregionError, write_text

TASK = "udhr_next"
LMEVAL_PREFIX = "lingregion_udhr_next_"  # lm-eval name of the built-in task in one language
DELIMITER = ""  # context + ending is the paragraph (a context cut at a space keeps the space)


def _task_dir() -> Path:
    return Path(str(files("lingregion").joinpath("data", "tasks", TASK)))


def manifest() -> dict:
    """The built-in task's manifest.json: how its items were made, its version, and its languages."""
    return json.loads((_task_dir() / "manifest.json").read_text(encoding="utf-8"))


def languages() -> list[str]:
    """The languages the built-in task has, sorted."""
    return sorted(manifest()["languages"])


def items_path(lang: str) -> Path:
    """The gzipped JSONL file of one language's items, or a LingregionError naming the languages there are."""
    if lang not in manifest()["languages"]:
        raise LingregionError(f"the {TASK} task has no language {lang!r}; it has {', '.join(languages())}")
    return _task_dir() / f"{lang}.jsonl.gz"


def load_items(lang: str, limit: int | None = None) -> list[dict]:
    """The task's items in one language: {id, article, unit, context, choices, label, units}, in id order."""
    with gzip.open(items_path(lang), "rt", encoding="utf-8") as f:
        items = [json.loads(line) for line in f]
    return items[:limit] if limit else items


def encode(tokenizer, context: str, choice: str) -> tuple[list[int], list[int]]:
    """Context tokens and candidate tokens, as lm-eval's Hugging Face backend makes them: trailing spaces
    of the context move to the candidate, context + candidate is tokenized once, and the candidate's
    tokens are those past the length of the context's own tokenization."""
    n = len(context) - len(context.rstrip())
    if n:
        context, choice = context[:-n], context[-n:] + choice
    ctx = tokenizer(context).input_ids
    return ctx, tokenizer(context + DELIMITER + choice).input_ids[len(ctx) :]


def max_length(model) -> int | None:
    """Positions the model takes, found as lm-eval's Hugging Face backend finds them."""
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(model.config, attr, None):
            return getattr(model.config, attr)
    return None


def longest_candidate(tokenizer, items: list[dict]) -> int:
    """Tokens of the longest candidate: a model needs at least this many positions to score the items."""
    return max(len(encode(tokenizer, it["context"], c)[1]) for it in items for c in it["choices"])


def _sequences(tokenizer, items: list[dict], limit: int | None) -> list[tuple[list[int], list[int]]]:
    """(input ids, candidate ids) for every candidate of every item, in order. The input is context +
    candidate without its last token, cut from the left to `limit` positions if longer (as lm-eval does); its
    last len(candidate) positions predict the candidate."""
    out = []
    for item in items:
        for choice in item["choices"]:
            ctx, cont = encode(tokenizer, item["context"], choice)
            if not ctx or not cont:
                raise LingregionError(f"item {item.get('id')}: empty context or candidate after tokenization")
            if limit and len(cont) > limit:
                raise LingregionError(
                    f"item {item.get('id')}: a candidate of {len(cont)} tokens does not fit the "
                    f"model's {limit} positions"
                )
            out.append(((ctx + cont)[:-1][-limit:] if limit else (ctx + cont)[:-1], cont))
    return out


@torch.inference_mode()
def loglikelihoods(
    model, tokenizer, items: list[dict], batch_size: int = 16, progress: bool = False, desc: str = ""
) -> list[list[float]]:
    """log p(candidate | context) for every candidate of every item (fp32 logits, fp64 sums).

    `batch_size` sequences (context + one candidate) per forward pass, longest first so that little is
    padded. Padding is on the right: under causal attention no real position sees it, so each candidate's
    score equals that of its sequence run alone. A sequence longer than the model's positions loses the
    start of its context, as in lm-eval.
    """
    seqs = _sequences(tokenizer, items, max_length(model))
    evaluation.check_output_layer(model)
    device = input_device(model)
    order = sorted(range(len(seqs)), key=lambda i: (-len(seqs[i][0]), i))
    scores = [0.0] * len(seqs)
    bar = tqdm(total=len(seqs), desc=desc or "multiple choice", unit="cand", disable=not progress, leave=False)
    for start in range(0, len(order), batch_size):
        group = order[start : start + batch_size]
        width = len(seqs[group[0]][0])
        ids = torch.tensor([seqs[i][0] + [0] * (width - len(seqs[i][0])) for i in group], device=device)
        hidden = model.base_model(input_ids=ids)[0]
        h = torch.cat([hidden[row, len(seqs[i][0]) - len(seqs[i][1]) : len(seqs[i][0])] for row, i in enumerate(group)])
        targets = torch.cat([torch.tensor(seqs[i][1]) for i in group])
        nll = evaluation.token_nll(model, h, targets).double().cpu().split([len(seqs[i][1]) for i in group])
        for i, x in zip(group, nll):
            scores[i] = -x.sum().item()
        bar.update(len(group))
    bar.close()
    out, i = [], 0
    for item in items:
        out.append(scores[i : i + len(item["choices"])])
        i += len(item["choices"])
    return out


def _mean_and_stderr(hits: list[bool]) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation / √n), as lm-eval reports them."""
    n = len(hits)
    mean = sum(hits) / n
    var = sum((h - mean) ** 2 for h in hits) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)


def accuracy(items: list[dict], logliks: list[list[float]]) -> dict:
    """acc (highest summed log-probability) and acc_norm (highest per character), ties to the first."""

    def argmax(xs):
        return max(range(len(xs)), key=lambda k: (xs[k], -k))

    acc = [argmax(ll) == it["label"] for it, ll in zip(items, logliks)]
    norm = [argmax([x / len(c) for x, c in zip(ll, it["choices"])]) == it["label"] for it, ll in zip(items, logliks)]
    (a, a_se), (b, b_se) = _mean_and_stderr(acc), _mean_and_stderr(norm)
    return {
        "acc": a,
        "acc_stderr": a_se,
        "acc_norm": b,
        "acc_norm_stderr": b_se,
        "items": len(items),
        "chance": sum(1 / len(it["choices"]) for it in items) / len(items),
    }


def evaluate(
    model,
    tokenizer,
    lang: str,
    items: list[dict] | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> dict:
    """Accuracy of `model` on the built-in task in `lang` (or on the given items)."""
    items = items if items is not None else load_items(lang, limit)
    if not items:
        raise LingregionError(f"no items to evaluate for {lang}")
    logliks = loglikelihoods(model, tokenizer, items, batch_size, progress, desc=f"{TASK} {lang}")
    return {**accuracy(items, logliks), "lang": lang, "task": TASK, "loglik": logliks}


# --- lm-eval ------------------------------------------------------------------------------------------
def lmeval_config(lang: str, path: Path | None = None) -> dict:
    """lm-eval task definition of the built-in task in one language (the items of `path` if given)."""
    return {
        "task": LMEVAL_PREFIX + lang,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(Path(path) if path else items_path(lang))}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "target_delimiter": DELIMITER,
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")],
        "metadata": {"version": manifest()["version"]},
    }


def write_lmeval_tasks(out_dir: Path, langs: list[str] | None = None) -> list[Path]:
    """One lm-eval YAML per language, for `lm_eval --include_path OUT_DIR --tasks lingregion_udhr_next_ru`."""
    import yaml

    paths = []
    for lang in langs or languages():
        path = Path(out_dir) / f"{LMEVAL_PREFIX}{lang}.yaml"
        write_text(path, yaml.safe_dump(lmeval_config(lang), allow_unicode=True, sort_keys=False))
        paths.append(path)
    return paths


@functools.cache
def _task_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager()  # indexes lm-eval's thousands of task files: once per process


def check_lmeval_tasks(names: list[str]) -> None:
    """Refuse unknown task names before a long run starts (lm-eval itself fails only when it reaches them)."""
    try:
        known = set(_task_manager().all_tasks)
    except ImportError:
        raise LingregionError("lm-eval is not installed; pip install lm-eval (or 'lingregion[lmeval]')") from None
    for name in names:
        if name.startswith(LMEVAL_PREFIX):
            items_path(name[len(LMEVAL_PREFIX) :])
        elif name not in known:
            raise LingregionError(f"lm-eval has no task or group {name!r}; list them with `lm_eval ls tasks`")


def lmeval(
    model,
    tokenizer,
    tasks: list[str | dict],
    limit: int | None = None,
    batch_size: int = 4,
    num_fewshot: int | None = None,
    samples: bool = False,
) -> dict[str, dict]:
    """Run lm-eval tasks on the model object as it is now (a region removed or not), in process.

    `tasks` are lm-eval task names or task configs (dicts); `lingregion_udhr_next_<lang>` is the built-in
    task in one language. Returns {task: {metric: value}} with lm-eval's filter suffix (",none") dropped;
    with `samples`, also each multiple-choice task's per-document log-likelihoods ("loglik") and gold
    answers ("target"), in document order.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise LingregionError("lm-eval is not installed; pip install lm-eval (or 'lingregion[lmeval]')") from None
    specs = [
        lmeval_config(t[len(LMEVAL_PREFIX) :]) if isinstance(t, str) and t.startswith(LMEVAL_PREFIX) else t
        for t in tasks
    ]
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        # bootstrap_iters only matters for metrics without a closed-form standard error (not accuracy)
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=specs,
            limit=limit,
            num_fewshot=num_fewshot,
            task_manager=_task_manager(),
            log_samples=samples,
            bootstrap_iters=1000,
        )
    except KeyError as e:  # lm-eval's way of saying a task name is unknown
        raise LingregionError(f"lm-eval: {e.args[0]}; list the known tasks with `lm_eval ls tasks`") from None
    results = {
        task: {k.split(",")[0]: v for k, v in metrics.items() if "," in k} for task, metrics in out["results"].items()
    }
    for task, docs in (out.get("samples") or {}).items():
        if not docs or not isinstance(docs[0]["filtered_resps"][0], (tuple, list)):
            continue  # not a log-likelihood task (generation)
        ordered = sorted(docs, key=lambda d: d["doc_id"])
        results[task]["loglik"] = [[r[0] for r in d["filtered_resps"]] for d in ordered]
        results[task]["target"] = [d["target"] for d in ordered]
    return results
