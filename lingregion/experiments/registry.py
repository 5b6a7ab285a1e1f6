"""The registered experiments, in the order `reproduce` runs them.

Each experiment is a module that follows one protocol (`Experiment`): `NAME`, `measure(Run) → result`
(computes the result through the run folder and saves it), `section(result) → report parts` and,
optionally, `findings(result) → sentences` and `validate(Config)`. The registry is the only place that
imports them all: experiments never import each other (what two of them share lives in a named helper
module of this package, `training` or `ranking`), and the report reads them through `EXPERIMENTS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

from ..config import EXPERIMENT_NAMES, Config
from ..run import Run
from ..store import LingregionError
from . import (
    downstream,
    estimators,
    forgetting,
    monolingual,
    outliers,
    recovery,
    removal,
    stability,
    structural,
)

REQUIRED = ("NAME", "measure", "section")
OPTIONAL = ("findings", "validate")


@dataclass(frozen=True)
class Experiment:
    """One experiment: `measure` computes and saves a result, `section` turns a saved result into report
    parts, `findings` into headline sentences, and `validate` rejects a config it cannot run."""

    name: str
    measure: Callable[[Run], dict]
    section: Callable[[dict], list]
    findings: Callable[[dict], list[str]] | None = None
    validate: Callable[[Config], None] | None = None

    @classmethod
    def of(cls, module: ModuleType) -> Experiment:
        """The experiment a module defines, checked against the protocol: a module that lacks a required
        name or defines one that is not callable is a programming error, named here."""
        missing = [a for a in REQUIRED if not hasattr(module, a)]
        uncallable = [a for a in REQUIRED[1:] + OPTIONAL if hasattr(module, a) and not callable(getattr(module, a))]
        if missing or uncallable:
            raise TypeError(f"{module.__name__} is not an experiment: missing {missing}, not callable {uncallable}")
        return cls(module.NAME, module.measure, module.section, *(getattr(module, a, None) for a in OPTIONAL))


_MODULES = (removal, stability, monolingual, structural, outliers, recovery, forgetting, downstream, estimators)
EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in map(Experiment.of, _MODULES)}
if list(EXPERIMENTS) != EXPERIMENT_NAMES:
    raise TypeError(f"config.EXPERIMENT_NAMES {EXPERIMENT_NAMES} must list the registered {list(EXPERIMENTS)} in order")


def validate(cfg: Config) -> None:
    """Check a config for the experiments it selects: unknown languages first, then budgets and ratios, then
    each selected experiment's own rules, so that only what will run is checked."""
    unknown = sorted(set(cfg.experiments) - set(EXPERIMENTS))
    if unknown:
        raise LingregionError(f"unknown experiment(s) {', '.join(unknown)}; choose from {', '.join(EXPERIMENTS)}")
    cfg.check_languages()
    cfg.check_basics()
    for name in cfg.experiments:
        if EXPERIMENTS[name].validate:
            EXPERIMENTS[name].validate(cfg)
