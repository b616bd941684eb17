"""Where a mesh hit's time to first token goes, read from the engines' meshkv timing lines.

`tools/bench_ttft.py` runs its engines with ``vllm.meshkv`` at DEBUG, so each mesh request
leaves wall-clock stamps in the engine logs: the scheduler's resolved lookup (how long it was
out, how many steps answered "ask again"), the worker's fetch (time queued for the fetch thread,
time in the get), the worker's load (get and copy into vLLM's blocks), and on the producer the
push of the prompt's chunks to their homes. `mesh_timeline` turns one request's stamps, with the
benchmark's own send and first-token times, into consecutive segments that add up to the TTFT.

This module only parses text; it knows nothing of engines or HTTP.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

RESOLVED = re.compile(
    r"lookup of (\S+): (\d+) of (\d+) chunks after ([\d.]+) ms and (\d+) asks again, "
    r"at wall ([\d.]+)"
)
FETCHED = re.compile(
    r"fetch (\d+) of (\S+) found (\d+) of (\d+) chunks: queued ([\d.]+) ms, get ([\d.]+) ms, "
    r"ended at wall ([\d.]+)"
)
LOADED = re.compile(
    r"load of (\S+): (\d+) blocks, staged fetch ([\d.]+) ms, get and copy ([\d.]+) ms, "
    r"done at wall ([\d.]+)"
)
PUSHED = re.compile(r"pushed (\d+) of (\d+) chunks to (\S+) in ([\d.]+) ms, at wall ([\d.]+)")


@dataclass(frozen=True, slots=True)
class MeshTimeline:
    """One mesh request, in ms. The first six segments follow each other and sum to
    ``ttft_ms``; ``push_after_lookup_ms`` > 0 means the producer's push to the home was still
    in flight when this lookup started (None: no push logged, e.g. the producer is the home)."""

    to_scheduler_ms: float
    """Request sent -> the scheduler's first lookup (HTTP, tokenizing, the engine's input)."""
    order_to_fetch_ms: float
    """Lookup ordered -> the worker's fetch thread starts it (a step to reach the worker)."""
    fetch_get_ms: float
    """The fetch itself: lookup at the homes, bytes into the local store, pinned."""
    report_ms: float
    """Fetch ended -> the scheduler resolves the hit (steps until the report arrives)."""
    load_ms: float
    """Hit resolved -> the load's copy into vLLM's blocks completed."""
    forward_ms: float
    """Load done -> first token at the client (forward of the rest, sampling, the stream)."""
    ttft_ms: float
    asks_again: int
    hit_chunks: int
    load_copy_ms: float
    push_after_lookup_ms: float | None

    def as_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def _last(pattern: re.Pattern[str], text: str) -> re.Match[str] | None:
    found = list(pattern.finditer(text))
    return found[-1] if found else None


def mesh_timeline(
    consumer_log: str, producer_log: str, *, sent_wall_s: float, first_token_wall_s: float
) -> MeshTimeline | None:
    """The timeline of the one mesh request whose lines ``consumer_log`` holds (the log since
    the request was sent), or None if a stamp is missing (no lookup, or nothing loaded).
    ``producer_log`` is the producer's log since it was asked for the prompt."""
    resolved, fetched, loaded = (
        _last(RESOLVED, consumer_log),
        _last(FETCHED, consumer_log),
        _last(LOADED, consumer_log),
    )
    if resolved is None or fetched is None or loaded is None:
        return None
    resolved_wall = float(resolved.group(6))
    lookup_start_wall = resolved_wall - float(resolved.group(4)) / 1000
    fetch_end_wall = float(fetched.group(7))
    get_ms = float(fetched.group(6))
    fetch_start_wall = fetch_end_wall - get_ms / 1000
    load_wall = float(loaded.group(5))
    pushes = [float(p.group(5)) for p in PUSHED.finditer(producer_log)]
    ms = 1000.0
    return MeshTimeline(
        to_scheduler_ms=(lookup_start_wall - sent_wall_s) * ms,
        order_to_fetch_ms=(fetch_start_wall - lookup_start_wall) * ms,
        fetch_get_ms=get_ms,
        report_ms=(resolved_wall - fetch_end_wall) * ms,
        load_ms=(load_wall - resolved_wall) * ms,
        forward_ms=(first_token_wall_s - load_wall) * ms,
        ttft_ms=(first_token_wall_s - sent_wall_s) * ms,
        asks_again=int(resolved.group(5)),
        hit_chunks=int(resolved.group(2)),
        load_copy_ms=float(loaded.group(4)),
        push_after_lookup_ms=(max(pushes) - lookup_start_wall) * ms if pushes else None,
    )


SEGMENTS = ("to_scheduler_ms", "order_to_fetch_ms", "fetch_get_ms", "report_ms", "load_ms",
            "forward_ms")  # fmt: skip
