"""`lingregion train`: further pre-training of any causal LM on any text with any region held exactly fixed, through
the Hugging Face Trainer, tracking how much the other languages forget.

Training is the Trainer's own loop (AdamW with the paper's lr 5e-5, betas (0.9, 0.95) and weight decay 0.001,
none on norms and biases; gradient clipping and accumulation; fp32 or bf16 autocast) with the experiments'
schedule (`freezing.lr_factor`: linear warm-up, then half cosine) and `freezing.FreezeCallback`, so
`accelerate launch` and `torchrun` run it as they run any Trainer script. Only the transformer-layer
parameters are trained by default, as in the recovery and forgetting experiments. The perplexity of each
tracked language is measured at chosen steps into the Trainer's state, so a checkpoint carries the curve so
far, and a killed run given the same command again resumes from the last checkpoint. At the end the frozen
entries are compared bit for bit with the values they were held at.

The output folder is a plain Hugging Face model (loadable by transformers and lm-eval) with a model card
(README.md) and `train-summary.json`: every tracked language's perplexity before, during and after training,
with paired 95% intervals of its change, and the provenance of model, text, settings and region.
`compare` trains the same run with nothing frozen, the region frozen and a random region of the same size per
matrix frozen, and reads the forgetting of the untrained languages and the verdict off paired intervals; the
forgetting experiment of `reproduce` reads its verdict with the same functions.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
import zlib
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from transformers import TrainerCallback

from . import corpus, distributed, evaluation, export, figures, freezing, markup, models, uncertainty
from .corpus import Windows
from .regions import Region, monolingual, select
from .run import Run, digest
from .store import LingregionError, environment, read_json, sha256_bytes, write_bytes, write_json, write_text

SUMMARY = "train-summary.json"
COMPARE_SUMMARY = "compare-summary.json"
VALUES = ("current", "removed")  # hold the frozen region where it is, or at θ_removed (a removed region)
SETTINGS = {"none": "No freezing", "core": "Region frozen", "random": "Random frozen"}
_EVAL = "lingregion_eval"  # the key of a tracked-perplexity entry in the Trainer's log_history
_INT_OF_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# --- which region ------------------------------------------------------------------------------------------
def needs_scores(spec: str) -> bool:
    """Whether the `--freeze` region is made from a run folder's scores (core:..., mono:...)."""
    return spec.partition(":")[0] in ("core", "mono")


def region_for(spec: str, m: models.Model, run: Run | None = None) -> Region | None:
    """The region `--freeze` names: none; core:SIDE:RATIO (the core score's Top / Bottom / Random share,
    from the `run` folder's scores, scored first when missing); mono:L[:RATIO] (L's monolingual region among
    the run's mono_langs); or a region file, checked against the model."""
    kind, _, rest = spec.partition(":")
    if spec == "none":
        return None
    if kind == "core":
        side, _, ratio = rest.partition(":")
        return run.core_region(side, _ratio(spec, ratio))
    if kind == "mono":
        lang, _, ratio = rest.partition(":")
        share = _ratio(spec, ratio) if ratio else run.cfg.mono_ratio
        langs = list(dict.fromkeys([*run.cfg.mono_langs, lang]))
        run.cfg.check_languages(langs)
        tops = {code: select(run.scores(code), share, "top", meta={"model": m.info["fingerprint"]}) for code in langs}
        return monolingual(tops, lang)
    path = Path(spec)
    if not path.is_file():
        raise LingregionError(
            f"--freeze {spec}: not a region file, 'none', 'core:top:0.01' or 'mono:ru'; pass one of these"
        )
    region = Region.load(path)
    region.check_model(m.module, m.info["fingerprint"])
    return region


def _ratio(spec: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise LingregionError(f"--freeze {spec}: {value!r} is not a ratio; write e.g. core:top:0.01") from None


def random_like(region: Region, seed: int) -> Region:
    """A seeded random region with exactly as many entries in each parameter as `region`: the control that
    tells a region's effect from the effect of freezing that many entries at all."""
    masks = {}
    for n, shape in region.shapes.items():
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(n.encode()))
        numel = math.prod(shape)
        mask = torch.zeros(numel, dtype=torch.bool)
        mask[torch.randperm(numel, generator=g)[: region.count(n)]] = True
        masks[n] = mask.reshape(shape)
    return Region.from_masks(masks, {**region.meta, "label": "random-like", "side": "random", "seed": seed})


# --- the Trainer's rows, and the tracked perplexities -------------------------------------------------------
def rows(data):
    """Training rows for the Trainer: the full-length windows of `data` (a language's last window is usually
    short; equal lengths keep every step the same size), or a dataset of rows with input_ids as it is."""
    if not isinstance(data, Windows):
        return data
    full = max(len(w) for w in data.input_ids)
    return [{"input_ids": w} for w in data.input_ids if len(w) == full]


def _collate(batch: list[dict]) -> dict:
    """input_ids and the same ids as labels: a causal LM shifts its labels itself."""
    ids = torch.stack([torch.as_tensor(r["input_ids"]) for r in batch])
    return {"input_ids": ids, "labels": ids}


class Track(TrainerCallback):
    """Perplexity of each tracked language at the chosen steps (0: before the first update), appended to the
    Trainer's log_history, which every checkpoint saves: a resumed run continues the curve without measuring
    a step twice. Under several processes every rank takes part (evaluation splits the windows)."""

    def __init__(self, evals: Mapping[str, Windows], steps: list[int], batch_size: int, progress: bool):
        self.evals, self.steps, self.batch_size, self.progress = dict(evals), set(steps), batch_size, progress

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        """The step-0 evaluation, unless a resumed state already holds it."""
        self._measure(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        """An evaluation after this update, if it is one of the chosen steps (before the Trainer saves it)."""
        self._measure(state, model)

    def _measure(self, state, model) -> None:
        step = state.global_step
        if step not in self.steps or any(e.get("step") == step and _EVAL in e for e in state.log_history):
            return
        was_training = model.training
        model.eval()
        show = self.progress and distributed.is_main()
        results = {
            lang: evaluation.perplexity(model, w, self.batch_size, show, desc=f"eval {lang} @{step}")
            for lang, w in self.evals.items()
        }
        model.train(was_training)
        state.log_history.append({"step": step, _EVAL: results})


# --- one training run ---------------------------------------------------------------------------------------
def train(
    m: models.Model,
    data,
    freeze: Region | None = None,
    eval: Mapping[str, Windows] | None = None,
    *,
    values: str = "current",
    settings: freezing.TrainConfig | None = None,
    out: Path | None = None,
    trainable: list[str] | None = None,
    progress: bool = True,
) -> dict:
    """Further pre-train `m` on `data` (Windows, or a dataset of rows with input_ids) with `freeze` held
    bit-identical (`values` "current": where it is; "removed": at θ_removed), measuring the perplexity of each
    `eval` language at settings.eval_steps. Returns the summary (see the module docstring).

    With `out`, the trained model is written there as a plain Hugging Face folder with its model card and
    summary, and checkpoints go to out/checkpoints every settings.checkpoint_every steps: the same call after
    a kill resumes from the last one, and the same call after a finished run returns its summary without
    training (the trained model is the one in `out`). The model in memory is left trained, requires_grad as
    it was."""
    cfg = settings or freezing.TrainConfig(steps=100, eval_steps=[0, 100])
    cfg.validate()
    if values not in VALUES:
        raise LingregionError(f"--freeze-values {values!r}: use one of {', '.join(VALUES)}")
    evals = dict(eval or {})
    names = list(trainable or m.names)
    train_rows = rows(data)
    if len(train_rows) < cfg.batch_size:
        raise LingregionError(
            f"{len(train_rows)} full training windows, fewer than the batch size {cfg.batch_size}; pass more text"
        )
    held = _held(m, freeze, values)
    if out is None:  # nothing to resume into: no checkpoints
        cfg = freezing.TrainConfig(**{**asdict(cfg), "checkpoint_every": 0})
    signature = _signature(m, data, cfg, names, freeze, values, evals)
    if out is not None and (Path(out) / "config.json").is_file():  # a finished model: this run's, or refused
        prior = read_json(Path(out) / SUMMARY) if (Path(out) / SUMMARY).is_file() else {}
        if prior.get("signature") == signature:
            return prior
        other = "a model trained with other settings, text or region" if prior else "a model"
        raise LingregionError(f"{out} already holds {other}; pass another --out")
    with tempfile.TemporaryDirectory() as scratch:
        checkpoints = Path(out) / "checkpoints" if out is not None else Path(scratch)
        resume = _resume_point(checkpoints, signature) if out is not None else None
        t0 = time.time()
        flags = {n: p.requires_grad for n, p in m.module.named_parameters()}
        trainer = _trainer(m, train_rows, cfg, names, freeze, values, evals, checkpoints, progress)
        try:
            trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        finally:
            for n, p in m.module.named_parameters():
                p.requires_grad_(flags[n])
            m.module.eval()
        width = len(train_rows[0]["input_ids"])
        summary = _summary(m, data, cfg, names, freeze, values, evals, trainer.state.log_history, held, width)
        summary["signature"] = signature
        summary["seconds"] = round(time.time() - t0, 1)
        summary["resumed_from_step"] = int(resume.name.rpartition("-")[2]) if resume else None
    if out is not None and distributed.is_main():
        save(m, Path(out), summary)
        shutil.rmtree(checkpoints, ignore_errors=True)  # the model is kept; the optimizer state is not
    return summary


def _trainer(m, train_rows, cfg, names, freeze, values, evals, checkpoints: Path, progress: bool):
    """The Hugging Face Trainer of this run: only `names` trainable, the region frozen, the languages tracked."""
    from transformers import Trainer, TrainingArguments

    for n, p in m.module.named_parameters():
        p.requires_grad_(n in names)
    checkpoints.mkdir(parents=True, exist_ok=True)
    args = TrainingArguments(
        output_dir=str(checkpoints),
        max_steps=cfg.steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.accumulation,
        learning_rate=cfg.lr,
        adam_beta1=cfg.betas[0],
        adam_beta2=cfg.betas[1],
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.clip,
        bf16=cfg.dtype == "bfloat16",
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=m.device.type == "cpu",
        save_strategy="steps" if cfg.checkpoint_every else "no",
        save_steps=cfg.checkpoint_every or 1,
        save_total_limit=1,  # only the last checkpoint is needed to resume
        logging_strategy="steps",
        logging_steps=1,
        report_to="none",
        disable_tqdm=not (progress and distributed.is_main()),
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    callbacks = [Track(evals, cfg.eval_steps, cfg.eval_batch_size, progress)]
    if freeze is not None:
        callbacks.append(freezing.FreezeCallback(freeze, _hold_values(m, freeze, values)))

    class Scheduled(Trainer):
        """The Trainer with the experiments' schedule (`freezing.lr_factor`), whose warm-up moves the weights from
        the first update on; the Trainer's own cosine warm-up starts at lr 0, which wastes the first step."""

        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None:
                self.lr_scheduler = freezing.scheduler_for(optimizer or self.optimizer, cfg)
            return self.lr_scheduler

    return Scheduled(model=m.module, args=args, train_dataset=train_rows, data_collator=_collate, callbacks=callbacks)


def _hold_values(m: models.Model, region: Region, values: str) -> dict[str, float] | None:
    """What FreezeCallback writes into the region first: θ_removed for "removed", nothing for "current"."""
    return {n: m.removed.get(n, 0.0) for n in region.packed} if values == "removed" else None


def _held(m: models.Model, region: Region | None, values: str) -> dict[str, torch.Tensor]:
    """The values the frozen entries must have after training: as they are now, or θ_removed."""
    if region is None:
        return {}
    params = dict(m.module.named_parameters())
    out = {}
    for n in region.packed:
        now = params[n].detach().reshape(-1)[region.indices(n).to(params[n].device)].clone()
        out[n] = torch.full_like(now, m.removed.get(n, 0.0)) if values == "removed" else now
    return out


def _frozen_check(m: models.Model, region: Region | None, held: dict[str, torch.Tensor]) -> dict | None:
    """Whether every frozen entry ends bit-identical to the value it was held at (the bytes compared)."""
    if region is None:
        return None
    params = dict(m.module.named_parameters())
    moved = 0
    for n, want in held.items():
        got = params[n].detach().reshape(-1)[region.indices(n).to(params[n].device)]
        bits = _INT_OF_WIDTH[got.element_size()]  # the same width as integers: -0.0 ≠ 0.0 and NaN = NaN here
        moved += int((got.contiguous().view(bits) != want.contiguous().view(bits)).sum())
    return {"entries": region.count(), "moved": moved, "bit_identical": moved == 0}


def _resume_point(checkpoints: Path, signature: str) -> Path | None:
    """The last checkpoint of this very run, or None for a fresh start; checkpoints of another run are refused,
    so that a changed command never continues someone else's optimizer state."""
    from transformers.trainer_utils import get_last_checkpoint

    mark = checkpoints / "lingregion-signature.json"
    last = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    if last and (not mark.is_file() or read_json(mark).get("signature") != signature):
        raise LingregionError(
            f"{checkpoints} holds checkpoints of another training run (other model, text, region or settings); "
            "pass another --out, or delete that folder to start over"
        )
    write_json(mark, {"signature": signature})
    return Path(last) if last else None


def _signature(m, data, cfg, names, freeze, values, evals) -> str:
    """What a run's checkpoints and summary are valid for: model, text, settings, trainable names, region, values."""
    region = None
    if freeze is not None:
        region = sha256_bytes(b"".join(freeze.packed[n].numpy().tobytes() for n in sorted(freeze.packed)))
    text = data.meta if isinstance(data, Windows) else f"dataset of {len(data)} rows"
    return digest(
        {
            "model": m.info["fingerprint"],
            "data": text,
            "settings": asdict(cfg),
            "trainable": digest(names),
            "region": region,
            "values": values,
            "evals": {lang: w.meta for lang, w in evals.items()},
        }
    )


def _summary(m, data, cfg, names, freeze, values, evals, log_history, held, width: int) -> dict:
    """The record of a run: provenance, settings, the per-step history and every tracked perplexity."""
    steps = [e for e in log_history if "loss" in e and "step" in e]
    tracked = {str(e["step"]): e[_EVAL] for e in log_history if _EVAL in e}
    langs = list(evals)
    first, last = (min(tracked, key=int), max(tracked, key=int)) if tracked else (None, None)
    return {
        "experiment": "train",
        "model": m.info,
        "environment": environment(),
        "train_text": data.meta if isinstance(data, Windows) else {"rows": len(data)},
        "settings": {
            **asdict(cfg),
            "optimizer": "AdamW (Hugging Face Trainer), no weight decay on norms and biases",
            "schedule": "linear warm-up (the first update already moves), then half cosine: freezing.lr_factor",
        },
        "seed": cfg.seed,
        "trainable_parameters": sum(p.numel() for n, p in m.module.named_parameters() if n in set(names)),
        "samples": cfg.steps * cfg.samples_per_step,
        "tokens_trained": cfg.steps * cfg.samples_per_step * (width - 1),
        "frozen": None
        if freeze is None
        else {"region": freeze.meta, "values": values, **_frozen_check(m, freeze, held)},
        "history": {k: [e.get(k) for e in steps] for k in ("loss", "grad_norm", "learning_rate")},
        "languages": langs,
        "evals": tracked,
        "change": {
            lang: uncertainty.ratio_entry(tracked[last][lang], tracked[first][lang], cfg.seed)
            for lang in langs
            if first is not None and first != last
        },
        "eval_windows": {lang: w.meta for lang, w in evals.items()},
        "protocol": evaluation.protocol(next(iter(evals.values())), m.info.get("dtype", "float32")) if evals else None,
    }


# --- the output folder --------------------------------------------------------------------------------------
def save(m: models.Model, out: Path, summary: dict) -> None:
    """The trained model as a plain Hugging Face folder, with README.md (model card), the summary and its curve
    figure. Files are written into a temporary folder and moved in with config.json last, so `out` does not
    look like a model until the weights are all there."""
    out.mkdir(parents=True, exist_ok=True)
    # The summary and figure first: a folder with config.json is taken for a finished model on a rerun, so
    # config.json must be the very last file to arrive.
    if summary["evals"]:
        lang = summary["train_text"].get("lang")
        write_bytes(
            out / "figures" / "train.png", curve_figure(_curves({"train": summary}, lang), {"train": "trained"})
        )
    write_json(out / SUMMARY, summary)
    tmp = out / f".model.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        m.module.save_pretrained(tmp)
        m.tokenizer.save_pretrained(tmp)
        write_text(tmp / "README.md", model_card(summary))
        for f in sorted(tmp.iterdir(), key=lambda f: f.name == "config.json"):
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def model_card(summary: dict) -> str:
    """README.md of a trained folder: the base model, the text, the settings, the frozen region, the curves."""
    s, base, text = summary["settings"], summary["model"], summary["train_text"]
    frozen = summary["frozen"]
    held = (
        f"{frozen['entries']:,} entries ({frozen['region'].get('label', 'region')}, "
        f"{frozen['region'].get('side', '')} {frozen['region'].get('ratio', '')}) held at their "
        f"{frozen['values']} values: **{'bit-identical' if frozen['bit_identical'] else 'MOVED'}** after training"
        if frozen
        else "nothing frozen"
    )
    lines = [
        "---",
        "library_name: transformers",
        "tags: [lingregion, continued-pretraining]",
        "---",
        "",
        f"# {base.get('name')} further pre-trained with lingregion",
        "",
        f"Base: **{base.get('name')}** ({base.get('class')}, fingerprint `{base.get('fingerprint')}`). "
        f"Trained on {text.get('lang', 'user rows')} text ({text.get('source', '')}, SHA-256 "
        f"`{str(text.get('text_sha256', '—'))[:16]}…`) for {s['steps']} steps of {s['batch_size'] * s['accumulation']} "
        f"windows ({summary['samples']:,} samples, {summary['tokens_trained']:,} predicted tokens); lr {s['lr']:g}, "
        f"{s['warmup']} warm-up steps then cosine, betas {tuple(s['betas'])}, weight decay {s['weight_decay']:g}, "
        f"clip {s['clip']:g}, {s['dtype']}, seed {s['seed']}; {summary['trainable_parameters']:,} parameters "
        f"trained. Frozen: {held}. Licence: that of the base model.",
        "",
        "## Perplexity of the tracked languages",
        "",
        markup.markdown_table(*_change_table(summary)),
        "",
        f"Every number with its provenance: `{SUMMARY}`.",
        "",
        *export.LOAD_SNIPPET,
        "",
    ]
    return "\n".join(lines)


def _change_table(summary: dict) -> tuple[list[str], list[list[str]]]:
    """(head, rows): each tracked language's perplexity at each evaluated step, and the change with its interval."""
    steps = sorted(summary["evals"], key=int)
    head = ["Language"] + [f"step {s}" for s in steps] + ["after / before (95% interval)"]
    body = [
        [lang]
        + [markup.fmt(summary["evals"][s][lang]["ppl"]) for s in steps]
        + [markup.cell(summary["change"][lang]) if lang in summary["change"] else "—"]
        for lang in summary["languages"]
    ]
    return head, body


# --- nothing frozen, the region frozen, a random region frozen ---------------------------------------------
def compare(
    m: models.Model,
    data,
    region: Region,
    eval: Mapping[str, Windows],
    trained_lang: str | None = None,
    *,
    settings: list[str] | None = None,
    values: str = "current",
    config: freezing.TrainConfig | None = None,
    out: Path | None = None,
    progress: bool = True,
) -> dict:
    """The same training run with nothing frozen ("none"), `region` frozen ("core") and a seeded random region
    of the same size per parameter frozen ("random"), each from the same starting weights (restored after
    each), in out/SETTING when `out` is given. Returns the comparison: every tracked language's change per
    setting with paired intervals, the forgetting of the untrained languages (every tracked one but
    `trained_lang`) and the verdict on "freezing the region reduces forgetting"."""
    chosen = settings or list(SETTINGS)
    unknown = [s for s in chosen if s not in SETTINGS]
    if unknown or "none" not in chosen:
        raise LingregionError(
            f"--compare {','.join(chosen)}: name settings among {', '.join(SETTINGS)}, 'none' included (the control)"
        )
    cfg = config or freezing.TrainConfig(steps=100, eval_steps=[0, 100])
    if 0 not in cfg.eval_steps:
        cfg = freezing.TrainConfig(**{**asdict(cfg), "eval_steps": sorted({0, *cfg.eval_steps})})
    untrained = [lang for lang in eval if lang != trained_lang]
    if not untrained:
        raise LingregionError("--compare needs at least one tracked language other than the trained one (--eval-langs)")
    regions = {"none": None, "core": region, "random": random_like(region, cfg.seed)}
    params = dict(m.module.named_parameters())
    start = {n: params[n].detach().clone() for n in m.names}  # what train() changes: the trained parameters
    runs = {}
    for s in chosen:
        try:
            runs[s] = train(
                m,
                data,
                regions[s],
                eval,
                values=values if s != "none" else "current",
                settings=cfg,
                out=Path(out) / s if out is not None else None,
                progress=progress,
            )
        finally:
            with torch.no_grad():
                for n, t in start.items():
                    params[n].copy_(t)
    result = forgetting_table(runs, untrained, cfg.seed)
    result |= {
        "experiment": "train-compare",
        "trained_lang": trained_lang,
        "settings": {s: SETTINGS[s] for s in chosen},
        "runs": {s: {k: v for k, v in r.items() if k != "evals"} for s, r in runs.items()},
        "model": m.info,
        "environment": environment(),
    }
    if out is not None and distributed.is_main():
        labels = {s: SETTINGS[s] for s in chosen}
        write_bytes(Path(out) / "figures" / "compare.png", curve_figure(_curves(runs, trained_lang), labels))
        write_json(Path(out) / COMPARE_SUMMARY, result | {"curves": _curves(runs, trained_lang)})
    return result


def forgetting_table(runs: dict[str, dict], untrained: list[str], seed: int) -> dict:
    """Each language's change per setting (paired intervals), and the forgetting intervals and verdict."""
    first = next(iter(runs.values()))
    steps = sorted(first["evals"], key=int)
    start = first["evals"][steps[0]]
    ends = {s: r["evals"][steps[-1]] for s, r in runs.items()}
    table = {s: {lang: uncertainty.ratio_entry(ends[s][lang], start[lang], seed) for lang in start} for s in runs}
    intervals = forgetting_intervals(start, ends, untrained, seed)
    return {
        "languages": list(start),
        "untrained": untrained,
        "steps": [int(s) for s in steps],
        "change": table,
        "intervals": intervals,
        "verdict": forgetting_verdict(intervals, " at this training budget; train longer or at a higher lr")
        if "core_vs_random" in intervals and "core_vs_none" in intervals
        else None,
        "ci95_method": uncertainty.method_record(seed=seed),
        "verdict_rule": uncertainty.RULE,
    }


def forgetting_intervals(start: dict, ends: dict[str, dict], untrained: list[str], seed: int) -> dict:
    """95% intervals of the forgetting of each setting of `ends` (geometric mean over the untrained languages of
    end / start perplexity) and, where core is among them, of the ratios the finding compares (core / none,
    core / random). Each language's blocks are resampled once for all settings (they share the text; the draw
    depends on the seed and the blocks alone, not on which settings there are), languages independently
    (their texts differ); without blocks the intervals are None, with the reason."""
    settings = list(ends)
    draws, reason = {}, None
    for lang in untrained:
        logs, why = uncertainty.joint_log_ppl({"start": start[lang]} | {s: ends[s][lang] for s in settings}, seed)
        if logs is None:
            reason = reason or f"{lang}: {why}"
        draws[lang] = logs
    point = {
        s: float(np.mean([uncertainty.log_ppl(ends[s][lang]) - uncertainty.log_ppl(start[lang]) for lang in untrained]))
        for s in settings
    }
    boot = None
    if reason is None:
        boot = {s: np.mean([draws[lang][s] - draws[lang]["start"] for lang in untrained], axis=0) for s in settings}

    def entry(log_value: float, log_draws) -> dict:
        if log_draws is None:
            return {"value": math.exp(log_value), "ci95": None, "reason": reason}
        return {"value": math.exp(log_value), "ci95": [math.exp(v) for v in uncertainty.percentile(log_draws)]}

    out = {s: entry(point[s], boot and boot[s]) for s in settings}
    for other in ("none", "random"):
        if "core" in settings and other in settings:
            out[f"core_vs_{other}"] = entry(point["core"] - point[other], boot and boot["core"] - boot[other])
    return out


def forgetting_verdict(iv: dict, budget: str) -> dict:
    """The finding "freezing the region reduces forgetting" from 95% intervals (uncertainty.RULE):

    - it can be tested only when there is forgetting to reduce: the interval of the forgetting with nothing
      frozen lies above 1; otherwise the verdict is inconclusive, the reason ending with `budget` (what budget
      would decide);
    - it holds when the intervals of forgetting(core) / forgetting(none) and forgetting(core) / forgetting(random)
      both lie below 1, does not hold when either lies above 1, and is inconclusive otherwise."""
    if iv["none"].get("ci95") is None:
        return {"verdict": uncertainty.INCONCLUSIVE, "reason": iv["none"].get("reason")}
    parts = {k: uncertainty.verdict_of(iv[k], 1.0, "below") for k in ("core_vs_none", "core_vs_random")}
    forgot = uncertainty.verdict_of(iv["none"], 1.0, "above")
    if forgot != uncertainty.HOLDS:
        return {
            "verdict": uncertainty.INCONCLUSIVE,
            "parts": parts,
            "reason": "with nothing frozen the untrained languages did not measurably get worse (95% interval "
            f"{markup.cell(iv['none'])} does not lie above 1), so there was no forgetting to reduce" + budget,
        }
    return {"verdict": uncertainty.all_of(list(parts.values())), "parts": parts}


# --- report -------------------------------------------------------------------------------------------------
def _curves(runs: dict[str, dict], trained_lang: str | None = None) -> dict:
    """The curve figure's input: perplexity per setting and language at each evaluated step."""
    first = next(iter(runs.values()))
    steps = sorted(first["evals"], key=int)
    per_step = first["settings"]["batch_size"] * first["settings"]["accumulation"]
    return {
        "languages": first["languages"],
        "samples": [int(s) * per_step for s in steps],
        "train_lang": trained_lang,
        "base": {lang: {"ppl": first["evals"][steps[0]][lang]["ppl"]} for lang in first["languages"]},
        "table": {
            s: {"ppl": {lang: [r["evals"][k][lang]["ppl"] for k in steps] for lang in r["languages"]}}
            for s, r in runs.items()
        },
    }


def curve_figure(res: dict, labels: dict[str, str]) -> bytes:
    """One panel per language: perplexity against training samples, one line per setting."""
    langs, samples = res["languages"], res["samples"]
    fig, axes = figures.subplots(1, len(langs), figsize=(4.2 * len(langs), 3.6), squeeze=False)
    for ax, lang in zip(axes[0], langs):
        for setting, label in labels.items():
            ax.plot(samples, res["table"][setting]["ppl"][lang], marker="o", label=label)
        ax.axhline(res["base"][lang]["ppl"], color="grey", linestyle="--", linewidth=1, label="unmodified")
        ax.set_xscale("symlog", linthresh=max(1, min((s for s in samples if s > 0), default=1)))
        ax.set_yscale("log")
        ax.set_title(lang + (" (trained)" if lang == res["train_lang"] else ""))
        ax.set_xlabel("training samples")
        ax.set_ylabel("perplexity")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return figures.png(fig)


def section(summary: dict) -> list:
    """Report blocks of one training run: settings, the frozen region's check, the tracked perplexities, curves."""
    s, frozen = summary["settings"], summary["frozen"]
    check = (
        f"The {frozen['entries']:,} frozen entries ended **{'bit-identical' if frozen['bit_identical'] else 'moved'}** "
        f"({frozen['moved']:,} moved) to their {frozen['values']} values."
        if frozen
        else "Nothing was frozen."
    )
    return [
        markup.heading(f"Further pre-training on {summary['train_text'].get('lang', 'user rows')}"),
        markup.text(
            f"{s['steps']} steps of {s['batch_size'] * s['accumulation']} windows ({summary['samples']:,} samples), lr "
            f"{s['lr']:g}, {s['warmup']} warm-up steps then cosine, {s['dtype']}; "
            f"{summary['trainable_parameters']:,} parameters trained; {summary['seconds']:.0f} s. {check}"
        ),
        markup.table(
            *_change_table(summary),
            caption="Perplexity of each tracked language at each evaluated step, and after / before with its paired "
            "95% interval (block bootstrap on the same text).",
        ),
        markup.figure("figures/train.png", "Perplexity (log scale) against training samples, per tracked language."),
    ]


def compare_section(result: dict) -> list:
    """Report blocks of a comparison: each language's change per setting, the forgetting, the verdict."""
    langs, iv, v = result["languages"], result["intervals"], result["verdict"]
    head = ["Setting"] + [lang + (" (trained)" if lang == result["trained_lang"] else "") for lang in langs]
    head.append("forgetting (geo. mean, untrained)")
    body = [
        [label] + [markup.cell(result["change"][s][lang]) for lang in langs] + [markup.cell(iv[s])]
        for s, label in result["settings"].items()
    ]
    verdict = (
        f"Freezing the region reduces forgetting: **{v['verdict']}**" + (f" ({v['reason']})" if v.get("reason") else "")
        if v
        else "No verdict: compare none, core and random to read one."
    )
    compared = (
        f" Forgetting core / none {markup.cell(iv['core_vs_none'])}, core / random {markup.cell(iv['core_vs_random'])}."
        if "core_vs_none" in iv
        else ""
    )
    return [
        markup.heading("Forgetting: nothing frozen, the region frozen, a random region of the same size frozen"),
        markup.table(
            head,
            body,
            caption="After / before training, with paired 95% intervals; forgetting is the geometric mean over the "
            "untrained languages. " + uncertainty.RULE,
        ),
        markup.text(verdict + "." + compared),
        markup.figure("figures/compare.png", "Perplexity (log scale) against training samples, one line per setting."),
    ]


def windows_for(m: models.Model, text: str, split: str, seq_len: int, tokens: int, texts: dict[str, str]) -> Windows:
    """Windows of `text`: a language (built-in, or given as --lang L=PATH), or a path / hf:DATASET of its own."""
    lang, path = (text, texts.get(text)) if text in corpus.builtin_languages() or text in texts else ("text", text)
    if path is not None and not path.startswith("hf:") and not Path(path).is_file():
        raise LingregionError(
            f"--text {text}: neither a built-in language ({', '.join(corpus.builtin_languages())}) nor a file; "
            "pass a language code, a .txt/.jsonl/.parquet file or hf:DATASET"
        )
    return corpus.load_windows(m.tokenizer, lang, split, seq_len, tokens, path)
