"""The installed layout: every top-level folder is a subpackage of the one import name `mner`.

The repository root is on sys.path while the tests run (for `tests.*` factories), so a bare
`import cache` would still work here and load a second copy of a module beside `mner.cache`; this
test keeps every import in the project on the installed names.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Folders installed as mner.<name> (pipeline/ is mner itself).
PACKAGE_FOLDERS = ("cache", "configs", "demo", "extract", "pipeline", "train")
SOURCE_FOLDERS = (*PACKAGE_FOLDERS, "tests", "benchmarks")


def _python_files() -> list[Path]:
    return sorted(path for folder in SOURCE_FOLDERS for path in (ROOT / folder).rglob("*.py"))


@functools.cache  # both checks walk every file; parse each once
def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute `import X` / `from X import` in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def _bare_imports(path: Path) -> list[str]:
    """`import X` / `from X import` lines whose first name is a package folder rather than `mner`."""
    return [
        f"{path.relative_to(ROOT)}:{line}: {name}"
        for line, name in _imports(path)
        if name.split(".")[0] in PACKAGE_FOLDERS
    ]


def test_every_import_uses_the_mner_namespace():
    bare = [line for path in _python_files() for line in _bare_imports(path)]
    assert bare == [], "import these through mner.*:\n" + "\n".join(bare)


@pytest.mark.parametrize("folder", PACKAGE_FOLDERS)
def test_each_folder_is_the_installed_subpackage(folder):
    """`mner.<folder>` (or `mner` for pipeline/) is the folder in this checkout, not a copy elsewhere."""
    import importlib

    module = importlib.import_module("mner" if folder == "pipeline" else f"mner.{folder}")
    assert Path(module.__file__).resolve().parent == ROOT / folder


def test_only_cache_imports_h5py():
    """cache/ alone knows the HDF5 layout; the rest reads and writes through it. Its tests may open
    shards with h5py (to corrupt one on purpose or check the layout); no other tests need to."""
    allowed = (ROOT / "cache", ROOT / "tests" / "cache")
    outside = [
        f"{path.relative_to(ROOT)}:{line}: {name}"
        for path in _python_files()
        if not any(path.is_relative_to(folder) for folder in allowed)
        for line, name in _imports(path)
        if name.split(".")[0] == "h5py"
    ]
    assert outside == [], "go through mner.cache instead of importing h5py:\n" + "\n".join(outside)
