"""`curate demo` end to end at test size, on the session's organism (the demo
reuses an organism whose config and builder match, as it does between runs)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from rich.console import Console

from curation.experiments.demo import DemoConfig, run_demo


def test_demo_writes_the_report_contract(organism_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(organism_dir, tmp_path / "organism")
    console = Console(record=True, width=120)
    result = run_demo(DemoConfig(workdir=str(tmp_path), size="test"), console=console)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report == json.loads(json.dumps(result, default=str))
    printed = console.export_text()
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
    html = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64," in html and "The refusal cliff" in html
