// The report's per-example explorer (curation/experiments/explorer.py embeds this file and its data).
// Plain DOM code: every text goes in through textContent, never as markup (prompts are untrusted).
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("ex-data").textContent);
  const rows = data.rows;
  const ID = 0, MS = 1, PLATEAU = 2, FINAL = 3, CATEGORY = 4, SELECTED = 5, CLOSED = 6, DETAILED = 7;
  const $ = (id) => document.getElementById(id);
  const state = { sortCol: MS, sortDesc: true, page: 0, view: rows };

  const categories = Array.from(new Set(rows.map((r) => r[CATEGORY] || ""))).sort();
  for (const c of categories) {
    const option = document.createElement("option");
    option.value = c;
    option.textContent = c || "(none)";
    $("ex-category").appendChild(option);
  }

  function num(v) { return v === null || v === undefined ? "—" : v.toFixed(3); }

  function refilter() {
    const search = $("ex-search").value.trim().toLowerCase();
    const category = $("ex-category").value;
    const selected = $("ex-selected").value;
    const lo = parseFloat($("ex-min").value), hi = parseFloat($("ex-max").value);
    state.view = rows.filter((r) =>
      (!search || r[ID].toLowerCase().includes(search) || (r[CATEGORY] || "").toLowerCase().includes(search)) &&
      (!$("ex-category").value || (r[CATEGORY] || "") === category) &&
      (selected === "" || String(r[SELECTED]) === selected) &&
      (isNaN(lo) || (r[MS] !== null && r[MS] >= lo)) && (isNaN(hi) || (r[MS] !== null && r[MS] <= hi)));
    const col = state.sortCol, sign = state.sortDesc ? -1 : 1;
    state.view.sort((a, b) => {
      const x = a[col], y = b[col];
      if (x === y) return a[ID] < b[ID] ? -1 : 1;
      if (x === null) return 1;
      if (y === null) return -1;
      return (x < y ? -1 : 1) * sign;
    });
    state.page = 0;
    draw();
  }

  function draw() {
    const size = data.pageSize, pages = Math.max(1, Math.ceil(state.view.length / size));
    state.page = Math.min(state.page, pages - 1);
    const body = document.querySelector("#ex-table tbody");
    body.replaceChildren();
    for (const r of state.view.slice(state.page * size, (state.page + 1) * size)) {
      const tr = document.createElement("tr");
      tr.dataset.id = r[ID];
      if (r[SELECTED]) tr.className = "sel";
      for (const cell of [r[ID], num(r[MS]), num(r[PLATEAU]), num(r[FINAL]), r[CATEGORY] || "—",
                          r[SELECTED] ? "yes" : "no", r[CLOSED] ? "yes" : "no"]) {
        const td = document.createElement("td");
        td.textContent = cell;
        tr.appendChild(td);
      }
      tr.addEventListener("click", () => open(r));
      body.appendChild(tr);
    }
    $("ex-page").textContent = `page ${state.page + 1} of ${pages}`;
    $("ex-count").textContent = `${state.view.length.toLocaleString()} of ${rows.length.toLocaleString()} rows`;
  }

  function colour(score) {
    const s = Math.max(0, Math.min(1, score));
    // blue (low refusal score) to red (high), through a pale middle so the text stays readable
    const r = Math.round(40 + 170 * s), g = Math.round(90 - 50 * s), b = Math.round(200 - 160 * s);
    return `rgba(${r},${g},${b},${0.25 + 0.6 * Math.abs(s - 0.5) * 2})`;
  }

  function open(r) {
    const detail = data.details[r[ID]];
    $("ex-detail").hidden = false;
    $("ex-title").textContent = `${r[ID]} · MS ${num(r[MS])} (I ${num(r[PLATEAU])} → I′ ${num(r[FINAL])}) · ` +
      `${r[CATEGORY] || "no category"} · ${r[SELECTED] ? "selected" : "not selected"}`;
    const reasoning = $("ex-reasoning");
    reasoning.replaceChildren();
    if (!detail) {
      $("ex-prompt").textContent = "";
      reasoning.textContent = "The detail of this row is not embedded (the report embeds a sample); read it from the store.";
      $("ex-answer").textContent = "";
      $("ex-verdict").textContent = "";
      return;
    }
    $("ex-prompt").textContent = detail.prompt;
    detail.tokens.forEach((token, i) => {
      const span = document.createElement("span");
      span.textContent = token;
      if (detail.trace.length) {
        span.style.background = colour(detail.trace[i]);
        span.title = `token ${i}: refusal score ${detail.trace[i].toFixed(3)}`;
        span.dataset.score = detail.trace[i];
        if (i === detail.cliff) { span.className = "cliff"; span.title += " (the cliff)"; }
      }
      reasoning.appendChild(span);
    });
    $("ex-answer").textContent = detail.answer === null ? "(no stored generation)" : (detail.answer || "(empty)");
    $("ex-verdict").textContent = detail.verdict || "not judged (scored without --judge-answers)";
    $("ex-detail").scrollIntoView({ block: "nearest" });
  }

  document.querySelectorAll("#ex-table th").forEach((th) => th.addEventListener("click", () => {
    const col = Number(th.dataset.col);
    state.sortDesc = state.sortCol === col ? !state.sortDesc : true;
    state.sortCol = col;
    refilter();
  }));
  for (const id of ["ex-search", "ex-category", "ex-selected", "ex-min", "ex-max"]) $(id).addEventListener("input", refilter);
  $("ex-prev").addEventListener("click", () => { state.page = Math.max(0, state.page - 1); draw(); });
  $("ex-next").addEventListener("click", () => { state.page += 1; draw(); });
  refilter();

  // report.html#open=first-selected opens the first selected row with a real click on its table row,
  // so a headless browser (tests/test_explorer.py) exercises the same path as a person.
  if (location.hash === "#open=first-selected") {
    $("ex-selected").value = "1";
    refilter();
    const first = document.querySelector("#ex-table tbody tr");
    if (first) first.click();
  }
})();
