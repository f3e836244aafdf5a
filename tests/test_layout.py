"""The package layout holds: no import cycle between project modules (imports
inside functions count too), no module over about 300 lines without its opening
comment saying why, module names of model internals known only in probes/, and
every verb's --help renders."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from curation.cli.main import build_parser
from curation.cli.registry import VERBS

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("curation", "training", "probes")
LINE_LIMIT = 300


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # "from pkg import mod" imports the submodule when there is one
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                out.add(name)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_between_modules() -> None:
    graph = import_graph()
    # Package __init__ modules are parents, not importers: drop the implicit package edges only.
    graph = {k: {v for v in deps if not k.startswith(v + ".")} for k, deps in graph.items()}
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph) or [])}"


def test_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_probes_imports_neither_curation_nor_training() -> None:
    graph = import_graph()
    bad = {m: sorted(d for d in deps if d.split(".")[0] in ("curation", "training"))
           for m, deps in graph.items() if m.startswith("probes")}
    assert not {m: d for m, d in bad.items() if d}


def test_long_modules_say_why() -> None:
    long_silent = []
    for name, path in _modules().items():
        lines = path.read_text().splitlines()
        if len(lines) > LINE_LIMIT:
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            if f"Over {LINE_LIMIT} lines because" not in doc:
                long_silent.append(f"{name} ({len(lines)} lines)")
    assert not long_silent, f"modules over {LINE_LIMIT} lines whose opening comment does not say why: {long_silent}"


# Attribute names of transformer internals: only probes/ may know them.
INTERNAL_NAMES = {"self_attn", "mlp", "o_proj", "down_proj", "gate_up_proj", "experts", "embed_tokens", "lm_head",
                  "layers", "block_sparse_moe", "router", "gate"}


def _internal_names_used(source: str) -> set[str]:
    """Attribute accesses (``x.mlp``) and string literals (``getattr(x, "mlp")``) naming model internals."""
    used: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in INTERNAL_NAMES:
            used.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in INTERNAL_NAMES:
            used.add(node.value)
    return used


def test_only_probes_knows_module_names() -> None:
    offenders = {name: sorted(used) for name, path in _modules().items()
                 if not name.startswith("probes") and (used := _internal_names_used(path.read_text()))}
    assert not offenders
    assert _internal_names_used("y = model.model.layers[0].mlp") == {"layers", "mlp"}


def test_every_verb_help_renders(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    for verb in VERBS.values():
        with pytest.raises(SystemExit) as done:
            parser.parse_args([*verb.name.split(), "--help"])
        assert done.value.code == 0, verb.name
        shown = " ".join(capsys.readouterr().out.split())
        assert " ".join(verb.help.split()) in shown, verb.name
        for option in verb.options:
            assert option.flag in shown, (verb.name, option.flag)
