import json
import subprocess
import sys

import pytest
import torch
import yaml

from lingregion.cli import main
from lingregion.regions import Region

TINY = [
    "--seq-len",
    "16",
    "--score-tokens",
    "32",
    "--eval-tokens",
    "32",
    "--score-langs",
    "ru,es",
    "--eval-langs",
    "ru,zh",
    "--ratios",
    "0.05",
    "--batch-size",
    "2",
]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_reproduce_end_to_end_and_resume(tiny_folder, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, _ = run(capsys, "reproduce", "--model", tiny_folder, "--out", out, *TINY)
    assert code == 0
    assert "| Language | Base | top 0.05 | bottom 0.05 | random 0.05 |" in stdout
    summary = json.loads((out / "results" / "removal-summary.json").read_text())
    assert summary["languages"] == ["ru", "zh"] and set(summary["table"]) == {
        "base",
        "top@0.05",
        "bottom@0.05",
        "random@0.05",
    }
    # provenance: model, tokenizer, data hash, token counts, window length, dtype, seed, version
    assert summary["model"]["fingerprint"] and summary["model"]["tokenizer"]
    assert summary["eval_windows"]["ru"]["text_sha256"] and summary["eval_windows"]["ru"]["tokens"] == 2 * 15
    assert summary["protocol"]["seq_len"] == 16 and summary["protocol"]["dtype"] == "float32"
    assert summary["environment"]["lingregion"]
    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == 0
    for name in [
        "report.md",
        "report.html",
        "scores/ru.safetensors",
        "regions/core-top-0.05.safetensors",
        "figures/removal.png",
        "figures/core-grid.png",
        "figures/core-q_proj.png",
    ]:
        assert (out / name).is_file(), name
    assert not list(out.rglob("*.tmp"))
    region = Region.load(out / "regions" / "core-top-0.05.safetensors")
    assert region.meta["languages"] == ["ru", "es"] and region.meta["model"] == summary["model"]["fingerprint"]

    # a second identical command reuses scores and results instead of recomputing them
    stamps = {p: p.stat().st_mtime_ns for p in (out / "scores").iterdir()}
    results = (out / "results" / "removal.json").read_text()
    code, stdout2, _ = run(capsys, "reproduce", "--model", tiny_folder, "--out", out, *TINY)
    assert code == 0 and stdout2 == stdout
    assert stamps == {p: p.stat().st_mtime_ns for p in (out / "scores").iterdir()}
    assert (out / "results" / "removal.json").read_text() == results

    # the report is one self-contained HTML file, rebuilt identically from saved results alone
    from test_report import check_html

    html, md = (out / "report.html").read_text(), (out / "report.md").read_text()
    check_html(html, out)
    for f in (out / "figures").glob("*.png"):
        assert f"(figures/{f.name})" in md
    (out / "report.md").unlink()
    (out / "report.html").unlink()
    assert run(capsys, "report", out)[0] == 0
    assert (out / "report.html").read_text() == html and (out / "report.md").read_text() == md


def test_score_locate_evaluate_commands(tiny_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        run(
            capsys,
            "score",
            "--model",
            tiny_folder,
            "--lang",
            "ru",
            "--lang",
            "es",
            "--seq-len",
            16,
            "--score-tokens",
            32,
            "--out",
            out,
        )[0]
        == 0
    )
    region = tmp_path / "top.safetensors"
    code, stdout, _ = run(capsys, "locate", "--run", out, "--langs", "ru,es", "--ratio", 0.1, "--out", region)
    assert code == 0 and "top 0.1" in stdout
    code, stdout, _ = run(
        capsys,
        "evaluate",
        "--model",
        tiny_folder,
        "--lang",
        "ru",
        "--remove",
        region,
        "--seq-len",
        16,
        "--eval-tokens",
        32,
    )
    assert code == 0 and "| ru |" in stdout
    q = "model.layers.0.self_attn.q_proj.weight"
    for extra in ([], ["--matrix", q, "--head-dim", 16]):
        png = tmp_path / f"plot{len(extra)}.png"
        assert run(capsys, "plot", region, "--out", png, *extra)[0] == 0
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, _, err = run(capsys, "plot", region, "--matrix", "q_proj", "--out", tmp_path / "x.png")
    assert code == 2 and "names look like model.layers.0.self_attn.q_proj.weight" in err


def test_config_file_round_trip(tiny_folder, tmp_path, capsys):
    """A run's saved config.yaml repeats it exactly; flags override the file; the file overrides the preset."""
    first, again = tmp_path / "first", tmp_path / "again"
    assert run(capsys, "reproduce", "--model", tiny_folder, "--out", first, "--experiments", "removal", *TINY)[0] == 0
    saved = yaml.safe_load((first / "config.yaml").read_text())
    assert saved["seq_len"] == 16 and saved["score_langs"] == ["ru", "es"] and saved["experiments"] == ["removal"]
    assert run(capsys, "reproduce", "--config", first / "config.yaml", "--out", again)[0] == 0
    assert (again / "config.yaml").read_text() == (first / "config.yaml").read_text()
    a, b = (json.loads((d / "results" / "removal-summary.json").read_text()) for d in (first, again))
    assert a["table"] == b["table"] and a["regions"] == b["regions"]

    from lingregion.cli import config, parser

    (tmp_path / "c.yaml").write_text("seq_len: 64\nscore_tokens: 999\nratios: [0.2]\n")
    cfg = config(
        parser().parse_args(["reproduce", "--config", str(tmp_path / "c.yaml"), "--seq-len", "32"]), quick=True
    )
    assert (cfg.seq_len, cfg.score_tokens, cfg.ratios, cfg.eval_tokens) == (32, 999, [0.2], 256)


# Config files written by hand or shared: each value is checked against its field's type before anything runs.
CONFIGS = {
    "QUOTED_INT": 'seq_len: "16"\n',
    "SCALAR_LIST": "ratios: 0.05\n",
    "STRING_LIST": "experiments: removal\n",
    "QUOTED_FALSE": 'trust_remote_code: "false"\n',
    "YES": "trust_remote_code: yes\n",
    "QUOTED_NULLABLE": 'down_items: "8"\n',
    "BAD_KEY": "score_tokenz: 5\n",
    "BAD_YAML": "ratios: [0.1\n",
}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["reproduce", "--eval-langs", "xx"], "unknown language 'xx'"),
        (["reproduce", "--ratios", "1.5"], "outside (0, 1)"),
        (["reproduce", "--experiments", "nope"], "unknown experiment"),
        (["reproduce", "--config", "/nonexistent.yaml"], "config file not found"),
        (["reproduce", "--config", "BAD_KEY"], "unknown config key(s): score_tokenz"),
        (["reproduce", "--config", "BAD_YAML"], "not valid YAML"),
        (["evaluate", "--model", "/nonexistent/model", "--lang", "ru"], "cannot load model"),
        (
            ["reproduce", "--config", "QUOTED_INT"],
            "seq_len must be a whole number, not '16' (text); write the number without quotes",
        ),
        (
            ["reproduce", "--config", "SCALAR_LIST"],
            "ratios must be a list of numbers, not 0.05 (a number); write a list",
        ),
        (["reproduce", "--config", "STRING_LIST"], "experiments must be a list of text, not 'removal' (text)"),
        (
            ["reproduce", "--config", "QUOTED_FALSE", "--model", "EVIL"],
            "trust_remote_code must be true or false, not 'false' (text); write true or false without quotes",
        ),
        (["reproduce", "--config", "YES"], "trust_remote_code must be true or false, not 'yes' (text)"),
        (["reproduce", "--config", "QUOTED_NULLABLE"], "down_items must be a whole number or null, not '8'"),
        (["reproduce", "--score-langs", ""], "score_langs is empty; name at least one language"),
        (["reproduce", "--eval-langs", ""], "eval_langs is empty; name at least one language"),
        (["reproduce", "--include", "("], "include '(' is not a valid regex"),
        (["evaluate", "--lang", "ru", "--device", "cuda:x", "--model", "NO_MODEL"], "'cuda:x' is not a torch device"),
        (["evaluate", "--lang", "ru", "--device", "cuda:99", "--model", "NO_MODEL"], "usable CUDA GPU(s)"),
        (["score", "--lang", "../../escaped=TEXT", "--model", "NO_MODEL"], "language code '../../escaped' is not"),
        (["evaluate", "--model", "UNKNOWN_ARCH", "--lang", "ru"], "cannot load model"),
    ],
)
def test_bad_input_is_one_line_exit_2(argv, message, tmp_path, capsys):
    """Refused before any model loads (NO_MODEL would fail to load), with nothing written anywhere: no file
    in or outside the run folder is created or removed (EVIL's code would leave a marker if it ran)."""
    for name, text in CONFIGS.items():
        (tmp_path / f"{name}.yaml").write_text(text)
    (tmp_path / "text.txt").write_text("Квантовая механика. " * 50, encoding="utf-8")
    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / "config.json").write_text(
        json.dumps({"model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig"}})
    )
    (tmp_path / "evil" / "evil.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').write('remote code ran')\n")
    (tmp_path / "unknown").mkdir()
    (tmp_path / "unknown" / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    paths = {
        **{name: tmp_path / f"{name}.yaml" for name in CONFIGS},
        "EVIL": tmp_path / "evil",
        "NO_MODEL": tmp_path / "no-model",
        "TEXT": tmp_path / "text.txt",
        "UNKNOWN_ARCH": tmp_path / "unknown",
    }
    argv = [_fill(a, paths) for a in argv]
    before = sorted(tmp_path.rglob("*"))
    code, _, err = run(capsys, *argv, *(["--out", tmp_path / "o"] if argv[0] in ("reproduce", "score") else []))
    assert code == 2
    assert err.count("\n") == 1 and message in err and err.startswith("lingregion: error:"), err
    assert sorted(tmp_path.rglob("*")) == before  # nothing half-written, in the run folder or outside it


def _fill(arg: str, paths: dict) -> str:
    """`arg` with the placeholder it holds (a key of `paths`) replaced by that path."""
    return next((arg.replace(k, str(v)) for k, v in paths.items() if k in arg), arg)


def test_remote_code_is_announced_with_the_model(tiny_folder, tmp_path, capsys):
    code, _, err = run(
        capsys,
        "evaluate",
        "--model",
        tiny_folder,
        "--lang",
        "ru",
        "--trust-remote-code",
        "--seq-len",
        16,
        "--eval-tokens",
        32,
    )
    assert code == 0
    assert f"lingregion: warning: trust_remote_code is true: the Python code in {tiny_folder}'s folder" in err


def test_out_under_a_file_is_refused_before_the_model_loads(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("keep me")
    code, _, err = run(
        capsys, "score", "--lang", "ru", "--model", tmp_path / "no-model", "--out", tmp_path / "notes.txt" / "run"
    )
    assert code == 2 and err.count("\n") == 1 and "is under" in err and "which is a file" in err
    assert (
        sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
        and (tmp_path / "notes.txt").read_text() == "keep me"
    )


def test_config_files_are_read_with_yaml_1_2_scalars(tmp_path):
    """Only true and false are booleans (Norwegian, no, stays a language), and 1e-6 is a number."""
    from lingregion.config import Config

    (tmp_path / "c.yaml").write_text("eval_langs: [no, en]\nest_ratios: [1e-6, 1.0e-4]\ndown_mono: false\n")
    cfg = Config.from_dict(Config.read(tmp_path / "c.yaml"))
    assert cfg.eval_langs == ["no", "en"] and cfg.est_ratios == [1e-6, 1e-4] and cfg.down_mono is False


def test_unknown_language_is_reported_before_any_experiment_rule(tmp_path, capsys):
    # the quick preset runs the estimators experiment, whose lape rule wants two score languages: the typo
    # must still be what the user hears about
    code, _, err = run(capsys, "reproduce", "--quick", "--score-langs", "xx", "--out", tmp_path / "o")
    assert code == 2 and "unknown language 'xx'" in err and "lape" not in err


def test_out_that_is_a_file_is_a_one_line_error(tmp_path, capsys):
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    code, _, err = run(capsys, "reproduce", "--quick", "--experiments", "removal", "--out", target)
    assert code == 2 and err.count("\n") == 1 and "is a file, not a run folder" in err
    assert target.read_text() == "keep me"


def test_score_one_language(tiny_folder, tmp_path, capsys):
    # score validates only what it runs: no experiment's rule (lape wants two languages) applies
    out = tmp_path / "run"
    code, stdout, err = run(
        capsys, "score", "--model", tiny_folder, "--lang", "ru", "--seq-len", 16, "--score-tokens", 32, "--out", out
    )
    assert code == 0, err
    assert (out / "scores" / "ru.safetensors").is_file() and "ru:" in stdout


def test_region_from_another_model_is_refused(tiny_folder, tmp_path, capsys):
    bad = tmp_path / "foreign.safetensors"
    Region.from_masks(
        {"model.layers.0.mlp.up_proj.weight": torch.ones(48, 32, dtype=torch.bool)}, {"model": "0000000000000000"}
    ).save(bad)
    code, _, err = run(capsys, "evaluate", "--model", tiny_folder, "--lang", "ru", "--remove", bad, "--seq-len", 16)
    assert code == 2 and "made on model 0000000000000000" in err
    (tmp_path / "cut.safetensors").write_bytes(bad.read_bytes()[:40])
    code, _, err = run(
        capsys,
        "evaluate",
        "--model",
        tiny_folder,
        "--lang",
        "ru",
        "--remove",
        tmp_path / "cut.safetensors",
        "--seq-len",
        16,
    )
    assert code == 2 and "corrupt or truncated" in err


def test_console_script_exits_2():
    proc = subprocess.run(
        [sys.executable, "-m", "lingregion.cli", "locate", "--ratio", "0.1", "--out", "x"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "lingregion: error:" in proc.stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (["reproduce", "--quick", "--split-half-share", "abc"], "argument --split-half-share: invalid float value"),
        (["reproduce", "--quick", "--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
        (["nosuch"], "invalid choice: 'nosuch'"),
    ],
)
def test_a_flag_argparse_refuses_is_one_line_exit_2(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*argv, *(["--out", str(tmp_path / "o")] if argv[0] == "reproduce" else [])])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and err.startswith("lingregion: error:") and message in err
    assert "usage:" not in err and not (tmp_path / "o").exists()
