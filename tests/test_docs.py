"""The README and docs/: every relative link resolves, the README stays a short guide, and
nothing cites a file outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_WORDS = 1600

# [text](target) and ![alt](target); the target ends at whitespace or ")".
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)


def relative_links(text: str) -> list[str]:
    """The link targets of a markdown text that point at files (no URL, no pure anchor),
    outside fenced code blocks, without their #anchor."""
    text = FENCE.sub("", text)
    targets = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue
        targets.append(target.split("#", 1)[0])
    return targets


def test_link_parser_finds_relative_links_only():
    text = (
        "see [a](docs/a.md), ![img](b.jpg) and [c](c.md#part), [web](https://x.org/y.md),\n"
        "[mail](mailto:a@b.c), [here](#anchor)\n```\n[not](inside-code.md)\n```\n"
    )
    assert relative_links(text) == ["docs/a.md", "b.jpg", "c.md"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path):
    broken = [t for t in relative_links(page.read_text(encoding="utf-8")) if not (page.parent / t).exists()]
    assert broken == [], f"{page.relative_to(ROOT)} links to missing files: {broken}"


def test_readme_is_a_short_guide():
    words = len((ROOT / "README.md").read_text(encoding="utf-8").split())  # as `wc -w` counts
    assert words <= README_MAX_WORDS, f"README.md has {words} words (at most {README_MAX_WORDS})"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_citation_of_files_outside_the_repository(page: Path):
    text = page.read_text(encoding="utf-8")
    assert "DESIGN.md" not in text
    assert "../shared" not in text


def test_readme_keeps_the_install_and_test_lines_ci_runs():
    """.ci/run runs the README's install line and test command: they stay as they are."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert 'pip install -e ".[dev]"' in readme
    assert re.search(r"^pytest$", readme, re.M)


def test_readme_predict_example_scores_test_split_images():
    """The README's predict example must not score training images (they would vote for
    themselves through the neighbour vote): 4.jpg and 1217.jpg are in the scene set's test
    split at the default seed 0, as ingest draws it."""
    from retdmctl.data.dataset import random_splits

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    line = next(l for l in readme.splitlines() if l.startswith("retdmctl predict "))
    names = re.findall(r"images/(\d+)\.jpg", line)
    assert names == ["4", "1217"]
    # scene's ids are 1.jpg..2000.jpg in labels.csv order, so row r is (r + 1).jpg
    test_rows = set(random_splits(2000, seed=0, test_fraction=0.2, val_fraction=0.1)["test"].tolist())
    assert all(int(n) - 1 in test_rows for n in names)
