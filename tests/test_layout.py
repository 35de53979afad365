"""The import rules of the layout (docs/DESIGN.md, "Layout"), read from the source with ast.

A unit is a top-level module of ``offload`` (``offload.model``), a sub-package (``offload.experts``), the
package itself (``offload``) or ``cli``. Imports inside functions count like any other.
- The engine (``offload`` minus ``offload.bench`` and ``offload.trace``) never imports ``bench``, ``trace``
  or ``cli``; ``offload`` never imports ``cli``.
- ``offload.quant.spec`` never imports ``offload.quant.linear`` (linear imports spec).
- No import cycle between units.
- No module reaches into another object's private attributes (``other._name``).
- The CLI's quick paths import no torch.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOT_ENGINE = ("offload.bench", "offload.trace")
# ``ModelConfig.from_dict`` checks the instance it has just built: its own class's private method.
# typer 0.29 has no public hook for the usage line's argument name; help_format replaces it, guarded.
PRIVATE_ALLOWED = {
    ("offload/config.py", "config._check"),
    ("cli/help_format.py", "argument._usage_display_name"),
    # torch's CPU kernels for weight-only quantized matmuls have no public name.
    ("offload/quant/host_kernels.py", "torch.ops.aten._convert_weight_to_int4pack_for_cpu"),
    ("offload/quant/host_kernels.py", "torch.ops.aten._weight_int4pack_mm_for_cpu"),
    ("offload/quant/host_kernels.py", "torch._weight_int8pack_mm"),
    ("offload/quant/device_kernels.py", "torch.ops.aten._convert_weight_to_int4pack"),
    ("offload/quant/device_kernels.py", "torch.ops.aten._weight_int4pack_mm"),
}


def module_name(path: Path, root: Path = ROOT) -> str:
    """``offload/experts/cache.py`` -> ``offload.experts.cache``; a package's ``__init__`` is the package."""
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_files() -> list[Path]:
    return sorted([*ROOT.glob("offload/**/*.py"), *ROOT.glob("cli/**/*.py")])


def imports_of(path: Path, root: Path = ROOT) -> set[str]:
    """Every module that ``path`` imports, anywhere in it; ``from X import Y`` counts X, and X.Y as well
    when Y is a module of ours (under ``root``).
    """
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                if _is_our_module(candidate, root):
                    found.add(candidate)
    return found


def _is_our_module(name: str, root: Path) -> bool:
    path = root.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def unit_of(module: str) -> str | None:
    """The unit that ``module`` belongs to, or None for a module that is not ours."""
    parts = module.split(".")
    if parts[0] == "cli":
        return "cli"
    if parts[0] != "offload":
        return None
    return "offload" if len(parts) == 1 else f"offload.{parts[1]}"


def in_engine(module: str) -> bool:
    return module.startswith("offload") and not any(
        module == banned or module.startswith(banned + ".") for banned in NOT_ENGINE
    )


def rule_violations(imports: Mapping[str, Iterable[str]]) -> list[str]:
    """Each import (module -> modules it imports) that breaks a rule other than "no cycle"."""
    problems = []
    for module, imported in imports.items():
        for target in imported:
            if in_engine(module) and unit_of(target) in (*NOT_ENGINE, "cli"):
                problems.append(f"{module} imports {target}: the engine may not import bench, trace or cli")
            elif module.startswith("offload") and unit_of(target) == "cli":
                problems.append(f"{module} imports {target}: offload may not import cli")
            if module == "offload.quant.spec" and target == "offload.quant.linear":
                problems.append(f"{module} imports {target}: linear imports spec, never the reverse")
    return sorted(problems)


def unit_graph(imports: Mapping[str, Iterable[str]]) -> dict[str, set[str]]:
    """Unit -> the other units its modules import."""
    graph: dict[str, set[str]] = {}
    for module, imported in imports.items():
        source = unit_of(module)
        assert source is not None, module
        targets = {unit_of(target) for target in imported} - {None, source}
        graph.setdefault(source, set()).update(targets)
    return graph


def find_cycle(graph: Mapping[str, Iterable[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None when it has none."""
    state: dict[str, str] = {}  # node -> "open" while on the path, "done" once fully explored
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for neighbour in sorted(graph.get(node, ())):
            if state.get(neighbour) == "open":
                return [*path[path.index(neighbour) :], neighbour]
            if neighbour not in state and (cycle := visit(neighbour)) is not None:
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def private_reach(path: Path) -> list[str]:
    """Accesses to ``x._name`` where x is not ``self`` or ``cls``."""
    found = []
    relative = path.relative_to(ROOT).as_posix()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not (
            isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
        ):
            continue
        if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
            continue
        text = ast.unparse(node)
        if (relative, text) not in PRIVATE_ALLOWED:
            found.append(f"{relative}:{node.lineno}: {text}")
    return found


@pytest.fixture(scope="module")
def imports() -> dict[str, set[str]]:
    return {module_name(path): imports_of(path) for path in source_files()}


def test_the_tree_keeps_the_import_rules(imports: dict[str, set[str]]) -> None:
    assert "offload.experts.cache" in imports and "cli.main" in imports  # the walk found the tree
    assert rule_violations(imports) == []


def test_no_import_cycle_between_units(imports: dict[str, set[str]]) -> None:
    graph = unit_graph(imports)
    assert {"offload.experts", "offload.quant", "offload.model", "cli"} <= set(graph)
    assert find_cycle(graph) is None


def test_no_module_reaches_into_private_attributes() -> None:
    assert [hit for path in source_files() for hit in private_reach(path)] == []


def test_the_rules_flag_each_kind_of_violation() -> None:
    assert rule_violations({"offload.experts.cache": ["offload.trace.replay"]}) != []
    assert rule_violations({"offload.model": ["offload.bench"]}) != []
    assert rule_violations({"offload.loading": ["cli.options"]}) != []
    assert rule_violations({"offload.bench.run": ["cli"]}) != []  # bench may use trace, never cli
    assert rule_violations({"offload.quant.spec": ["offload.quant.linear"]}) != []
    assert (
        rule_violations({"offload.bench.run": ["offload.trace.recorder"], "cli.main": ["offload.engine"]})
        == []
    )
    graph = unit_graph(
        {"offload.checkpoint.convert": ["offload.loading"], "offload.loading": ["offload.checkpoint"]}
    )
    assert find_cycle(graph) == ["offload.checkpoint", "offload.loading", "offload.checkpoint"]
    assert find_cycle(unit_graph({"offload.a": ["offload.b.x"], "offload.b.y": ["offload.c"]})) is None


def test_imports_inside_functions_and_relative_ones_count(tmp_path: Path) -> None:
    package = tmp_path / "offload" / "experts"
    package.mkdir(parents=True)
    for name in ("__init__.py", "sibling.py", "../__init__.py", "../errors.py"):
        (package / name).write_text("")
    (package / "mod.py").write_text(
        "from . import sibling\nfrom ..errors import OffloadError\n\n"
        "def later():\n    from offload.trace import replay\n"
    )
    found = imports_of(package / "mod.py", tmp_path)
    assert {"offload.experts.sibling", "offload.errors", "offload.trace"} <= found
    assert rule_violations({module_name(package / "mod.py", tmp_path): found}) != []


@pytest.mark.parametrize("argv", [["--help"], ["profiles", "list"], ["profiles", "show", "cpu"]])
def test_quick_cli_paths_import_no_torch(argv: list[str]) -> None:
    code = (
        "import sys\nfrom cli.main import run\n"
        f"sys.argv = ['offload', *{argv!r}]\n"
        "try:\n    run()\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules, file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stderr.strip().splitlines()[-1] == "False", done.stderr
