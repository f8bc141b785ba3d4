"""The tree shows the architecture: every import points down the layers of docs/architecture.md.

Layers, lowest first; a module may import its own package and any package below it, never one
above (so no two packages import each other). Imports inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LAYERS = ["esa", "esa.core", "esa.spec", "esa.planner", "esa.results", "esa.data", "esa.model", "esa.parallel", "esa.inputs", "esa.baseline",
          "esa.profile", "esa.perturb", "esa.runner", "analysis", "jobs", "esa.cli", "esa.__main__"]
OURS = ("esa", "jobs", "analysis")


def layer_of(module: str) -> int:
    """The index of the longest layer prefix of a dotted module name."""
    best = -1
    for i, name in enumerate(LAYERS):
        if module == name or module.startswith(name + "."):
            best = i if best == -1 or len(name) > len(LAYERS[best]) else best
    assert best >= 0, f"{module} belongs to no layer: add it to LAYERS and docs/architecture.md"
    return best


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) of every import of our own packages in a file."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # `from esa import provenance` imports the module esa.provenance when it is one.
            out += [(node.lineno, f"{base}.{a.name}" if (REPO / Path(*base.split("."), a.name)).exists()
                     or (REPO / Path(*base.split("."), a.name + ".py")).exists() else base) for a in node.names]
    return [(line, m) for line, m in out if m.split(".")[0] in OURS]


def sources() -> list[Path]:
    return sorted(p for pkg in OURS for p in (REPO / pkg).rglob("*.py"))


def test_every_module_has_a_layer():
    for path in sources():
        layer_of(module_name(path))


def test_imports_point_down_the_layers():
    wrong = []
    for path in sources():
        own = module_name(path)
        for line, target in imports(path):
            if layer_of(target) > layer_of(own):
                wrong.append(f"{path.relative_to(REPO)}:{line}: {own} ({LAYERS[layer_of(own)]}) imports {target} "
                             f"({LAYERS[layer_of(target)]}, a higher layer)")
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """The rule can fail: a results module importing the job layer is reported."""
    assert layer_of("jobs.submit") > layer_of("esa.results.state")
    assert layer_of("esa.profile.metrics.gradient") == LAYERS.index("esa.profile")
    assert layer_of("esa.cli.profile") > layer_of("jobs.executors") > layer_of("analysis.report")
