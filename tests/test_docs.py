"""The README and docs/: a short README that links every docs page, relative links that
resolve (files, and headings for `#anchors` into Markdown), and the README's test command
being the one CI runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").rglob("*.md"))
PAGES = [README, *DOCS]
FENCE = re.compile(r"^```.*?^```[^\n]*$", re.DOTALL | re.MULTILINE)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def prose(text: str) -> str:
    """`text` without fenced code blocks and inline code, where a `[x](y)` is no link."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def links(path: Path) -> list[str]:
    return LINK.findall(prose(path.read_text()))


def anchors(path: Path) -> set[str]:
    """The heading anchors GitHub gives a Markdown file: the heading's text, lower case,
    without punctuation other than '-' and '_', spaces as '-'; repeats get -1, -2, ..."""
    seen: dict[str, int] = {}
    for heading in HEADING.findall(FENCE.sub("", path.read_text())):
        text = re.sub(r"`([^`]*)`", r"\1", heading)
        text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)
        slug = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        if count:
            seen[f"{slug}-{count}"] = 1
    return set(seen)


def test_anchor_rule_matches_github(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Items both domains share: `--match-items-by`\n## ML-1M -> ML-100k, "
                    "matched\n```\n# not a heading\n```\n## Scale\n## Scale\n")
    assert anchors(page) == {"items-both-domains-share---match-items-by",
                             "ml-1m---ml-100k-matched", "scale", "scale-1"}


def test_readme_is_short():
    lines = README.read_text().count("\n")
    assert lines <= 400, f"README.md has {lines} lines; move detail to docs/ (at most 400)"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (page.parent / file_part).resolve() if file_part else page
        if not linked.exists():
            broken.append(f"{target}: no file {linked}")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: broken links:\n" + "\n".join(broken)


def test_readme_links_every_docs_page():
    linked = {(README.parent / target.partition("#")[0]).resolve()
              for target in links(README) if target.partition("#")[0]}
    missing = [str(page.relative_to(ROOT)) for page in DOCS if page.resolve() not in linked]
    assert not missing, f"README.md links none of: {missing}"


def test_readme_test_command_is_the_one_ci_runs():
    """.ci/run runs the README's test command; both must name the same command."""
    script = (ROOT / ".ci" / "run").read_text().splitlines()
    commands = [line.strip() for line in script
                if line.strip() and not line.lstrip().startswith(("#", "set ", "cd "))]
    assert commands == ["make test"], f".ci/run runs {commands}; update this test and the README"
    blocks = "\n".join(FENCE.findall(README.read_text()))
    assert re.search(r"^make test\b", blocks, re.MULTILINE), \
        "README.md shows no `make test` in a code block, the command .ci/run runs"


def test_every_flag_the_command_reference_names_is_a_scripts_flag():
    """The flags users type, as the reference names them, are still some script's."""
    from peftrec.downstream.sweep import script_parser

    flags = set()
    for path in sorted((ROOT / "scripts").glob("*.py")):
        flags |= set(script_parser(path.stem)._option_string_actions)
    rows = re.findall(r"^\| (.+?) \| ", (ROOT / "docs" / "command-reference.md").read_text(),
                      re.MULTILINE)
    named = {flag for row in rows for flag in re.findall(r"--[a-z][a-z0-9-]*[a-z0-9](?![\w-])",
                                                         row)}
    assert named and not named - flags, f"no script has {sorted(named - flags)}"
