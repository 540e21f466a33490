"""The documents: every relative link in README.md and docs/ resolves, the README stays short, and no source file
cites a document outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def relative_links(text: str) -> list[str]:
    """Targets of Markdown links that are not URLs or in-page anchors, without their #fragment."""
    return [target.split("#")[0] for target in LINK.findall(text)
            if not re.match(r"[a-z]+:", target) and not target.startswith("#")]


def test_link_finder_sees_relative_links_only():
    text = "[a](docs/x.md) [b](https://e.org/y.md) [c](#top) [d](../z.png#frag)"
    assert relative_links(text) == ["docs/x.md", "../z.png"]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(document):
    missing = [t for t in relative_links(document.read_text()) if not (document.parent / t).exists()]
    assert not missing, f"{document.name} links to missing {missing}"


def test_readme_is_short_and_docs_hold_the_rest():
    assert (ROOT / "README.md").stat().st_size <= 20_000
    assert len(list((ROOT / "docs").glob("*.md"))) >= 4


def test_no_source_cites_a_document_outside_the_repository():
    sources = [p for folder in ("algorithms", "actors", "learner", "deploy", "tests", "cluster")
               for p in (ROOT / folder).rglob("*") if p.suffix in {".py", ".yaml", ".md"}]
    outside = [p.relative_to(ROOT).as_posix() for p in sources
               if p != Path(__file__) and re.search(r"\b(ALGORITHMS|DESIGN)\.md|shared/", p.read_text())]
    assert not outside, outside
