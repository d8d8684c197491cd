"""Every relative link of the documentation resolves: the linked file exists and, where the link names an anchor
of a markdown file, that file has a heading with that anchor (GitHub's slugs). Web and mail links, and links in
code (fenced blocks and inline spans), are not checked."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")  # [text](target "title")
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)(?:\s+#+)?\s*$")
CODE_SPAN = re.compile(r"(`+).+?\1")
EXTERNAL = re.compile(r"(?i)(https?:|mailto:)")


def doc_files() -> list[Path]:
    """The pages whose links are checked: README.md, BENCHMARKS.md, docs/**/*.md and assets/*/README.md."""
    pages = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return pages + sorted(ROOT.glob("assets/*/README.md"))


def prose(text: str, spans: bool = True) -> list[str]:
    """The lines of ``text`` with fenced code blocks blanked, and inline code spans too where ``spans``."""
    lines, fence = [], ""
    for line in text.splitlines():
        match = FENCE.match(line)
        if match and not fence:
            fence, line = match.group(1), ""
        elif match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence):
            fence, line = "", ""
        lines.append("" if fence else CODE_SPAN.sub("", line) if spans else line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: its text (a link counts by its text) in lower case, every character that is
    not a letter, digit, space, hyphen or underscore dropped, spaces turned into hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors of the headings of a markdown text; a repeated slug gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for line in prose(text, spans=False):
        match = HEADING.match(line)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def broken_links(page: Path, text: str) -> list[str]:
    """'line: target (why)' for each relative link of ``text``, the page at ``page``, that does not resolve."""
    problems = []
    body = "\n".join(prose(text))
    for match in LINK.finditer(body):
        target = match.group(1)
        if EXTERNAL.match(target):
            continue
        line = body.count("\n", 0, match.start()) + 1
        file_part, _, anchor = target.partition("#")
        dest = page.parent / unquote(file_part) if file_part else page
        if file_part and not dest.exists():
            problems.append(f"{line}: {target} (no such file)")
            continue
        if anchor and dest.suffix == ".md":
            dest_text = dest.read_text(encoding="utf-8") if file_part else text
            if unquote(anchor) not in anchors(dest_text):
                problems.append(f"{line}: {target} (no heading with this anchor)")
    return problems


@pytest.mark.parametrize("page", doc_files(), ids=lambda page: page.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    """Each relative link of the page names an existing file and, for a markdown file, one of its headings."""
    assert broken_links(page, page.read_text(encoding="utf-8")) == []


def test_every_documentation_page_is_checked():
    """The pages above are found (an empty list would pass the link test vacuously)."""
    names = {page.relative_to(ROOT).as_posix() for page in doc_files()}
    assert {"README.md", "BENCHMARKS.md", "docs/testbed.md", "docs/study_four/study.md"} <= names
    assert {"assets/testbed-sd/README.md", "assets/tiny-sd/README.md"} <= names


def test_slugs_and_broken_links_are_found(tmp_path):
    """The checker itself, on hand-made pages: GitHub slugs, numbered duplicates, and each kind of broken link
    reported, while web links and links in code are skipped."""
    assert slug("DDPO, GRPO, B2-DiffuRL and SRRL as presets of one code") == (
        "ddpo-grpo-b2-diffurl-and-srrl-as-presets-of-one-code")
    assert slug("`train.sh` variables") == "trainsh-variables"
    assert slug("7. Defects of the original code") == "7-defects-of-the-original-code"
    (tmp_path / "other.md").write_text("# Title\n\n## Part\n\n## Part\n\n```\n# not a heading\n```\n", encoding="utf-8")
    assert anchors((tmp_path / "other.md").read_text(encoding="utf-8")) == {"title", "part", "part-1"}
    text = ("# Page\n\n[fine](other.md#part-1), [fine](#page), [a picture](other.md), [web](https://x.org/a.md#b)\n"
            "[gone](missing.md), [bad anchor](other.md#part-2) and [a link over\ntwo lines](#nowhere)\n"
            "```bash\n[in a fence](missing.md)\n```\n`[in a span](missing.md)`\n")
    assert broken_links(tmp_path / "page.md", text) == [
        "4: missing.md (no such file)",
        "4: other.md#part-2 (no heading with this anchor)",
        "4: #nowhere (no heading with this anchor)",
    ]
