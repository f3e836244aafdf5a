"""The README stays short and the documentation holds together: every relative link in
README.md and docs/*.md resolves (files and #anchors, as GitHub renders them), every topic
page opens with what the reader will find there, and the index lists every page."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
TOPICS = ("pipeline", "judges", "data", "experiments", "speed", "nightly", "reliability", "real-models", "settings",
          "layout")
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)\)")


def _pages() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def _prose(text: str) -> str:
    """The text outside fenced code blocks and inline code, where links are links."""
    out, fence = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fence = not fence
            continue
        if not fence:
            out.append(re.sub(r"`[^`]*`", "", line))
    return "\n".join(out)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out: set[str] = set()
    fence = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fence = not fence
        elif not fence and (m := re.match(r"^#{1,6} (.+)$", line)):
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[str]:
    return [t for t in LINK.findall(_prose(path.read_text())) if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


def broken_links(path: Path) -> list[str]:
    bad = []
    for target in links(path):
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            bad.append(f"{target} (no such file)")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            bad.append(f"{target} (no such anchor)")
    return bad


def test_readme_is_short_and_keeps_the_two_commands() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text.encode("utf-8")) <= 12_000, len(text.encode("utf-8"))
    assert "make demo" in text and "make test" in text
    for verb in ("curate score", "curate select", "curate finetune", "curate experiment attacks", "curate run"):
        assert verb in _code(text), verb


def _code(text: str) -> str:
    return "\n".join(re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S))


@pytest.mark.parametrize("page", _pages(), ids=lambda p: p.name)
def test_every_relative_link_resolves(page: Path) -> None:
    assert not broken_links(page), broken_links(page)


def test_the_link_check_can_fail(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("# Title here\n\n## Second: part `x --y`\n\n[ok](#second-part-x---y) [no](b.md) "
                                   "[bad](#nope) [self](a.md#title-here) `[code](c.md)` [web](https://x.org/y)\n")
    assert broken_links(tmp_path / "a.md") == ["b.md (no such file)", "#nope (no such anchor)"]


def test_every_topic_page_exists_opens_with_what_it_holds_and_is_indexed() -> None:
    index = (DOCS / "README.md").read_text()
    for topic in TOPICS:
        page = DOCS / f"{topic}.md"
        lines = [line for line in page.read_text().splitlines() if line.strip()]
        assert lines[0].startswith("# "), page.name
        assert lines[1].startswith("What you will find here:"), page.name
        assert f"]({topic}.md)" in index, topic
    assert (ROOT / "docs" / "img" / "cliff.png").stat().st_size > 10_000


def test_stage_times_read_in_pipeline_order() -> None:
    from training.report import stage_times_in_order

    seconds = {"total": 9.0, "select": 1.0, "evaluate after": 2.0, "LoRA fine-tune": 3.0, "score pool": 4.0,
               "train probe": 5.0, "build organism": 6.0, "evaluate before": 7.0, "retain set": 8.0}
    assert [k for k, _ in stage_times_in_order(seconds)] == [
        "build organism", "train probe", "score pool", "select", "retain set", "LoRA fine-tune", "evaluate before",
        "evaluate after", "total"]
