"""weights/ and the layers below it (io/, data/, tokenizer/, common.py) import without cycles.

Every `import` statement counts, at module level and inside functions (a lazy import that closes a
cycle is still a cycle: it only moves the failure to call time). The source is read with `ast`;
nothing is imported. An edge to a package's own __init__ (implied by importing a submodule) is not
counted, since every package would then be a cycle."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
LAYERS = ("scratchllm.common", "scratchllm.io", "scratchllm.data", "scratchllm.tokenizer", "scratchllm.weights")


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / "scratchllm").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_edges(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the scratchllm modules it imports anywhere in its source."""
    def known(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges = {}
    for mod, path in mods.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {known(a.name) for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets |= {known(f"{node.module}.{a.name}") for a in node.names}
        edges[mod] = {t for t in targets if t and t != mod}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Each cycle once, as [a, b, ..., a], found by depth-first search."""
    found, done = [], set()

    def visit(node, path):
        if node in path:
            cyc = path[path.index(node):] + [node]
            if set(cyc) not in [set(c) for c in found]:
                found.append(cyc)
            return
        if node in done:
            return
        for nxt in sorted(edges.get(node, ())):
            visit(nxt, path + [node])
        done.add(node)

    for start in sorted(edges):
        visit(start, [])
    return found


def test_the_cycle_finder_finds_a_lazy_cycle():
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_below_train():
    mods = modules()
    lower = {m: {t for t in e if t.startswith(LAYERS)} for m, e in import_edges(mods).items() if m.startswith(LAYERS)}
    assert "scratchllm.tokenizer.bpe" in lower and "scratchllm.weights.state" in lower
    assert cycles(lower) == []
    # the lower layers never reach up into train/, infer/ or the CLI (model/ and the root package's
    # __version__ are fine: neither imports anything above)
    below = LAYERS + ("scratchllm.model",)
    up = {m: sorted(t for t in e if not t.startswith(below) and t != "scratchllm")
          for m, e in import_edges(mods).items() if m.startswith(LAYERS)}
    assert {m: t for m, t in up.items() if t} == {}
