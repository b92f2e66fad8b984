"""The project files a module imports, directly or not: read statically (``ast``), nothing is imported.

:func:`import_closure` ``("tasks.evaluate")`` is the set of files (paths relative to the repository
root) that running ``python -m tasks.evaluate`` can load from this project: the module itself, every
``import x`` / ``from x import y`` of it and of what it imports, at any depth (inside functions
too), the ``__init__.py`` of every package on the way (``import a.b.c`` runs ``a/__init__.py`` and
``a/b/__init__.py``), ``y`` itself when it is a submodule of ``x``, and relative imports. Only files
under :data:`SCOPE` count and are followed; third-party imports are left out. Imports under
``if TYPE_CHECKING:`` never run and are left out.

Imports by name at run time (``importlib.import_module(module)``, tasks/check_params.py's
``SECTIONS``) cannot be followed as such; instead a string constant that is exactly the dotted name
of a project module (``"chatuie.data.prepare"``, ``"tasks.sft"``) counts as an import of it. A
module named only by a string built at run time stays unseen.
"""

from __future__ import annotations

import ast
import functools
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Where a top-level module name is looked up, in order: the installed package (src layout), then
# the repository root (tasks/, as pytest's and `python -m`'s working directory puts it on sys.path).
SEARCH_PATH = ("src", ".")
SCOPE = ("src/chatuie", "tasks")  # the files a closure keeps (and follows)
_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")


def _in_scope(rel: str) -> bool:
    return any(rel == s or rel.startswith(s + "/") for s in SCOPE)


def module_file(name: str, root: Path = ROOT) -> str | None:
    """``"chatuie.data.prompts"`` -> ``"src/chatuie/data/prompts.py"`` (a package: its ``__init__.py``);
    None for a module outside :data:`SCOPE` or not found."""
    parts = name.split(".")
    for base in SEARCH_PATH:
        stem = root / base / Path(*parts)
        for path in (stem.with_suffix(".py"), stem / "__init__.py"):
            if path.is_file():
                rel = path.relative_to(root).as_posix()
                return rel if _in_scope(rel) else None
    return None


def _with_parents(name: str) -> Iterator[str]:
    """``"a.b.c"`` -> ``"a"``, ``"a.b"``, ``"a.b.c"``: importing a module imports its packages first."""
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        yield ".".join(parts[:i])


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement of ``tree`` at any depth, but those under ``if TYPE_CHECKING:``."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _module_strings(tree: ast.AST) -> Iterator[str]:
    """String constants that look like a dotted module name (``"tasks.sft"``): imports by name."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and _DOTTED.fullmatch(node.value):
            yield node.value


def imported_names(path: Path, module: str) -> frozenset[str]:
    """The module names the file ``path`` (module ``module``) imports: ``from x import y`` gives ``x``
    and ``x.y``, a string constant ``"a.b"`` gives ``a.b`` (each kept by :func:`import_closure` only
    where it is a project module). Read once per version of the file."""
    stat = path.stat()
    return _imported_names(path, module, stat.st_mtime_ns, stat.st_size)


@functools.cache
def _imported_names(path: Path, module: str, mtime_ns: int, size: int) -> frozenset[str]:
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names = set(_module_strings(tree))
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
            continue
        if node.module == "__future__":
            continue
        if node.level:  # relative: against this module's package
            package = module.split(".") if is_package else module.split(".")[:-1]
            if node.level > 1:
                package = package[: len(package) - (node.level - 1)]
            base = ".".join(package + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        if base:
            names.add(base)
        names.update(
            f"{base}.{alias.name}" if base else alias.name for alias in node.names if alias.name != "*"
        )
    return frozenset(names)


def import_closure(modules: str | Iterable[str], root: Path = ROOT) -> set[str]:
    """The files under :data:`SCOPE` that importing ``modules`` loads (paths relative to ``root``)."""
    todo = [modules] if isinstance(modules, str) else list(modules)
    seen_modules: set[str] = set()
    files: set[str] = set()
    while todo:
        name = todo.pop()
        for mod in _with_parents(name):
            if mod in seen_modules:
                continue
            seen_modules.add(mod)
            rel = module_file(mod, root)
            if rel is None:  # third-party, stdlib, out of scope, or a name that is not a module
                continue
            files.add(rel)
            todo.extend(imported_names(root / rel, mod))
    return files
