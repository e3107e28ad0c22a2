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


# ----------------------------------------------------------------------------------- import rules
# docs/design.md, "Import rules": each rule below is one sentence there.


def _module_name(path: Path) -> str:
    """mner.<folder>.<...> of a package file (pipeline/ is mner itself)."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    top = () if parts[0] == "pipeline" else (parts[0],)
    rest = parts[1:] if parts[-1] != "__init__" else parts[1:-1]
    return ".".join(("mner", *top, *rest))


@functools.cache
def _modules() -> dict[str, Path]:
    """Every package module by its import name."""
    return {
        _module_name(path): path
        for folder in PACKAGE_FOLDERS
        for path in sorted((ROOT / folder).rglob("*.py"))
    }


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


@functools.cache
def _top_level_imports(path: Path) -> tuple[tuple[int, str], ...]:
    """(line, module) of the imports a file runs when it is imported: module level, also inside a
    top-level try/if/with, but not in a function or class body nor under `if TYPE_CHECKING:`. A
    `from X import y` whose y is a module of ours counts as importing X.y."""
    found = []

    def visit(statements):
        for node in statements:
            if isinstance(node, ast.Import):
                found.extend((node.lineno, alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.append((node.lineno, node.module))
                found.extend(
                    (node.lineno, f"{node.module}.{alias.name}")
                    for alias in node.names
                    if f"{node.module}.{alias.name}" in _modules()
                )
            elif isinstance(node, ast.If):
                if not _is_type_checking(node):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                    visit(block)
            elif isinstance(node, ast.With):
                visit(node.body)

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)).body)
    return tuple(found)


def _loaded_by(module: str) -> dict[str, str]:
    """Every module importing `module` loads (ours followed transitively, parent packages included),
    each with the chain that loads it: {"torch": "mner.train.report.plots -> mner.train.engine.runs -> torch"}."""
    chains: dict[str, str] = {}
    todo = [(module, module)]
    while todo:
        name, chain = todo.pop()
        parts = name.split(".")
        for parent in (".".join(parts[:i]) for i in range(1, len(parts))):  # packages run first
            if parent in _modules() and parent not in chains:
                chains[parent] = f"{chain} (package {parent})"
                todo.append((parent, chains[parent]))
        if name not in _modules():
            continue
        for _, imported in _top_level_imports(_modules()[name]):
            if imported not in chains:
                chains[imported] = f"{chain} -> {imported}"
                todo.append((imported, chains[imported]))
    return chains


def _imports_under(
    folders: tuple[str, ...], forbidden: tuple[str, ...], top_level_only: bool = False
) -> list[str]:
    """`file:line: module` for each import, in the files under `folders`, of a module in (or under) one
    of `forbidden`."""
    hits = []
    for folder in folders:
        root = ROOT / folder
        paths = sorted(root.rglob("*.py")) if root.is_dir() else [root.with_suffix(".py")]
        for path in paths:
            imports = _top_level_imports(path) if top_level_only else _imports(path)
            for line, name in imports:
                if any(name == bad or name.startswith(bad + ".") for bad in forbidden):
                    hits.append(f"{path.relative_to(ROOT)}:{line}: {name}")
    return hits


def test_the_zoo_imports_only_the_configs_of_the_engine_and_the_engine_never_imports_report():
    """train/zoo is what a model is made of: it reads configs, never the loop, the run folder or a report;
    train/engine trains and never needs what reads finished runs."""
    engine_but_configs = tuple(
        f"mner.train.engine.{path.stem}"
        for path in (ROOT / "train" / "engine").glob("*.py")
        if path.stem not in ("__init__", "config", "classifier_config")
    )
    assert _imports_under(("train/zoo",), (*engine_but_configs, "mner.train.report")) == []
    assert _imports_under(("train/engine",), ("mner.train.report",)) == []


def test_extract_and_cache_never_import_train():
    """Stage one and the cache know nothing of stage two: what both need lives in mner.cache or mner.runtime."""
    assert _imports_under(("extract", "cache"), ("mner.train",)) == []


def test_cache_never_imports_extract():
    """cache/ is below both stages: extract/ writes through it, never the other way round."""
    assert _imports_under(("cache",), ("mner.extract",)) == []


def test_cache_and_runtime_import_torch_only_inside_functions():
    """The cache commands (inspect, verify, show) and `mner --help` never load torch: cache/ and
    mner.runtime import it inside the functions that need it."""
    assert _imports_under(("cache", "pipeline/runtime"), ("torch",), top_level_only=True) == []
    for module in ("mner.cli", "mner.cache", "mner.runtime", "mner.cache.inspect", "mner.cache.verify"):
        assert "torch" not in _loaded_by(module), _loaded_by(module)["torch"]


def test_no_stage_imports_the_cli():
    """The CLI maps commands to entry functions; nothing below it imports it back."""
    folders = ("cache", "extract", "pipeline/runtime", "train", "demo", "configs")
    assert _imports_under(folders, ("mner.cli",)) == []


def test_train_never_imports_extract():
    """Stage two never imports stage one (predict re-extracts images through a command-level call)."""
    assert _imports_under(("train",), ("mner.extract",)) == []


@pytest.mark.parametrize("name", ["plots.py", "cases.py"])
def test_reporting_modules_load_neither_torch_nor_the_training_loop(name):
    """`mner results --plot` and `mner cases` read JSON and images: loading them loads no torch, no
    training loop and no ablation runner, however deep the import chain."""
    [path] = (ROOT / "train").rglob(name)
    loaded = _loaded_by(_module_name(path))
    banned = [
        chain
        for module, chain in loaded.items()
        if module == "torch"
        or module.startswith("torch.")
        or module.split(".")[-1] in ("loop", "fit", "ablate")
    ]
    assert banned == []


LONG_MODULE_LINES = 500


def test_no_package_module_is_longer_than_500_lines_unless_it_says_why():
    """A module over LONG_MODULE_LINES lines is a grab-bag unless its docstring says it is one concern."""
    long = []
    for path in _modules().values():
        lines = path.read_text(encoding="utf-8").count("\n")
        docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        if lines > LONG_MODULE_LINES and "one concern" not in docstring:
            long.append(f"{path.relative_to(ROOT)}: {lines} lines")
    assert long == []
