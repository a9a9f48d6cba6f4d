"""The documentation's relative links resolve: every file exists and every #anchor is a heading."""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCUMENTS = sorted([ROOT / "README.md", ROOT / "benchmarks" / "README.md", *ROOT.glob("docs/*.md")])
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: pathlib.Path) -> set[str]:
    """Every heading anchor of a Markdown file (fenced code blocks excluded)."""
    text = FENCE.sub("", path.read_text())
    return {github_slug(m) for m in re.findall(r"^#+\s+(.*)$", text, re.M)}


def relative_links(path: pathlib.Path) -> list[str]:
    """The links of a Markdown file that point into the repository (not URLs, not mailto)."""
    text = FENCE.sub("", path.read_text())
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


def test_slug_rule():
    assert github_slug("Pods: memory and scale on paper") == "pods-memory-and-scale-on-paper"
    assert github_slug("SimCLRv2 semi-supervised: pretrain -> fine-tune") == (
        "simclrv2-semi-supervised-pretrain---fine-tune"
    )


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(document: pathlib.Path):
    broken = []
    for target in relative_links(document):
        file_part, _, anchor = target.partition("#")
        resolved = (document.parent / file_part).resolve() if file_part else document
        if not resolved.exists():
            broken.append(f"{target}: no file {resolved}")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading #{anchor} in {resolved.name}")
    assert not broken, f"{document.name} has broken links:\n" + "\n".join(broken)


def test_readme_is_a_guide():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 300, "README.md is over 300 lines; move detail into docs/"
    first_block = readme.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert first_block[0].startswith("bash launch/run_local.sh"), first_block
    assert first_block[1].startswith("bash tests/run.sh"), first_block
