"""How a get splits a holder's run of chunks into requests: every byte once, in bounded count."""

from hypothesis import given
from hypothesis import strategies as st

from meshkv.dataplane.client import SEND_HWM
from meshkv.node.fetch import FETCH_REQUEST_BYTES, FETCH_REQUESTS_MAX, PIECE_ALIGN, plan


@given(st.integers(0, 100), st.integers(1, 4096), st.integers(1, 256 << 20))
def test_a_run_goes_as_few_requests_that_cover_every_byte_once(
    start: int, chunks: int, chunk_bytes: int
) -> None:
    requests = plan(start, start + chunks, chunk_bytes)
    assert len(requests) <= FETCH_REQUESTS_MAX < SEND_HWM  # never past the socket's send queue
    covered: list[tuple[int, int, int]] = []  # (chunk, first byte, past the last)
    for piece in requests:
        if piece.nbytes:
            assert piece.end == piece.start + 1
            assert piece.offset % PIECE_ALIGN == 0
            covered.append((piece.start, piece.offset, piece.offset + piece.nbytes))
        else:
            assert piece.end > piece.start
            covered += [(i, 0, chunk_bytes) for i in range(piece.start, piece.end)]
    position = (start, 0)
    for chunk, first, past in covered:  # in order, no gap, no overlap
        assert (chunk, first) == position
        position = (chunk, past) if past < chunk_bytes else (chunk + 1, 0)
    assert position == (start + chunks, 0)


@given(st.integers(1, 64), st.integers(1, 256 << 20))
def test_only_a_chunk_larger_than_a_request_goes_in_pieces_of_half_a_request_or_more(
    chunks: int, chunk_bytes: int
) -> None:
    requests = plan(0, chunks, chunk_bytes)
    pieces = [p for p in requests if p.nbytes]
    if chunk_bytes <= FETCH_REQUEST_BYTES:
        assert not pieces
    for piece in pieces:
        if piece.offset + piece.nbytes < chunk_bytes:  # all but a chunk's last piece
            assert piece.nbytes >= FETCH_REQUEST_BYTES // 2


def test_a_single_large_chunk_goes_in_pieces() -> None:
    assert len(plan(0, 1, 4 * FETCH_REQUEST_BYTES)) == 4
    assert [p.nbytes for p in plan(0, 1, FETCH_REQUEST_BYTES)] == [0]
