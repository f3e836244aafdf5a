"""`curate demo` end to end at test size, on the session's organism (the demo
reuses an organism whose config and builder match, as it does between runs),
and its report opened in headless Chromium."""

from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from rich.console import Console

from curation.experiments.demo import DemoConfig, run_demo
from tests.browser import CHROMIUM, dump_dom, screenshot


@pytest.fixture(scope="module")
def demo_run(organism_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, str]:
    root = tmp_path_factory.mktemp("demo")
    shutil.copytree(organism_dir, root / "organism")
    console = Console(record=True, width=120)
    result = run_demo(DemoConfig(workdir=str(root), size="test"), console=console)
    return root, result, console.export_text()


def test_demo_writes_the_report_contract(demo_run: tuple[Path, dict, str]) -> None:
    root, result, printed = demo_run
    report = json.loads((root / "report.json").read_text())
    assert report == json.loads(json.dumps(result, default=str))
    assert "reusing organism" in printed and "cliff-curate demo" in printed
    sel = report["selection"]
    assert {"strategy", "budget", "n_pool", "n_selected", "share_from_suppressed"} <= set(sel)
    assert sel["n_selected"] == round(0.017 * sel["n_pool"])
    assert sel["share_from_suppressed"] > 0.5 > sel["pool_share_suppressed"]
    for key in ("asr", "asr_all", "over_refusal"):
        assert set(report[key]) == {"before", "after"}
    assert report["asr"]["after"] < report["asr"]["before"]
    for name in ("model", "probe", "adapter", "db", "selection"):
        assert Path(report["paths"][name]).exists(), name
    html = (root / "report.html").read_text()
    assert "data:image/png;base64," in html and "The refusal cliff" in html and "id='ex-data'" in html


class _Detail(HTMLParser):
    """What the explorer's detail panel shows: token spans with a background, the cliff, the verdict."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.detail_hidden: bool | None = None
        self.coloured = 0
        self.cliffs = 0
        self.rows = 0
        self.text: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("id") == "ex-detail":
            self.detail_hidden = "hidden" in a
        if tag == "span" and "ex-reasoning" in self.stack and "background" in (a.get("style") or ""):
            self.coloured += 1
            self.cliffs += a.get("class") == "cliff"
        if tag == "tr" and a.get("class") == "sel":
            self.rows += 1
        self.stack.append(a.get("id") or tag)

    def handle_endtag(self, tag: str) -> None:
        if self.stack:
            self.stack.pop()

    def handle_data(self, data: str) -> None:
        if self.stack and self.stack[-1] in ("ex-verdict", "ex-prompt", "ex-title", "ex-count"):
            self.text[self.stack[-1]] = self.text.get(self.stack[-1], "") + data


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (apt-get install chromium): the report's "
                    "browser test cannot run")
def test_the_reports_explorer_opens_a_selected_row_in_a_browser(demo_run: tuple[Path, dict, str]) -> None:
    root, result, _ = demo_run
    url = (root / "report.html").resolve().as_uri() + "#open=first-selected"
    page = _Detail()
    page.feed(dump_dom(url))
    # The hash filtered the table to the selected rows and clicked the first one.
    assert page.rows == result["selection"]["n_selected"] or page.rows == 50
    assert page.detail_hidden is False
    assert page.coloured > 5 and page.cliffs == 1  # the trace, token by token, with the cliff marked
    assert "· selected" in page.text["ex-title"] and page.text.get("ex-prompt")
    assert page.text.get("ex-verdict") in ("refusal", "compliance", "no_answer", "unparsed", "refused", "complied",
                                           "off_topic", "degenerate"), page.text.get("ex-verdict")
    shot = screenshot(url, root / "report.png")
    assert shot.stat().st_size > 10_000
