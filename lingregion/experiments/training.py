"""Further pre-training one language with regions removed or frozen, shared by the recovery (Table 2) and
forgetting experiments: the config's training run, one cached training setting, its perplexity curves and the
record of how it was trained (the curve figure is `pretraining.curve_figure`, shared with `lingregion train`).

Only the transformer-layer parameters are trained (the embedding and the LM head tied to it, 170M of
Gemma 3 270M's 268M parameters, stay fixed), which keeps a CPU step affordable; the paper trained
everything. Each setting starts from the unmodified model and leaves it unmodified: the trained
parameters are copied before and written back after, whatever happens in between. Finished settings
are cached in results/, and a setting interrupted mid-training resumes from checkpoints/ (every
`train_checkpoint_every` steps), so rerunning the same command continues.
"""

from __future__ import annotations

import math
from dataclasses import asdict

import torch

from .. import freezing, interventions, markup, models
from ..regions import Region
from ..run import Run, digest, edits_digest
from ..store import LingregionError, read_json, write_json

PAPER_SAMPLES = [0, 2000, 5000, 10000, 20000, 50000, 200000]


# --- configuration ----------------------------------------------------------------------------------------
def validate_training(cfg) -> None:
    """Refuse sample counts that are not increasing or share a step, a bad ratio, or a trained tracked language."""
    samples = cfg.train_samples
    if not samples or min(samples) < 0 or max(samples) < 1 or sorted(set(samples)) != list(samples):
        raise LingregionError(
            f"train_samples {samples} must be increasing sample counts ≥ 0 with one ≥ 1, e.g. 0,2000,5000,10000"
        )
    if not 0 < cfg.train_ratio < 1:
        raise LingregionError(f"train_ratio {cfg.train_ratio} is outside (0, 1); pass a fraction such as 0.01")
    if cfg.train_lang == cfg.train_other or cfg.train_lang in cfg.train_track:
        raise LingregionError(
            f"the training language {cfg.train_lang} cannot also be an untrained language; "
            "choose other train_other / train_track languages (config keys)"
        )
    if not cfg.train_track:
        raise LingregionError("train_track needs at least one untrained language to measure forgetting")
    if cfg.train_eval_tokens < 1:
        raise LingregionError("train_eval_tokens must be ≥ 1")
    train_config(cfg).validate()
    if len(set(eval_steps(cfg))) != len(cfg.train_samples):
        raise LingregionError(
            f"train_samples {samples} fall on the same training step at "
            f"{cfg.train_batch * cfg.train_accum} samples per step; space them further apart"
        )


def eval_steps(cfg) -> list[int]:
    """The training step after which each requested sample count is reached (rounded up)."""
    per_step = cfg.train_batch * cfg.train_accum
    return [math.ceil(s / per_step) for s in cfg.train_samples]


def train_config(cfg) -> freezing.TrainConfig:
    """The training run the config asks for, evaluated after each requested sample count."""
    steps = eval_steps(cfg)
    return freezing.TrainConfig(
        steps=max(steps),
        lr=cfg.train_lr,
        warmup=cfg.train_warmup,
        batch_size=cfg.train_batch,
        accumulation=cfg.train_accum,
        dtype=cfg.train_dtype,
        seed=cfg.seed,
        eval_steps=[s for s in steps if s > 0],
        eval_batch_size=cfg.batch_size,
        checkpoint_every=cfg.train_checkpoint_every,
    )


# --- one training setting -----------------------------------------------------------------------------------
def trained(
    run: Run, name: str, setting: str, edits: list[interventions.Edit], frozen: Region | None, values, langs: list[str]
) -> dict:
    """Train on cfg.train_lang from the model with `edits` applied and `frozen` held (at `values`), and
    return the history with the perplexity of `langs` at each evaluation step. Cached in
    results/NAME-train.json; the model is restored exactly afterwards."""
    cfg, model = run.cfg, run.model
    trainable = models.scored_names(model)
    data = run.windows(cfg.train_lang, "score", max(cfg.train_samples) * cfg.seq_len)
    evals = {lang: run.windows(lang, "eval", cfg.train_eval_tokens) for lang in langs}
    # Keyed on what the result depends on, so that unrelated config changes keep finished settings.
    key = digest(
        {
            "fingerprint": run.info["fingerprint"],
            "train": asdict(train_config(cfg)),
            "data": data.meta,
            "evals": {lang: w.meta for lang, w in evals.items()},
            "trainable": digest(trainable),
            "edits": edits_digest(edits),
            "frozen": edits_digest(_hold(frozen, values)),
        }
    )
    path = run.out / "results" / f"{name}-train.json"
    cache = read_json(path) if path.is_file() else {}
    if cache.get(setting, {}).get("key") == key:
        return cache[setting]["history"]
    params = dict(model.named_parameters())
    saved = {n: params[n].detach().clone() for n in dict.fromkeys(trainable + run.names)}
    checkpoint = run.out / "checkpoints" / f"{name}-{setting}.safetensors"
    try:
        interventions.apply(model, edits)  # undone below by writing back every parameter it can touch
        history = freezing.train(
            model,
            data,
            train_config(cfg),
            trainable,
            frozen=frozen,
            frozen_values=values,
            evals=evals,
            checkpoint=checkpoint,
            progress=run.progress,
            desc=f"{name} {setting}",
        )
    finally:
        with torch.no_grad():
            for n, t in saved.items():
                params[n].copy_(t)
    cache[setting] = {"key": key, "history": history}
    write_json(path, cache)
    checkpoint.unlink(missing_ok=True)  # the result is kept; the 12-bytes-per-parameter state is not
    return history


def _hold(frozen: Region | None, values) -> list[interventions.Edit]:
    """The frozen region as edits (value None: held at whatever it is), for the cache key."""
    if frozen is None:
        return []
    return [interventions.Edit(n, frozen.indices(n), None if values is None else values[n]) for n in frozen.packed]


def curves(run: Run, name: str, setting: str, start: dict, history: dict, langs: list[str], metric: str) -> dict:
    """{lang: [metric at each requested sample count]}: the step-0 evaluation, then the history's."""
    steps = eval_steps(run.cfg)
    return {
        lang: [start[lang][metric] if s == 0 else history["evals"][str(s)][lang][metric] for s in steps]
        for lang in langs
    }


def final(run: Run, start: dict, history: dict) -> dict:
    """Each language's perplexity result (with its blocks, if the history kept them) at the last sample count."""
    last = eval_steps(run.cfg)[-1]
    return start if last == 0 else history["evals"][str(last)]


def training_record(run: Run, histories: dict[str, dict]) -> dict:
    """How the settings were trained: samples, hyperparameters, tokens, data and each setting's history."""
    cfg, first = run.cfg, next(iter(histories.values()))
    return {
        "train_lang": cfg.train_lang,
        "samples": [s * first["samples_per_step"] for s in eval_steps(cfg)],
        "requested_samples": cfg.train_samples,
        "hyperparameters": {
            **asdict(train_config(cfg)),
            "optimizer": "AdamW, no weight decay on 1-D parameters",
            "schedule": "linear warm-up, then half cosine",
            "trained": "transformer-layer parameters",
        },
        "trainable_parameters": first["trainable_parameters"],
        "seq_len": cfg.seq_len,
        "tokens_per_step": first["tokens_per_step"],
        "train_windows": run.windows(cfg.train_lang, "score", max(cfg.train_samples) * cfg.seq_len).meta,
        "epochs": first["epochs"],
        "history": {
            s: {k: h[k] for k in ("loss", "grad_norm", "lr", "seconds", "frozen_entries", "frozen_bytes")}
            for s, h in histories.items()
        },
    }


def change(values: list[float]) -> str:
    """A curve's first and last value and their ratio: 12.3 → 10.1 (×0.821)."""
    return f"{markup.fmt(values[0])} → {markup.fmt(values[-1])} (×{values[-1] / values[0]:.3f})"
