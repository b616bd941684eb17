"""The README's generated reference sections: the config keys and the command lines.

Each section is rendered from the code that defines it (`MeshConfig`'s field docs, the
``meshkv`` typer app, the ``lmcache_controller`` parser) and sits in the README between
``<!-- BEGIN GENERATED: name -->`` and ``<!-- END GENERATED: name -->``. A test checks the
README is current; ``python -m meshkv.cli.reference_docs README.md`` rewrites the sections.

This module knows nothing of the mesh; it only reads definitions.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path

import typer.main

from meshkv.cli import app
from meshkv.compat.controller_cli import build_parser
from meshkv.config import reference_markdown

HELP_WIDTH = 100
"""Columns of the lmcache_controller help text (argparse would use the terminal's)."""


def config_reference() -> str:
    return reference_markdown()


def meshkv_commands() -> str:
    """Every ``meshkv`` command with its options, from the typer app."""
    group = typer.main.get_command(app)
    blocks = []
    for name, command in sorted(group.commands.items()):
        summary = (command.help or "").strip().splitlines()[0]
        lines = [f"**`meshkv {name}`**: {summary}", ""]
        options = [p for p in command.params if p.param_type_name == "option"]
        if options:
            lines += ["| option | default | meaning |", "|---|---|---|"]
            for option in options:
                default = "" if option.default in (None, False) else f"`{option.default}`"
                meaning = (option.help or "").replace("|", "\\|")
                lines.append(f"| `{', '.join(option.opts)}` | {default} | {meaning} |")
        else:
            lines.append("Takes `lmcache_controller`'s arguments (below).")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def controller_help() -> str:
    """``lmcache_controller --help``, at a fixed width."""
    parser = build_parser("lmcache_controller")
    parser.formatter_class = lambda prog: argparse.HelpFormatter(prog, width=HELP_WIDTH)
    return f"```text\n{parser.format_help().rstrip()}\n```"


SECTIONS: dict[str, Callable[[], str]] = {
    "config-reference": config_reference,
    "meshkv-commands": meshkv_commands,
    "lmcache-controller-help": controller_help,
}


def _pattern(name: str) -> re.Pattern[str]:
    begin, end = (f"<!-- {edge} GENERATED: {re.escape(name)} -->" for edge in ("BEGIN", "END"))
    return re.compile(f"({begin}).*?({end})", re.DOTALL)


def rendered(text: str) -> str:
    """``text`` with every generated section brought up to date (sections must exist)."""
    for name, render in SECTIONS.items():
        pattern = _pattern(name)
        if not pattern.search(text):
            raise ValueError(f"README has no generated section {name!r}")
        section = render()
        text = pattern.sub(lambda m, s=section: f"{m.group(1)}\n{s}\n{m.group(2)}", text)
    return text


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m meshkv.cli.reference_docs README.md", file=sys.stderr)
        return 2
    path = Path(argv[0])
    path.write_text(rendered(path.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
