"""The package's shape: the public API, unique file names, and imports that follow the data flow without a cycle."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import lingregion as lr
from lingregion.experiments.registry import EXPERIMENTS

PACKAGE = Path(lr.__file__).parent
README = PACKAGE.parent / "README.md"


def test_the_api_is_listed_and_importable():
    assert {
        "load",
        "windows",
        "score",
        "core",
        "monolingual",
        "removed",
        "applied",
        "perplexity",
        "generate",
        "plot",
        "reproduce",
        "Config",
        "Region",
        "Model",
    } <= set(lr.__all__)
    assert all(hasattr(lr, name) for name in lr.__all__)


def test_no_two_files_in_the_package_share_a_name():
    names = [p.name for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"]
    assert sorted(set(names)) == sorted(names)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, everywhere: bool = True) -> set[str]:
    """Package modules a file imports: in every statement, function bodies included (`everywhere`), or only
    in its top-level statements (what runs when it is imported)."""
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree) if everywhere else tree.body:
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            module = (base + "." + node.module if node.module else base) if node.level else node.module
            if module and module.startswith("lingregion"):
                found.add(module)
                found |= {f"{module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("lingregion")}
    return found


def _graph(everywhere: bool) -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {m: {i for i in _imports(p, everywhere) if i in files and i != m} for m, p in files.items()}
    # a package's __init__ runs before its submodules, so an edge to a parent package is not a cycle
    return {m: {i for i in deps if not m.startswith(i + ".")} for m, deps in graph.items()}


@pytest.mark.parametrize("everywhere", [False, True], ids=["module level", "function bodies too"])
def test_imports_have_no_cycle(everywhere):
    graph = _graph(everywhere)
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for dep in graph[m]:
            if state.get(dep) == 1:
                pytest.fail(
                    "import cycle: " + " → ".join(path[path.index(dep) :] + [dep])
                    if dep in path
                    else f"import cycle through {m} → {dep}"
                )
            if dep not in state:
                visit(dep, path + [dep])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


# The data flow, bottom to top: a module imports (anywhere, function bodies included) only modules of its own
# layer or below. A new module is placed here, so that where it sits in the flow is a decision.
LAYERS = [
    ["version", "store", "markup"],
    ["corpus_sources", "corpus", "distributed", "checkpoint", "architectures", "regions"],
    ["models", "config"],
    ["evaluation", "interventions", "scoring", "scorefile", "figures", "uncertainty", "memory"],
    ["importance", "slices", "freezing", "tasks", "export"],
    ["run", "pretraining", "api"],
    [
        "experiments",
        "experiments.training",
        "experiments.ranking",
        "experiments.estimator_damage",
        "experiments.estimator_stability",
        "experiments.estimator_regions",
    ],
    [f"experiments.{name}" for name in EXPERIMENTS],
    ["experiments.registry", "report", "pipeline"],
    ["", "cli"],
]


def test_imports_never_run_back_up_the_layers():
    layer = {("lingregion." + m).rstrip("."): i for i, names in enumerate(LAYERS) for m in names}
    graph = _graph(everywhere=True)
    assert sorted(graph) == sorted(layer), "place every module of the package in LAYERS"
    upward = [f"{m} → {dep}" for m, deps in graph.items() for dep in deps if layer[dep] > layer[m]]
    assert not upward, f"imports that run back up the layers: {upward}"
    # experiments never import each other; what two share lives in a helper module of their layer below
    experiments = {f"lingregion.experiments.{name}" for name in EXPERIMENTS}
    assert not [f"{m} → {dep}" for m in experiments for dep in graph[m] if dep in experiments]


def test_the_score_command_loads_no_experiment(tiny_folder, tmp_path):
    code = (
        "import sys; from lingregion.cli import main; "
        f"rc = main(['score', '--model', {str(tiny_folder)!r}, '--lang', 'ru', '--seq-len', '16', "
        f"'--score-tokens', '32', '--out', {str(tmp_path / 'run')!r}]); "
        "print(rc, sorted(m for m in sys.modules if m.startswith('lingregion.experiments')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.stdout.strip().splitlines()[-1] == "0 []", done.stderr[-2000:]


def test_every_public_function_has_a_docstring():
    missing = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        nodes = list(tree.body) + [n for c in tree.body if isinstance(c, ast.ClassDef) for n in c.body]
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                if ast.get_docstring(node) is None:
                    missing.append(f"{path.relative_to(PACKAGE)}:{node.name}")
    assert not missing, f"{len(missing)} public functions without a docstring: {missing[:20]}"


@pytest.mark.integration
def test_the_readme_python_api_runs_as_written(tmp_path):
    block = re.search(r"## Python API.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    done = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ja without the core region:" in done.stdout
    assert (tmp_path / "core-top-1pct.png").read_bytes().startswith(b"\x89PNG")


# --- CONTRIBUTING's "where things live" table, generated from the tree ------------------------------------
TESTS = Path(__file__).parent
CONTRIBUTING = PACKAGE.parent / "CONTRIBUTING.md"
BEGIN, END = "<!-- where-things-live: generated by `python tests/test_package.py` -->", "<!-- end where-things-live -->"
NO_OWN_TEST = {"version.py": "test_package.py"}  # one constant: checked where the package's shape is


def _summary(path: Path) -> str:
    """The first sentence of a module's docstring, on one line."""
    doc = " ".join((ast.get_docstring(ast.parse(path.read_text())) or "").split("\n\n")[0].split())
    return re.split(r"(?<=[a-z)`])\. ", doc)[0].rstrip(".").replace("|", "\\|")


def _test_file(path: Path) -> str:
    """The test file that mirrors a module: tests/test_X.py, tests/experiments/test_X.py for an experiment's."""
    sub = "experiments/" if path.parent.name == "experiments" else ""
    return NO_OWN_TEST.get(path.name, f"{sub}test_{path.stem}.py")


def where_things_live() -> str:
    """The table of every module of the package: what it does (its docstring) and the test file mirroring it."""
    rows = ["| Module | What it does | Tests |", "|---|---|---|"]
    for path in sorted(PACKAGE.rglob("*.py"), key=lambda p: (p.parent != PACKAGE, p.relative_to(PACKAGE).as_posix())):
        if path.name != "__init__.py":
            rel = path.relative_to(PACKAGE).as_posix()
            rows.append(f"| `{rel}` | {_summary(path)} | `tests/{_test_file(path)}` |")
    return "\n".join(rows)


def test_every_module_has_the_test_file_that_mirrors_it():
    missing = [
        f for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" and not (TESTS / (f := _test_file(p))).is_file()
    ]
    assert not missing, f"tests/ should mirror the package; missing {missing}"


def test_contributing_lists_where_things_live_as_the_tree_says():
    text = CONTRIBUTING.read_text(encoding="utf-8")
    assert BEGIN in text and END in text, f"CONTRIBUTING.md lacks the markers {BEGIN} … {END}"
    table = text.split(BEGIN)[1].split(END)[0].strip()
    assert table == where_things_live(), "the table is stale: run `python tests/test_package.py` to regenerate it"


if __name__ == "__main__":  # regenerate the table in CONTRIBUTING.md
    before, rest = CONTRIBUTING.read_text(encoding="utf-8").split(BEGIN)
    CONTRIBUTING.write_text(f"{before}{BEGIN}\n{where_things_live()}\n{END}{rest.split(END)[1]}", encoding="utf-8")
