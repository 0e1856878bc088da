"""The package's layers import one way: serving -> api -> runtime -> planning, with `errors` shared.

`overspill.planning` is pure Python (no torch, transformers or numpy, not even indirectly): `overspill
plan` runs from a config alone, fast, on machines without torch. `overspill.runtime` never reaches up
into `overspill.api`, `overspill.serving` or the CLI. Checked two ways: a fresh interpreter that
imports every planning module (found with pkgutil, so a new one is covered without editing this
file), and a scan of every import statement in the package, lazy ones inside functions included.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "overspill"
HEAVY = ("torch", "transformers", "numpy", "safetensors", "accelerate")


def test_planning_and_the_plan_command_import_no_torch() -> None:
    code = f"""
import importlib, pkgutil, sys
import overspill.planning
names = [m.name for m in pkgutil.walk_packages(overspill.planning.__path__, "overspill.planning.")]
assert len(names) >= 9 and "overspill.planning.placement" in names and "overspill.planning.configs" in names, names
for name in names + ["overspill", "overspill.errors", "overspill.cli", "overspill.commands"]:
    importlib.import_module(name)
bad = [m for m in {HEAVY!r} if m in sys.modules]
assert not bad, f"importing the planning layer and the CLI loaded {{bad}}"
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_the_engine_scheduler_imports_no_torch() -> None:
    """The serving engine's decisions (queues, admission, KV blocks, when a request ends) are pure
    Python, like the planning layer: `serving.scheduler` and what it imports load no torch; only the
    runner touches tensors."""
    code = f"""
import sys
import overspill.serving.scheduler
bad = [m for m in {HEAVY!r} if m in sys.modules]
assert not bad, f"importing the scheduler loaded {{bad}}"
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module an import statement in `path` names, made absolute (submodules of `from X import a`
    counted as `X.a` too, since `a` may be a module)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def _layer_files(layer: str) -> list[Path]:
    files = sorted((PACKAGE / layer).rglob("*.py"))
    assert files, f"no modules under overspill/{layer}"
    return files


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_layers_import_only_downward() -> None:
    above_runtime = ("overspill.api", "overspill.serving", "overspill.cli", "overspill.commands", "overspill.run")
    wrong: list[str] = []
    for path in _layer_files("planning"):
        for name in _imports(path):
            if _within(name, HEAVY):
                wrong.append(f"{path.relative_to(ROOT)} imports {name} (planning is pure Python)")
            elif name.startswith("overspill") and not _within(name, ("overspill.errors", "overspill.planning")):
                wrong.append(f"{path.relative_to(ROOT)} imports {name} (planning imports only planning and errors)")
    for path in _layer_files("runtime"):
        wrong += [f"{path.relative_to(ROOT)} imports {name} (runtime is below api and serving)"
                  for name in _imports(path) if _within(name, above_runtime)]
    for path in _layer_files("serving"):
        wrong += [f"{path.relative_to(ROOT)} imports {name} (the CLI is above serving)"
                  for name in _imports(path) if _within(name, ("overspill.cli", "overspill.commands", "overspill.run"))]
    for name in _imports(PACKAGE / "errors.py"):
        if name.startswith("overspill"):
            wrong.append(f"overspill/errors.py imports {name} (errors is the shared base)")
    assert not wrong, "\n".join(sorted(wrong))


def test_layer_packages_import_nothing_eagerly() -> None:
    """Importing `overspill.runtime` must not load torch, nor `overspill.serving` fastapi: each
    subpackage's __init__ is a docstring only."""
    for layer in ("planning", "runtime", "serving"):
        assert not _imports(PACKAGE / layer / "__init__.py"), f"overspill/{layer}/__init__.py imports something"
    assert not [p for p in PACKAGE.glob("*.py") if p.stem not in {"__init__", "__main__", "api", "cli", "commands",
                                                                   "run", "errors"}], "a module outside the layers"
