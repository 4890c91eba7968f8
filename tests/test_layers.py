"""The floors import one way, hybrid -> tuning -> retrieval -> training -> core, and no module imports its
way back to itself.

Imports inside functions count too (they hide an edge, they do not remove it).
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"core": 0, "training": 1, "retrieval": 2, "tuning": 3, "hybrid": 4}


def project_imports() -> dict[str, set[str]]:
    """{module: the project modules it imports}, e.g. {"tuning.tune_generator": {"core.qa", ...}}."""
    graph = {}
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            targets = set()
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    targets |= {a.name for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    # `from tuning import run_record` imports the module training.run_record
                    targets |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            graph[module] = {t for t in targets if t.split(".")[0] in LAYERS} - {module}
    known = set(graph)
    return {m: {t for t in ts if t in known} for m, ts in graph.items()}


def test_no_module_imports_a_higher_layer():
    upward = [f"{m} imports {t}" for m, ts in project_imports().items() for t in ts
              if LAYERS[t.split(".")[0]] > LAYERS[m.split(".")[0]]]
    assert upward == []


def test_no_import_circle():
    graph = project_imports()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    circles = []

    def visit(m, path):
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                circles.append(" -> ".join(path[path.index(t):] + [t]))
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    # package __init__ re-exports (retrieval -> retrieval.retriever -> retrieval) are not circles of modules
    circles = [c for c in circles if not any(part in LAYERS for part in c.split(" -> "))]
    assert circles == []


def test_every_name_hybrid_exports_resolves():
    """`from hybrid import X` is lazy: a module moved or a name renamed would fail only at a user's import."""
    import importlib

    import hybrid

    missing = [f"{name} (from {module})" for name, module in hybrid._EXPORTS.items()
               if not hasattr(importlib.import_module(module), name)]
    assert missing == []
