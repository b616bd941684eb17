"""Writes meshkv/lmcache_keys.py: LMCache's engine config keys, as data, from its own sources.

    pip download lmcache==0.5.6 --no-deps -d /tmp/lmcache
    cd /tmp/lmcache && python -m zipfile -e lmcache-0.5.6-*.whl src
    python tools/extract_lmcache_keys.py /tmp/lmcache/src 0.5.6 > meshkv/lmcache_keys.py

It reads ``lmcache/v1/config.py`` with `ast` (LMCache is never imported): every entry of
``_CONFIG_DEFINITIONS`` (name, declared type, default, and which converter LMCache applies to
its values) and ``_CONFIG_ALIASES``. Run it once per LMCache version meshkv follows.
"""

from __future__ import annotations

import ast
import json
import math
import sys
from pathlib import Path

CONVERTERS = {
    "int": "int",
    "float": "float",
    "str": "str",
    "_to_bool": "bool",
    "_to_int_list": "int_list",
    "_to_float_list": "float_list",
    "_to_str_list": "str_list",
    "_parse_local_disk": "str",
    "_to_hidden_states_retrieve_mode": "str",
}
"""LMCache's converter (by name) -> the value kind meshkv converts to the same way."""


def _converter(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return CONVERTERS[node.id]
    source = ast.unparse(node)
    if "json.loads" in source:
        return "json_dict"  # extra_config: a mapping, or JSON text
    if "isinstance(x, list)" in source:
        return "str_list"  # runtime_plugin_locations: a list, or one item
    raise ValueError(f"unknown converter {source}")


def _default(node: ast.expr) -> object:
    if ast.unparse(node) == "float('inf')":
        return math.inf
    return ast.literal_eval(node)


def _assigned(tree: ast.Module, name: str) -> ast.expr:
    for node in tree.body:
        targets = [node.target] if isinstance(node, ast.AnnAssign) else getattr(node, "targets", [])
        if any(isinstance(t, ast.Name) and t.id == name for t in targets) and node.value:
            return node.value
    raise KeyError(name)


Extracted = tuple[dict[str, tuple[str, str, object]], dict[str, str], list[str]]


def extract(config_py: Path) -> Extracted:
    tree = ast.parse(config_py.read_text(encoding="utf-8"))
    definitions: dict[str, tuple[str, str, object]] = {}
    table = _assigned(tree, "_CONFIG_DEFINITIONS")
    assert isinstance(table, ast.Dict)
    for key, value in zip(table.keys, table.values, strict=True):
        assert isinstance(key, ast.Constant) and isinstance(value, ast.Dict)
        entry = {k.value: v for k, v in zip(value.keys, value.values, strict=True)}  # type: ignore[union-attr]
        definitions[key.value] = (
            ast.unparse(entry["type"]),
            _converter(entry["env_converter"]),
            _default(entry["default"]),
        )
    aliases = ast.literal_eval(_assigned(tree, "_CONFIG_ALIASES"))
    deprecated = ast.literal_eval(_assigned(tree, "_DEPRECATED_CONFIGS"))
    return definitions, aliases, [k for k in deprecated if k not in aliases]


def _literal(value: object) -> str:
    """Python source for a default, strings in double quotes (as ruff formats them)."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    return "math.inf" if value == math.inf else repr(value)


def render(version: str, extracted: Extracted) -> str:
    definitions, aliases, deprecated = extracted
    lines = [
        f'"""LMCache {version}\'s engine config keys, as data (generated; do not edit).',
        "",
        "Made by tools/extract_lmcache_keys.py from LMCache's ``lmcache/v1/config.py``:",
        "``DEFINITIONS`` maps each key to (LMCache's declared type, the kind of value LMCache",
        "converts it to, LMCache's default); ``ALIASES`` maps an older name to its key;",
        "``DEPRECATED`` are older names LMCache still accepts (and drops) with a warning.",
        '"""',
        "",
        "import math",
        "",
        f'LMCACHE_VERSION = "{version}"',
        "",
        "DEFINITIONS: dict[str, tuple[str, str, object]] = {",
    ]
    for name, (declared, kind, default) in definitions.items():
        row = ", ".join(_literal(v) for v in (declared, kind, default))
        lines.append(f"    {_literal(name)}: ({row}),")
    lines += ["}", "", "ALIASES: dict[str, str] = {"]
    lines += [f"    {_literal(old)}: {_literal(new)}," for old, new in aliases.items()]
    lines += ["}", "", f"DEPRECATED: tuple[str, ...] = ({_literal(deprecated)[1:-1]},)", ""]
    return "\n".join(lines)


def main() -> None:
    source, version = Path(sys.argv[1]), sys.argv[2]
    sys.stdout.write(render(version, extract(source / "lmcache" / "v1" / "config.py")))


if __name__ == "__main__":
    main()
