"""Write a region-removed (or otherwise edited) model as a plain Hugging Face folder.

The folder holds safetensors weights, config, generation config, tokenizer, a README.md model card that
says exactly what was changed and from which scores, and the same record as lingregion-export.json. Any
tool that loads a Hugging Face model (transformers, lm-eval, vLLM) loads it like the original. The folder
is assembled under a temporary name beside the target and renamed into place, so a reader never sees a
half-written model; the in-memory model is restored bit for bit afterwards.
"""

from __future__ import annotations

import os
import shutil
from collections import defaultdict
from pathlib import Path

from . import interventions, models
from .regions import Region
from .store import (
    LingregionError,
    environment,
    fsync,
    read_tensors,
    sha256_file,
    write_json,
    write_text,
)

RECORD = "lingregion-export.json"
# How a model card says to load the folder it sits in (an exported or a trained model alike)
LOAD_SNIPPET = (
    "```python",
    "from transformers import AutoModelForCausalLM, AutoTokenizer",
    "model = AutoModelForCausalLM.from_pretrained('THIS_FOLDER')",
    "tokenizer = AutoTokenizer.from_pretrained('THIS_FOLDER')",
    "```",
)


def region_record(region: Region, path: Path | None, model, removed: dict[str, float]) -> dict:
    """What a removal changes: the region (file, how it was made, sizes per parameter) and the score files
    it came from, when they sit in the run folder beside it (RUN/regions/x.safetensors → RUN/scores/)."""
    params = dict(model.named_parameters())
    per_param = {
        n: {
            "entries": region.count(n),
            "of": params[n].numel(),
            "set_to": removed[n],
            "already_at_value": int((params[n].detach().reshape(-1)[region.indices(n)] == removed[n]).sum()),
        }
        for n in region.packed
        if region.count(n)
    }
    record = {
        "kind": "region removal",
        "region": {
            "file": str(path) if path else None,
            "sha256": sha256_file(path) if path else None,
            "meta": region.meta,
            "entries": region.count(),
            "of": region.total(),
            "parameters": per_param,
        },
    }
    record["scores"] = _score_files(path, region) if path else {}
    return record


def _score_files(region_path: Path, region: Region) -> dict:
    scores_dir = Path(region_path).resolve().parent.parent / "scores"
    out = {}
    for lang in region.meta.get("languages") or []:
        f = scores_dir / f"{lang}.safetensors"
        if not f.is_file():
            continue
        _, meta = read_tensors(f)
        if meta.get("model_fingerprint") == region.meta.get("model"):
            out[lang] = {
                "file": str(f),
                "sha256": sha256_file(f),
                "estimator": meta.get("estimator"),
                "made_of": meta.get("made_of"),
            }
    return out


def export(model, tokenizer, out_dir: Path, edits: list[interventions.Edit], record: dict, force: bool = False) -> Path:
    """Save `model` with `edits` applied into `out_dir` (a new folder, or an old one replaced with `force`)."""
    out = Path(out_dir).expanduser().resolve()
    check_target(out, getattr(model, "name_or_path", "") or "", force)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with interventions.applied(model, edits):
            model.save_pretrained(tmp)  # safetensors
        tokenizer.save_pretrained(tmp)
        full = {
            **record,
            "edits": _edit_summary(edits),
            "base_model": _base(model, record.get("base_model")),
            "environment": environment(),
        }
        write_json(tmp / RECORD, full)
        write_text(tmp / "README.md", model_card(full))
        for f in tmp.rglob("*"):  # on disk before the folder is renamed into place
            if f.is_file():
                fsync(f)
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def check_target(out: Path, source: str, force: bool) -> None:
    """Refuse an --out that is, or contains, the folder the model came from or the current directory, and
    one that holds files unless `force` is given and it is an earlier export (it holds lingregion-export.json):
    replacing a folder deletes it, so only a folder this command made may be replaced."""
    src = Path(source).expanduser()
    if source and src.exists() and (out == src.resolve() or out in src.resolve().parents):
        raise LingregionError(f"{out} holds the model being exported ({src.resolve()}); choose another --out")
    if out == Path.cwd().resolve() or out in Path.cwd().resolve().parents:
        raise LingregionError(f"{out} contains the current directory; choose another --out")
    if out.exists() and not out.is_dir():
        raise LingregionError(f"{out} is a file; choose another --out")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise LingregionError(f"{out} exists and is not empty; choose another --out or pass --force to replace it")
        if not (out / RECORD).is_file():
            raise LingregionError(
                f"{out} holds files but no {RECORD}, so it is not an earlier export; --force replaces only "
                "those: choose another --out"
            )


def _swap_in(tmp: Path, out: Path) -> None:
    old = out.with_name(f".{out.name}.old{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    fsync(out.parent)
    shutil.rmtree(old, ignore_errors=True)


def _base(model, info: dict | None) -> dict:
    """The caller's record of the base model (models.Model.info) completed from the model itself."""
    return {
        "name": getattr(model, "name_or_path", None) or type(model).__name__,
        "class": type(model).__name__,
        "dtype": str(model.dtype).removeprefix("torch."),
        **(info or {}),
        "fingerprint": models.fingerprint(model),
    }


def _edit_summary(edits: list[interventions.Edit]) -> dict:
    return {"parameters": len({e.name for e in edits}), "entries": sum(len(e.index) for e in edits)}


def _by_matrix_type(per_param: dict) -> list[tuple[str, int, int, int]]:
    """(matrix type, layers touched, entries, of) per parameter name with the layer index removed."""
    groups = defaultdict(lambda: [set(), 0, 0])
    for name, p in per_param.items():
        parts = name.split(".")
        layer = next((x for x in parts if x.isdigit()), "")
        kind = ".".join(x for x in parts if not x.isdigit())
        g = groups[kind]
        g[0].add(layer)
        g[1] += p["entries"]
        g[2] += p["of"]
    return [(k, len(v[0]), v[1], v[2]) for k, v in sorted(groups.items())]


def model_card(record: dict) -> str:
    """README.md: the base model, what was removed and from which scores, how to load and evaluate."""
    base, reg = record["base_model"], record.get("region") or {}
    meta = {k: v for k, v in (reg.get("meta") or {}).items() if v is not None}  # None shows as "—"
    lines = [
        "---",
        "library_name: transformers",
        "tags: [lingregion, region-removed]",
        "---",
        "",
        f"# {base['name']} with a lingregion region removed",
        "",
        f"This is **{base['name']}** ({base['class']}, {base['dtype']}) with {record['edits']['entries']:,} "
        f"weight entries in {record['edits']['parameters']} parameters set to their removed value "
        "(0 for weights, −1 for norms computed as x̂·(1+w)), written by "
        f"lingregion {record['environment']['lingregion']}. Every other weight is "
        "bit-identical to the base model. Licence: that of the base model.",
        "",
    ]
    if reg:
        share = reg["entries"] / reg["of"] if reg["of"] else 0.0
        lines += [
            "## What was removed",
            "",
            "| field | value |",
            "|---|---|",
            f"| region file | `{reg['file']}` |",
            f"| region SHA-256 | `{reg['sha256']}` |",
            f"| label | {meta.get('label', '—')} |",
            f"| side | {meta.get('side', '—')} |",
            f"| ratio | {meta.get('ratio', '—')} |",
            f"| scope | {meta.get('scope', '—')} |",
            f"| seed | {meta.get('seed', '—')} |",
            f"| languages | {', '.join(meta.get('languages') or []) or '—'} |",
            f"| importance estimator | {meta.get('estimator', '—')} |",
            f"| made on model | `{meta.get('model', '—')}` (this base: `{base['fingerprint']}`) |",
            f"| entries | {reg['entries']:,} of {reg['of']:,} scored entries ({share:.3%}) |",
            f"| already at the removed value | {sum(p['already_at_value'] for p in reg['parameters'].values()):,} |",
            "",
            "Per matrix type:",
            "",
            "| parameter | layers | entries | of | share |",
            "|---|---|---|---|---|",
        ]
        lines += [f"| `{k}` | {n} | {e:,} | {o:,} | {e / o:.3%} |" for k, n, e, o in _by_matrix_type(reg["parameters"])]
        lines += ["", f"Every parameter and its count: `{RECORD}`.", ""]
        if meta.get("operation"):
            lines += [f"The region is a set {meta['operation']} of two regions; both are recorded in `{RECORD}`.", ""]
    lines += ["## From which scores", ""]
    scores = record.get("scores") or {}
    if scores:
        lines += [
            "| language | score file | SHA-256 | tokens | windows × length | text SHA-256 |",
            "|---|---|---|---|---|---|",
        ]
        for lang, s in scores.items():
            w = (s.get("made_of") or {}).get("windows") or {}
            lines.append(
                f"| {lang} | `{s['file']}` | `{s['sha256'][:16]}…` | {w.get('tokens', '—')} | "
                f"{w.get('windows', '—')} × {w.get('seq_len', '—')} | `{str(w.get('text_sha256', '—'))[:16]}…` |"
            )
        lines += ["", f"Estimator: {next(iter(scores.values())).get('estimator')}.", ""]
    else:
        lines += [
            "The score files were not found beside the region file (a run folder's `scores/`); the region's "
            "own metadata above is the record of how it was made.",
            "",
        ]
    lines += [
        "## Use",
        "",
        *LOAD_SNIPPET,
        "",
        "```bash",
        "lm_eval --model hf --model_args pretrained=THIS_FOLDER --tasks mmlu",
        "```",
        "",
    ]
    return "\n".join(lines)
