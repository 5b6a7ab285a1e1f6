"""The registered experiments, in the order `reproduce` runs them.

Each experiment module defines `NAME`, `DOC`, `run(Run) → result`, `section(result) → report blocks` and,
optionally, `findings(result) → sentences` and `validate(Config)`. The registry is the only place that
imports them all, so that neither the modules nor the report import each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

from ..config import EXPERIMENT_NAMES, Config
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


@dataclass(frozen=True)
class Experiment:
    """One experiment: `run` computes and saves a result, `section` turns a saved result into report blocks,
    `findings` into headline sentences, and `validate` rejects a config it cannot run."""

    name: str
    run: Callable
    section: Callable[[dict], list]
    doc: str
    findings: Callable[[dict], list[str]] | None = None
    validate: Callable[[Config], None] | None = None

    @classmethod
    def of(cls, module: ModuleType) -> Experiment:
        """The experiment a module defines."""
        return cls(
            module.NAME,
            module.run,
            module.section,
            module.DOC,
            getattr(module, "findings", None),
            getattr(module, "validate", None),
        )


_MODULES = (removal, stability, monolingual, structural, outliers, recovery, forgetting, downstream, estimators)
EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in map(Experiment.of, _MODULES)}
assert list(EXPERIMENTS) == EXPERIMENT_NAMES, "config.EXPERIMENT_NAMES lists the registered experiments in order"


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
