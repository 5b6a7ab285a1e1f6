"""The run folder: config, scores, regions and results, reused when the same command runs again.

A run folder holds everything a result depends on: the resolved config, per-language scores, regions,
and results JSON that is rewritten (atomically) after every single evaluation, so an interrupted run
picks up where it stopped when the same command is given again.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import corpus, evaluation, importance, interventions, models, scorefile, scoring, uncertainty
from .config import Config
from .regions import Region, select
from .store import (
    LingregionError,
    digest,
    environment,
    read_cached,
    read_json,
    read_tensors,
    write_json,
    write_tensors,
)

ESTIMATOR_RECORDS = {"taylor": "taylor: |(θ − θ_removed) ⊙ Σ_windows ∂(mean token NLL)/∂θ|, fp32 accumulation"}
# Part of the key of every score and evaluation the run folder caches: raise it when what they compute, or how
# they are stored, changes, so that files made by the older code are recomputed rather than reused.
CACHE_VERSION = 3  # 3: split-half statistics on a sample of matrices, with intervals and the stable share
# The running core sum (a full fp32 copy) is written for resuming only once the languages since the last write took
# this long: a quick run never pays for it, and a long run killed midway loses at most this much.
CORE_RESUME_SECONDS = 120


def check_out(out: Path) -> None:
    """A run folder must be a folder: refuse an existing file, or a path under one, before anything is loaded
    or written."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LingregionError(f"{out} is a file, not a run folder; pass --out a folder (new or from an earlier run)")
    file = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if file is not None:
        raise LingregionError(f"{out} is under {file}, which is a file; pass --out a folder path")


class Run:
    """A run folder: config, scores, regions and results, reused when the same command runs again."""

    def __init__(self, out: Path, cfg: Config, lm: models.Model, progress: bool = True):
        out = Path(out)
        check_out(out)
        self.out, self.cfg, self.lm, self.progress = out, cfg, lm, progress
        self.model, self.tokenizer, self.info = lm.module, lm.tokenizer, lm.info
        self.names, self.removed = lm.names, lm.removed
        self._windows: dict[tuple[str, str], corpus.Windows] = {}
        self._core: dict[str, torch.Tensor] | None = None
        self._regions: dict[tuple, tuple[dict, Region]] = {}
        self._stability: dict[str, dict] = {}  # label → split-half statistics of a score
        self._core_halves: tuple[dict, dict] = ({}, {})  # Σ over the scored languages of each half's importance
        self._core_halved: set[str] = set()  # the languages in those sums (a score read from disk adds none)
        # the matrices whose scores keep split halves: a seeded sample, so that halves cost a share of the memory
        self.halved = uncertainty.matrix_sample(self.names, cfg.split_half_share, cfg.seed) if cfg.split_halves else []

    def windows(self, lang: str, split: str, budget: int | None = None) -> corpus.Windows:
        """A language's score or eval windows at `budget` tokens (the config's by default), loaded once per run."""
        budget = budget or (self.cfg.score_tokens if split == "score" else self.cfg.eval_tokens)
        key = (lang, split, budget)
        if key not in self._windows:
            cfg = self.cfg
            self._windows[key] = corpus.load_windows(
                self.tokenizer,
                lang,
                split,
                cfg.seq_len,
                budget,
                cfg.texts.get(lang),
                parallel=cfg.parallel,
                parallel_with=cfg.languages() if cfg.parallel else None,  # one aligned set for the whole run
                genres=cfg.genres or None,
                texts=cfg.texts,
            )
        return self._windows[key]

    def provenance(self, **extra) -> dict:
        """The model, the software versions and `extra`: the record every saved result starts with."""
        return {"model": self.info, "environment": environment(), **extra}

    def eval_record(self, langs: list[str], budget: int | None = None) -> dict:
        """How the perplexities of an experiment were measured: the protocol and each language's text."""
        return {
            "protocol": evaluation.protocol(self.windows(langs[0], "eval", budget), self.cfg.dtype),
            "eval_windows": {lang: self.windows(lang, "eval", budget).meta for lang in langs},
        }

    def save(self, name: str, result: dict) -> None:
        """results/NAME-summary.json: what the report is rebuilt from, with how it was made, and the digest of
        the config it was made under (the report flags a result whose digest is not that of config.yaml)."""
        write_json(
            self.out / "results" / f"{name}-summary.json",
            self.provenance(**result, config_digest=self.cfg.results_digest()),
        )

    def made_of(self, **what) -> dict:
        """The key of a cached score or evaluation: the model (its fingerprint and where it came from), the
        version of the code that computes it, the dtype, and `what` else it depends on."""
        info = self.info
        return {
            "fingerprint": info["fingerprint"],
            "revision": info.get("revision"),
            "version": CACHE_VERSION,
            "dtype": self.cfg.dtype,
            **what,
        }

    # --- scores -------------------------------------------------------------------------------------
    def scores(
        self, lang: str, budget: int | None = None, estimator: str = "taylor", exact: bool = False
    ) -> dict[str, torch.Tensor]:
        """One language's importance by `estimator`, computed once and kept in scores/LANG.safetensors
        (LANG-BUDGET for a budget other than the configured one; .ESTIMATOR before the suffix for an estimator
        other than the paper's taylor) at the configured `score_storage` (see `scorefile`). Read back from a
        compact file, every per-matrix Top / Bottom selection up to the run's largest region share is that of
        the fp32 scores; `exact=True` asks for the fp32 values themselves, and scores the language again if
        its file is not float32. Taylor scores keep split halves (`split_halves`); other estimators come from
        one `importance` pass over the same windows."""
        budget = None if budget == self.cfg.score_tokens else budget
        w = self.windows(lang, "score", budget)
        made_of = self.made_of(windows=w.meta, names=digest(self.names), estimator=estimator)
        if estimator == "taylor":  # its split-half statistics and half regions cover this sample of matrices
            made_of["halved"] = digest(self.halved)
        cfg = self.cfg
        share = max([*cfg.ratios, cfg.mono_ratio, cfg.struct_ratio, cfg.train_ratio, cfg.down_ratio])
        storage = cfg.score_storage if share < 0.5 else "float32"  # tails of half a matrix: keep it all
        label = f"{lang}-{budget}" if budget else lang
        path = self.out / "scores" / (label if estimator == "taylor" else f"{label}.{estimator}")
        path = path.with_name(path.name + ".safetensors")
        if loaded := read_cached(path, scorefile.load):
            tensors, meta = loaded
            good = scorefile.exact_share(meta) >= (1.0 if exact else share) or (
                not exact and storage == meta.get("precision") == "bfloat16"  # inexact by the user's choice
            )
            if meta.get("made_of") == made_of and good:
                if meta.get("stability"):
                    self._stability[label] = meta["stability"]
                return {n: tensors[n] for n in self.names}  # parameter order: ties and edits follow it
        t0 = time.time()
        stability = None
        if estimator != "taylor":
            s = importance.score(estimator, importance.Target(self.model, self.names, self.removed), [w], self.progress)
        else:
            s = scoring.score(
                self.model,
                w,
                self.names,
                self.removed,
                progress=self.progress,
                checkpoint=path.with_name(f".{path.stem}.partial.safetensors"),
                every=self.cfg.scale_checkpoint_every,
                halves=self.halved or False,
                model_fingerprint=self.info["fingerprint"],
            )
            if cfg.split_halves:
                stability = self._split_half(label, w, s.a, s.b)
                if budget is None and lang in cfg.score_langs:  # the core score's halves are these halves' sums
                    for total, half in zip(self._core_halves, (s.a, s.b)):
                        scoring.accumulate(total, half)
                    self._core_halved.add(lang)
                s = s.full
        scorefile.save(
            path,
            s,
            self.provenance(
                made_of=made_of,
                lang=lang,
                model_fingerprint=self.info["fingerprint"],
                estimator=ESTIMATOR_RECORDS.get(estimator, estimator),
                seconds=round(time.time() - t0, 1),
                stability=stability,
            ),
            storage,
            min(share, 0.49),
        )
        return s  # the fp32 scores as computed, whatever the file keeps

    def _split_half(self, label: str, w: corpus.Windows, a: dict, b: dict) -> dict:
        """Split-half stability of one score: the Jaccard of the halves' per-matrix Top sets at every share
        the run selects, and their Spearman correlation; the halves' Top mono_ratio sets are kept as regions
        (regions/halves/LABEL-{a,b}-top-RATIO) so that languages can be compared half against half later."""
        cfg = self.cfg
        stats, ranked = uncertainty.split_half(a, b, [*cfg.ratios, cfg.mono_ratio], cfg.seed)
        stats["tokens_per_half"] = [sum(len(ids) - 1 for ids in w.input_ids[k::2]) for k in (0, 1)]
        shapes, meta = {n: tuple(t.shape) for n, t in a.items()}, {"model": self.info["fingerprint"]}
        for k in "ab":
            region = Region.from_ranked(ranked[k], shapes, cfg.mono_ratio, meta)
            region.save(self.out / "regions" / "halves" / f"{label}-{k}-top-{cfg.mono_ratio:g}.safetensors")
        self._stability[label] = stats
        return stats

    def half_region(self, label: str, half: str) -> Region | None:
        """One half's Top mono_ratio set of a score made in this run folder (None if it was made without halves)."""
        path = self.out / "regions" / "halves" / f"{label}-{half}-top-{self.cfg.mono_ratio:g}.safetensors"
        return read_cached(path, Region.load)

    def stability_of_scores(self) -> dict:
        """Split-half stability of every score this run has made or read, and of the core score when every
        scored language's halves were computed in this process."""
        out = dict(self._stability)
        a, b = self._core_halves
        if a and self._core_halved == set(self.cfg.score_langs):
            out["core"] = uncertainty.split_half(a, b, [*self.cfg.ratios, self.cfg.mono_ratio], self.cfg.seed)[0]
        return out

    def core_scores(self) -> dict[str, torch.Tensor]:
        """Σ over the scored languages of their importance (the paper's core-region score), kept in
        memory once made (most experiments start from it) and in scores/core.safetensors. That file is
        written from the fp32 sum, so core regions stay exact however compact the per-language files are;
        while the sum is being built it is kept in fp32 after each language
        (scores/.core.partial.safetensors), so that an interrupted run resumes it."""
        if self._core is not None:
            return self._core
        cfg, langs = self.cfg, list(self.cfg.score_langs)
        made_of = self.made_of(  # the same inputs as each language's scores
            languages=langs,
            windows={lang: self.windows(lang, "score").meta for lang in langs},
            names=digest(self.names),
            estimator="taylor",
        )
        share = max([*cfg.ratios, cfg.struct_ratio, cfg.train_ratio, cfg.down_ratio])
        # a global selection may take more than `share` of one matrix: only float32 keeps it exact
        storage = cfg.score_storage if cfg.scope == "matrix" and share < 0.5 else "float32"
        path, partial = self.out / "scores" / "core.safetensors", self.out / "scores" / ".core.partial.safetensors"
        if loaded := read_cached(path, scorefile.load):
            tensors, meta = loaded
            good = scorefile.exact_share(meta) >= share or storage == meta.get("precision") == "bfloat16"
            if meta.get("made_of") == made_of and good:
                self._core = {n: tensors[n] for n in self.names}
                return self._core
        total: dict[str, torch.Tensor] = {}
        done: list[str] = []
        if loaded := read_cached(partial, read_tensors):
            tensors, meta = loaded
            if meta.get("made_of") == made_of and meta.get("done") == langs[: len(meta.get("done") or [])]:
                total, done = {n: tensors[n] for n in self.names}, list(meta["done"])
        t0 = saved = time.time()
        for lang in tqdm(langs[len(done) :], desc="scoring languages", disable=not self.progress):
            # fp32 values: the sum must be the fp32 one, bit for bit, whatever the language files keep
            scoring.accumulate(total, self.scores(lang, exact=True))
            done.append(lang)
            # The sum so far is a full fp32 copy: written only once the languages since the last write took
            # CORE_RESUME_SECONDS, so that a quick run never pays for it and a long one loses little when killed.
            if len(done) < len(langs) and time.time() - saved >= CORE_RESUME_SECONDS:
                write_tensors(partial, total, {"made_of": made_of, "done": done, "format": "lingregion-core-partial"})
                saved = time.time()
        scorefile.save(
            path,
            total,
            self.provenance(
                made_of=made_of,
                lang="+".join(langs),
                languages=langs,
                model_fingerprint=self.info["fingerprint"],
                estimator="Σ over languages of taylor importance, summed in fp32 in the order of 'languages'",
                seconds=round(time.time() - t0, 1),
            ),
            storage,
            min(share, 0.49),
        )
        partial.unlink(missing_ok=True)
        self._core = total
        return self._core

    def core_region(self, side: str, ratio: float, draw: int = 0) -> Region:
        """The Top / Bottom / Random `ratio` of the core score (see `region`), selected once per run: most
        experiments start from one, and summing and selecting cost more than a few evaluations on a CPU."""
        return self.region(self.core_scores(), side, ratio, "core", draw)

    def region(
        self, scores: dict[str, torch.Tensor], side: str, ratio: float, label: str = "core", draw: int = 0
    ) -> Region:
        """The Top / Bottom / Random `ratio` of `scores`, saved as regions/LABEL-SIDE-RATIO.safetensors and
        kept for the other experiments that ask for the same one. `draw` k > 0 is the k-th further Random
        region (seed + k), saved with a -seedN suffix."""
        key = (id(scores), label, side, ratio, draw)
        if key not in self._regions:
            meta = {
                "model": self.info["fingerprint"],
                "languages": self.cfg.score_langs,
                "estimator": "taylor",
                "label": label,
            }
            seed = self.cfg.seed + draw
            region = select(scores, ratio, side, self.cfg.scope, seed, meta)
            suffix = f"-seed{seed}" if draw else ""
            region.save(self.out / "regions" / f"{label}-{side}-{ratio:g}{suffix}.safetensors")
            self._regions[key] = (scores, region)  # holding `scores` keeps its id from being reused
        return self._regions[key][1]

    # --- evaluation -----------------------------------------------------------------------------------
    def evaluate(
        self,
        results_file: str,
        setting: str,
        edits: list[interventions.Edit],
        langs: list[str],
        budget: int | None = None,
    ) -> dict:
        """Perplexity of each language with `edits` applied; results are cached entry by entry, keyed by
        what they depend on (model, dtype, the exact edits and the evaluation text), so that changing one
        experiment's settings recomputes only what it changes."""
        path = self.out / "results" / results_file
        cache = read_cached(path, read_json) or {}
        cache.setdefault("entries", {})
        cache.setdefault("keys", {})
        made_of = self.made_of(
            edits=edits_digest(edits),
            block=evaluation.NLL_BLOCK,  # results without per-block NLL (older runs) are recomputed
        )
        keys = {lang: digest({**made_of, "windows": self.windows(lang, "eval", budget).meta}) for lang in langs}
        todo = [lang for lang in langs if cache["keys"].get(f"{setting}/{lang}") != keys[lang]]
        if todo:
            with interventions.applied(self.model, edits):
                for lang in todo:
                    partial = path.parent / ".partial" / f"{keys[lang]}.safetensors"
                    r = evaluation.perplexity(
                        self.model,
                        self.windows(lang, "eval", budget),
                        self.cfg.batch_size,
                        self.progress,
                        desc=f"{setting} {lang}",
                        checkpoint=partial,
                        every=self.cfg.scale_checkpoint_every,
                    )
                    cache["entries"][f"{setting}/{lang}"] = r
                    cache["keys"][f"{setting}/{lang}"] = keys[lang]
                    write_json(path, cache)
        return {lang: cache["entries"][f"{setting}/{lang}"] for lang in langs}


def edits_digest(edits: list[interventions.Edit]) -> str:
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
