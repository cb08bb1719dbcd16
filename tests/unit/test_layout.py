"""The folders are the import paths, and each layer imports only the layers below it."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
PARTS = (ROOT / "services", ROOT / "pipelines")

# Layers, lowest first. A module may import its own layer and the ones below; the
# services may use each other's engines, settings and factories, never a servicer.
LAYERS: dict[str, int] = {
    "v1": 0,
    "domain": 1,
    "backends": 2,
    "runtime": 3,
    "generation": 4,
    "judge": 4,
    "correction": 4,
    "training": 4,
    "sandbox": 5,
    "intake": 5,
    "streaming": 5,
    "dataset": 6,
    "evaluation": 6,
    "demo": 6,
    "triggers": 6,
    "docs": 7,
    "cli": 7,
}


def _modules() -> dict[str, Path]:
    found = {}
    for part in PARTS:
        for path in sorted((part / "unsafechain").rglob("*.py")):
            relative = path.relative_to(part).with_suffix("")
            parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def test_unsafechain_is_one_namespace_package_over_the_design_cards_folders():
    for part in PARTS:
        assert (part / "unsafechain").is_dir()
        assert not (part / "unsafechain" / "__init__.py").exists(), part
    import unsafechain

    roots = {Path(path).resolve() for path in unsafechain.__path__}
    assert {(part / "unsafechain").resolve() for part in PARTS} <= roots


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_is_found_at_its_import_path(name: str):
    module = importlib.import_module(name)
    assert Path(module.__file__).resolve() == MODULES[name].resolve()


def test_no_module_is_importable_under_a_second_name():
    for name in MODULES:
        importlib.import_module(name)
    doubles = [name for name in sys.modules if name.split(".")[0] in ("services", "pipelines")]
    assert doubles == []


def test_no_folder_is_named_like_build_output():
    for part in PARTS:
        named = [p for p in part.rglob("*") if p.is_dir() and p.name in ("build", "dist", "out")]
        assert named == []


def _layer(module: str) -> str:
    return module.split(".")[1]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if name.startswith("unsafechain.")}


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.count(".") >= 1))
def test_a_module_imports_only_its_own_and_lower_layers(name: str):
    own = _layer(name)
    assert own in LAYERS, f"{name}: folder {own!r} is not a known layer"
    for imported in sorted(_imports(MODULES[name])):
        other = _layer(imported)
        if imported not in MODULES and imported.rpartition(".")[0] in MODULES:
            imported = imported.rpartition(".")[0]  # a name imported from a module
        assert LAYERS[other] <= LAYERS[own], f"{name} imports {imported} from a higher layer"
        if other != own and LAYERS[other] == LAYERS[own] == LAYERS["judge"]:
            assert not imported.endswith(".servicer"), f"{name} imports another servicer"
