"""The README and docs/*.md hold together: the README stays a five-minute read, links every page of docs/,
and every relative link, anchor and repository path the pages quote resolves.

Why: the README's detail moved into docs/ (issue 25); a renamed heading, a moved file or a benchmark
script that left the tree would otherwise leave a reader at a dead link or a command that cannot run.
A script that left the tree may still be named where docs/performance.md's table of removed scripts
lists it (with the commit to run it from).
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
README_MAX_LINES = 150
REMOVED_SCRIPTS_HEADING = "## Scripts that left the tree"

FENCE = re.compile(r"^```.*?^```[^\n]*$", re.S | re.M)
CODE_SPAN = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$", re.M)
# Repository paths a page may quote in code: checked against the tree (globs and {a,b} expanded).
REPO_PATH = re.compile(r"(?<![\w./-])((?:benchmarks|scripts|notebooks|tests|constraints|docs)/"
                       r"(?:\{[^{}\s]*\}|[^\s`'\"(),;{}])*)")


def prose(text: str) -> str:
    """The page without fenced code blocks and code spans: what a renderer turns into links and headings."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link targets dropped, lower case, punctuation but - and _ (code
    spans' backticks included) removed, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every anchor GitHub gives the page's headings (a repeated heading gets -1, -2, ...)."""
    seen: dict[str, int] = {}
    found = set()
    for _, title in HEADING.findall(FENCE.sub("", page.read_text())):
        base = slug(title)
        count = seen.get(base, 0)
        found.add(base if count == 0 else f"{base}-{count}")
        seen[base] = count + 1
    return found


def broken_links(page: Path) -> list[str]:
    """The page's relative links whose file, or whose anchor in a markdown file, does not exist."""
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        path = (page.parent / path_part).resolve() if path_part else page
        if not path.exists():
            broken.append(f"{target}: no file {path}")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target}: no heading with anchor #{anchor} in {path.name}")
    return broken


def expand_braces(pattern: str) -> list[str]:
    """`a.{json,log}` -> [`a.json`, `a.log`] (the shell's brace expansion, as the pages write result files)."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    return [expanded for choice in match.group(1).split(",")
            for expanded in expand_braces(pattern[:match.start()] + choice + pattern[match.end():])]


def quoted_paths(text: str) -> set[str]:
    """Repository paths in the page's code (spans and fenced blocks), placeholders (<name>) left out."""
    code = "\n".join(CODE_SPAN.findall(FENCE.sub("", text)) + FENCE.findall(text))
    return {path.rstrip(".:") for path in REPO_PATH.findall(code) if "<" not in path}


def removed_scripts() -> set[str]:
    """The scripts docs/performance.md lists as having left the tree (first code span of each table row)."""
    section = (DOCS / "performance.md").read_text().partition(REMOVED_SCRIPTS_HEADING)[2]
    section = re.split(r"^## ", section, flags=re.M)[0]
    return {match.group(1) for match in re.finditer(r"^\|\s*`([^`]+)`", section, re.M)}


def missing_paths(page: Path, removed: set[str]) -> list[str]:
    """Quoted repository paths that match nothing in the tree and are not listed as removed."""
    return sorted(path for path in quoted_paths(page.read_text()) if path not in removed
                  and not any(list(ROOT.glob(p)) for p in expand_braces(path)))


def test_the_readme_is_a_five_minute_read():
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/ (at most {README_MAX_LINES})"


def test_the_readme_links_every_page_of_docs():
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in LINK.findall(prose(README.read_text()))}
    pages = sorted(DOCS.glob("*.md"))
    assert pages, "docs/ holds no pages"
    assert [page.name for page in pages if page.resolve() not in linked] == []


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_every_relative_link_and_anchor_resolves(page):
    assert broken_links(page) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_every_quoted_repository_path_exists(page):
    assert missing_paths(page, removed_scripts()) == []


def test_the_checks_catch_what_they_look_for(tmp_path):
    """The helpers on a page written to break each rule: a missing file, a missing anchor, a missing path."""
    (tmp_path / "other.md").write_text("# Some `code` title\n## Repeated\n## Repeated\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#some-code-title) [dup](other.md#repeated-1) [gone](nowhere.md)\n"
                    "[bad anchor](other.md#nope) [self](#local) [web](https://example.org/x)\n"
                    "`benchmarks/results/bench-synthetic-4b.{json,log}` `benchmarks/no_such_script.py`\n"
                    "```\n[not a link](nowhere-in-code.md)\n```\n## Local\n")
    assert broken_links(page) == ["nowhere.md: no file " + str(tmp_path / "nowhere.md"),
                                  "other.md#nope: no heading with anchor #nope in other.md"]
    assert missing_paths(page, removed=set()) == ["benchmarks/no_such_script.py"]
    assert missing_paths(page, removed={"benchmarks/no_such_script.py"}) == []
