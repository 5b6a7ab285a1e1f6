"""Everything a run depends on, declared once.

Each field of `Config` carries its help text and its `--quick` value; the command line, the YAML file a
run folder keeps and the quick preset are all generated from these declarations, so they cannot drift.
"""

from __future__ import annotations

import functools
import os
import re
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from . import corpus
from .store import LingregionError, digest

PAPER_SCORE_LANGS = ["ar", "es", "ru", "zh", "ko", "vi"]
PAPER_EVAL_LANGS = ["ar", "zh", "it", "ja", "ko", "fa", "pt", "ru", "es", "uk", "vi", "en"]
# The paper evaluates removal on 30 languages: its twelve, and here the 18 built-in languages with the most
# evaluation text after them (`lingregion languages`: fr 59,653 tokens down to nl 5,989; ties by code).
MORE_EVAL_LANGS = "fr th he tr et sl cs ro fi lt pl da hu el sk lv no nl".split()
MONO_LANGS = PAPER_SCORE_LANGS + ["uk", "pt"]  # so that related pairs exist (ru-uk, es-pt)
EXPERIMENT_NAMES = [
    "removal",
    "stability",
    "monolingual",
    "structural",
    "outliers",
    "recovery",
    "forgetting",
    "downstream",
    "estimators",
]  # the order they run in: later ones reuse earlier caches


def opt(default, help: str, quick=MISSING, flag: str | None = None, langs: bool = False, choices=None):
    """A Config field: its default, help text, value under --quick, command-line flag (default: the name with
    dashes), whether it names languages (checked before anything else) and its allowed values."""
    meta = {"help": help, "quick": quick, "flag": flag, "langs": langs, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Config:
    """Everything a run depends on. `Config.quick()` is the small preset; every field can be overridden."""

    # --- model and data -----------------------------------------------------------------------------
    model: str | None = opt(None, "Hugging Face hub id or local folder (default: the built-in Gemma 3 270M base)")
    dtype: str = opt(
        "float32",
        "weights dtype; losses and scores accumulate in fp32 regardless",
        choices=["float32", "bfloat16", "float16"],
    )
    device: str = opt("cpu", "torch device (cpu, cuda, cuda:1), or auto to spread the model over all visible GPUs")
    trust_remote_code: bool = opt(False, "allow the model's own Python code to run")
    texts: dict[str, str] = opt(
        {},
        "your own text for language L: .txt, .jsonl, .parquet or hf:DATASET[:CONFIG]; repeat for several",
        flag="lang",
    )
    score_langs: list[str] = opt(
        PAPER_SCORE_LANGS, "languages whose importance is summed into the core score", langs=True
    )
    eval_langs: list[str] = opt(
        PAPER_EVAL_LANGS + MORE_EVAL_LANGS,
        "languages evaluated in the removal table and (those among mono_eval_langs) the monolingual interaction "
        "matrix (default: the paper's 30, its twelve and then the 18 built-in languages with the most evaluation "
        "text)",
        langs=True,
        quick=["ar", "zh", "ru", "uk", "en"],
    )
    parallel: bool = opt(
        False,
        "build every language's windows from the same aligned documents: the alignment ids that all the "
        "run's languages share, in one order (see `lingregion languages`)",
    )
    genres: list[str] = opt(
        [],
        "keep only documents of these genres (scripture, software-help, legal, essays, encyclopedia, "
        "generated-prose, technical-manual; user text: user or its own); empty: all",
    )
    seq_len: int = opt(512, "tokens per window, BOS included", quick=256)
    score_tokens: int = opt(2048, "scoring tokens per language", quick=512)
    score_storage: str = opt(
        "compact",
        "how score files are kept: compact (every region the run makes stays exact; 0.74 bytes per scored "
        "parameter when the largest region share is 0.03), bfloat16 (2 bytes) or float32 (4 bytes, as computed)",
        choices=["compact", "bfloat16", "float32"],
    )
    eval_tokens: int = opt(1024, "evaluation tokens per language and setting", quick=256)
    batch_size: int = opt(4, "windows per forward pass when evaluating")
    scale_checkpoint_every: int = opt(
        4,
        "save a scoring or evaluation job's running sums every N windows, so that "
        "a killed run resumes (each save writes one fp32 copy of the scored "
        "parameters: use hundreds on a GPU)",
        flag="checkpoint-every",
    )
    # --- regions ------------------------------------------------------------------------------------
    ratios: list[float] = opt([0.01, 0.03], "core region sizes as fractions of each matrix")
    sides: list[str] = opt(["top", "bottom", "random"], "which core regions to remove")
    scope: str = opt(
        "matrix",
        "take the ratio of each matrix (the paper) or of all scored parameters at once",
        choices=["matrix", "global"],
    )
    include: str | None = opt(None, "regex of the parameters to score (default: every transformer-layer parameter)")
    exclude: str | None = opt(None, "regex of parameters to leave out of scoring")
    seed: int = opt(0, "seed of every random choice (Random regions, controls, shuffles)")
    random_seeds: int = opt(
        3,
        "Random regions drawn per ratio (seeds seed, seed+1, ...): tables show their geometric mean and min–max",
        quick=2,
    )
    experiments: list[str] = opt(EXPERIMENT_NAMES, "which experiments to run", choices=EXPERIMENT_NAMES)
    # --- monolingual --------------------------------------------------------------------------------
    mono_langs: list[str] = opt(
        MONO_LANGS,
        "languages whose monolingual regions are found",
        langs=True,
        quick=["ar", "zh", "ru", "uk"],
    )
    mono_eval_langs: list[str] = opt(
        PAPER_EVAL_LANGS,
        "which of eval_langs the interaction matrix evaluates (default the paper's twelve: each further language "
        "costs one evaluation per monolingual region and control)",
        langs=True,
    )
    mono_ratio: float = opt(0.03, "Top share of each language's own score before the set difference")
    mono_eval_tokens: int = opt(512, "evaluation tokens per language and setting of the interaction matrix", quick=256)
    mono_focus: str = opt("ru", "the language of the Table 5 layout")
    mono_estimator: str = opt(
        "taylor",
        "importance estimator of each language's Top set (taylor: the paper's; the estimators experiment "
        "recommends one); another also shows the paper's interaction matrix beside its own",
        choices=["taylor", "taylor-window", "fisher", "wanda"],
    )
    gen_tokens: int = opt(16, "tokens generated per prompt with each region removed", quick=4)
    # --- structural and outliers --------------------------------------------------------------------
    struct_dims: list[int] = opt([1, 10], "N_d: rows/columns removed per space", quick=[10])
    struct_families: list[str] = opt(
        ["feature", "feature+ffn", "head"], "dimension families removed", choices=["feature", "feature+ffn", "head"]
    )
    struct_mode: str = opt(
        "common", "one index shared by the matrices of a space, or one per matrix", choices=["common", "matrix"]
    )
    struct_ratio: float = opt(0.03, "the core Top region whose entries rank rows and columns")
    struct_langs: list[str] = opt(
        ["zh", "ru", "en"], "languages evaluated by structural and outliers", langs=True, quick=["zh", "en"]
    )
    struct_eval_tokens: int = opt(512, "evaluation tokens per language and setting (at most eval_tokens)", quick=256)
    outlier_layers: int = opt(4, "input norms of the first N layers are scanned")
    outlier_scan_tokens: int = opt(512, "tokens per language of the scan's forward pass", quick=256)
    outlier_confirm: int = opt(5, "scan candidates confirmed by perplexity", quick=2)
    outlier_controls: int = opt(2, "random input-norm entries perturbed as controls", quick=1)
    outlier_dims: int = opt(2, "most massive residual dimensions removed whole (and as many random ones)", quick=1)
    # --- stability ------------------------------------------------------------------------------------
    split_halves: bool = opt(
        True,
        "keep two half sums (even and odd windows) of a sample of the matrices while scoring, for split-half "
        "stability; costs one extra fp32 copy of the sampled matrices while scoring",
    )
    split_half_share: float = opt(
        0.125,
        "share of each kind of matrix (e.g. every layer's mlp.up_proj) whose scores keep split halves: a seeded "
        "sample of layers, at least one per kind; 1 keeps all (one extra fp32 copy of every scored matrix)",
    )
    stability_langs: list[str] = opt(["ru", "zh"], "languages scored at growing budgets", langs=True, quick=["ru"])
    stability_tokens: int = opt(4096, "scoring tokens of the largest budget (1/8, 1/4, 1/2 and all of it)", quick=1024)
    stability_other_dtype: bool = opt(
        True, "also score the first stability language in the other precision (an extra copy of the model)"
    )
    # --- estimators ---------------------------------------------------------------------------------
    est_estimators: list[str] = opt(
        ["taylor", "taylor-window", "fisher", "magnitude", "wanda", "lape"], "importance estimators compared"
    )
    est_ratios: list[float] = opt([1e-6, 1e-4, 1e-2], "region sizes of the damage curve", quick=[1e-6, 1e-2])
    est_overlap_ratio: float = opt(0.01, "the estimators' regions are compared (Jaccard) at this share")
    est_tokens: int = opt(1024, "tokens per language of the one pass every estimator shares", quick=128)
    est_seq_len: int | None = opt(
        128,
        "window length of that pass (null: seq_len); short windows give each half several, so that the "
        "estimators that differ in how they combine windows can be told apart, at the same tokens",
        quick=64,
    )
    est_eval_langs: list[str] = opt(
        ["ru", "zh", "ja", "en"], "languages evaluated by the estimators experiment", langs=True, quick=["ru"]
    )
    est_eval_tokens: int = opt(256, "evaluation tokens per language and setting")
    est_control_lang: str = opt("en", "the specificity control's single language (none of the scored ones)", langs=True)
    est_outlier_dims: int = opt(2, "most massive residual dimensions as a control (0: none)")
    # --- recovery and forgetting ----------------------------------------------------------------------
    train_lang: str = opt("zh", "further pre-trained on (recovery and forgetting)", langs=True)
    train_other: str = opt("en", "the untrained language of the recovery table", langs=True)
    train_track: list[str] = opt(
        ["en", "ru", "es"], "untrained languages tracked for forgetting", langs=True, quick=["en"]
    )
    train_ratio: float = opt(0.01, "Top / Bottom / Random share of the core score removed or frozen")
    train_samples: list[int] = opt([0, 4, 8], "sample counts at which perplexity is measured", quick=[0, 2])
    train_batch: int = opt(1, "windows per forward/backward pass")
    train_accum: int = opt(1, "forward/backward passes per optimizer step (the paper: 256 samples per step)")
    train_lr: float = opt(
        1e-4,
        "peak learning rate (the paper's is 5e-5; at 1e-4 the default's 8 samples make the built-in model "
        "forget measurably with nothing frozen: README, the CPU protocol)",
        quick=5e-5,
    )
    train_warmup: int = opt(2, "linear warm-up steps (the paper: 100)", quick=1)
    train_dtype: str = opt(
        "float32",
        "training precision: fp32, or bf16 autocast over fp32 master weights",
        choices=["float32", "bfloat16"],
    )
    train_eval_tokens: int = opt(512, "evaluation tokens per language and evaluation point", quick=256)
    train_checkpoint_every: int = opt(50, "training steps between checkpoints (0: none)")
    # --- downstream ---------------------------------------------------------------------------------
    down_langs: list[str] = opt(
        ["ar", "zh", "ru", "en"], "languages of the built-in multiple-choice task", quick=["zh", "en"]
    )
    down_items: int | None = opt(8, "items per language, of 50 (null: all)", quick=3)
    down_ratio: float = opt(0.01, "Top / Bottom / Random share of the core score removed")
    down_mono: bool = opt(True, "also remove the saved monolingual regions of down_langs", quick=False)
    down_batch: int = opt(16, "sequences (context + one candidate) per forward pass")
    down_lmeval_tasks: list[str] = opt(
        [], "lm-eval tasks run in process for every setting, e.g. mmlu", flag="lmeval-tasks"
    )
    down_lmeval_limit: int | None = opt(None, "documents per lm-eval task (default all)", flag="lmeval-limit")

    def __post_init__(self):
        """Every value against its field's declared type, whatever it came from (YAML, flags, the API), so that a
        quoted 'false' never switches anything on; then what can be told from the value alone: language codes,
        empty language lists, regexes and the device's spelling."""
        for f in fields(self):
            setattr(self, f.name, _typed(f.name, getattr(self, f.name), field_types()[f.name]))
            if f.metadata["langs"]:
                value = getattr(self, f.name)
                if value == []:
                    raise LingregionError(f"{f.name} is empty; name at least one language")
                for lang in value if isinstance(value, list) else [value]:
                    corpus.check_code(lang)
        for lang in self.texts:
            corpus.check_code(lang)
        for name in ("include", "exclude"):
            try:
                re.compile(getattr(self, name) or "")
            except re.error as e:
                pattern = getattr(self, name)
                raise LingregionError(f"{name} {pattern!r} is not a valid regex ({e}); fix the pattern") from None
        check_device(self.device)

    @classmethod
    def quick(cls, **overrides) -> Config:
        """The small preset (minutes on a 2-core CPU), with `overrides` on top."""
        preset = {f.name: f.metadata["quick"] for f in fields(cls) if f.metadata["quick"] is not MISSING}
        return cls(**{**preset, **overrides})

    @classmethod
    def from_dict(cls, d: dict, quick: bool = False) -> Config:
        """A Config from keys such as a YAML file holds, on top of the default or the quick preset."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise LingregionError(
                f"unknown config key(s): {', '.join(unknown)}; known keys are {', '.join(sorted(known))}"
            )
        return cls.quick(**d) if quick else cls(**d)

    @staticmethod
    def read(path: Path) -> dict:
        """The keys of a YAML config file (a run folder's config.yaml, or one written by hand), read with YAML
        1.2's scalars (`_yaml_loader`)."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise LingregionError(f"{path}: config file not found")
        try:
            d = yaml.load(path.read_text(encoding="utf-8"), Loader=_yaml_loader()) or {}
        except yaml.YAMLError as e:
            raise LingregionError(f"{path}: not valid YAML ({str(e).splitlines()[0]}); fix the file") from None
        if not isinstance(d, dict):
            raise LingregionError(
                f"{path}: a config is a mapping of keys such as 'score_tokens: 4096', not {type(d).__name__}"
            )
        return d

    def results_digest(self) -> str:
        """What a saved result depends on in this config: a digest of every field but the NEUTRAL ones."""
        return digest({k: v for k, v in asdict(self).items() if k not in NEUTRAL})

    def to_yaml(self) -> str:
        """The resolved config as YAML, which `--config` reads back."""
        import yaml

        return (
            "# lingregion run config: repeat with `lingregion reproduce --config THIS_FILE --out DIR`\n"
            + yaml.safe_dump(asdict(self), sort_keys=False, allow_unicode=True)
        )

    def languages(self) -> list[str]:
        """Every language any field names, in order of appearance."""
        out: list[str] = []
        for f in fields(self):
            if f.metadata["langs"]:
                value = getattr(self, f.name)
                out += value if isinstance(value, list) else [value]
        return list(dict.fromkeys(out))

    def check_languages(self, langs: list[str] | None = None) -> None:
        """Unknown languages first, before any other check, so that a typo is what the user hears about."""
        builtin = set(corpus.builtin_languages())
        for lang in self.languages() if langs is None else langs:
            if lang not in builtin and lang not in self.texts:
                raise LingregionError(
                    f"unknown language {lang!r}; built-in languages are "
                    f"{', '.join(sorted(builtin))}, or pass your own text as --lang {lang}=PATH"
                )

    def check_basics(self) -> None:
        """The checks every command needs: budgets, ratios, choices."""
        if self.seq_len < 2 or self.score_tokens < 1 or self.eval_tokens < 1 or self.batch_size < 1:
            raise LingregionError("--seq-len must be ≥ 2 and token budgets and --batch-size ≥ 1")
        if self.scale_checkpoint_every < 1:
            raise LingregionError(f"--checkpoint-every {self.scale_checkpoint_every} must be a whole number ≥ 1")
        check_device(self.device, present=True)
        for r in self.ratios + [self.mono_ratio]:
            if not 0 < r < 1:
                raise LingregionError(f"ratio {r} is outside (0, 1); pass a fraction such as 0.01 for 1%")
        if not 0 < self.split_half_share <= 1:
            raise LingregionError(
                f"split_half_share {self.split_half_share} is outside (0, 1]; pass e.g. 0.125 (1 halves every matrix)"
            )
        for f in fields(self):
            choices, value = f.metadata["choices"], getattr(self, f.name)
            bad = [v for v in (value if isinstance(value, list) else [value]) if choices and v not in choices]
            if bad:
                raise LingregionError(f"unknown {f.name} value {bad[0]!r}; choose from {', '.join(choices)}")


# Fields that decide how a run goes, not what any result says: a result made under other values of these still
# belongs to the run, so they are left out of Config.results_digest.
NEUTRAL = {"experiments", "device", "batch_size", "down_batch", "scale_checkpoint_every", "train_checkpoint_every"}


@functools.cache
def _yaml_loader():
    """PyYAML's safe loader with YAML 1.2's booleans and floats: only true and false are booleans (YAML 1.1 also
    reads yes, no, on and off as booleans, so that `yes` would switch remote code on and Norwegian, `no`, would be
    false), and 1e-6 is a number, as it is everywhere but in YAML 1.1."""
    import yaml

    bool_tag, float_tag = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"

    class Loader(yaml.SafeLoader):
        yaml_implicit_resolvers = {
            first: [(tag, rx) for tag, rx in resolvers if tag != bool_tag]
            for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
        }

    Loader.add_implicit_resolver(bool_tag, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
    Loader.add_implicit_resolver(
        float_tag, re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"), list("-+.0123456789")
    )
    return Loader


@functools.cache
def field_types() -> dict[str, type]:
    """Each Config field's declared type (the annotations are strings under `from __future__`)."""
    return typing.get_type_hints(Config)


def check_device(device: str, present: bool = False) -> None:
    """Refuse a device torch cannot parse (cuda:x) and, with `present`, a GPU this machine does not have, before
    any model loads. "auto" spreads the model over all visible GPUs."""
    import torch

    if device == "auto":
        kind, index = "cuda", None
    else:
        try:
            d = torch.device(device)
        except (RuntimeError, ValueError):
            raise LingregionError(f"device {device!r} is not a torch device; use cpu, cuda, cuda:1 or auto") from None
        kind, index = d.type, d.index
    if present and kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (index or 0) >= count:
            raise LingregionError(f"device {device!r}: this machine has {count} usable CUDA GPU(s); pass --device cpu")


_KINDS = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}


def _described(annotation) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is list:
        return f"a list of {_described(args[0]).removeprefix('a ').removeprefix('an ')}s".replace("texts", "text")
    if origin is dict:
        return f"a mapping of {_described(args[0])} to {_described(args[1])}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(["null" if a is type(None) else _described(a) for a in args])
    return _KINDS[annotation]


def _typed(name: str, value, annotation):
    """`value` if it is of the declared type (an int where a float is declared becomes that float, a path its
    text, a tuple a list); otherwise one line naming the key, the value, and the type it needs."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType) and len(args) == 2 and type(None) in args:  # X | None
        if value is None:
            return None
        try:
            return _typed(name, value, next(a for a in args if a is not type(None)))
        except LingregionError:
            _refuse(name, value, annotation)  # naming null as allowed too
    elif origin is list:
        if isinstance(value, (list, tuple)):
            return [_typed(f"each entry of {name}", v, args[0]) for v in value]
    elif origin is dict:
        if isinstance(value, dict):
            each = f"each entry of {name}"
            return {_typed(each, k, args[0]): _typed(each, v, args[1]) for k, v in value.items()}
    elif annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is str:
        if isinstance(value, (str, os.PathLike)):
            return os.fspath(value)
    else:
        raise TypeError(f"Config field {name}: type {annotation} is not one that config values are checked against")
    return _refuse(name, value, annotation)


def _refuse(name: str, value, annotation) -> typing.NoReturn:
    hint = ""
    if isinstance(value, str):
        if annotation in (int, float) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", value.strip()):
            hint = "; write the number without quotes"
        elif annotation is bool and value.strip().lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            hint = "; write true or false without quotes"
    elif typing.get_origin(annotation) is list and not isinstance(value, dict):
        hint = f"; write a list, e.g. [{value}]"
    kind = {bool: "a boolean", type(None): "null"}.get(type(value)) or _KINDS.get(type(value), type(value).__name__)
    raise LingregionError(f"{name} must be {_described(annotation)}, not {value!r} ({kind}){hint}")
