"""The run folder: config, scores, regions and results, reused when the same command runs again.

A run folder holds everything a result depends on: the resolved config, per-language scores, regions,
and results JSON that is rewritten (atomically) after every single evaluation, so an interrupted run
picks up where it stopped when the same command is given again.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import corpus, evaluation, interventions, models, scoring
from ..config import Config
from ..regions import Region, select
from ..store import (
    LingregionError,
    environment,
    read_json,
    read_tensors,
    write_json,
    write_tensors,
)


def digest(obj) -> str:
    """A short, stable hash of any JSON-able value: the key under which cached results are kept."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_out(out: Path) -> None:
    """A run folder must be a folder: refuse an existing file before anything is loaded or written."""
    if Path(out).exists() and not Path(out).is_dir():
        raise LingregionError(f"{out} is a file, not a run folder; pass --out a folder (new or from an earlier run)")


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

    def windows(self, lang: str, split: str, budget: int | None = None) -> corpus.Windows:
        """A language's score or eval windows at `budget` tokens (the config's by default), loaded once per run."""
        budget = budget or (self.cfg.score_tokens if split == "score" else self.cfg.eval_tokens)
        key = (lang, split, budget)
        if key not in self._windows:
            self._windows[key] = corpus.load_windows(
                self.tokenizer, lang, split, self.cfg.seq_len, budget, self.cfg.texts.get(lang)
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
        """results/NAME-summary.json: what the report is rebuilt from, with how it was made."""
        write_json(self.out / "results" / f"{name}-summary.json", self.provenance(**result))

    # --- scores -------------------------------------------------------------------------------------
    def scores(self, lang: str, budget: int | None = None) -> dict[str, torch.Tensor]:
        """The paper's importance for one language, computed once and kept in scores/LANG.safetensors
        (scores/LANG-BUDGET.safetensors for a budget other than the configured one)."""
        budget = None if budget == self.cfg.score_tokens else budget
        w = self.windows(lang, "score", budget)
        made_of = {
            "fingerprint": self.info["fingerprint"],
            "windows": w.meta,
            "names": digest(self.names),
            "dtype": self.cfg.dtype,
            "estimator": "taylor",
        }
        path = self.out / "scores" / (f"{lang}-{budget}.safetensors" if budget else f"{lang}.safetensors")
        if path.is_file():
            tensors, meta = read_tensors(path)
            if meta.get("made_of") == made_of:
                return {n: tensors[n] for n in self.names}  # parameter order: ties and edits follow it
        t0 = time.time()
        s = scoring.score(
            self.model,
            w,
            self.names,
            self.removed,
            progress=self.progress,
            checkpoint=path.with_name(f".{path.stem}.partial.safetensors"),
            every=self.cfg.scale_checkpoint_every,
        )
        write_tensors(
            path,
            s,
            self.provenance(
                made_of=made_of,
                format="lingregion-scores-v1",
                lang=lang,
                model_fingerprint=self.info["fingerprint"],
                estimator="taylor: |(θ − θ_removed) ⊙ Σ_windows ∂(mean token NLL)/∂θ|, fp32 accumulation",
                score_dtype="float32",
                seconds=round(time.time() - t0, 1),
            ),
        )
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
            meta = {
                "model": self.info["fingerprint"],
                "languages": self.cfg.score_langs,
                "estimator": "taylor",
                "label": label,
            }
            region = select(scores, ratio, side, self.cfg.scope, self.cfg.seed, meta)
            region.save(self.out / "regions" / f"{label}-{side}-{ratio:g}.safetensors")
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
        cache = read_json(path) if path.is_file() else {}
        cache.setdefault("entries", {})
        cache.setdefault("keys", {})
        made_of = {"fingerprint": self.info["fingerprint"], "dtype": self.cfg.dtype, "edits": _editsdigest(edits)}
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


def _editsdigest(edits: list[interventions.Edit]) -> str:
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
