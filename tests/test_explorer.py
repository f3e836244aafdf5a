"""The report's explorer data: every pool row in the table, the detail of a bounded sample (every
selected row first), tokens aligned one-to-one with the probe's trace, and untrusted text kept out
of the page's markup. The browser half is in tests/test_demo.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

from curation.experiments.explorer import explorer_data, explorer_section
from curation.pipeline.store import Store
from probes.models import LoadedModel
from probes.refusal import RefusalProbe
from tests.conftest import FMT


def _pool(store: Store, lm: LoadedModel, probe: RefusalProbe) -> list[tuple[str, float, bool, list[float], str]]:
    return store.con.execute("SELECT example_id, misalignment, closed, trace, reasoning FROM scores WHERE model_fingerprint = ? "
                             "AND probe_id = ? ORDER BY misalignment DESC, example_id", [lm.fingerprint, probe.probe_id]).fetchall()


def test_every_row_is_listed_and_a_sample_is_detailed_token_by_token(scored_db: Path, lm: LoadedModel,
                                                                      probe: RefusalProbe) -> None:
    with Store(scored_db, read_only=True) as store:
        pool = _pool(store, lm, probe)
        selected = {pool[-1][0], pool[len(pool) // 2][0]}  # rows the top-MS rule would not reach first
        data = explorer_data(store, lm.fingerprint, probe.probe_id, selected, lm.tokenizer, FMT, lm.end_tokens,
                             max_detailed=10)
    assert [r[0] for r in data.rows] == [p[0] for p in pool] and len({r[0] for r in data.rows}) == len(pool)
    assert len(data.details) == 10 and selected <= set(data.details)
    assert sum(r[5] for r in data.rows) == 2 and sum(r[7] for r in data.rows) == 10
    assert pool[0][0] in data.details  # the highest MS is in the sample
    traces = {p[0]: p for p in pool}
    for example_id, detail in data.details.items():
        _, _, closed, trace, reasoning = traces[example_id]
        assert len(detail["tokens"]) == len(detail["trace"]) == len(trace)
        assert detail["trace"] == [round(float(v), 3) for v in trace]
        text = "".join(detail["tokens"])
        assert text.rstrip().endswith(FMT.close_marker)
        if closed:
            assert reasoning.strip()[:20] in text
        assert 0 <= detail["cliff"] < len(trace)
        assert detail["verdict"] and detail["answer"] is not None


def test_untrusted_text_cannot_close_the_embedded_script(scored_db: Path, lm: LoadedModel, probe: RefusalProbe) -> None:
    with Store(scored_db, read_only=True) as store:
        data = explorer_data(store, lm.fingerprint, probe.probe_id, set(), lm.tokenizer, FMT, lm.end_tokens, max_detailed=3)
    hostile = "</script><script>alert(1)</script><img src=x onerror=alert(2)>"
    first = next(iter(data.details))
    data.details[first]["prompt"] = hostile
    data.rows[0][4] = hostile
    html = explorer_section(data)
    assert hostile not in html and "</script><script>alert" not in html
    embedded = re.search(r"<script type='application/json' id='ex-data'>(.*?)</script>", html, re.S)
    assert embedded is not None
    payload = json.loads(embedded.group(1))  # the escaped form is still the same JSON
    assert payload["details"][first]["prompt"] == hostile and payload["rows"][0][4] == hostile
    script = html[embedded.end():]
    assert "innerHTML" not in script and "textContent" in script
