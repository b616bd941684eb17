"""``meshkv controller``: the ``lmcache_controller`` shim under meshkv's own name.

Every argument goes, untouched, to the same parser as ``lmcache_controller`` (LMCache's flags
and ``key=value`` overrides; ``meshkv controller --help`` lists them), so the two commands are
one command.

This module knows nothing of the shim beyond its entry point.
"""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    app.command(
        "controller",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
        add_help_option=False,
    )(controller)


def controller(ctx: typer.Context) -> None:
    """Run the lmcache_controller shim: a gossip seed and LMCache's controller HTTP API."""
    from meshkv.compat.controller_cli import main  # here: the shim's imports cost other commands

    raise typer.Exit(main(list(ctx.args), prog="meshkv controller"))
