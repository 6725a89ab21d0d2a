"""Every relative link of README.md and docs/*.md leads to a file that exists, and every #anchor to
a heading of that file (GitHub's heading ids)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def heading_id(heading: str) -> str:
    """GitHub's id of a heading: lower case, punctuation but '-' and '_' dropped, spaces as '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def headings(page: Path) -> set[str]:
    found, fenced = set(), False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            found.add(heading_id(line.lstrip("#")))
    return found


def links(page: Path) -> list[str]:
    """Relative link targets outside code blocks and code spans."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", t)]


def test_heading_id_is_githubs():
    assert heading_id(" Reviewing flagged images: `jobs.export`, `jobs.import_labels`") == \
        "reviewing-flagged-images-jobsexport-jobsimport_labels"
    assert heading_id("Output schema (a contract)") == "output-schema-a-contract"


def test_every_relative_link_and_anchor_of_the_docs_resolves():
    """Catches: a section moved to docs/ (or renamed) while a link still points at its old place."""
    broken = []
    for page in PAGES:
        for target in links(page):
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in headings(dest):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert len(PAGES) > 1 and not broken, broken
