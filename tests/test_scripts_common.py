"""scripts/_common.py: the one helper module the scripts share (path bootstrap, subprocess runner)."""

from __future__ import annotations

import ast
import importlib.util
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_t_{name}", SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _script_imports(path: Path) -> set[str]:
    """The names of other scripts a script imports."""
    stems = {p.stem for p in SCRIPTS.glob("*.py")} - {path.stem}
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names} & stems
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out |= {node.module.split(".")[0]} & stems
    return out


def test_scripts_import_only_the_common_module():
    imports = {p.name: _script_imports(p) for p in sorted(SCRIPTS.glob("*.py"))}
    assert imports["compare_models.py"] == {"_common"}  # no longer from benchmark_quality
    assert imports["benchmark.py"] == {"_common", "benchmark_metrics"}  # benchmark_metrics is its library
    assert imports["_common.py"] == set()
    assert all(deps <= {"_common"} for name, deps in imports.items() if name != "benchmark.py"), imports
    # every script that puts the repository on the path does it through _common
    for path in SCRIPTS.glob("*.py"):
        text = path.read_text(encoding="utf-8")
        if path.name != "_common.py":
            assert "parents[1]" not in text and "parent.parent" not in text, path.name


def test_a_script_loaded_from_its_file_gets_the_shared_runner():
    common = _load("_common")
    compare = _load("compare_models")
    bq = _load("benchmark_quality")
    assert compare.REPO == bq.REPO == common.REPO == REPO
    assert compare.run_logged.__module__ == bq.run_logged.__module__ == "_common"


def test_run_logged_appends_output_and_raises_with_the_tail(tmp_path):
    common = _load("_common")
    log = tmp_path / "log.txt"
    env = common.repo_env(PROBUNET_T="x")
    common.run_logged([sys.executable, "-c", "import os; print('hello', os.environ['PROBUNET_T'])"], env, log)
    text = log.read_text()
    assert text.startswith("$ ") and "hello x" in text
    with pytest.raises(RuntimeError, match=r"failed \(exit 3\); see .*log\.txt: .*boom"):
        common.run_logged([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], env, log)
    assert "hello x" in log.read_text()  # appended, not overwritten


def test_repo_env_puts_the_repository_first_on_pythonpath(monkeypatch):
    common = _load("_common")
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    env = common.repo_env(pythonpath=True, OMP_NUM_THREADS="1")
    assert env["PYTHONPATH"] == str(REPO) + os.pathsep + "/elsewhere" and env["OMP_NUM_THREADS"] == "1"
    assert "PYTHONPATH" not in common.repo_env() or common.repo_env()["PYTHONPATH"] == "/elsewhere"
