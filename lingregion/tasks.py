"""Multiple-choice accuracy: the built-in parallel task, and any lm-eval task, on a model held in memory.

The built-in task `udhr_next` (data/tasks/udhr_next/SOURCES.md) asks, for a paragraph of the Universal
Declaration of Human Rights, which of four paragraphs comes next; the distractors are other articles of the
same translation. The items are parallel: the same context, candidates and answer position in 41 languages,
so accuracies are comparable across languages.

Scoring follows lm-eval's `multiple_choice` exactly, so that the direct evaluator here and lm-eval agree:
a candidate's score is the summed log-probability (fp32 logits, fp64 sums) of its tokens given the context,
where context + delimiter + candidate is tokenized as one string (with the tokenizer's own special tokens)
and the candidate's tokens are those after the context's. `acc` takes the highest sum; `acc_norm` the
highest sum per character of the candidate.

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
from .store import LingregionError, write_text

TASK = "udhr_next"
LMEVAL_PREFIX = "lingregion_udhr_next_"  # lm-eval name of the built-in task in one language
DELIMITER = "\n"  # between context and candidate: they are consecutive paragraphs


def _task_dir() -> Path:
    return Path(str(files("lingregion").joinpath("data", "tasks", TASK)))


def manifest() -> dict:
    return json.loads((_task_dir() / "manifest.json").read_text(encoding="utf-8"))


def languages() -> list[str]:
    return sorted(manifest()["languages"])


def items_path(lang: str) -> Path:
    if lang not in manifest()["languages"]:
        raise LingregionError(f"the {TASK} task has no language {lang!r}; it has {', '.join(languages())}")
    return _task_dir() / f"{lang}.jsonl.gz"


def load_items(lang: str, limit: int | None = None) -> list[dict]:
    """The task's items in one language: {id, article, context, choices, label, units}, in id order."""
    with gzip.open(items_path(lang), "rt", encoding="utf-8") as f:
        items = [json.loads(line) for line in f]
    return items[:limit] if limit else items


def encode(tokenizer, context: str, choice: str) -> tuple[list[int], list[int]]:
    """Context tokens and candidate tokens, split as lm-eval splits them: the whole string is tokenized
    once, and the candidate's tokens are those past the context's own tokenization."""
    whole = tokenizer(context + DELIMITER + choice).input_ids
    ctx = tokenizer(context).input_ids
    return whole[:len(ctx)], whole[len(ctx):]


def _sequences(tokenizer, items: list[dict]) -> list[tuple[list[int], int]]:
    """(token ids, number of candidate tokens) for every candidate of every item, in order."""
    out = []
    for item in items:
        for choice in item["choices"]:
            ctx, cont = encode(tokenizer, item["context"], choice)
            if not ctx or not cont:
                raise LingregionError(f"item {item.get('id')}: empty context or candidate after tokenization")
            out.append((ctx + cont, len(cont)))
    return out


@torch.inference_mode()
def loglikelihoods(model, tokenizer, items: list[dict], batch_size: int = 4, progress: bool = False,
                   desc: str = "") -> list[list[float]]:
    """log p(candidate | context) for every candidate of every item (fp32 logits, fp64 sums).

    Sequences are right-padded: under causal attention no real position sees the padding, so each
    candidate's score equals that of its sequence run alone.
    """
    seqs = _sequences(tokenizer, items)
    limit = getattr(model.config, "max_position_embeddings", None)
    longest = max(len(ids) for ids, _ in seqs)
    if limit and longest > limit:
        raise LingregionError(f"an item is {longest} tokens long, more than the model's {limit} positions")
    logits_fn = evaluation.output_head(model)
    device = next(model.parameters()).device
    scores = []
    bar = tqdm(total=len(items), desc=desc or "multiple choice", unit="item", disable=not progress, leave=False)
    for start in range(0, len(seqs), batch_size):
        group = seqs[start:start + batch_size]
        width = max(len(ids) for ids, _ in group)
        ids = torch.tensor([s + [0] * (width - len(s)) for s, _ in group], device=device)
        hidden = model.base_model(input_ids=ids)[0]
        for row, (s, n) in enumerate(group):
            # positions len-n-1 .. len-2 predict the candidate's n tokens
            h, targets = hidden[row, len(s) - n - 1:len(s) - 1], ids[row, len(s) - n:len(s)]
            scores.append(-evaluation.summed_nll(logits_fn, h, targets).item())
        bar.n = len(scores) // len(items[0]["choices"])
        bar.refresh()
    bar.close()
    out, i = [], 0
    for item in items:
        out.append(scores[i:i + len(item["choices"])])
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
    return {"acc": a, "acc_stderr": a_se, "acc_norm": b, "acc_norm_stderr": b_se, "items": len(items),
            "chance": sum(1 / len(it["choices"]) for it in items) / len(items)}


def evaluate(model, tokenizer, lang: str, items: list[dict] | None = None, limit: int | None = None,
             batch_size: int = 4, progress: bool = False) -> dict:
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


def lmeval(model, tokenizer, tasks: list[str], limit: int | None = None, batch_size: int = 4,
           num_fewshot: int | None = None, samples: bool = False) -> dict[str, dict]:
    """Run lm-eval tasks on the model object as it is now (a region removed or not), in process.

    `tasks` are lm-eval task names; `lingregion_udhr_next_<lang>` is the built-in task. Returns
    {task: {metric: value}} with lm-eval's filter suffix (",none") dropped; with `samples`, also each
    multiple-choice task's per-document log-likelihoods under "loglik" (in document order).
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise LingregionError("lm-eval is not installed; pip install lm-eval (or 'lingregion[lmeval]')") from None
    specs = [lmeval_config(t[len(LMEVAL_PREFIX):]) if t.startswith(LMEVAL_PREFIX) else t for t in tasks]
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        # bootstrap_iters only matters for metrics without a closed-form standard error (not accuracy)
        out = lm_eval.simple_evaluate(model=lm, tasks=specs, limit=limit, num_fewshot=num_fewshot,
                                      task_manager=_task_manager(), log_samples=samples, bootstrap_iters=1000)
    except KeyError as e:  # lm-eval's way of saying a task name is unknown
        raise LingregionError(f"lm-eval: {e.args[0]}; list the known tasks with `lm_eval ls tasks`") from None
    results = {task: {k.split(",")[0]: v for k, v in metrics.items() if "," in k}
               for task, metrics in out["results"].items()}
    for task, docs in (out.get("samples") or {}).items():
        if not docs or not isinstance(docs[0]["filtered_resps"][0], (tuple, list)):
            continue  # not a log-likelihood task (generation)
        ordered = sorted(docs, key=lambda d: d["doc_id"])
        results[task]["loglik"] = [[r[0] for r in d["filtered_resps"]] for d in ordered]
    return results
