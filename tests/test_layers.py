"""No private names across modules: a ``_name`` belongs to the module that defines it.

One-way layering itself is checked by import-linter (``lint-imports`` in ``make test``, the
contracts in pyproject.toml); this walks ``src/keyledger`` with ``ast`` for what import-linter
cannot see:

(a) an import of a private name (``from .x import _helper``) or of a private module from
    outside its own package (``widgets/_common.py`` is for the ``widgets`` modules only);
(b) a private attribute of an object that is not ``self``/``cls`` (``led._rt``,
    ``backend._session()``), unless a class of the same module defines that attribute (it
    reads its own attribute on another instance), or it is a dunder or a protocol name below.

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

# (module, private attribute) -> why it may cross; keep this short.
ALLOWED = {
    ("keyledger/demo_fleet/workers.py", "_rt"):
        "the demo seeder's worker processes tune their own ledgers' runtime (no background "
        "ingest while the seeder holds the store; the catalog refreshed before each simulated "
        "batch): simulation plumbing that no public KeyLedger call should offer",
    ("keyledger/server/kms/seam.py", "_rt"):
        "the KMS layer's one seam into a ledger: unaudited catalog reads that AWS's responses "
        "need (a key id's name for an ARN, a permission pre-check that lets the ledger's own "
        "call refuse and audit); public, they would be unaudited KeyLedger calls",
    ("keyledger/server/kms/seam.py", "_audited"):
        "the same seam: one audit record for what only the KMS layer does (a refusal before any "
        "ledger call, a DryRun check, GenerateRandom) through the ledger's own record path",
    ("keyledger/hsm/pkcs11_backend.py", "_encrypt"):
        "python-pkcs11's one-shot encrypt of bytes, what its public encrypt() calls after type "
        "checks and a **kwargs dict: the hot path's HSM call skips that wrapper (issue 18)",
    ("keyledger/hsm/pkcs11_backend.py", "_decrypt"):
        "the same for decrypt()",
    ("keyledger/server/native.py", "_audited"):
        "keyledger's own API over the service: one audit record for a call refused before the "
        "ledger runs (unknown method or argument, wrong type), through the ledger's record path",
}


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_of(rel: Path, module: str) -> str:
    return module if rel.name == "__init__.py" else module.rpartition(".")[0]


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
    """Private attributes this module's classes define: methods, class attributes and
    ``self._x = ...`` (a class may read them on another instance of itself)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    names.add(item.name)
                elif isinstance(item, ast.Assign):
                    names.update(t.id for t in item.targets if isinstance(t, ast.Name))
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    names.add(item.target.id)
        elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
              and is_self(node.value)):
            names.add(node.attr)
    return {n for n in names if is_private(n)}


def is_self(node: ast.expr) -> bool:
    if isinstance(node, ast.Name):
        return node.id in ("self", "cls")
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id == "super")


def findings_in(source: str, rel: Path) -> list[str]:
    """The crossings in the module at ``rel`` (relative to src/) with text ``source``."""
    module = module_name(rel)
    package = package_of(rel, module)
    tree = ast.parse(source, str(rel))
    own = defined_privates(tree)
    where = rel.as_posix()
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = resolve(node, package)
            bad_module = private_module_outside(target, module)
            if bad_module:
                found.append(f"{where}:{node.lineno}: imports the private module {bad_module}")
            for alias in node.names:
                if not is_private(alias.name):
                    continue
                sub = f"{target}.{alias.name}"
                if not (SRC / (sub.replace(".", "/") + ".py")).exists():  # a name, not a module
                    found.append(f"{where}:{node.lineno}: imports {alias.name} from {target}")
                elif private_module_outside(sub, module):
                    found.append(f"{where}:{node.lineno}: imports the private module {sub}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                bad_module = private_module_outside(alias.name, module)
                if bad_module:
                    found.append(f"{where}:{node.lineno}: imports the private module {bad_module}")
        elif isinstance(node, ast.Attribute) and is_private(node.attr):
            if (node.attr in PROTOCOL_NAMES or node.attr in own or is_self(node.value)
                    or (where, node.attr) in ALLOWED):
                continue
            found.append(f"{where}:{node.lineno}: uses {ast.unparse(node)}")
    return found


def test_no_private_names_across_modules() -> None:
    found = [f for path in sorted(PACKAGE.rglob("*.py"))
             for f in findings_in(path.read_text(), path.relative_to(SRC))]
    assert not found, ("private names used outside the module that defines them (make the name "
                       "public where another module needs it):\n" + "\n".join(found))


def test_allow_list_entries_are_still_needed() -> None:
    for rel, name in ALLOWED:
        text = (SRC / rel).read_text()
        assert f".{name}" in text, f"{rel} no longer uses {name}: drop it from ALLOWED"


def test_the_check_sees_each_kind_of_crossing() -> None:
    """The walker itself: each rule fires on a crossing and stays quiet on its allowed form."""
    source = """
from .x import _helper
from ..widgets._common import esc
from keyledger.widgets import _common as c
import keyledger.widgets._common


class Box:
    def __init__(self):
        self._items = []

    def same(self, other):
        return other._items == self._items and super()._check()

    def show(self, obj, led):
        return obj._repr_html_(), led._rt.db, led.__dict__
"""
    found = findings_in(source, Path("keyledger/cli/box.py"))
    assert sorted(f.split(": ", 1)[1] for f in found) == [
        "imports _helper from keyledger.cli.x",
        *["imports the private module keyledger.widgets._common"] * 3,
        "uses led._rt",
    ]
    sibling = "from . import _common\nfrom ._common import esc\n"
    assert findings_in(sibling, Path("keyledger/widgets/grid.py")) == []
