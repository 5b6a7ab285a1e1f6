"""The paper's experiments, each a function composing corpus → scoring → regions → interventions →
evaluation, and the run folder that makes them resumable.

Each experiment lives in its own module and registers an `Experiment`: a function Run → result dict
(saved as results/NAME-summary.json) and a function result → report blocks, so that the report can be
rebuilt from saved results alone.

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
from typing import Callable

import torch
from tqdm.auto import tqdm

from .. import corpus, evaluation, interventions, models, scoring
from ..regions import Region, select
from ..store import LingregionError, environment, read_json, read_tensors, write_json, write_tensors, write_text

PAPER_SCORE_LANGS = ["ar", "es", "ru", "zh", "ko", "vi"]
PAPER_EVAL_LANGS = ["ar", "zh", "it", "ja", "ko", "fa", "pt", "ru", "es", "uk", "vi", "en"]
MONO_LANGS = PAPER_SCORE_LANGS + ["uk", "pt", "it", "ja"]  # so that related pairs exist


@dataclass(frozen=True)
class Experiment:
    """One experiment: `run` computes and saves a result dict, `section` turns a saved result into report
    blocks, `findings` into headline sentences, and `validate` rejects a config it cannot run."""

    name: str
    run: Callable[["Run"], dict]
    section: Callable[[dict], list]
    doc: str
    findings: Callable[[dict], list[str]] | None = None
    validate: Callable[["Config"], None] | None = None


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
    mono_langs: list[str] = field(default_factory=lambda: list(MONO_LANGS))
    mono_ratio: float = 0.03  # size of each language's own Top set before the set difference
    mono_eval_tokens: int = 1024  # per language and setting, for the interaction matrix
    mono_focus: str = "ru"  # the language of the Table 5 layout
    gen_tokens: int = 16
    scale_checkpoint_every: int = 4  # windows between saves of a scoring/evaluation job's running sums
    struct_dims: list[int] = field(default_factory=lambda: [1, 3, 5, 10])  # N_d, rows/columns removed per space
    struct_families: list[str] = field(default_factory=lambda: ["feature", "feature+ffn", "head"])
    struct_mode: str = "common"  # one index shared by the matrices of a space, or "matrix": one per matrix
    struct_ratio: float = 0.03  # the core Top region whose entries rank rows/columns
    struct_langs: list[str] = field(default_factory=lambda: ["zh", "ru", "en"])  # structural and outliers
    struct_eval_tokens: int = 512  # per language and setting (at most eval_tokens)
    outlier_layers: int = 4  # input norms of the first N layers are scanned
    outlier_scan_tokens: int = 512  # per language, scoring split, one forward pass
    outlier_confirm: int = 5  # scan candidates confirmed by perplexity
    outlier_controls: int = 2  # random input-norm entries perturbed as controls
    outlier_dims: int = 2  # most massive residual dimensions removed whole (and as many random ones)
    est_estimators: list[str] = field(default_factory=lambda: ["taylor", "taylor-window", "fisher", "magnitude",
                                                               "wanda", "lape"])
    est_ratios: list[float] = field(default_factory=lambda: [1e-6, 1e-5, 1e-4, 1e-3, 1e-2])  # damage curve
    est_overlap_ratio: float = 0.01  # Jaccard overlap of the estimators' regions at this share
    est_tokens: int = 2048  # per language, one pass for every estimator (and each control)
    est_seq_len: int | None = None  # window length of that pass (None: seq_len)
    est_eval_langs: list[str] = field(default_factory=lambda: ["ru", "zh", "ja", "en"])
    est_eval_tokens: int = 512  # per language and setting
    est_control_lang: str = "en"  # the specificity control's single language (none of the scored ones)
    est_outlier_dims: int = 2  # most massive residual dimensions as a control (0: none)
    train_lang: str = "zh"  # further pre-trained on, in the recovery (Table 2) and forgetting experiments
    train_other: str = "en"  # the untrained language of the recovery table (the paper: English)
    train_track: list[str] = field(default_factory=lambda: ["en", "ru", "es"])  # untrained, tracked for forgetting
    train_ratio: float = 0.01  # Top / Bottom / Random share of the core score removed or frozen (the paper: 1%)
    train_samples: list[int] = field(default_factory=lambda: [0, 6, 12, 24])  # paper: 0,2000,5000,...,200000
    train_batch: int = 2  # windows per forward/backward
    train_accum: int = 1  # forward/backward passes per step (the paper: 256 samples per step)
    train_lr: float = 5e-5
    train_warmup: int = 2  # steps (the paper: 100)
    train_precision: str = "float32"  # or bfloat16 autocast with fp32 master weights (the paper: bf16)
    train_eval_tokens: int = 512  # per language and evaluation point
    train_checkpoint_every: int = 50  # training steps between checkpoints (0: none)
    down_langs: list[str] = field(default_factory=lambda: ["ar", "zh", "ru", "en"])  # multiple-choice task
    down_items: int | None = 16  # items per language (None: all 50)
    down_ratio: float = 0.01  # Top / Bottom / Random share of the core score removed
    down_mono: bool = True  # also remove the saved monolingual regions of down_langs
    down_batch: int = 16  # sequences (context + one candidate) per forward pass
    down_lmeval_tasks: list[str] = field(default_factory=list)  # lm-eval task names, run in process per setting
    down_lmeval_limit: int | None = None  # documents per lm-eval task (None: all)
    experiments: list[str] = field(default_factory=lambda: list(EXPERIMENTS))

    # The small preset: every experiment adds the overrides that bring it within the --quick budget.
    QUICK = {"seq_len": 256, "score_tokens": 1024, "eval_tokens": 256, "mono_eval_tokens": 256, "gen_tokens": 8,
             "train_samples": [0, 2, 4], "train_batch": 1, "train_warmup": 1, "train_eval_tokens": 256,
             "train_track": ["en"],
             "eval_langs": ["ar", "zh", "ja", "ru", "uk", "es", "pt", "en"],
             "mono_langs": ["ar", "zh", "ru", "uk", "es", "pt"],
             "est_ratios": [1e-6, 1e-2], "est_tokens": 128, "est_seq_len": 64, "est_eval_langs": ["ru", "en"],
             "est_eval_tokens": 256,
             "struct_dims": [1, 10], "struct_langs": ["zh", "en"], "struct_eval_tokens": 256,
             "outlier_scan_tokens": 256, "outlier_confirm": 3, "outlier_controls": 1, "outlier_dims": 1,
             "down_items": 5, "down_mono": False}

    @classmethod
    def quick(cls, **overrides) -> "Config":
        return cls(**{**cls.QUICK, **overrides})

    @classmethod
    def from_dict(cls, d: dict, quick: bool = False) -> "Config":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise LingregionError(f"unknown config key(s): {', '.join(unknown)}; known keys are {', '.join(sorted(known))}")
        return cls.quick(**d) if quick else cls(**d)

    @staticmethod
    def read(path: Path) -> dict:
        """The keys of a YAML config file (a run folder's config.yaml, or one written by hand)."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise LingregionError(f"{path}: config file not found")
        try:
            d = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise LingregionError(f"{path}: not valid YAML ({str(e).splitlines()[0]}); fix the file") from None
        if not isinstance(d, dict):
            raise LingregionError(f"{path}: a config is a mapping of keys such as 'score_tokens: 4096', not {type(d).__name__}")
        return d

    def to_yaml(self) -> str:
        import yaml

        return ("# lingregion run config: repeat with `lingregion reproduce --config THIS_FILE --out DIR`\n"
                + yaml.safe_dump(asdict(self), sort_keys=False, allow_unicode=True))

    def validate(self) -> None:
        for r in self.ratios + [self.mono_ratio]:
            if not 0 < r < 1:
                raise LingregionError(f"ratio {r} is outside (0, 1); pass a fraction such as 0.01 for 1%")
        unknown = sorted(set(self.experiments) - set(EXPERIMENTS))
        if unknown:
            raise LingregionError(f"unknown experiment(s) {', '.join(unknown)}; choose from {', '.join(EXPERIMENTS)}")
        for name in self.experiments:
            if EXPERIMENTS[name].validate:
                EXPERIMENTS[name].validate(self)
        builtin = set(corpus.builtin_languages())
        for lang in dict.fromkeys(self.score_langs + self.eval_langs + self.mono_langs):
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
        self._core: dict[str, torch.Tensor] | None = None
        self._regions: dict[tuple, tuple[dict, Region]] = {}

    def windows(self, lang: str, split: str, budget: int | None = None) -> corpus.Windows:
        budget = budget or (self.cfg.score_tokens if split == "score" else self.cfg.eval_tokens)
        key = (lang, split, budget)
        if key not in self._windows:
            self._windows[key] = corpus.load_windows(self.m.tokenizer, lang, split, self.cfg.seq_len, budget,
                                                     self.cfg.texts.get(lang))
        return self._windows[key]

    def provenance(self, **extra) -> dict:
        return {"model": self.m.info, "environment": environment(), **extra}

    def eval_record(self, langs: list[str], budget: int | None = None) -> dict:
        """How the perplexities of an experiment were measured: the protocol and each language's text."""
        return {"protocol": evaluation.protocol(self.windows(langs[0], "eval", budget), self.cfg.dtype),
                "eval_windows": {lang: self.windows(lang, "eval", budget).meta for lang in langs}}

    def save(self, name: str, result: dict) -> None:
        """results/NAME-summary.json: what the report is rebuilt from, with how it was made."""
        write_json(self.out / "results" / f"{name}-summary.json", self.provenance(**result))

    # --- scores -------------------------------------------------------------------------------------
    def scores(self, lang: str, budget: int | None = None) -> dict[str, torch.Tensor]:
        """The paper's importance for one language, computed once and kept in scores/LANG.safetensors
        (scores/LANG-BUDGET.safetensors for a budget other than the configured one)."""
        budget = None if budget == self.cfg.score_tokens else budget
        w = self.windows(lang, "score", budget)
        made_of = {"fingerprint": self.m.info["fingerprint"], "windows": w.meta, "names": _digest(self.names),
                   "dtype": self.cfg.dtype, "estimator": "taylor"}
        path = self.out / "scores" / (f"{lang}-{budget}.safetensors" if budget else f"{lang}.safetensors")
        if path.is_file():
            tensors, meta = read_tensors(path)
            if meta.get("made_of") == made_of:
                return {n: tensors[n] for n in self.names}  # parameter order: ties and edits follow it
        t0 = time.time()
        s = scoring.score(self.m.model, w, self.names, self.removed, progress=self.progress,
                          checkpoint=path.with_name(f".{path.stem}.partial.safetensors"),
                          every=self.cfg.scale_checkpoint_every)
        write_tensors(path, s, self.provenance(
            made_of=made_of, format="lingregion-scores-v1", lang=lang, model_fingerprint=self.m.info["fingerprint"],
            estimator="taylor: |(θ − θ_removed) ⊙ Σ_windows ∂(mean token NLL)/∂θ|, fp32 accumulation",
            score_dtype="float32", seconds=round(time.time() - t0, 1)))
        return s

    def core_scores(self) -> dict[str, torch.Tensor]:
        """Σ over the scored languages of their importance (the paper's core-region score), kept in
        memory once made: most experiments start from it."""
        if self._core is None:
            total: dict[str, torch.Tensor] = {}
            for lang in tqdm(self.cfg.score_langs, desc="scoring languages", disable=not self.progress):
                scoring.accumulate(total, self.scores(lang))
            self._core = total
        return self._core

    def region(self, scores: dict[str, torch.Tensor], side: str, ratio: float, label: str = "core") -> Region:
        """The Top / Bottom / Random `ratio` of `scores`, saved as regions/LABEL-SIDE-RATIO.safetensors and
        kept for the other experiments that ask for the same one."""
        key = (id(scores), label, side, ratio)
        if key not in self._regions:
            meta = {"model": self.m.info["fingerprint"], "languages": self.cfg.score_langs, "estimator": "taylor",
                    "label": label}
            region = select(scores, ratio, side, self.cfg.scope, self.cfg.seed, meta)
            region.save(self.out / "regions" / f"{label}-{side}-{ratio:g}.safetensors")
            self._regions[key] = (scores, region)  # holding `scores` keeps its id from being reused
        return self._regions[key][1]

    # --- evaluation -----------------------------------------------------------------------------------
    def evaluate(self, results_file: str, setting: str, edits: list[interventions.Edit], langs: list[str],
                 budget: int | None = None) -> dict:
        """Perplexity of each language with `edits` applied; results are cached entry by entry, keyed by
        what they depend on (model, dtype, the exact edits and the evaluation text), so that changing one
        experiment's settings recomputes only what it changes."""
        path = self.out / "results" / results_file
        cache = read_json(path) if path.is_file() else {}
        cache.setdefault("entries", {})
        cache.setdefault("keys", {})
        made_of = {"fingerprint": self.m.info["fingerprint"], "dtype": self.cfg.dtype, "edits": _edits_digest(edits)}
        keys = {lang: _digest({**made_of, "windows": self.windows(lang, "eval", budget).meta}) for lang in langs}
        todo = [lang for lang in langs if cache["keys"].get(f"{setting}/{lang}") != keys[lang]]
        if todo:
            with interventions.applied(self.m.model, edits):
                for lang in todo:
                    partial = path.parent / ".partial" / f"{keys[lang]}.safetensors"
                    r = evaluation.perplexity(self.m.model, self.windows(lang, "eval", budget), self.cfg.batch_size,
                                              self.progress, desc=f"{setting} {lang}", checkpoint=partial,
                                              every=self.cfg.scale_checkpoint_every)
                    cache["entries"][f"{setting}/{lang}"] = r
                    cache["keys"][f"{setting}/{lang}"] = keys[lang]
                    write_json(path, cache)
        return {lang: cache["entries"][f"{setting}/{lang}"] for lang in langs}


def _edits_digest(edits: list[interventions.Edit]) -> str:
    """What a list of edits does, as a short hash (a value of None stands for "held where it is")."""
    h = hashlib.sha256()
    for e in edits:
        h.update(e.name.encode())
        h.update(e.index.detach().cpu().numpy().tobytes())
        if torch.is_tensor(e.value):
            h.update(e.value.detach().cpu().float().numpy().tobytes())
        else:
            h.update(repr(None if e.value is None else float(e.value)).encode())
    return h.hexdigest()[:16]


def reproduce(cfg: Config, out: Path, progress: bool = True) -> dict:
    """Run the configured experiments on one model and write results and the report into `out`."""
    from .. import report

    cfg.validate()
    out = Path(out)
    started = time.time()
    model = models.load(cfg.model, cfg.dtype, cfg.device, cfg.trust_remote_code)
    run = Run(out, cfg, model, progress)
    write_text(out / "config.yaml", cfg.to_yaml())
    results, seconds = {}, {}
    for name in [n for n in EXPERIMENTS if n in cfg.experiments]:  # registry order: later ones reuse earlier caches
        t0 = time.time()
        results[name] = EXPERIMENTS[name].run(run)
        seconds[name] = round(time.time() - t0, 1)
    write_json(out / "run.json", run.provenance(config=asdict(cfg), experiments=cfg.experiments,
                                                  seconds=round(time.time() - started, 1),
                                                  experiment_seconds=seconds))
    report.write(out)
    return results


from . import downstream, estimators, monolingual, removal, structure, training  # noqa: E402  (the modules import Run and Experiment from here)

EXPERIMENTS: dict[str, Experiment] = {e.name: e for module in (removal, monolingual, structure, estimators, training, downstream)
                                      for e in module.EXPERIMENTS}
