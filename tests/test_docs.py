"""The documentation holds together: every relative link in README.md and docs/**/*.md resolves (files, folders and
#anchors, the anchors as GitHub slugs of the target page's headings), every plot has its raw data beside it, and the
README stays a front door."""
import re
import sys
import unicodedata
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 220

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'(][^)]*)?\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
HTML_LINK = re.compile(r"<(?:a|img)\b[^>]*?\b(?:href|src)=[\"']([^\"']+)[\"']", re.I)
HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$", re.M)


def pages():
    return [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))


def prose(text):
    """The text without fenced code blocks and code spans, where brackets are code, not links."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def links(text):
    body = prose(text)
    return [m.group(1) for pattern in (INLINE_LINK, REFERENCE_LINK, HTML_LINK) for m in pattern.finditer(body)]


def slug(heading):
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading anchors by its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def anchors(page):
    """Every heading's slug, repeats numbered as GitHub numbers them (-1, -2, ...)."""
    seen, found = Counter(), set()
    for heading in HEADING.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        base = slug(heading)
        found.add(base if seen[base] == 0 else f"{base}-{seen[base]}")
        seen[base] += 1
    return found


def broken_links(page):
    problems = []
    for target in links(page.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...: not checked offline
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            problems.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{target}: no heading with anchor #{anchor}")
        elif anchor and resolved.suffix != ".md":
            problems.append(f"{target}: an anchor into a file that is not markdown")
    return problems


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    assert broken_links(page) == []


def test_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail to docs/"


def test_every_picture_sits_next_to_its_raw_data():
    """Plots in docs/ are drawn from a JSON file kept beside them, so their numbers can be read and redrawn."""
    bare = [p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").rglob("*.png") if not any(p.parent.glob("*.json"))]
    assert bare == []


def test_the_checker_finds_broken_links_and_anchors(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "target.md").write_text("# Title\n\n## Exit codes (`errors.py`)\n\n## Exit codes (`errors.py`)\n")
    page = tmp_path / "README.md"
    page.write_text(
        "[ok](docs/target.md#exit-codes-errorspy) [repeat](docs/target.md#exit-codes-errorspy-1) [self](#top)\n"
        "[gone](docs/missing.md) ![img](docs/none.png) [bad anchor](docs/target.md#nowhere) <https://example.org>\n"
        "`[code](docs/missing_in_code.md)`\n\n```\n[fenced](docs/missing_in_fence.md)\n```\n\n# Top\n")
    assert broken_links(page) == ["docs/missing.md: no such file", "docs/none.png: no such file",
                                  "docs/target.md#nowhere: no heading with anchor #nowhere"]


def test_every_test_file_is_named_in_the_maintainers_guide():
    """docs/maintainers.md sorts the test files by area: a new one is placed there too."""
    guide = (ROOT / "docs" / "maintainers.md").read_text(encoding="utf-8")
    unnamed = sorted(p.name for p in (ROOT / "tests").glob("test_*.py") if f"`{p.name}`" not in guide)
    assert unnamed == []
