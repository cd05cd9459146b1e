"""The front page stays a front page (at most 12,000 characters) and every link in it and in
docs/ resolves: to a file of the repository, and where it names a heading, to that heading;
and what a page tells users to type matches the code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from shared.backend import MALLOC_TUNABLES

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)]+)\)|<img src=\"([^\"]+)\"")


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces
    as hyphens."""
    found, in_code = set(), False
    for line in page.read_text().splitlines():
        in_code ^= line.startswith("```")
        if line.startswith("#") and not in_code:
            text = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return found


def local_links(page: Path) -> list[str]:
    targets = [a or b for a, b in LINK.findall(page.read_text())]
    return [t for t in targets if not re.match(r"[a-z]+:", t)]


def test_the_front_page_is_read_in_five_minutes():
    assert len((ROOT / "README.md").read_text()) <= 12_000


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_resolves(page):
    links = local_links(page)
    broken = []
    for link in links:
        if re.search(r"\s", link):  # a link broken across lines
            broken.append(link)
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        exists = target.exists()
        headed = not anchor or target.suffix != ".md" or (exists and anchor in anchors(target))
        if not (exists and headed):
            broken.append(link)
    assert broken == []


# Written whole by a script (experiments.py --out docs), which also writes it elsewhere.
GENERATED = {"EXPERIMENTS.md"}


@pytest.mark.parametrize(
    "page", [p for p in PAGES[1:] if p.name not in GENERATED], ids=lambda p: p.name
)
def test_every_page_of_the_docs_opens_with_the_way_back(page):
    """Its third line, under the title, links to the README: a reader who arrives from a
    search finds the front page, and every page has a link for the test above to follow."""
    assert page.read_text().splitlines()[2].startswith("Back to the [README](../README.md).")


def test_the_front_page_links_to_every_page_of_the_docs():
    linked = {Path(link.partition("#")[0]).name for link in local_links(ROOT / "README.md")}
    assert {p.name for p in PAGES[1:]} <= linked


def test_the_cluster_guide_gives_the_malloc_settings_the_code_uses():
    """A cluster users start themselves gets keep_freed_memory's settings only from the line
    docs/CLUSTER.md gives them to export."""
    guide = (ROOT / "docs" / "CLUSTER.md").read_text()
    assert f"export GLIBC_TUNABLES={MALLOC_TUNABLES}\n" in guide
