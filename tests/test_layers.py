"""No private names across modules: a ``_name`` belongs to the module that defines it.

One-way layering itself is checked by import-linter (``lint-imports`` in ``make test``, the
contracts in pyproject.toml); this walks ``src/keyledger`` with ``ast`` for what import-linter
cannot see:

(a) an import of a private name (``from .x import _helper``) or of a private module from
    outside its own package (``widgets/_common.py`` is for the ``widgets`` modules only);
(b) a private attribute of an object that is not ``self``/``cls`` (``led._rt``,
    ``backend._session()``), unless the module itself defines that name (a class reading its
    own attribute on another instance) or it is a dunder or a protocol name below.

A name another module needs is part of that module's API: make it public.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "keyledger"

# Names other libraries call by protocol (IPython display, namedtuple, pandas subclassing).
PROTOCOL_NAMES = frozenset({
    "_repr_html_", "_repr_mimebundle_", "_ipython_display_", "_asdict", "_replace", "_fields",
    "_make", "_constructor", "_missing_", "_value_", "_name_",
})


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_of(path: Path, module: str) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def resolve(node: ast.ImportFrom, package: str) -> str:
    """The absolute module a ``from ... import`` names."""
    if not node.level:
        return node.module or ""
    base = package.split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def private_module_outside(target: str, importer: str) -> str | None:
    """The private module in ``target`` that ``importer`` may not import (it is not inside the
    package holding it), else None."""
    parts = target.split(".")
    for i, part in enumerate(parts):
        if is_private(part):
            owner = ".".join(parts[:i])
            if not (importer == owner or importer.startswith(owner + ".")):
                return ".".join(parts[: i + 1])
    return None


def defined_privates(tree: ast.AST) -> set[str]:
    """Private names this module defines: functions, classes, assignments, ``self._x = ...``."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {n for n in names if is_private(n)}


def is_self(node: ast.expr) -> bool:
    if isinstance(node, ast.Name):
        return node.id in ("self", "cls")
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id == "super")


def findings_in(path: Path) -> list[str]:
    module = module_name(path)
    package = package_of(path, module)
    tree = ast.parse(path.read_text(), str(path))
    own = defined_privates(tree)
    where = f"{path.relative_to(SRC)}"
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = resolve(node, package)
            bad_module = private_module_outside(target, module)
            if bad_module:
                found.append(f"{where}:{node.lineno}: imports the private module {bad_module}")
            for alias in node.names:
                if is_private(alias.name):
                    sub = f"{target}.{alias.name}"
                    if private_module_outside(sub, module) or not (PACKAGE.parent / (
                            sub.replace(".", "/") + ".py")).exists():
                        found.append(f"{where}:{node.lineno}: imports {alias.name} from {target}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                bad_module = private_module_outside(alias.name, module)
                if bad_module:
                    found.append(f"{where}:{node.lineno}: imports the private module {bad_module}")
        elif isinstance(node, ast.Attribute) and is_private(node.attr):
            if node.attr in PROTOCOL_NAMES or node.attr in own or is_self(node.value):
                continue
            found.append(f"{where}:{node.lineno}: uses {ast.unparse(node)}")
    return found


def test_no_private_names_across_modules() -> None:
    found = [f for path in sorted(PACKAGE.rglob("*.py")) for f in findings_in(path)]
    assert not found, ("private names used outside the module that defines them (make the name "
                       "public where another module needs it):\n" + "\n".join(found))


def test_the_check_sees_each_kind_of_crossing(tmp_path: Path) -> None:
    """The walker itself: each rule fires on a crossing and stays quiet on its allowed form."""
    tree = ast.parse("from .x import _helper\nfrom .widgets._common import esc\n"
                     "led._rt.db\nself._rt\nsuper()._setup()\nobj._repr_html_()\n")
    imports = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert resolve(imports[0], "keyledger.backup") == "keyledger.backup.x"
    assert private_module_outside("keyledger.widgets._common", "keyledger.cli.keys") == (
        "keyledger.widgets._common")
    assert private_module_outside("keyledger.widgets._common", "keyledger.widgets.grid") is None
    attrs = [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and is_private(n.attr)]
    crossing = [ast.unparse(a) for a in attrs
                if not (is_self(a.value) or a.attr in PROTOCOL_NAMES)]
    assert crossing == ["led._rt"]
