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
from . import figures
from .regions import Region, matching, monolingual, select
from .store import LingregionError, environment, read_json, read_tensors, write_bytes, write_json, write_tensors

PAPER_SCORE_LANGS = ["ar", "es", "ru", "zh", "ko", "vi"]
PAPER_EVAL_LANGS = ["ar", "zh", "it", "ja", "ko", "fa", "pt", "ru", "es", "uk", "vi", "en"]
MONO_LANGS = PAPER_SCORE_LANGS + ["uk", "pt", "it", "ja"]  # so that related pairs exist
RELATED = {"ru": ["uk"], "uk": ["ru"], "es": ["pt", "it"], "pt": ["es", "it"], "it": ["es", "pt"],
           "zh": ["ja"], "ja": ["zh"]}
PROMPTS = {  # the paper's generation case, in several languages
    "en": "There are 365 days in a year and 12",
    "ar": "هناك 365 يومًا في السنة و 12",
    "zh": "一年有365天和12",
    "ru": "В году 365 дней и 12",
    "es": "Hay 365 días en un año y 12",
}
EXPERIMENTS = ["removal", "monolingual"]


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
    experiments: list[str] = field(default_factory=lambda: list(EXPERIMENTS))

    @classmethod
    def quick(cls, **overrides) -> "Config":
        return cls(**{"seq_len": 256, "score_tokens": 1024, "eval_tokens": 256, "mono_eval_tokens": 256, **overrides})

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise LingregionError(f"unknown config key(s): {', '.join(unknown)}; known keys are {', '.join(sorted(known))}")
        return cls(**d)

    def validate(self) -> None:
        if self.mono_focus not in self.mono_langs and "monolingual" in self.experiments:
            raise LingregionError(f"--mono-focus {self.mono_focus} is not among the monolingual languages "
                                  f"{','.join(self.mono_langs)}; add it or choose another")
        for r in self.ratios + [self.mono_ratio]:
            if not 0 < r < 1:
                raise LingregionError(f"ratio {r} is outside (0, 1); pass a fraction such as 0.01 for 1%")
        unknown = sorted(set(self.experiments) - set(EXPERIMENTS))
        if unknown:
            raise LingregionError(f"unknown experiment(s) {', '.join(unknown)}; choose from {', '.join(EXPERIMENTS)}")
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

    def windows(self, lang: str, split: str, budget: int | None = None) -> corpus.Windows:
        budget = budget or (self.cfg.score_tokens if split == "score" else self.cfg.eval_tokens)
        key = (lang, split, budget)
        if key not in self._windows:
            self._windows[key] = corpus.load_windows(self.m.tokenizer, lang, split, self.cfg.seq_len, budget,
                                                     self.cfg.texts.get(lang))
        return self._windows[key]

    def provenance(self, **extra) -> dict:
        return {"model": self.m.info, "environment": environment(), **extra}

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
            scoring.accumulate(total, self.scores(lang))
        return total

    def region(self, scores: dict[str, torch.Tensor], side: str, ratio: float, label: str = "core") -> Region:
        meta = {"model": self.m.info["fingerprint"], "languages": self.cfg.score_langs, "estimator": "taylor",
                "label": label}
        region = select(scores, ratio, side, self.cfg.scope, self.cfg.seed, meta)
        region.save(self.out / "regions" / f"{label}-{side}-{ratio:g}.safetensors")
        return region

    # --- evaluation -----------------------------------------------------------------------------------
    def evaluate(self, results_file: str, setting: str, edits: list[interventions.Edit], langs: list[str],
                 budget: int | None = None) -> dict:
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
                    r = evaluation.perplexity(self.m.model, self.windows(lang, "eval", budget), self.cfg.batch_size,
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
    regions, figs = {}, run.out / "figures"
    for ratio in cfg.ratios:
        for side in cfg.sides:
            region = run.region(core, side, ratio)
            if side == "top" and ratio == max(cfg.ratios):  # the paper's Figure 2 / 9 for the largest Top
                write_bytes(figs / "core-grid.png", figures.region_grid(region))
                q = next((n for n in region.packed if "q_proj" in n), None)
                if q:
                    head_dim = getattr(run.m.model.config, "head_dim", None)
                    write_bytes(figs / "core-q_proj.png", figures.region_heatmap(region, q, head_dim))
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
    write_bytes(figs / "removal.png", figures.removal_chart(result))
    write_json(run.out / "results" / "removal-summary.json", run.provenance(**result))
    return result


def generate(model, tokenizer, prompts: dict[str, str], max_new_tokens: int) -> dict[str, str]:
    """Greedy continuations of fixed prompts (the new text only)."""
    device = next(model.parameters()).device
    out = {}
    for lang, prompt in prompts.items():
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
        with torch.inference_mode():
            new = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
                                 if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
        out[lang] = tokenizer.decode(new[0, ids.shape[1]:], skip_special_tokens=True)
    return out


def _tops(run: Run, langs: list[str], budget: int | None) -> tuple[dict[str, Region], dict[str, torch.Tensor]]:
    """Each language's per-matrix Top set, and the summed score (for the core region), one language's
    scores in memory at a time."""
    tops, total = {}, {}
    for lang in tqdm(langs, desc="language Top sets", disable=not run.progress):
        s = run.scores(lang, budget)
        tops[lang] = select(s, run.cfg.mono_ratio, "top", meta={"model": run.m.info["fingerprint"], "languages": [lang],
                                                               "estimator": "taylor", "label": f"top-{lang}"})
        scoring.accumulate(total, s)
    return tops, total


def monolingual_regions(run: Run) -> dict:
    """Table 5 and beyond: each language's monolingual region S_L* = S_L − ∪ S_L', the languages ×
    languages interaction matrix of its removal, a same-size Bottom control, generation cases, and
    where the regions sit (overlaps, layers, matrix types)."""
    cfg, langs, evals = run.cfg, run.cfg.mono_langs, run.cfg.eval_langs
    budget, small = cfg.mono_eval_tokens, max(cfg.score_tokens // 4, cfg.seq_len)
    tops, core_scores = _tops(run, langs, None)
    core = select(core_scores, cfg.mono_ratio, "top", meta={"label": "core", "languages": langs})
    del core_scores
    monos = {lang: monolingual(tops, lang) for lang in langs}
    for lang, region in monos.items():
        region.save(run.out / "regions" / f"monolingual-{lang}-{cfg.mono_ratio:g}.safetensors")

    base = run.evaluate("monolingual.json", "base", [], evals, budget)
    removed = {lang: run.evaluate("monolingual.json", f"mono-{lang}", interventions.removal(monos[lang], run.removed),
                                  evals, budget) for lang in langs}
    ratio = {lang: {e: removed[lang][e]["ppl"] / base[e]["ppl"] for e in evals} for lang in langs}

    # Table 5 layout for the focus language at two scoring budgets; Bottom of the same size is the control.
    focus, table5 = cfg.mono_focus, {}
    for label, b in (("full", None), ("quarter", small)):
        f_tops = tops if b is None else _tops(run, langs, b)[0]
        f_mono = monos[focus] if b is None else monolingual(f_tops, focus)
        bottom = matching(run.scores(focus, b), f_mono, "bottom", {"label": f"bottom-like-mono-{focus}"})
        table5[label] = {
            "score_tokens": cfg.score_tokens if b is None else b,
            "entries": f_mono.count(),
            "top": run.evaluate("monolingual.json", f"mono-{focus}" if b is None else f"mono-{focus}@{b}",
                                interventions.removal(f_mono, run.removed), evals, budget),
            "bottom": run.evaluate("monolingual.json", f"bottom-{focus}@{b or cfg.score_tokens}",
                                   interventions.removal(bottom, run.removed), evals, budget),
        }

    generations = {"base": generate(run.m.model, run.m.tokenizer, PROMPTS, cfg.gen_tokens)}
    for lang in langs:
        with interventions.applied(run.m.model, interventions.removal(monos[lang], run.removed)):
            generations[f"mono-{lang}"] = generate(run.m.model, run.m.tokenizer, PROMPTS, cfg.gen_tokens)

    related = {}
    for lang in langs:
        kin = [r for r in RELATED.get(lang, []) if r in evals]
        rest = sorted(ratio[lang][e] for e in evals if e != lang and e not in kin)
        if kin and rest:
            related[lang] = {"related": {r: ratio[lang][r] for r in kin}, "others_median": rest[len(rest) // 2],
                             "own": ratio[lang].get(lang)}
    distributions = {"core": figures.region_distribution(core),
                     **{f"mono-{lang}": figures.region_distribution(monos[lang]) for lang in langs}}
    result = {
        "experiment": "monolingual",
        "languages": langs, "eval_languages": evals, "ratio": cfg.mono_ratio, "focus": focus,
        "sizes": {lang: {"entries": monos[lang].count(), "top_entries": tops[lang].count(),
                         "share": monos[lang].count() / monos[lang].total()} for lang in langs},
        "base": base, "removed": removed, "ppl_ratio": ratio, "table5": table5, "related": related,
        "jaccard": {a: {b: tops[a].jaccard(tops[b]) for b in langs} for a in langs},
        "distribution": distributions, "generations": generations, "prompts": PROMPTS,
        "protocol": evaluation.protocol(run.windows(evals[0], "eval", budget), cfg.dtype),
        "eval_windows": {e: run.windows(e, "eval", budget).meta for e in evals},
        "score_windows": {lang: run.windows(lang, "score").meta for lang in langs},
    }
    figs = run.out / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    write_bytes(figs / "interaction.png", figures.matrix_heatmap(
        langs, evals, [[ratio[a][e] for e in evals] for a in langs], "Perplexity ratio (removed / base)",
        "perplexity ratio", "monolingual region removed", "evaluation language", log=True))
    write_bytes(figs / "jaccard.png", figures.matrix_heatmap(
        langs, langs, [[result["jaccard"][a][b] for b in langs] for a in langs], f"Jaccard overlap of Top {cfg.mono_ratio:g} sets",
        "Jaccard", "language", "language"))
    write_bytes(figs / "distribution.png", figures.distribution_plot(
        {k: v for k, v in distributions.items() if k == "core" or k in {f"mono-{x}" for x in langs[:4]}}))
    write_json(run.out / "results" / "monolingual-summary.json", run.provenance(**result))
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
        results[name] = {"removal": removal, "monolingual": monolingual_regions}[name](run)
    write_json(out / "run.json", run.provenance(config=asdict(cfg), experiments=cfg.experiments,
                                                  seconds=round(time.time() - started, 1)))
    report.write(out)
    return results
