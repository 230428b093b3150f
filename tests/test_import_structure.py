"""The dependency direction of the package (docs: architecture; issue "a codebase people can carry on").

``utils`` <- ``zoo, data, config, losses, callbacks`` <- ``graph`` <- ``teleport``, ``probes``, ``compression``, ``closedform`` <- ``train``
<- ``monitor`` <- ``report``, ``experiments`` <- ``runner``, ``diagnose`` <- ``cli``.

Imports are read statically from every module's source -- including imports inside functions, which is where a lazy
import used to hide a cycle -- but not those under ``if TYPE_CHECKING:``.  A module may import from its own
subpackage and from lower layers only.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import gradcond

ROOT = Path(gradcond.__file__).parent

# Layer of each top-level unit of the package (a subpackage or a top-level module).  Lower numbers sit lower.
LAYERS = {
    "__init__": 0, "utils": 0, "presets": 0,
    "config": 1, "distributed": 1, "losses": 1, "callbacks": 1, "zoo": 1, "data": 1,
    "graph": 2,
    "teleport": 3, "probes": 3, "compression": 3, "closedform": 3,
    "train": 4,
    "monitor": 5,
    "report": 6, "experiments": 6,
    "runner": 7, "diagnose": 7,
    "cli": 8, "integrations": 8,
}
# Same-layer imports that the architecture allows: reproductions draw their figures with the report's helpers;
# the stand-alone seed-002 ideas (compression, closedform) may use the probes (e.g. the least-squares distance).
ALLOWED_SIDEWAYS = {("experiments", "report"), ("closedform", "probes"), ("compression", "probes")}


def _unit(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "gradcond":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def _is_unit(name: str) -> bool:
    return (ROOT / f"{name}.py").is_file() or (ROOT / name / "__init__.py").is_file()


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
            if name == "TYPE_CHECKING":
                for sub in node.body:
                    for inner in ast.walk(sub):
                        if hasattr(inner, "lineno"):
                            lines.add(inner.lineno)
    return lines


def _imports(path: Path) -> list[tuple[str, int]]:
    """(imported gradcond module, line) for every import statement in ``path``."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(), filename=str(path))
    skip = _type_checking_lines(tree)
    found = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.startswith("gradcond")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("gradcond"):
                # ``from gradcond import zoo`` imports the subpackage ``gradcond.zoo``.
                if target == "gradcond":
                    found += [(f"gradcond.{a.name}" if _is_unit(a.name) else "gradcond", node.lineno)
                              for a in node.names]
                else:
                    found.append((target, node.lineno))
    return found


def _edges() -> list[tuple[str, str, str]]:
    edges = []
    for path in sorted(ROOT.rglob("*.py")):
        src_unit = _unit(_module_name(path))
        for target, line in _imports(path):
            dst_unit = _unit(target)
            if dst_unit is None or dst_unit == src_unit or dst_unit == "__init__":
                continue
            edges.append((src_unit, dst_unit, f"{path.relative_to(ROOT.parent)}:{line} imports {target}"))
    return edges


def test_every_unit_has_a_layer():
    units = {p.stem if p.is_file() else p.name for p in ROOT.iterdir()
             if (p.is_file() and p.suffix == ".py") or (p.is_dir() and (p / "__init__.py").exists())}
    missing = sorted(units - set(LAYERS))
    assert not missing, f"give these parts of the package a layer in LAYERS: {missing}"


def test_imports_point_down_only():
    bad = [why for src, dst, why in _edges()
           if LAYERS[dst] > LAYERS[src] or (LAYERS[dst] == LAYERS[src] and (src, dst) not in ALLOWED_SIDEWAYS)]
    assert not bad, "imports against the dependency direction:\n" + "\n".join(bad)


def test_no_import_cycle_between_subpackages():
    graph: dict[str, set[str]] = {}
    for src, dst, _ in _edges():
        graph.setdefault(src, set()).add(dst)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle between subpackages: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in list(graph):
        if node not in state:
            visit(node)


def test_cycle_detector_finds_a_planted_cycle(tmp_path, monkeypatch):
    """The checks above can fail: a planted upward import is reported with its file and line."""
    fake = tmp_path / "gradcond"
    (fake / "graph").mkdir(parents=True)
    (fake / "train").mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "graph" / "__init__.py").write_text("def f():\n    from gradcond.train import fit\n")
    (fake / "train" / "__init__.py").write_text("from ..graph import f\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake)
    edges = _edges()
    assert ("graph", "train", "gradcond/graph/__init__.py:2 imports gradcond.train") in edges
    assert ("train", "graph", "gradcond/train/__init__.py:1 imports gradcond.graph") in edges


@pytest.mark.parametrize("package", ["gradcond.graph", "gradcond.teleport", "gradcond.probes"])
def test_low_packages_do_not_load_training_monitoring_or_matplotlib(package):
    """Importing every module of graph/teleport/probes loads neither the trainer, the monitor nor matplotlib."""
    code = (
        "import importlib, pkgutil, sys\n"
        f"pkg = importlib.import_module({package!r})\n"
        "for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] == 'matplotlib'"
        " or n.startswith(('gradcond.train', 'gradcond.monitor', 'gradcond.report')))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"{package} loads {out.stdout.strip()}"
