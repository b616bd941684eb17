"""Lower layers never import higher ones: every import in meshkv/, read with `ast` (imports
inside functions and under ``if TYPE_CHECKING:`` included, relative ones resolved), goes to
the module's own layer or one below. The order is written here and, the same, in
docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "meshkv"

LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors",),
    (
        "keys",
        "wire",
        "wire_fields",
        "member_meta",
        "lmcache_keys",
        "lmcache_values",
        "config",
        "metrics",
        "models",
    ),
    ("ring", "gossip"),
    ("store",),
    ("transfer",),
    ("dataplane",),
    ("node",),
    ("connector", "compat"),
    ("cli",),
    ("__main__",),
)
"""meshkv's top-level modules and packages, lowest layer first; a module may import its own
layer and the layers below."""

LAYER_OF = {part: index for index, parts in enumerate(LAYERS) for part in parts}


def layer_table() -> str:
    """The order as docs/ARCHITECTURE.md shows it, highest layer first."""
    rows = [f"{index}  {'  '.join(parts)}" for index, parts in enumerate(LAYERS)]
    return "\n".join(reversed(rows))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, module) of every meshkv import in ``source``, wherever it stands."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = module.split(".")
                package = package if is_package else package[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join([*package, base] if base else package)
            found.append((node.lineno, base))
    return sorted((line, name) for line, name in found if name.startswith("meshkv."))


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    """Each import in ``source`` (module ``module``) of a layer above the module's own."""
    own = LAYER_OF[module.split(".")[1]]
    out = []
    for line, name in imported_modules(source, module, is_package):
        target = name.split(".")[1]
        if LAYER_OF[target] > own:
            out.append(f"{module}:{line} imports {name} (layer {LAYER_OF[target]} > {own})")
    return out


SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_top_level_module_has_a_layer() -> None:
    top = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in SOURCES}
    assert top - {"__init__"} == set(LAYER_OF)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: module_name(p))
def test_no_module_imports_a_layer_above_its_own(path: Path) -> None:
    module = module_name(path)
    if module == "meshkv":
        return  # the package's own __init__ imports nothing of meshkv
    assert violations(path.read_text(), module, path.name == "__init__.py") == []


def test_the_check_finds_imports_inside_functions_and_relative_ones() -> None:
    source = (
        "from meshkv.errors import UsageError\n"
        "def late():\n"
        "    from meshkv.node import MeshNode\n"
        "from ..cli import app\n"
    )
    assert violations(source, "meshkv.store.slots") == [
        "meshkv.store.slots:3 imports meshkv.node (layer 6 > 3)",
        "meshkv.store.slots:4 imports meshkv.cli (layer 8 > 3)",
    ]


def test_the_architecture_page_shows_the_same_order() -> None:
    page = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    assert f"```text\n{layer_table()}\n```" in page
