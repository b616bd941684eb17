"""The ``meshkv`` command line: one typer app, one module per command group.

A command module exposes ``register(app)``; add it to `_COMMAND_MODULES` to make it appear.
Exit codes: 0 success, 1 failure (e.g. no member answered), 2 bad usage or bad config (one
line on stderr naming the key).

This package knows nothing of SWIM's rules or wire formats; it drives the public APIs.
"""

from __future__ import annotations

import logging

import typer

from meshkv.cli import controller, demo, join, members, ring

app = typer.Typer(
    name="meshkv",
    help="Share vLLM KV cache between engines through a gossip mesh, with no central controller.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_COMMAND_MODULES = (join, members, ring, controller, demo)
for _module in _COMMAND_MODULES:
    _module.register(app)


def main() -> None:
    """Entry point of the ``meshkv`` script and of ``python -m meshkv``."""
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app()
