"""The library's arrows run one way (docs/architecture.md), and the project's parts are packages.

Read from the code with ``ast``: every ``import`` / ``from ... import`` at any depth counts (a lazy
import inside a function is an arrow too).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "chatuie"

# Lowest first: a package may import its own modules and those of lower layers, never higher ones.
LAYERS: list[set[str]] = [
    {"errors", "io", "progress", "env"},
    {"config"},
    {"data"},
    {"models"},
    {"tracking"},
    {"decoding"},
    {"train"},
    {"eval"},
    {"reward"},
    {"rl"},
    {"serve"},
    {"cli"},
]
LAYER = {name: level for level, names in enumerate(LAYERS) for name in names}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _part(path: Path) -> str:
    """The top-level part of chatuie a file belongs to (``data``, ``cli``, ...)."""
    rel = path.relative_to(SRC).parts
    return rel[0] if len(rel) > 1 else rel[0].removesuffix(".py")


def _library_files() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if p.name != "__init__.py" or p.parent != SRC)


def test_every_part_of_the_library_has_a_layer() -> None:
    parts = {_part(p) for p in _library_files()}
    assert parts <= set(LAYER), f"new parts of chatuie without a layer here: {sorted(parts - set(LAYER))}"


def test_arrows_point_down() -> None:
    wrong = []
    for path in _library_files():
        part = _part(path)
        for name in _imports(path):
            if not name.startswith("chatuie."):
                continue
            target = name.split(".")[1]
            if target in LAYER and target != part and LAYER[target] > LAYER[part]:
                wrong.append(f"{path.relative_to(ROOT)}: {part} -> {target} ({name})")
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(set(wrong)))


@pytest.mark.parametrize(
    ("folder", "allowed", "banned"),
    [
        ("src/chatuie/tracking", {"mlflow"}, {"prefect", "dvc"}),
        ("src/chatuie", set(), {"prefect", "dvc"}),
        ("flows", {"prefect", "dvc"}, {"mlflow"}),
        ("tasks", {"dvc"}, {"mlflow", "prefect"}),
    ],
)
def test_each_tool_stays_in_its_folder(folder: str, allowed: set[str], banned: set[str]) -> None:
    found = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for name in _imports(path):
            if name.split(".")[0] in banned:
                found.append(f"{path.relative_to(ROOT)}: {name}")
    assert not found, f"{folder} imports {sorted(banned)}:\n" + "\n".join(sorted(set(found)))


def test_mlflow_only_in_tracking() -> None:
    outside = [
        str(p.relative_to(ROOT))
        for p in _library_files()
        if _part(p) != "tracking" and any(n.split(".")[0] == "mlflow" for n in _imports(p))
    ]
    assert not outside


@pytest.mark.parametrize("folder", ["tasks", "flows", "bench", "tests/helpers"])
def test_entry_points_are_packages(folder: str) -> None:
    assert (ROOT / folder / "__init__.py").is_file()


def test_no_sys_path_patches() -> None:
    patched = []
    for folder in ("src", "tasks", "flows", "bench", "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            if "sys.path.insert" in text.replace('"sys.path.insert"', "") or "sys.path.append" in text:
                patched.append(str(path.relative_to(ROOT)))
    patched.remove("tests/test_architecture.py")
    assert not patched, f"sys.path patched in {patched}: import through the packages instead"


def test_no_test_module_imports_another() -> None:
    tests = {p.stem for p in (ROOT / "tests").rglob("test_*.py")}
    found = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for name in _imports(path):
            if name.split(".")[-1] in tests or name.split(".")[0] in tests:
                found.append(f"{path.relative_to(ROOT)}: {name}")
    assert not found, "shared test code belongs in tests/conftest.py or tests/helpers:\n" + "\n".join(found)


def test_tests_mirror_the_packages() -> None:
    """tests/<package>/ for each package of the library; tests/pipeline for tasks/, flows/, DVC."""
    folders = {p.name for p in (ROOT / "tests").iterdir() if p.is_dir() and p.name != "__pycache__"}
    packages = {p.name for p in SRC.iterdir() if (p / "__init__.py").is_file()}
    assert folders - {"helpers", "fixtures", "pipeline"} <= packages, folders - packages
    at_top = [p.name for p in (ROOT / "tests").glob("test_*.py") if p.stem.removeprefix("test_") in packages]
    assert not at_top, f"tests of a package belong in its folder: {at_top}"
