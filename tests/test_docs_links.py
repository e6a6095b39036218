"""The documentation's relative links resolve, and nothing tracked points at files users do not have.

Checks README.md, every ``docs/*.md`` and the other READMEs: each relative Markdown link (``[text](path)``
or ``![alt](path)``, optionally with ``#anchor``) names a file or folder in the repository, and an anchor
into a Markdown file names one of its headings (GitHub's slugs). Tracked files outside ``tests/`` may not
mention the planning notes outside the repository (``INTERNAL_NOTES``): users do not have them.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INTERNAL_NOTES = ("METRICS" + ".md", ".." + "/shared")  # spelled apart: this file may name them
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted(ROOT.glob("*/README.md"))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {slug(line.lstrip("#")) for line in text.splitlines() if re.match(r"#{1,6} ", line)}


def dead_links(path: Path) -> list[str]:
    """Every relative link of ``path`` whose target file, or heading anchor, does not exist."""
    dead = []
    for target in LINK.findall(FENCE.sub("", path.read_text())):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:, data:
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            dead.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            dead.append(f"{target} (no heading #{anchor})")
    return dead


def test_slug_follows_githubs_rule():
    assert slug("The default set's report page") == "the-default-sets-report-page"
    assert slug("On a GPU host: `scripts/gpu-check`") == "on-a-gpu-host-scriptsgpu-check"
    assert (
        slug("Overlap: the all-to-all behind the expert compute") == "overlap-the-all-to-all-behind-the-expert-compute"
    )


def test_a_dead_link_and_a_missing_anchor_are_both_found(tmp_path):
    (tmp_path / "there.md").write_text("# Real heading\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](there.md#real-heading) [gone](missing.md) [bad](there.md#nope) [web](https://x.org)\n")
    assert dead_links(page) == ["missing.md (no such file)", "there.md#nope (no heading #nope)"]


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_in_the_docs_resolves(path):
    assert dead_links(path) == []


def test_readme_stays_a_product_page_of_at_most_250_lines():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_no_tracked_file_outside_tests_mentions_internal_notes():
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=False)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    offenders = []
    for name in listed.stdout.splitlines():
        path = ROOT / name
        if name.startswith("tests/") or not path.is_file():
            continue
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        offenders += [f"{name}: {word}" for word in INTERNAL_NOTES if word in text]
    assert offenders == []
