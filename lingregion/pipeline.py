"""`reproduce`: every selected experiment on one model, then the report."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from . import distributed, models, report
from .config import Config
from .experiments.registry import EXPERIMENTS, validate
from .run import Run, check_out
from .store import locked, write_json, write_text


def reproduce(cfg: Config | None = None, out: Path | str = "lingregion-run", progress: bool = True) -> dict:
    """Run the configured experiments (default: all, at the default budgets) and write results and the report
    into `out`; returns each experiment's result. Rerunning with the same folder resumes."""
    cfg = cfg or Config()
    validate(cfg)
    check_out(Path(out))
    with locked(Path(out)):  # before the model loads, so that a second run into `out` is refused at once
        distributed.world()  # under torchrun, the other processes wait here until rank 0 holds the lock
        started = time.time()
        lm = models.load(cfg.model, cfg.dtype, cfg.device, cfg.trust_remote_code, cfg.include, cfg.exclude)
        run = Run(Path(out), cfg, lm, progress)
        write_text(run.out / "config.yaml", cfg.to_yaml())
        results, seconds = {}, {}
        for name in [n for n in EXPERIMENTS if n in cfg.experiments]:
            t0 = time.time()
            results[name] = EXPERIMENTS[name].measure(run)
            seconds[name] = round(time.time() - t0, 1)
        write_json(
            run.out / "run.json",
            run.provenance(
                config=asdict(cfg),
                experiments=cfg.experiments,
                seconds=round(time.time() - started, 1),
                experiment_seconds=seconds,
            ),
        )
        report.write(run.out)
    return results
