"""Where a finished run's wall time went: each experiment, and within them the scoring of each language.

    python benchmarks/stages.py RUN_DIR [RUN_DIR ...]

Reads run.json (seconds per experiment, as `lingregion reproduce` records them) and the score files'
provenance (seconds each score took before its file was written: gradient pass, importance, split-half statistics).
Scores are made inside the first experiment that needs them, so their seconds are part of that
experiment's. Prints JSON, then a Markdown table with one column per run folder (e.g. before / after).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lingregion import scorefile, store


def stages(folder: Path) -> dict:
    record = store.read_json(folder / "run.json")
    scores = {}
    for path in sorted((folder / "scores").glob("*.safetensors")):
        meta = scorefile.load_meta(path)
        if meta.get("seconds") is not None:
            scores[path.name.removesuffix(".safetensors")] = meta["seconds"]
    return {
        "folder": str(folder),
        "seconds": record["seconds"],
        "experiments": record["experiment_seconds"],
        "scores": scores,
        "scoring_total": round(sum(v for k, v in scores.items() if k != "core"), 1),
    }


def table(runs: list[dict]) -> str:
    rows = [("whole run", [r["seconds"] for r in runs])]
    names = list(dict.fromkeys(k for r in runs for k in r["experiments"]))
    rows += [(f"experiment {n}", [r["experiments"].get(n) for r in runs]) for n in names]
    rows.append(("  of which: scoring the languages (score files' seconds)", [r["scoring_total"] for r in runs]))
    head = "| stage | " + " | ".join(Path(r["folder"]).name for r in runs) + " |"
    lines = [head, "|---|" + "---|" * len(runs)]
    lines += [
        f"| {label} | " + " | ".join("" if v is None else f"{v:.1f} s" for v in vals) + " |" for label, vals in rows
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", type=Path, help="run folders (--out of lingregion reproduce)")
    runs = [stages(f) for f in p.parse_args(argv).folders]
    print(json.dumps(runs, indent=1))
    print(table(runs))


if __name__ == "__main__":
    main()
