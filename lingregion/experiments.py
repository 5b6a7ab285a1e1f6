"""The paper's experiments, each a function composing corpus → scoring → regions → interventions →
evaluation, and the run folder that makes them resumable.

A run folder holds everything a result depends on: the resolved config, per-language scores, regions,
and results JSON that is rewritten (atomically) after every single evaluation, so an interrupted run
picks up where it stopped when the same command is given again.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import corpus, evaluation, interventions, models, scoring
from .regions import Region, select
from .store import LingregionError, environment, read_json, read_tensors, write_json, write_tensors

PAPER_SCORE_LANGS = ["ar", "es", "ru", "zh", "ko", "vi"]
PAPER_EVAL_LANGS = ["ar", "zh", "it", "ja", "ko", "fa", "pt", "ru", "es", "uk", "vi", "en"]
EXPERIMENTS = ["removal"]


@dataclass
class Config:
    """Everything a run depends on. `quick()` is the small preset; every field can be overridden."""

    model: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    trust_remote_code: bool = False
    score_langs: list[str] = field(default_factory=lambda: list(PAPER_SCORE_LANGS))
    eval_langs: list[str] = field(default_factory=lambda: list(PAPER_EVAL_LANGS))
    texts: dict[str, str] = field(default_factory=dict)  # lang → user text path; built-in corpus otherwise
    seq_len: int = 512
    score_tokens: int = 4096  # per language
    eval_tokens: int = 2048  # per language and setting
    batch_size: int = 4
    ratios: list[float] = field(default_factory=lambda: [0.01, 0.03])
    sides: list[str] = field(default_factory=lambda: ["top", "bottom", "random"])
    scope: str = "matrix"
    include: str | None = None
    exclude: str | None = None
    seed: int = 0
    experiments: list[str] = field(default_factory=lambda: list(EXPERIMENTS))

    @classmethod
    def quick(cls, **overrides) -> "Config":
        return cls(**{"score_tokens": 512, "eval_tokens": 256, **overrides})

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise LingregionError(f"unknown config key(s): {', '.join(unknown)}; known keys are {', '.join(sorted(known))}")
        return cls(**d)

    def validate(self) -> None:
        for r in self.ratios:
            if not 0 < r < 1:
                raise LingregionError(f"ratio {r} is outside (0, 1); pass a fraction such as 0.01 for 1%")
        unknown = sorted(set(self.experiments) - set(EXPERIMENTS))
        if unknown:
            raise LingregionError(f"unknown experiment(s) {', '.join(unknown)}; choose from {', '.join(EXPERIMENTS)}")
        builtin = set(corpus.builtin_languages())
        for lang in dict.fromkeys(self.score_langs + self.eval_langs):
            if lang not in builtin and lang not in self.texts:
                raise LingregionError(f"unknown language {lang!r}; built-in languages are {', '.join(sorted(builtin))}, "
                                      f"or pass your own text as --lang {lang}=PATH")
        if self.seq_len < 2 or self.score_tokens < 1 or self.eval_tokens < 1 or self.batch_size < 1:
            raise LingregionError("--seq-len must be ≥ 2 and token budgets and --batch-size ≥ 1")


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Run:
    """A run folder: config, scores, regions and results, reused when the same command runs again."""

    def __init__(self, out: Path, cfg: Config, model: models.Model, progress: bool = True):
        self.out, self.cfg, self.m, self.progress = Path(out), cfg, model, progress
        self.names = models.scored_names(model.model, cfg.include, cfg.exclude)
        self.removed = models.removed_values(model.model, self.names)
        self._windows: dict[tuple[str, str], corpus.Windows] = {}

    def windows(self, lang: str, split: str) -> corpus.Windows:
        key = (lang, split)
        if key not in self._windows:
            budget = self.cfg.score_tokens if split == "score" else self.cfg.eval_tokens
            self._windows[key] = corpus.load_windows(self.m.tokenizer, lang, split, self.cfg.seq_len, budget,
                                                     self.cfg.texts.get(lang))
        return self._windows[key]

    def provenance(self, **extra) -> dict:
        return {"model": self.m.info, "environment": environment(), **extra}

    # --- scores -------------------------------------------------------------------------------------
    def scores(self, lang: str) -> dict[str, torch.Tensor]:
        """The paper's importance for one language, computed once and kept in scores/LANG.safetensors."""
        w = self.windows(lang, "score")
        made_of = {"fingerprint": self.m.info["fingerprint"], "windows": w.meta, "names": _digest(self.names),
                   "dtype": self.cfg.dtype, "estimator": "taylor"}
        path = self.out / "scores" / f"{lang}.safetensors"
        if path.is_file():
            tensors, meta = read_tensors(path)
            if meta.get("made_of") == made_of:
                return tensors
        t0 = time.time()
        s = scoring.score(self.m.model, w, self.names, self.removed, progress=self.progress)
        write_tensors(path, s, self.provenance(
            made_of=made_of, format="lingregion-scores-v1", lang=lang, model_fingerprint=self.m.info["fingerprint"],
            estimator="taylor: |(θ − θ_removed) ⊙ Σ_windows ∂(mean token NLL)/∂θ|, fp32 accumulation",
            score_dtype="float32", seconds=round(time.time() - t0, 1)))
        return s

    def core_scores(self) -> dict[str, torch.Tensor]:
        """Σ over the scored languages of their importance (the paper's core-region score)."""
        total: dict[str, torch.Tensor] = {}
        for lang in tqdm(self.cfg.score_langs, desc="scoring languages", disable=not self.progress):
            for n, t in self.scores(lang).items():
                total[n] = total[n].add_(t) if n in total else t.clone()
        return total

    def region(self, scores: dict[str, torch.Tensor], side: str, ratio: float, label: str = "core") -> Region:
        meta = {"model": self.m.info["fingerprint"], "languages": self.cfg.score_langs, "estimator": "taylor",
                "label": label}
        region = select(scores, ratio, side, self.cfg.scope, self.cfg.seed, meta)
        region.save(self.out / "regions" / f"{label}-{side}-{ratio:g}.safetensors")
        return region

    # --- evaluation -----------------------------------------------------------------------------------
    def evaluate(self, results_file: str, setting: str, edits: list[interventions.Edit], langs: list[str]) -> dict:
        """Perplexity of each language with `edits` applied; results are cached entry by entry."""
        path = self.out / "results" / results_file
        key_of = _digest({"fingerprint": self.m.info["fingerprint"], "cfg": asdict(self.cfg)})
        cache = read_json(path) if path.is_file() else {}
        if cache.get("config_digest") != key_of:
            cache = {"config_digest": key_of, "entries": {}}
        out = {}
        todo = [lang for lang in langs if f"{setting}/{lang}" not in cache["entries"]]
        if todo:
            with interventions.applied(self.m.model, edits):
                for lang in todo:
                    r = evaluation.perplexity(self.m.model, self.windows(lang, "eval"), self.cfg.batch_size,
                                              self.progress, desc=f"{setting} {lang}")
                    cache["entries"][f"{setting}/{lang}"] = r
                    write_json(path, cache)
        for lang in langs:
            out[lang] = cache["entries"][f"{setting}/{lang}"]
        return out


def removal(run: Run) -> dict:
    """Table 1: perplexity of every evaluation language with the Top / Bottom / Random k% of the core
    score removed, against the unmodified model, and what the removed entries were before removal."""
    cfg, langs = run.cfg, run.cfg.eval_langs
    core = run.core_scores()
    params = dict(run.m.model.named_parameters())
    table = {"base": run.evaluate("removal.json", "base", [], langs)}
    regions = {}
    for ratio in cfg.ratios:
        for side in cfg.sides:
            region = run.region(core, side, ratio)
            setting = f"{side}@{ratio:g}"
            table[setting] = run.evaluate("removal.json", setting, interventions.removal(region, run.removed), langs)
            already = sum(int((params[n].detach().reshape(-1)[region.indices(n)] == run.removed[n]).sum())
                          for n in region.packed)
            regions[setting] = {"entries": region.count(), "of": region.total(),
                                "already_at_removed_value": already / max(region.count(), 1)}
    zero = sum(int((params[n] == run.removed[n]).sum()) for n in run.names)
    result = {
        "experiment": "removal",
        "settings": list(table),
        "languages": langs,
        "table": table,
        "regions": regions,
        "scored_parameters": sum(params[n].numel() for n in run.names),
        "share_already_at_removed_value": zero / sum(params[n].numel() for n in run.names),
        "protocol": evaluation.protocol(run.windows(langs[0], "eval"), cfg.dtype),
        "eval_windows": {lang: run.windows(lang, "eval").meta for lang in langs},
        "score_windows": {lang: run.windows(lang, "score").meta for lang in cfg.score_langs},
    }
    write_json(run.out / "results" / "removal-summary.json", run.provenance(**result))
    return result


def reproduce(cfg: Config, out: Path, progress: bool = True) -> dict:
    """Run the configured experiments on one model and write results and the report into `out`."""
    from . import report

    cfg.validate()
    out = Path(out)
    started = time.time()
    model = models.load(cfg.model, cfg.dtype, cfg.device, cfg.trust_remote_code)
    run = Run(out, cfg, model, progress)
    write_json(out / "config.json", asdict(cfg))
    results = {}
    for name in cfg.experiments:
        results[name] = {"removal": removal}[name](run)
    write_json(out / "run.json", run.provenance(config=asdict(cfg), experiments=cfg.experiments,
                                                  seconds=round(time.time() - started, 1)))
    report.write(out)
    return results
