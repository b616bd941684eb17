"""The TTFT benchmark's parsers: meshkv's timing lines and vLLM's prefix-cache counter."""

from __future__ import annotations

import logging

import pytest

from tools.bench.ttft_timeline import SEGMENTS, mesh_timeline
from tools.bench_ttft import prefix_cache_hits

REQ = "cmpl-7f3a-0-9c1e"


def logged(logger: str, caplog: pytest.LogCaptureFixture, fmt: str, *args: object) -> str:
    """The line meshkv's own format string gives (the parser's contract with the code)."""
    with caplog.at_level(logging.DEBUG, logger=logger):
        logging.getLogger(logger).debug(fmt, *args)
    return caplog.records[-1].getMessage()


def test_segments_follow_each_other_and_add_up_to_the_ttft(caplog) -> None:
    sent = 1000.000
    lines = [
        logged("vllm.meshkv.connector.scheduler", caplog,
               "lookup of %s: %d of %d chunks after %.2f ms and %d asks again, at wall %.6f",
               REQ, 2, 2, 6.0, 1, sent + 0.010),
        logged("vllm.meshkv.connector.worker", caplog,
               "rank %d: fetch %d of %s found %d of %d chunks: queued %.2f ms, get %.2f ms, "
               "ended at wall %.6f", 0, 3, REQ, 2, 2, 0.5, 2.0, sent + 0.008),
        logged("vllm.meshkv.connector.worker", caplog,
               "rank %d: load of %s: %d blocks, staged fetch %.2f ms, get and copy %.2f ms, "
               "done at wall %.6f", 0, REQ, 4, 2.0, 1.5, sent + 0.013),
    ]  # fmt: skip
    producer = logged("vllm.meshkv.node.push", caplog,
                      "pushed %d of %d chunks to %s in %.2f ms, at wall %.6f",
                      2, 2, "two/0", 3.0, sent + 0.005)  # fmt: skip
    timeline = mesh_timeline("\n".join(lines), producer, sent_wall_s=sent,
                             first_token_wall_s=sent + 0.020)  # fmt: skip
    assert timeline is not None
    parts = timeline.as_dict()
    assert [round(parts[k], 3) for k in SEGMENTS] == [4.0, 2.0, 2.0, 2.0, 3.0, 7.0]
    assert sum(parts[k] for k in SEGMENTS) == pytest.approx(timeline.ttft_ms)
    assert (timeline.asks_again, timeline.hit_chunks) == (1, 2)
    assert timeline.push_after_lookup_ms == pytest.approx(1.0)  # push ended after the lookup


def test_a_request_without_a_load_has_no_timeline() -> None:
    assert mesh_timeline("nothing", "", sent_wall_s=0.0, first_token_wall_s=1.0) is None


def test_prefix_cache_hits_are_summed_over_engines_from_the_metrics_text() -> None:
    text = "\n".join(
        [
            "# HELP vllm:prefix_cache_hits_total Prefix cache hits, in cached tokens.",
            "# TYPE vllm:prefix_cache_hits_total counter",
            'vllm:prefix_cache_hits_total{engine="0",model_name="tiny"} 3328.0',
            'vllm:prefix_cache_hits_total{engine="1",model_name="tiny"} 1.28e2',
            'vllm:prefix_cache_hits_created{engine="0",model_name="tiny"} 1.7e9',
            'vllm:external_prefix_cache_hits_total{engine="0",model_name="tiny"} 999.0',
            'vllm:prefix_cache_queries_total{engine="0",model_name="tiny"} 5000.0',
        ]
    )
    assert prefix_cache_hits(text) == 3456
    assert prefix_cache_hits("") == 0
