"""A few members' gossip addresses, kept in a small file so a restarted shim can rejoin.

A restarted shim knows nobody, and members only seldom contact a seed they hold dead (and
forget it after a while). So the shim writes down the gossip addresses of some live engine
members; on start it joins through them and gossip's full-state exchange gives it the whole
member table in one round trip. The file holds addresses only, never keys or member state:
what the shim serves is always what gossip says now. A missing, unreadable or corrupt file is
an empty list (the shim then waits for members to reach it).

This module knows nothing of gossip or HTTP.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger("vllm.meshkv.compat.seeds")

REMEMBERED_MAX = 32
"""Addresses written (the first ones in sorted order); any one live member is enough."""
FILE_VERSION = 1


class RememberedSeeds:
    """Reads and atomically rewrites one JSON file ``{"version": 1, "seeds": [...]}``."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._last: list[str] | None = None
        self._warned = False

    def load(self) -> list[str]:
        if self.path is None:
            return []
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable seed file %s: %s", self.path, exc)
            return []
        if not isinstance(data, dict) or data.get("version") != FILE_VERSION:
            log.warning("ignoring seed file %s: not a version %d file", self.path, FILE_VERSION)
            return []
        seeds = data.get("seeds")
        if not isinstance(seeds, list):
            log.warning("ignoring seed file %s: not a version %d file", self.path, FILE_VERSION)
            return []
        self._last = sorted(s for s in seeds if isinstance(s, str))[:REMEMBERED_MAX]
        return list(self._last)

    def save(self, addresses: Iterable[str]) -> None:
        """Writes the addresses if they changed since the last load or save (never raises)."""
        seeds = sorted(set(addresses))[:REMEMBERED_MAX]
        if self.path is None or seeds == self._last or not seeds:
            return
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary.write_text(json.dumps({"version": FILE_VERSION, "seeds": seeds}))
            os.replace(temporary, self.path)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("cannot write seed file %s: %s", self.path, exc)
            return
        self._last = seeds
