"""The repository keeps its promises about itself (issue 16): every third-party module the
package imports is a declared dependency, no source file grows past ~700 lines, and every path
the docs point at exists. Static checks over the files: no home, no HSM."""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = SRC / "keyledger"
MAX_LINES = 700
CODE_SUFFIXES = (".py", ".js", ".css")
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# repo-relative paths in prose (`src/...`, `tests/...`) and package paths (`keyledger/x.py`)
_REPO_PATH = re.compile(r"(?<![\w./-])((?:src|tests|docs|bench|scripts|notebooks|dashboards|data)"
                        r"/[\w./*-]*)")
_PACKAGE_PATH = re.compile(r"(?<![\w./-])(keyledger/[\w./*-]*)")
_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
_TICKED = re.compile(r"`([^`]+)`")


# -- declared dependencies ----------------------------------------------------------------------
def _dist_name(requirement: str) -> str:
    """The normalised distribution name of a PEP 508 requirement (PEP 503 normalisation)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, f"unparsable requirement {requirement!r} in pyproject.toml"
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def _declared() -> tuple[set[str], set[str]]:
    """(names in [project].dependencies, names in any [project.optional-dependencies] extra)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    required = {_dist_name(r) for r in project.get("dependencies", [])}
    extras = {_dist_name(r) for reqs in project.get("optional-dependencies", {}).values()
              for r in reqs}
    return required, extras


class _Imports(ast.NodeVisitor):
    """Top-level names of the absolute imports of one module, each marked optional when it sits
    in a ``try`` that catches ImportError or under ``if TYPE_CHECKING:`` (never run)."""

    def __init__(self) -> None:
        self.found: list[tuple[str, bool]] = []
        self._optional = 0

    def visit_Try(self, node: ast.Try) -> None:
        guarded = any(_catches_import_error(h.type) for h in node.handlers)
        self._optional += guarded
        for stmt in node.body:
            self.visit(stmt)
        self._optional -= guarded
        for part in [*node.handlers, *node.orelse, *node.finalbody]:
            self.visit(part)

    def visit_If(self, node: ast.If) -> None:
        typing_only = ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
        self._optional += typing_only
        for stmt in node.body:
            self.visit(stmt)
        self._optional -= typing_only
        for stmt in node.orelse:
            self.visit(stmt)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.found.append((alias.name.split(".")[0], self._optional > 0))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level == 0 and node.module:
            self.found.append((node.module.split(".")[0], self._optional > 0))


def _catches_import_error(handler: ast.expr | None) -> bool:
    names = [] if handler is None else ([handler] if not isinstance(handler, ast.Tuple)
                                        else handler.elts)
    return any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError")
               for n in names)


def _third_party_imports() -> dict[str, dict[str, bool]]:
    """module -> {importing file: whether every import there is optional}."""
    out: dict[str, dict[str, bool]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        visitor = _Imports()
        visitor.visit(ast.parse(path.read_text(), str(path)))
        rel = str(path.relative_to(ROOT))
        for module, optional in visitor.found:
            if module in sys.stdlib_module_names or module == "keyledger":
                continue
            files = out.setdefault(module, {})
            files[rel] = files.get(rel, True) and optional
    return out


def test_every_third_party_import_is_a_declared_dependency():
    required, extras = _declared()
    providers = md.packages_distributions()
    problems = []
    for module, files in sorted(_third_party_imports().items()):
        dists = {_dist_name(d) for d in providers.get(module, [])}
        where = ", ".join(sorted(files))
        if not dists:
            problems.append(f"{module} (imported by {where}) is provided by no installed "
                            "distribution: install it and declare it in pyproject.toml")
            continue
        allowed = required if not all(files.values()) else required | extras
        if not dists & allowed:
            kind = ("[project].dependencies" if allowed is required
                    else "[project].dependencies or an extra")
            problems.append(f"{module} (imported by {where}) comes from "
                            f"{' or '.join(sorted(dists))}, which is not in {kind}")
    assert not problems, "undeclared imports:\n" + "\n".join(problems)


def test_the_import_scan_sees_guarded_and_typing_only_imports_as_optional():
    visitor = _Imports()
    visitor.visit(ast.parse(
        "import a.b\nfrom c import d\n"
        "try:\n    import e\nexcept (OSError, ImportError):\n    import f\n"
        "if TYPE_CHECKING:\n    import g\nelse:\n    import h\n"
        "def later():\n    from i.j import k\n"))
    assert visitor.found == [("a", False), ("c", False), ("e", True), ("f", False),
                             ("g", True), ("h", False), ("i", False)]


# -- file sizes ---------------------------------------------------------------------------------
def test_no_source_file_is_over_700_lines():
    long = sorted((n, str(p.relative_to(ROOT))) for p in PACKAGE.rglob("*")
                  if p.suffix in CODE_SUFFIXES
                  and (n := len(p.read_text().splitlines())) > MAX_LINES)
    assert not long, (f"files over {MAX_LINES} lines (split them, one job each): "
                      + ", ".join(f"{p} ({n})" for n, p in long))


# -- paths in the docs --------------------------------------------------------------------------
def _exists(base: Path, path: str) -> bool:
    path = path.rstrip(".,:;")
    return any(base.glob(path)) if "*" in path else (base / path).exists()


def _doc_paths(doc: Path) -> list[tuple[int, Path, str]]:
    """(line, base, path) for each repo path, package path and relative link in ``doc``."""
    found = []
    for n, line in enumerate(doc.read_text().splitlines(), start=1):
        found += [(n, ROOT, m.group(1)) for m in _REPO_PATH.finditer(line)]
        found += [(n, SRC, m.group(1)) for m in _PACKAGE_PATH.finditer(line)]
        found += [(n, doc.parent, m.group(1)) for m in _LINK.finditer(line)
                  if not re.match(r"[a-z]+:", m.group(1))]
    return found


def test_every_path_the_docs_point_at_exists():
    missing = [f"{doc.relative_to(ROOT)}:{n}: {path}"
               for doc in DOCS for n, base, path in _doc_paths(doc) if not _exists(base, path)]
    assert not missing, "docs point at missing files:\n" + "\n".join(missing)


def _module_map_cells() -> list[tuple[int, str]]:
    """(line, first cell) of each row of design.md's module map (the table headed `module`)."""
    rows, in_map = [], False
    for n, line in enumerate((ROOT / "docs" / "design.md").read_text().splitlines(), start=1):
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") \
            else None
        if cells is None:
            in_map = False
        elif cells[0] == "module":
            in_map = True
        elif in_map and not set(cells[0]) <= set("-: "):
            rows.append((n, cells[0]))
    return rows


def test_every_module_in_the_design_map_exists():
    rows = _module_map_cells()
    assert len(rows) > 20, "docs/design.md has no module map (a table headed `module`)"
    missing = []
    for n, cell in rows:
        names = [t for t in _TICKED.findall(cell) if re.fullmatch(r"[\w./]+", t)]
        # a bare name (`grid.js` after `widgets/grid.py`) lives beside the cell's first path
        near = PACKAGE / Path(names[0]).parent if names else PACKAGE
        missing += [f"docs/design.md:{n}: {name}" for name in names
                    if not (PACKAGE / name).exists() and not (near / name).exists()]
    assert not missing, "design.md's module map names missing modules:\n" + "\n".join(missing)


def test_the_design_map_names_every_module_and_package():
    named = {t.rstrip("/").split("/")[0].removesuffix(".py")
             for _, cell in _module_map_cells() for t in _TICKED.findall(cell)}
    present = {p.stem for p in PACKAGE.glob("*.py")} | {
        p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    unnamed = sorted(present - named)
    assert not unnamed, ("docs/design.md's module map does not say what these do: "
                         + ", ".join(unnamed))
