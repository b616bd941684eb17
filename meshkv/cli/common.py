"""What every meshkv command shares: loading the config (bad config = one line, exit 2), the
gossip settings and codec it implies, and reaching a member through a seed.

This module knows nothing of any one command's output.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

import typer

from meshkv.config import MeshConfig, load_config
from meshkv.errors import ConfigError, TransportError
from meshkv.gossip.config import GossipConfig
from meshkv.gossip.member import MemberView
from meshkv.gossip.messages import gossip_codec
from meshkv.gossip.runner import query_members
from meshkv.wire import AuthPolicy, FrameCodec

EXIT_FAILURE = 1
EXIT_CONFIG = 2

ConfigOption = typer.Option(
    None,
    "--config",
    help="meshkv/LMCache YAML file (default: $MESHKV_CONFIG_FILE or $LMCACHE_CONFIG_FILE).",
    dir_okay=False,
)
SeedsOption = typer.Option(
    None, "--seed", help='Gossip address "host:port" of any member; repeatable.'
)
TimeoutOption = typer.Option(3.0, "--timeout", help="Seconds to wait for a member's answer.")
JsonOption = typer.Option(False, "--json", help="Print JSON instead of a table.")


def fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    """Prints one line on stderr and exits with ``code``."""
    print(f"meshkv: {message}", file=sys.stderr)
    raise typer.Exit(code)


def load_or_exit(path: Path | None, overrides: Mapping[str, Any]) -> MeshConfig:
    """The config from file, environment and the flags given (None = flag not given)."""
    try:
        return load_config(path, overrides={k: v for k, v in overrides.items() if v is not None})
    except ConfigError as exc:
        fail(f"config error: {exc}", EXIT_CONFIG)


def codec_of(config: MeshConfig) -> FrameCodec:
    return gossip_codec(
        GossipConfig.profile(config.mesh_gossip_profile), AuthPolicy.from_config(config)
    )


def query_any_seed(config: MeshConfig, timeout_s: float) -> list[MemberView]:
    """The member table of the first seed that answers; exits with one line if none does."""
    if not config.seeds:
        fail("no seed: give --seed HOST:PORT or set mesh_seeds", EXIT_CONFIG)
    errors = []
    for seed in config.seeds:
        try:
            return query_members(seed, timeout_s=timeout_s, codec=codec_of(config))
        except TransportError as exc:
            errors.append(str(exc))
    fail("; ".join(errors))
