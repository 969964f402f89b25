"""The user documentation: README.md stays a short manual, every relative link in
README.md, data/README.md, docs/*.md and docs/results/*.md resolves (files and #anchors),
every config key and command option is documented in docs/configs.md, and every config
value a doc quotes as shipped is the config's value.

A doc quotes a shipped value in one of two forms, both checked:

- inline: `configs/synthetic.yaml`: `train.beta: 2.0` (more `key: value` spans may follow,
  separated by commas or "and");
- a Markdown table with columns named config, key and value; the config cell names one or
  more files or globs (`configs/zoo/lidc/*.yaml`), each of which must hold that value.

The value is read as YAML and compared with the config as load_config resolves it
(defaults included). docs/results/ is a log of past configs and is not checked."""

from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 240  # a short manual; the Models section carries the LIDC zoo table

_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.S | re.M)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$", re.M)


def doc_files() -> list[Path]:
    return [ROOT / "README.md", ROOT / "data" / "README.md", *sorted((ROOT / "docs").glob("*.md")),
            *sorted((ROOT / "docs" / "results").glob("*.md"))]


def shipped_value_docs() -> list[Path]:
    """The docs whose config quotes must match the configs (not the dated results log)."""
    return [p for p in doc_files() if p.parent.name != "results"]


def strip_code(text: str) -> str:
    """The text without fenced code blocks and inline code spans (links there are not links)."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def links(text: str) -> list[str]:
    return [m.group(1) for m in _LINK.finditer(strip_code(text))]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, with GitHub's -1, -2 ... for repeated headings."""
    seen: dict[str, int] = {}
    out = set()
    for m in _HEADING.finditer(_FENCE.sub("", path.read_text(encoding="utf-8"))):
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    problems = []
    name = path.relative_to(root)
    for target in links(path.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            problems.append(f"{name}: {target} (no such file)")
            continue
        if anchor:
            if dest.suffix != ".md":
                problems.append(f"{name}: {target} (an anchor into a non-Markdown file)")
            elif anchor not in anchors(dest):
                problems.append(f"{name}: {target} (no heading '#{anchor}' in {dest.name})")
    return problems


# ----------------------------------------------------------------------------- the checker itself


def test_slug_follows_github():
    assert slug("Array axes and geometry (`probunet.data.io`)") == "array-axes-and-geometry-probunetdataio"
    assert slug("The Probabilistic U-Net and its loss (Kohl et al. 2018)") == \
        "the-probabilistic-u-net-and-its-loss-kohl-et-al-2018"
    assert slug("`lidc_pickle`") == "lidc_pickle"


def test_link_checker_finds_broken_links(tmp_path):
    (tmp_path / "other.md").write_text("# Title\n\n## A section\n\n## A section\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n"
        "[ok](other.md) [ok anchor](other.md#a-section) [repeat](other.md#a-section-1) [self](#page)\n"
        "[gone](missing.md) [bad anchor](other.md#nope) ![fig](fig.png) [web](https://example.org/x)\n"
        "`[not a link](nowhere.md)`\n\n```\n[not a link either](nowhere2.md)\n```\n")
    problems = broken_links(page, root=tmp_path)
    assert len(problems) == 3, problems
    assert any("missing.md" in p for p in problems)
    assert any("#nope" in p for p in problems)
    assert any("fig.png" in p for p in problems)


# ----------------------------------------------------------------------------- the documents


def test_readme_is_a_short_manual():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path):
    assert path.is_file()
    assert broken_links(path) == []


def test_the_user_guide_pages_exist_and_are_linked_from_the_readme():
    readme = links((ROOT / "README.md").read_text(encoding="utf-8"))
    for page in ("configs", "data", "metrics", "models", "quality", "safety", "distributed", "benchmarks", "cvae"):
        assert (ROOT / "docs" / f"{page}.md").is_file(), page
        assert f"docs/{page}.md" in readme, f"README.md does not link docs/{page}.md"


def test_no_doc_cites_internal_design_files():
    for path in doc_files():
        text = path.read_text(encoding="utf-8")
        assert "../shared/" not in text and "DESIGN.md" not in text, path


def config_keys() -> list[str]:
    from probunet.config import Config

    def walk(cls, prefix):
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default):
                yield from walk(type(default), f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}"

    return list(walk(Config, ""))


def test_every_config_key_is_documented():
    keys = config_keys()
    assert {"model.name", "data.split.file", "train.geco.goal", "eval.empty_iou"} <= set(keys)
    text = (ROOT / "docs" / "configs.md").read_text(encoding="utf-8")
    missing = [k for k in keys if f"`{k}`" not in text]
    assert missing == [], f"config keys missing from docs/configs.md: {missing}"


def test_every_command_option_is_documented():
    from probunet import options

    classes = [c for c in vars(options).values() if dataclasses.is_dataclass(c) and c.__name__.endswith("Options")]
    assert len(classes) == 11  # one per command
    flags = [f.metadata["flag"] for cls in classes for f in dataclasses.fields(cls) if f.metadata.get("flag")]
    assert "--num-samples" in flags and "--shard" in flags and "--3d" in flags
    text = (ROOT / "docs" / "configs.md").read_text(encoding="utf-8")
    missing = sorted({flag for flag in flags if f"`{flag}" not in text})
    assert missing == [], f"command options missing from docs/configs.md: {missing}"


def layout_block() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Layout", 1)[1].split("\n## ", 1)[0]
    return section.split("```", 2)[1]


def test_readme_layout_names_every_module():
    """The Layout section follows the tree: every module of probunet/, probunet/data/ and
    probunet/models/ is named there (a new module needs its line)."""
    block = layout_block()
    modules = [p for folder in ("probunet", "probunet/data", "probunet/models")
               for p in sorted((ROOT / folder).glob("*.py")) if p.name not in ("__init__.py", "__main__.py")]
    assert len(modules) > 20
    missing = [str(p.relative_to(ROOT)) for p in modules if not re.search(rf"\b{re.escape(p.name)}", block)]
    assert missing == [], f"modules missing from the README's Layout section: {missing}"
    zoo = [p.stem for p in (ROOT / "probunet" / "models" / "zoo").glob("*.py") if not p.stem.startswith("_")]
    assert [m for m in zoo if not re.search(rf"\b{m}\b", block)] == []


# ----------------------------------------------------------------------------- quoted config values

_DOUBLE_SPAN = re.compile(r"``.*?``", re.S)  # ``...`` shows the convention itself: not a quote
_INLINE_QUOTE = re.compile(
    r"`(configs/[^`\s]+\.ya?ml)`:((?:\s*`[A-Za-z_][\w.]*: [^`\n]*`(?:\s*,|\s+and)?)+)")
_KEY_VALUE = re.compile(r"`([A-Za-z_][\w.]*): ([^`\n]*)`")
_CELL_SPLIT = re.compile(r"(?<!\\)\|")


@dataclasses.dataclass(frozen=True)
class Quote:
    line: int
    config: str   # a path or glob relative to the checkout
    key: str      # dotted, e.g. train.beta
    value: str    # as written in the doc


def _blank(match: re.Match) -> str:
    """The match replaced by spaces, its newlines kept (line numbers stay right)."""
    return re.sub(r"[^\n]", " ", match.group(0))


def _cells(row: str) -> list[str]:
    return [c.strip().replace("\\|", "|") for c in _CELL_SPLIT.split(row.strip().strip("|"))]


def _unquote(cell: str) -> str:
    return cell.strip().strip("`").strip()


def config_quotes(text: str) -> list[Quote]:
    """Every shipped config value a Markdown text quotes, in either form (see the docstring)."""
    text = _DOUBLE_SPAN.sub(_blank, _FENCE.sub(_blank, text))
    quotes = []
    for m in _INLINE_QUOTE.finditer(text):
        for kv in _KEY_VALUE.finditer(m.group(2)):
            line = text.count("\n", 0, m.start(2) + kv.start()) + 1
            quotes.append(Quote(line, m.group(1), kv.group(1), kv.group(2).strip()))
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        header = [_unquote(c).lower() for c in _cells(lines[i])] if lines[i].lstrip().startswith("|") else []
        if {"config", "key", "value"} <= set(header) and i + 1 < len(lines) and set(lines[i + 1]) <= set("|-: "):
            col = {name: header.index(name) for name in ("config", "key", "value")}
            i += 2
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                cells = _cells(lines[i])
                cell = lambda name: cells[col[name]] if col[name] < len(cells) else ""  # noqa: E731
                configs = re.findall(r"`([^`]+)`", cell("config")) or \
                    [c.strip() for c in cell("config").split(",") if c.strip()]
                for config in configs or [""]:
                    quotes.append(Quote(i + 1, config, _unquote(cell("key")), _unquote(cell("value"))))
                i += 1
            continue
        i += 1
    return sorted(quotes, key=lambda q: q.line)


@functools.lru_cache(maxsize=None)
def _resolved_config(path: str) -> dict:
    from probunet.config import load_config

    return load_config(path).to_dict()


def _plain(value):
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _shown(value) -> str:
    """A config value as YAML writes it inline: null, true, 2.0, [4, 8]."""
    if isinstance(value, list):
        return "[" + ", ".join(_shown(v) for v in value) + "]"
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return str(value)


def _doc_value(text: str, actual):
    """The doc's value read as YAML; a number YAML 1.1 reads as text (3e-4) still compares as one."""
    value = yaml.safe_load(text) if text else None
    if isinstance(value, str) and isinstance(actual, (int, float)) and not isinstance(actual, bool):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def quote_problems(path: Path, root: Path = ROOT) -> list[str]:
    """One line per quote of ``path`` that does not match its config: doc, line, config, key."""
    name = path.relative_to(root)
    problems = []
    for q in config_quotes(path.read_text(encoding="utf-8")):
        where = f"{name}:{q.line}: {q.config or '(no config)'} {q.key or '(no key)'}"
        if not q.config or not q.key:
            problems.append(f"{where}: a quote needs a config and a key")
            continue
        files = sorted(root.glob(q.config)) if any(ch in q.config for ch in "*?[") else [root / q.config]
        files = [f for f in files if f.is_file()]
        if not files:
            problems.append(f"{where}: no such config")
            continue
        for f in files:
            config = f.relative_to(root)
            node = _resolved_config(str(f))
            for part in q.key.split("."):
                if not isinstance(node, dict) or part not in node:
                    problems.append(f"{name}:{q.line}: {config} {q.key}: no such key")
                    break
                node = node[part]
            else:
                actual = _plain(node)
                try:
                    expected = _plain(_doc_value(q.value, actual))
                except yaml.YAMLError:
                    problems.append(f"{name}:{q.line}: {config} {q.key}: the doc's value {q.value!r} is not YAML")
                    continue
                if expected != actual:
                    problems.append(f"{name}:{q.line}: {config} {q.key}: the doc says {q.value}, "
                                    f"the config has {_shown(actual)}")
    return problems


def test_config_quotes_are_found_in_both_forms():
    text = ("# Page\n\n"
            "Shipped: `configs/a.yaml`: `train.beta: 2.0`, `train.lr: 3e-4` and\n"
            "`model.features: [4, 8]`. Not a quote: ``\x60configs/x.yaml\x60: \x60k: v\x60``.\n\n"
            "| part | config | key | value |\n|---|---|---|---|\n"
            "| init | `configs/a.yaml`, `configs/*.yaml` | `model.init` | `he_normal` |\n\n"
            "```yaml\n`configs/a.yaml`: `train.beta: 9.0`\n```\n")
    quotes = config_quotes(text)
    assert [(q.line, q.config, q.key, q.value) for q in quotes] == [
        (3, "configs/a.yaml", "train.beta", "2.0"),
        (3, "configs/a.yaml", "train.lr", "3e-4"),
        (4, "configs/a.yaml", "model.features", "[4, 8]"),
        (8, "configs/a.yaml", "model.init", "he_normal"),
        (8, "configs/*.yaml", "model.init", "he_normal"),
    ]


def test_quote_checker_names_doc_line_config_and_key(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "a.yaml").write_text("model:\n  latent_dim: 2\ntrain:\n  beta: 2.0\n  lr: 3.0e-4\n")
    (tmp_path / "configs" / "b.yaml").write_text("train:\n  beta: 1.0\n")
    doc = tmp_path / "page.md"
    doc.write_text("# Page\n\n"
                   "`configs/a.yaml`: `train.beta: 2.0`, `train.lr: 3e-4`, `model.latent_dim: 2`\n"
                   "`configs/a.yaml`: `train.beta: 0.625`\n"
                   "`configs/a.yaml`: `train.nope: 1`\n"
                   "`configs/gone.yaml`: `train.beta: 1.0`\n\n"
                   "| config | key | value |\n|---|---|---|\n"
                   "| `configs/*.yaml` | `train.beta` | `2.0` |\n"
                   "| `configs/b.yaml` | `model.init` | `he_normal` |\n")
    problems = quote_problems(doc, root=tmp_path)
    assert problems == [
        "page.md:4: configs/a.yaml train.beta: the doc says 0.625, the config has 2.0",
        "page.md:5: configs/a.yaml train.nope: no such key",
        "page.md:6: configs/gone.yaml train.beta: no such config",
        "page.md:10: configs/b.yaml train.beta: the doc says 2.0, the config has 1.0",
    ], problems


def test_quality_md_quotes_the_shipped_recipe():
    quotes = config_quotes((ROOT / "docs" / "quality.md").read_text(encoding="utf-8"))
    assert len(quotes) >= 40
    assert any(q.config == "configs/synthetic.yaml" and q.key == "train.beta" for q in quotes)
    assert any(q.config == "configs/lidc.yaml" and q.key == "train.beta" for q in quotes)


@pytest.mark.parametrize("path", shipped_value_docs(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_quoted_config_value_matches_the_config(path):
    assert quote_problems(path) == []


def test_results_log_entries_are_dated_and_indexed():
    """docs/results/: one YYYY-MM-DD-topic.md per entry, each with its date, commit and command,
    each linked from docs/results/README.md."""
    folder = ROOT / "docs" / "results"
    entries = sorted(p for p in folder.glob("*.md") if p.name != "README.md")
    assert len(entries) >= 10
    index = set(links((folder / "README.md").read_text(encoding="utf-8")))
    for p in entries:
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}-[a-z0-9-]+\.md", p.name), p.name
        assert p.name in index, f"{p.name} is not linked from docs/results/README.md"
        text = p.read_text(encoding="utf-8")
        assert f"- **Date:** {p.name[:10]}" in text, p.name
        assert re.search(r"^- \*\*Commit:\*\* `[0-9a-f]{7,40}`", text, re.M), p.name
        assert re.search(r"^- \*\*Command:\*\*\n\n```", text, re.M), p.name

def test_the_python_examples_of_the_docs_import():
    """Every ``from probunet... import ...`` line of a ``python`` block in the docs names something that exists
    (the documented API, not a module that moved). The results log is left out: each entry shows the code of
    the commit it names."""
    import importlib

    fence = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
    found = []
    for path in (p for p in doc_files() if p.parent.name != "results"):
        for block in fence.findall(path.read_text(encoding="utf-8")):
            for m in re.finditer(r"^from (probunet[\w.]*) import ([\w, ]+)$", block, re.M):
                found.append((path.name, m.group(1), [n.strip() for n in m.group(2).split(",")]))
    assert ("predict.md", "probunet", ["Predictor", "predict_folder"]) in found
    missing = [f"{doc}: from {mod} import {name}" for doc, mod, names in found for name in names
               if not hasattr(importlib.import_module(mod), name)]
    assert missing == []


def shown_commands(text: str) -> list[str]:
    """The ``probunet ...`` command lines of the ``bash`` blocks of a Markdown text (continuations joined,
    comments dropped; usage lines with ``[options]`` or upper-case placeholders left out)."""
    out = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #", 1)[0].strip()
            if line.startswith("probunet ") and not re.search(r"\[|\b[A-Z_]{3,}\b", line):
                out.append(line)
    return out


@pytest.mark.parametrize("path", [p for p in doc_files() if p.parent.name != "results"],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_the_docs_show_parses(path):
    """Every ``probunet`` command line the docs show is a command with options it has, as written (the results
    log shows the commands of the commits it names)."""
    import shlex

    from probunet.cli import build_parser, parse_args

    for line in shown_commands(path.read_text(encoding="utf-8")):
        argv = shlex.split(line)[1:]
        args = parse_args(build_parser(), argv)
        assert args.command == argv[0] and args.func is not None, line


def test_shown_commands_finds_the_readmes_commands():
    lines = shown_commands((ROOT / "README.md").read_text(encoding="utf-8"))
    assert "probunet prepare-lidc --synthetic-images --crop-size 64 --out data/lidc_style" in lines
    assert "probunet evaluate runs/lidc --num-samples 100" in lines
    assert not any(line.startswith("probunet train CONFIG") for line in lines)
