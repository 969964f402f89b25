"""Files shipped with probunet: the example configs.

The configs have one source, the repository's ``configs/`` folder. An installed
probunet carries them as package data (``probunet/configs/*.yaml``, mapped in
``pyproject.toml``); a source checkout (editable install, or ``PYTHONPATH``)
reads ``configs/`` next to the package. :func:`config_dir` finds whichever
exists, the packaged copy first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

_PACKAGE = Path(__file__).resolve().parents[1]  # probunet/


def config_dir() -> Path:
    """The folder of the shipped configs (``probunet/configs`` when installed, else ``<repo>/configs``)."""
    for cand in (_PACKAGE / "configs", _PACKAGE.parent / "configs"):
        if cand.is_dir() and any(cand.glob("*.yaml")):
            return cand
    raise FileNotFoundError(f"the shipped configs are missing: neither {_PACKAGE / 'configs'} nor "
                            f"{_PACKAGE.parent / 'configs'} holds *.yaml files (reinstall probunet)")


def config_names() -> list[str]:
    """Names of the shipped configs, e.g. ``synthetic.yaml`` (sub-folders as ``zoo/unet.yaml``)."""
    root = config_dir()
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.yaml"))


def config_path(name: str) -> Path:
    """The shipped config ``name`` (``synthetic``, ``synthetic.yaml`` or ``zoo/unet.yaml``).

    Raises FileNotFoundError naming the config and listing the shipped ones.
    """
    root = config_dir()
    rel = name if name.endswith((".yaml", ".yml")) else f"{name}.yaml"
    path = root / rel
    if not path.is_file():
        raise FileNotFoundError(f"no shipped config {name!r} in {root}; shipped: {', '.join(config_names())}")
    return path


def resolve_config(path_or_name: str | Path, *, base: Optional[Path] = None) -> Path:
    """A config file given by the user: the path itself when it exists, else a shipped config of that
    name (``configs/synthetic.yaml`` and ``synthetic`` both find the shipped one from any folder)."""
    given = Path(path_or_name)
    if not given.is_absolute() and base is not None:
        given = base / given
    if given.is_file():
        return given
    name = Path(path_or_name)
    parts = name.parts[1:] if name.parts[:1] == ("configs",) else name.parts
    if parts and not name.is_absolute():
        try:
            return config_path("/".join(parts))
        except FileNotFoundError:
            pass
    raise FileNotFoundError(f"config not found: {path_or_name} (shipped configs: {', '.join(config_names())})")


__all__ = ["config_dir", "config_names", "config_path", "resolve_config"]
