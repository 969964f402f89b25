"""What the scripts share: the path bootstrap and the subprocess runner.

A script runs from a source checkout without probunet installed: importing this
module puts the repository root on ``sys.path`` when ``import probunet`` fails
(an installed probunet is used otherwise). ``scripts/`` itself must be on the
path to import this module: it is when a script runs as ``python scripts/x.py``;
a script loaded from its file (as the tests do) adds it first::

    sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/_common
    from _common import REPO, run_logged  # noqa: E402

Not a part of probunet (nothing in the package imports it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def add_repo_to_path(always: bool = False) -> None:
    """Make ``import probunet`` work from a source checkout: the repository root first on ``sys.path``
    when probunet is not importable (``always``: whatever is installed, for a script that checks this
    tree's code)."""
    if str(REPO) in sys.path:
        return
    if not always:
        try:
            import probunet  # noqa: F401
            return
        except ImportError:
            pass
    sys.path.insert(0, str(REPO))


def repo_env(*, pythonpath: bool = False, **extra: str) -> dict:
    """The environment of a subprocess: this one's, plus ``extra``; ``pythonpath``: the repository root
    first on ``PYTHONPATH`` (the child then imports this tree's probunet from any directory)."""
    env = {**os.environ, **extra}
    if pythonpath:
        env["PYTHONPATH"] = str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")
    return env


def run_logged(cmd: list[str], env: dict, log: Path) -> None:
    """Run ``cmd`` in the repository, its output appended to ``log``; a failure raises with the log's tail."""
    with open(log, "a", encoding="utf-8") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
    if proc.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-5:]
        raise RuntimeError(f"{' '.join(cmd[2:5])} failed (exit {proc.returncode}); see {log}: " + " | ".join(tail))


add_repo_to_path()
