"""How a get splits a holder's run of chunks into requests: bounded bytes and bounded count."""

from hypothesis import given
from hypothesis import strategies as st

from meshkv.dataplane.client import SEND_HWM
from meshkv.node.fetch import FETCH_BATCH_BYTES, FETCH_BATCHES_MAX, _batch_chunks


@given(st.integers(1, 4096), st.integers(1, 256 << 20))
def test_a_run_goes_as_few_enough_requests_of_at_least_a_batch_each(
    run_chunks: int, chunk_bytes: int
) -> None:
    per_request = _batch_chunks(run_chunks, chunk_bytes)
    requests = -(-run_chunks // per_request)
    assert requests <= FETCH_BATCHES_MAX < SEND_HWM  # never past the socket's send queue
    assert per_request >= max(1, FETCH_BATCH_BYTES // chunk_bytes)  # a batch's worth at least
    if per_request > max(1, FETCH_BATCH_BYTES // chunk_bytes):  # larger only to stay in count
        assert requests == -(-run_chunks // -(-run_chunks // FETCH_BATCHES_MAX))
