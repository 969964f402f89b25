"""The user documentation: README.md stays a short manual, every relative link in
README.md, data/README.md and docs/*.md resolves (files and #anchors), and every config
key and command option is documented in docs/configs.md."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 220

_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.S | re.M)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$", re.M)


def doc_files() -> list[Path]:
    return [ROOT / "README.md", ROOT / "data" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


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

    flags = [f.metadata["flag"] for cls in (options.TrainOptions, options.EvaluateOptions, options.PredictOptions)
             for f in dataclasses.fields(cls) if f.metadata.get("flag")]
    assert "--num-samples" in flags and "--shard" in flags
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
