"""The `lingregion` command: a thin layer over the Python API."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__
from .store import LingregionError

DEFAULT_OUT = "lingregion-run"


def _langs(value: str) -> list[str]:
    return [x.strip() for x in value.split(",") if x.strip()]


def _ratios(value: str) -> list[float]:
    try:
        return [float(x) for x in _langs(value)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a comma-separated list of numbers such as 0.01,0.03") from None


def _ints(value: str) -> list[int]:
    try:
        return [int(x) for x in _langs(value)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a comma-separated list of whole numbers such as 1,3,5,10") from None


def _texts(pairs: list[str]) -> tuple[list[str], dict[str, str]]:
    """--lang ru or --lang ru=PATH: the languages named, and the user text for those given a path."""
    langs, texts = [], {}
    for item in pairs or []:
        lang, sep, path = item.partition("=")
        langs.append(lang)
        if sep:
            texts[lang] = path
    return langs, texts


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", help="Hugging Face hub id or local folder (default: the built-in Gemma 3 270M base)")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="weights dtype; losses and scores are accumulated in fp32 regardless (default float32)")
    g.add_argument("--device", help="torch device, e.g. cpu, cuda, cuda:1 (default cpu)")
    g.add_argument("--device-map", dest="device", choices=["auto"],
                   help="auto: spread the model over all visible GPUs (accelerate), for models larger than one GPU")
    g.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code to run")


def _checkpoint_arg(p: argparse.ArgumentParser) -> None:
    def positive(value: str) -> int:
        if not value.isdigit() or int(value) < 1:
            raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of windows ≥ 1")
        return int(value)

    p.add_argument("--checkpoint-every", type=positive, metavar="N",
                   help="save a scoring or evaluation job's running sums every N windows, so that a killed run "
                        "resumes where it stopped (default 4; each save writes one fp32 copy of the scored parameters)")


def _data_args(p: argparse.ArgumentParser, quick_preset: bool = False) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--lang", action="append", metavar="L[=PATH]",
                   help="a language of the built-in corpus, or L=PATH for your own .txt/.jsonl/.parquet text "
                        "(or L=hf:DATASET[:CONFIG]); repeat for several")
    g.add_argument("--seq-len", type=int, default=None if quick_preset else 512,
                   help="tokens per window, BOS included (default 512" + ("; 256 with --quick)" if quick_preset else ")"))
    g.add_argument("--batch-size", type=int, help="windows per forward pass (default 4)")


def _config(args, **extra):
    """Preset (default or --quick) < the --config file < flags given on the command line."""
    from .experiments import Config

    _, texts = _texts(args.lang)
    flags = {"model": args.model, "dtype": args.dtype, "device": args.device,
             "trust_remote_code": args.trust_remote_code or None, "seq_len": args.seq_len,
             "batch_size": args.batch_size, "texts": texts or None,
             "scale_checkpoint_every": getattr(args, "checkpoint_every", None), **extra}
    base = Config.read(args.config) if getattr(args, "config", None) else {}
    return Config.from_dict({**base, **{k: v for k, v in flags.items() if v is not None}},
                            quick=getattr(args, "quick", False))


def cmd_reproduce(args) -> None:
    from . import report
    from .experiments import removal, reproduce

    extra = {k: v for k, v in {
        "score_langs": args.score_langs, "eval_langs": args.eval_langs, "score_tokens": args.tokens,
        "eval_tokens": args.eval_tokens, "ratios": args.ratios, "scope": args.scope, "seed": args.seed,
        "experiments": args.experiments, "mono_langs": args.mono_langs, "mono_ratio": args.mono_ratio,
        "mono_focus": args.mono_focus, "struct_dims": args.struct_dims, "struct_mode": args.struct_mode,
        "struct_langs": args.struct_langs, "down_langs": args.down_langs, "down_items": args.down_items,
        "down_lmeval_tasks": args.lmeval_tasks, "down_lmeval_limit": args.lmeval_limit}.items() if v is not None}
    cfg = _config(args, **extra)
    results = reproduce(cfg, Path(args.out))
    if "removal" in results:
        print(report.markdown_table(*removal.table(results["removal"])))
    print(f"\nreport: {Path(args.out) / 'report.html'} (and report.md)")


def cmd_perturb(args) -> None:
    from . import corpus, evaluation, interventions, models, report, structure
    from .experiments import removal

    langs, texts = _texts(args.lang)
    if not langs:
        raise LingregionError("name at least one language with --lang L (or --lang L=PATH)")
    cfg = _config(args)
    m = models.load(cfg.model, cfg.dtype, cfg.device, cfg.trust_remote_code)
    if args.param:
        layer, dim = structure.parse_label(args.param)
        setting, edits = f"{args.kind} {args.param}", structure.perturbation(m.model, layer, dim, args.kind)
    else:
        setting, edits = f"remove D{args.remove_dim}", structure.dimension_removal(m.model, [args.remove_dim])
    windows = {lang: corpus.load_windows(m.tokenizer, lang, "eval", cfg.seq_len, args.tokens, texts.get(lang))
               for lang in langs}
    table = {"base": {lang: evaluation.perplexity(m.model, w, cfg.batch_size) for lang, w in windows.items()}}
    with interventions.applied(m.model, edits):
        table[setting] = {lang: evaluation.perplexity(m.model, w, cfg.batch_size) for lang, w in windows.items()}
    print(report.markdown_table(*removal.table({"settings": list(table), "languages": langs, "table": table})))


def cmd_score(args) -> None:
    from . import models
    from .experiments import Run

    langs, _ = _texts(args.lang)
    if not langs:
        raise LingregionError("name at least one language with --lang L (or --lang L=PATH)")
    cfg = _config(args, score_langs=langs, eval_langs=[], score_tokens=args.tokens)
    cfg.validate()
    run = Run(Path(args.out), cfg, models.load(cfg.model, cfg.dtype, cfg.device, cfg.trust_remote_code))
    for lang in langs:
        run.scores(lang)
        print(f"{lang}: {Path(args.out) / 'scores' / (lang + '.safetensors')}")


def cmd_locate(args) -> None:
    from . import scoring
    from .regions import monolingual, select
    from .store import read_tensors

    files = [Path(args.run) / "scores" / f"{lang}.safetensors" for lang in args.langs] if args.run else [Path(f) for f in args.scores]
    if not files:
        raise LingregionError("give score files with --scores FILE ... or a run folder with --run DIR --langs ar,es")
    total, tops, fingerprint, langs = {}, {}, None, []
    for f in files:
        tensors, meta = read_tensors(f)
        if meta.get("format") != "lingregion-scores-v1":
            raise LingregionError(f"{f}: not a score file; pass files written by 'lingregion score'")
        if fingerprint and meta["model_fingerprint"] != fingerprint:
            raise LingregionError(f"{f}: scores come from another model ({meta['model_fingerprint']} ≠ {fingerprint}); "
                                  "score every language with the same model")
        fingerprint = meta["model_fingerprint"]
        langs.append(meta["lang"])
        if args.kind == "monolingual":
            tops[meta["lang"]] = select(tensors, args.ratio, "top", meta={"model": fingerprint, "estimator": "taylor"})
            continue
        scoring.accumulate(total, tensors)
    if args.kind == "monolingual":
        if args.side != "top" or args.scope != "matrix":
            raise LingregionError("--kind monolingual uses per-matrix Top sets; drop --side/--scope")
        if args.lang not in langs:
            raise LingregionError(f"--lang {args.lang} is not among the scored languages {','.join(langs)}")
        region = monolingual(tops, args.lang)
    else:
        region = select(total, args.ratio, args.side, args.scope, args.seed,
                        {"model": fingerprint, "languages": langs, "estimator": "taylor", "label": "core"})
    region.save(Path(args.out))
    kind = f"monolingual {args.lang}" if args.kind == "monolingual" else f"{args.side} {args.ratio:g}, {args.scope}"
    print(f"{args.out}: {region.count():,} of {region.total():,} entries ({kind}, languages {','.join(langs)})")


def cmd_evaluate(args) -> None:
    from . import corpus, evaluation, interventions, models, report
    from .experiments import removal
    from .regions import Region

    langs, texts = _texts(args.lang)
    if not langs and not args.lmeval_tasks:
        raise LingregionError("name at least one language with --lang L (or --lang L=PATH), or lm-eval tasks "
                              "with --lmeval-tasks")
    region = Region.load(Path(args.remove)) if args.remove else None
    cfg = _config(args)
    m = models.load(cfg.model, cfg.dtype, cfg.device, cfg.trust_remote_code)
    edits = []
    if region:
        region.check_model(m.model, m.info["fingerprint"])
        edits = interventions.removal(region, models.removed_values(m.model, list(region.packed)))
    rows, lm = {}, {}
    with interventions.applied(m.model, edits):
        for lang in langs:
            w = corpus.load_windows(m.tokenizer, lang, "eval", cfg.seq_len, args.tokens, texts.get(lang))
            rows[lang] = evaluation.perplexity(m.model, w, cfg.batch_size)
        if args.lmeval_tasks:
            from . import tasks

            lm = tasks.lmeval(m.model, m.tokenizer, args.lmeval_tasks, limit=args.lmeval_limit,
                              batch_size=cfg.batch_size)
    setting = "removed" if region else "base"
    if langs:
        print(report.markdown_table(*removal.table({"settings": [setting], "languages": langs, "table": {setting: rows}})))
    if lm:
        print(report.markdown_table(["Task", "Metric", setting], [[t, k, report.fmt(v)] for t, r in lm.items()
                                                                  for k, v in r.items() if isinstance(v, float)]))


def cmd_export(args) -> None:
    from . import export, interventions, models
    from .regions import Region

    region = Region.load(Path(args.remove))
    cfg = _config(args)
    m = models.load(cfg.model, cfg.dtype, cfg.device, cfg.trust_remote_code)
    region.check_model(m.model, m.info["fingerprint"])
    removed = models.removed_values(m.model, list(region.packed))
    record = {**export.region_record(region, Path(args.remove), m.model, removed), "base_model": m.info}
    out = export.export(m.model, m.tokenizer, Path(args.out), interventions.removal(region, removed), record, args.force)
    print(f"{out}: {region.count():,} of {region.total():,} entries removed; model card in {out / 'README.md'}")


def cmd_plot(args) -> None:
    from . import figures
    from .regions import Region
    from .store import write_bytes

    region = Region.load(Path(args.region))
    if args.matrix:
        if args.matrix not in region.shapes:
            near = [n for n in region.shapes if args.matrix in n][:3] or list(region.shapes)[:3]
            raise LingregionError(f"--matrix {args.matrix} is not in this region; names look like {', '.join(near)}")
        data = figures.region_heatmap(region, args.matrix, args.head_dim)
    else:
        data = figures.region_grid(region)
    write_bytes(Path(args.out), data)
    print(args.out)


def cmd_report(args) -> None:
    from . import report

    report.write(Path(args.run_dir))
    print(f"{Path(args.run_dir) / 'report.html'} (and report.md)")


def cmd_languages(args) -> None:
    from .corpus import manifest

    for code, info in sorted(manifest()["languages"].items()):
        print(f"{code}\t{info['name']}\tscore {info['chars']['score']:,} chars\teval {info['chars']['eval']:,} chars\t"
              f"{'+'.join(info['sources'])}")


def parser() -> argparse.ArgumentParser:
    from .experiments import EXPERIMENTS

    p = argparse.ArgumentParser(prog="lingregion", description="Find and test the linguistic regions of LLMs.")
    p.add_argument("--version", action="version", version=f"lingregion {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("reproduce", help="run the paper's experiments end to end and write a report",
                       description="Score languages, locate the core region, remove Top/Bottom/Random and evaluate "
                                   "perplexity and bits per byte. Rerunning the same command resumes.")
    _model_args(r)
    _data_args(r, quick_preset=True)
    r.add_argument("--quick", action="store_true", help="small token budgets (a few minutes on a 2-core CPU)")
    r.add_argument("--config", metavar="FILE", help="YAML config (any Config key, e.g. a run folder's config.yaml); "
                                                    "flags given on the command line override it")
    r.add_argument("--out", default=DEFAULT_OUT, help=f"run folder (default {DEFAULT_OUT}); reused to resume")
    r.add_argument("--experiments", type=_langs, help=f"comma-separated subset of: {', '.join(EXPERIMENTS)}")
    r.add_argument("--score-langs", type=_langs, help="languages whose importance is summed (default ar,es,ru,zh,ko,vi)")
    r.add_argument("--eval-langs", type=_langs, help="languages evaluated (default ar,zh,it,ja,ko,fa,pt,ru,es,uk,vi,en)")
    r.add_argument("--tokens", type=int, help="scoring tokens per language (default 4096; 512 with --quick)")
    _checkpoint_arg(r)
    r.add_argument("--eval-tokens", type=int, help="evaluation tokens per language (default 2048; 256 with --quick)")
    r.add_argument("--ratios", type=_ratios, help="region sizes as fractions (default 0.01,0.03)")
    r.add_argument("--scope", choices=["matrix", "global"], help="Top/Bottom k%% per matrix (default) or over all")
    r.add_argument("--seed", type=int, help="seed of the Random region (default 0)")
    r.add_argument("--mono-langs", type=_langs,
                   help="languages whose monolingual regions are found (default ar,es,ru,zh,ko,vi,uk,pt,it,ja)")
    r.add_argument("--mono-ratio", type=float, help="Top share of each language before the set difference (default 0.03)")
    r.add_argument("--mono-focus", help="language of the Table 5 layout (default ru)")
    r.add_argument("--struct-dims", type=_ints, help="structural: N_d values, rows/columns removed (default 1,3,5,10)")
    r.add_argument("--struct-mode", choices=["common", "matrix"],
                   help="structural: one index shared by the matrices of a space (default) or one per matrix")
    r.add_argument("--struct-langs", type=_langs, help="structural and outliers: languages evaluated (default zh,ru,en)")
    r.add_argument("--down-langs", type=_langs,
                   help="downstream: languages of the built-in multiple-choice task (default ar,zh,ru,en)")
    r.add_argument("--down-items", type=int, help="downstream: items per language, of 50 (default 16; 5 with --quick)")
    r.add_argument("--lmeval-tasks", type=_langs, metavar="TASKS",
                   help="downstream: lm-eval tasks run in process for every setting, e.g. mmlu (needs lm-eval and "
                        "the task's data)")
    r.add_argument("--lmeval-limit", type=int, metavar="N", help="downstream: documents per lm-eval task (default all)")
    r.set_defaults(func=cmd_reproduce)

    pt = sub.add_parser("perturb", help="perplexity with one input-norm parameter perturbed or one residual "
                                        "dimension removed (the paper's Table 8)",
                        description="--param L1-N2100 --kind reset: set layer 1's input-norm weight at dimension "
                                    "2100 to its initial value (effective scale 1); --kind x10: multiply its effective "
                                    "scale by 10. --remove-dim 2100: zero residual dimension 2100 in every attention "
                                    "and MLP matrix. Layers count from 1, as in the paper.")
    _model_args(pt)
    _data_args(pt)
    what = pt.add_mutually_exclusive_group(required=True)
    what.add_argument("--param", help="input-norm entry, e.g. L1-N2100")
    what.add_argument("--remove-dim", type=int, metavar="D", help="residual dimension to remove from every matrix")
    pt.add_argument("--kind", choices=["reset", "x10"], default="reset", help="with --param (default reset)")
    pt.add_argument("--tokens", type=int, default=2048, help="evaluation tokens per language (default 2048)")
    pt.set_defaults(func=cmd_perturb)

    s = sub.add_parser("score", help="compute per-language importance scores",
                       description="Write OUT/scores/L.safetensors for each --lang: |(θ − θ_removed) ⊙ Σg| in fp32.")
    _model_args(s)
    _data_args(s)
    s.add_argument("--tokens", type=int, default=4096, help="scoring tokens per language (default 4096)")
    _checkpoint_arg(s)
    s.add_argument("--out", default=DEFAULT_OUT, help=f"run folder (default {DEFAULT_OUT})")
    s.set_defaults(func=cmd_score)

    loc = sub.add_parser("locate", help="select a region from score files",
                         description="core: sum the given languages' scores and keep the Top/Bottom/Random ratio. "
                                     "monolingual: S_L* = S_L − ∪ S_L', the per-matrix Top ratio of L's own score "
                                     "minus every other given language's.")
    loc.add_argument("--kind", default="core", choices=["core", "monolingual"],
                     help="core: one region from the summed scores (default); monolingual: one language's own")
    loc.add_argument("--lang", help="with --kind monolingual: the language L")
    loc.add_argument("--scores", nargs="*", default=[], help="score files (.safetensors from 'lingregion score')")
    loc.add_argument("--run", help="a run folder; use with --langs")
    loc.add_argument("--langs", type=_langs, default=[], help="languages of --run to sum, e.g. ar,es,ru,zh,ko,vi")
    loc.add_argument("--ratio", type=float, default=0.01, help="fraction of entries (default 0.01)")
    loc.add_argument("--side", default="top", choices=["top", "bottom", "random"],
                     help="the highest, lowest or seeded-random scores (default top)")
    loc.add_argument("--scope", default="matrix", choices=["matrix", "global"],
                     help="take the ratio of each matrix (default, as the paper) or of all scored parameters at once")
    loc.add_argument("--seed", type=int, default=0, help="seed for --side random (default 0)")
    loc.add_argument("--out", required=True, help="region file to write (.safetensors)")
    loc.set_defaults(func=cmd_locate)

    e = sub.add_parser("evaluate", help="perplexity and bits per byte, optionally with a region removed",
                       description="Perplexity and bits per byte of each --lang's evaluation text, and any lm-eval "
                                   "tasks (--lmeval-tasks, run in process on the same model object), with the "
                                   "--remove region set to its removed value, or on the unmodified model.")
    _model_args(e)
    _data_args(e)
    e.add_argument("--remove", help="region file to remove before evaluating")
    e.add_argument("--tokens", type=int, default=2048, help="evaluation tokens per language (default 2048)")
    e.add_argument("--lmeval-tasks", type=_langs, metavar="TASKS",
                   help="comma-separated lm-eval tasks, e.g. mmlu or lingregion_udhr_next_ru (the built-in "
                        "multiple-choice task in one language); needs lm-eval")
    e.add_argument("--lmeval-limit", type=int, metavar="N", help="documents per lm-eval task (default all)")
    e.set_defaults(func=cmd_evaluate)

    x = sub.add_parser("export", help="write a model with a region removed as a plain Hugging Face folder",
                       description="Load the model, set the region's entries to their removed value and save a "
                                   "Hugging Face folder (safetensors, config, tokenizer) with a README.md model card "
                                   "stating what was removed and from which scores, and the same record as "
                                   "lingregion-export.json. transformers, lm-eval and vLLM load it like any model. "
                                   "Written to a temporary folder and renamed into place.")
    _model_args(x)
    x.add_argument("--remove", required=True, metavar="REGION",
                   help="region file to remove (.safetensors from 'lingregion locate' or a run's regions/)")
    x.add_argument("--out", required=True, metavar="DIR", help="folder to write (must not exist or be empty)")
    x.add_argument("--force", action="store_true", help="replace --out if it already holds files")
    x.set_defaults(func=cmd_export, lang=None, seq_len=None, batch_size=None)

    pl = sub.add_parser("plot", help="draw a region: the layers × matrix-types grid, or one matrix in detail",
                        description="Heat map of the share of region members in each 3×3 neighbourhood (0 to 1), "
                                    "reduced for display by area averaging; rows are outputs, columns inputs.")
    pl.add_argument("region", help="region file (.safetensors from 'lingregion locate' or a run's regions/)")
    pl.add_argument("--matrix", help="one parameter name, e.g. model.layers.0.self_attn.q_proj.weight "
                                     "(default: the overview grid)")
    pl.add_argument("--head-dim", type=int, help="with --matrix: mark head boundaries every N rows")
    pl.add_argument("--out", required=True, help="PNG file to write")
    pl.set_defaults(func=cmd_plot)

    rep = sub.add_parser("report", help="rebuild a run folder's report from its saved results",
                         description="Write RUN_DIR/report.md and report.html again from results/*-summary.json "
                                     "and the figures, without loading a model or recomputing anything.")
    rep.add_argument("run_dir", help="a run folder written by 'lingregion reproduce'")
    rep.set_defaults(func=cmd_report)

    lg = sub.add_parser("languages", help="list the built-in corpus",
                        description="Each built-in language: code, name, characters of scoring and evaluation "
                                    "text, and its sources (details in lingregion/data/corpus/SOURCES.md).")
    lg.set_defaults(func=cmd_languages)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
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
