"""Config declares every field once; the quick preset, the CLI flags and their help come from it."""

import re
from dataclasses import MISSING, fields

import pytest

from lingregion.cli import config, parser
from lingregion.config import Config
from lingregion.store import LingregionError


def _reproduce_actions():
    sub = next(a for a in parser()._actions if a.dest == "command")
    return {a.dest: a for a in sub.choices["reproduce"]._actions}


def test_every_field_has_help_and_a_reproduce_flag():
    actions = _reproduce_actions()
    for f in fields(Config):
        assert f.metadata["help"], f.name
        dest = "lang" if f.name == "texts" else f.name
        assert dest in actions, f"no flag for {f.name}"


def test_help_shows_the_declared_default_and_quick_value():
    action = _reproduce_actions()["score_tokens"]
    assert action.option_strings == ["--score-tokens"]
    assert "default: 2048" in action.help and "--quick: 512" in action.help
    assert Config().score_tokens == 2048 and Config.quick().score_tokens == 512


def test_quick_preset_comes_from_the_declarations():
    quick = Config.quick()
    for f in fields(Config):
        want = f.metadata["quick"]
        if want is not MISSING:
            assert getattr(quick, f.name) == want, f.name
    assert Config.quick(seq_len=99).seq_len == 99


@pytest.mark.parametrize("command", ["score", "evaluate", "perturb"])
def test_scoring_and_evaluation_budgets_have_distinct_flags(command):
    sub = next(a for a in parser()._actions if a.dest == "command")
    flags = {s for a in sub.choices[command]._actions for s in a.option_strings}
    assert "--tokens" not in flags
    assert ("--score-tokens" in flags) == (command == "score")
    assert ("--eval-tokens" in flags) == (command != "score")


def test_flags_override_the_file_which_overrides_the_preset(tmp_path):
    (tmp_path / "c.yaml").write_text("seq_len: 64\nscore_tokens: 999\nratios: [0.2]\ndown_mono: true\n")
    args = parser().parse_args(
        [
            "reproduce",
            "--config",
            str(tmp_path / "c.yaml"),
            "--seq-len",
            "32",
            "--struct-dims",
            "2,4",
            "--down-items",
            "none",
            "--no-down-mono",
        ]
    )
    cfg = config(args, quick=True)
    assert (cfg.seq_len, cfg.score_tokens, cfg.ratios, cfg.eval_tokens) == (32, 999, [0.2], 256)
    assert cfg.struct_dims == [2, 4] and cfg.down_items is None and cfg.down_mono is False


def test_a_list_flag_with_a_bad_value_is_refused():
    with pytest.raises(LingregionError, match="unknown struct_families value 'rows'"):
        Config(struct_families=["rows"]).check_basics()


def test_every_command_and_option_has_help_text():
    import argparse

    sub = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    summaries = {c.dest: c.help for c in sub._choices_actions}
    for name, p in sub.choices.items():
        assert summaries[name] and p.description, name
        for a in p._actions:
            assert a.help or isinstance(a, argparse._HelpAction), (name, a.option_strings or a.dest)


def test_values_are_typed_however_the_config_is_made(tmp_path):
    """The API, a YAML file and the flags meet the same checks: a bool is never taken for a number, a number
    where a float is declared becomes that float, a path its text, a tuple a list."""
    cfg = Config(train_lr=1, ratios=(0.1,), texts={"ru": tmp_path / "ru.txt"}, model=tmp_path)
    assert cfg.train_lr == 1.0 and isinstance(cfg.train_lr, float) and cfg.ratios == [0.1]
    assert cfg.texts == {"ru": str(tmp_path / "ru.txt")} and cfg.model == str(tmp_path)
    assert Config.from_dict({"down_items": None}).down_items is None
    for kwargs, message in [
        ({"seq_len": True}, "seq_len must be a whole number, not True (a boolean)"),
        ({"seq_len": 16.0}, "seq_len must be a whole number, not 16.0 (a number)"),
        ({"trust_remote_code": "false"}, "trust_remote_code must be true or false, not 'false'"),
        ({"trust_remote_code": 0}, "trust_remote_code must be true or false, not 0 (a whole number)"),
        ({"texts": {"ru": 5}}, "each entry of texts must be text, not 5"),
        ({"score_langs": ["ru", "../x"]}, "language code '../x' is not 1 to 32 letters"),
        ({"texts": {"../x": "f.txt"}}, "language code '../x'"),
        ({"train_lang": "a" * 33}, "is not 1 to 32 letters"),
        ({"mono_langs": []}, "mono_langs is empty"),
        ({"exclude": "[a-"}, "exclude '[a-' is not a valid regex"),
    ]:
        with pytest.raises(LingregionError, match=re.escape(message)):
            Config(**kwargs)


def test_every_field_has_a_type_that_values_are_checked_against():
    from lingregion.config import _typed, field_types

    for f in fields(Config):
        default = f.default if f.default is not MISSING else f.default_factory()
        assert _typed(f.name, default, field_types()[f.name]) == default, f.name


def test_the_results_digest_leaves_out_what_does_not_change_a_result():
    base = Config().results_digest()
    assert Config(batch_size=1, device="cuda", experiments=["removal"]).results_digest() == base
    assert Config(ratios=[0.02]).results_digest() != base and Config(model="x").results_digest() != base


def test_the_default_removal_table_has_the_papers_thirty_languages_and_quick_stays_small():
    from lingregion import corpus
    from lingregion.config import PAPER_EVAL_LANGS

    cfg = Config()
    table = cfg.eval_langs
    assert len(set(table)) == 30 and table[:12] == PAPER_EVAL_LANGS and set(table) <= set(corpus.builtin_languages())
    quick = Config.quick()
    assert quick.eval_langs == ["ar", "zh", "ru", "uk", "en"]
    assert (cfg.train_lr, quick.train_lr) == (1e-4, 5e-5)  # the CPU forgetting protocol; quick as it was
