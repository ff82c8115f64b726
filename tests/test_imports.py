"""Every module of the four packages and of ``benchmarks`` imports, and every name in ``__all__`` exists;
the dependency rules between the packages, ``benchmarks``, ``scripts/`` and the tests hold."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

PACKAGES = ("mmalign", "vision", "diffusion", "video")
ROOT = Path(__file__).resolve().parents[1]
#: module names that ``scripts/*.py`` would have with ``scripts/`` on ``sys.path``
SCRIPT_MODULES = frozenset({"scripts", *(p.stem for p in (ROOT / "scripts").glob("*.py"))})


def _modules() -> list[str]:
    names = []
    for pkg_name in (*PACKAGES, "benchmarks"):  # benchmarks.cuda imports its CUDA-only libraries lazily
        pkg = importlib.import_module(pkg_name)
        names.append(pkg_name)
        names += [m.name for m in pkgutil.walk_packages(pkg.__path__, prefix=f"{pkg_name}.")]
    return names


@pytest.mark.parametrize("name", _modules())
def test_module_imports_and_exports(name: str) -> None:
    module = importlib.import_module(name)
    for exported in getattr(module, "__all__", []):
        assert hasattr(module, exported), f"{name}.__all__ names {exported!r}, which does not exist"


MODALITIES = ("vision", "diffusion", "video")
#: the one documented exception to "modalities never import each other": video reuses the VLM code it
#: shares with vision (the adapter, generation helpers, model loading) and nothing else of it
VIDEO_MAY_USE = {"vision.adapter", "vision.generate", "vision.train"}


def _imports(package: str) -> list[tuple[str, str]]:
    """(file relative to the package, absolute imported module) for every import statement anywhere in
    ``package`` (sub-packages included; relative imports resolved, so ``from ..x import y`` counts too)."""
    root = Path(importlib.import_module(package).__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        parts = [package, *rel.with_suffix("").parts]
        package_of_file = parts[:-1]  # what a relative import with one dot names
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found += [(str(rel), a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level == 0:
                    found.append((str(rel), node.module or ""))
                else:  # relative: the file's package, then up one package per extra dot
                    base = package_of_file[: len(package_of_file) - (node.level - 1)]
                    found.append((str(rel), ".".join([*base, node.module] if node.module else base)))
    return found


def test_import_scan_sees_subpackages_and_relative_imports() -> None:
    """The rules below are only as good as the scan: it reads every file of a sub-package (mmalign.pairs,
    mmalign.tiny) and resolves relative imports to absolute names."""
    files = {f for f, _ in _imports("mmalign")}
    assert any(f.startswith("pairs/") for f in files) and any(f.startswith("tiny/") for f in files)
    modules = {m for _, m in _imports("mmalign")}
    assert "mmalign.pairs.record" in modules and "mmalign.tiny.registry" in modules


def test_core_does_not_import_the_modality_packages() -> None:
    """Dependency direction (DESIGN.md): mmalign, sub-packages included, imports none of vision, diffusion, video."""
    bad = [(f, m) for f, m in _imports("mmalign") if m.split(".")[0] in MODALITIES]
    assert not bad, bad


@pytest.mark.parametrize("package", PACKAGES)
def test_nothing_imports_scripts(package: str) -> None:
    """Nothing under the four packages imports ``scripts/`` (the scripts are thin wrappers over them) or
    ``benchmarks`` (which measures them: it may import the four packages, never the other way round)."""
    bad = [(f, m) for f, m in _imports(package) if m.split(".")[0] in ("scripts", "benchmarks")]
    assert not bad, bad


def test_benchmarks_do_not_import_scripts() -> None:
    """The benchmarks and the crash matrix live in ``benchmarks``; ``scripts/bench.py`` and
    ``scripts/crash_matrix.py`` only call its ``main``."""
    bad = [(f, m) for f, m in _imports("benchmarks") if m.split(".")[0] in SCRIPT_MODULES]
    assert not bad, bad
    for name in ("bench.py", "crash_matrix.py"):
        assert len((ROOT / "scripts" / name).read_text().splitlines()) < 20, name


def _script_uses(path: Path) -> list[str]:
    """What in a test file reaches into ``scripts/``: an import of a module only ``scripts/`` has, or a
    ``sys.path`` (or ``monkeypatch.syspath_prepend``, ``importlib``'s ``spec_from_file_location``, ``runpy.run_path``)
    call that names ``scripts``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in SCRIPT_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] in SCRIPT_MODULES:
                found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Call):
            func = ast.unparse(node.func)
            loads_file = func.endswith(("syspath_prepend", "spec_from_file_location", "run_path"))
            if (func.startswith("sys.path.") or loads_file) and "scripts" in ast.unparse(node):
                found.append(ast.unparse(node))
    return found


def test_script_scan_sees_path_hacks_and_script_imports(tmp_path: Path) -> None:
    sample = tmp_path / "test_sample.py"
    sample.write_text("import sys\nimport make_pairs\nfrom scripts.bench import main\nfrom mmalign.pairs import read_pairs\n"
                      "sys.path.insert(0, str(ROOT / 'scripts'))\nsys.path.append('/elsewhere')\n"
                      "spec = importlib.util.spec_from_file_location('demo', ROOT / 'scripts' / 'demo.py')\n")
    assert sorted(_script_uses(sample)) == [
        "from scripts.bench import ...", "import make_pairs",
        "importlib.util.spec_from_file_location('demo', ROOT / 'scripts' / 'demo.py')",
        "sys.path.insert(0, str(ROOT / 'scripts'))"]


def test_tests_do_not_import_scripts() -> None:
    """No test puts ``scripts/`` on ``sys.path`` or imports a script: tests import the packages (``benchmarks``
    included) and run a script, where its command line is what they test, as a subprocess."""
    bad = {p.name: uses for p in sorted((ROOT / "tests").glob("*.py")) if (uses := _script_uses(p))}
    assert not bad, bad


def test_modalities_do_not_import_each_other() -> None:
    """vision and diffusion never import another modality; video only the shared VLM code of vision
    (VIDEO_MAY_USE, pinned) and never diffusion."""
    for package in MODALITIES:
        others = set(MODALITIES) - {package}
        used = {m for _, m in _imports(package) if m.split(".")[0] in others}
        if package == "video":
            assert used <= VIDEO_MAY_USE, sorted(used - VIDEO_MAY_USE)
        else:
            assert not used, (package, sorted(used))
