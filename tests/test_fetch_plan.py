"""How a get splits a holder's run of chunks into requests: every byte once, in bounded count."""

from hypothesis import given
from hypothesis import strategies as st

from meshkv.dataplane.client import SEND_HWM
from meshkv.dataplane.config import DataPlaneConfig
from meshkv.node.arrivals import Piece
from meshkv.node.fetch import plan

DEFAULTS = DataPlaneConfig()
FETCH_REQUEST_BYTES = DEFAULTS.fetch_request_bytes
FETCH_REQUESTS_MAX = DEFAULTS.fetch_requests_max
PIECE_ALIGN = DEFAULTS.piece_align_bytes


def covered_chunks(requests: list[Piece], start: int, chunk_bytes: int) -> int:
    """How many leading chunks from ``start`` the requests cover, checking that they cover
    each byte of those once, in order, and nothing else."""
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
    assert position[1] == 0, "a chunk is covered only in part"
    return position[0] - start


def request_bytes(piece: Piece, chunk_bytes: int) -> int:
    return piece.nbytes or (piece.end - piece.start) * chunk_bytes


@given(st.integers(0, 100), st.integers(1, 4096), st.integers(1, 256 << 20))
def test_a_run_goes_as_few_requests_that_cover_every_byte_once(
    start: int, chunks: int, chunk_bytes: int
) -> None:
    requests = plan(start, start + chunks, chunk_bytes)
    assert len(requests) <= FETCH_REQUESTS_MAX < SEND_HWM  # never past the socket's send queue
    assert covered_chunks(requests, start, chunk_bytes) == chunks


@given(
    st.integers(0, 100),
    st.integers(1, 4096),
    st.integers(1, 1 << 30),
    st.integers(PIECE_ALIGN, 256 << 20),
)
def test_requests_never_ask_for_more_than_a_reply_carries(
    start: int, chunks: int, chunk_bytes: int, request_max: int
) -> None:
    """tcp channel: replies carry the bytes, and a reply has a size bound. Requests stay under
    it; the run's cover is cut short only where the unbounded plan has a request over it."""
    requests = plan(start, start + chunks, chunk_bytes, request_max)
    assert len(requests) <= FETCH_REQUESTS_MAX
    assert all(request_bytes(p, chunk_bytes) <= request_max for p in requests)
    covered = covered_chunks(requests, start, chunk_bytes)
    unbounded = plan(start, start + chunks, chunk_bytes)
    if all(request_bytes(p, chunk_bytes) <= request_max for p in unbounded):
        assert requests == unbounded
    elif chunk_bytes <= request_max:  # whole chunks fit: as many as 16 requests carry
        assert covered == min(chunks, FETCH_REQUESTS_MAX * (request_max // chunk_bytes))


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


def test_a_run_too_large_for_the_replies_is_cut_to_its_leading_chunks() -> None:
    chunk_bytes = 32 << 20
    capped = plan(0, 200, chunk_bytes, request_max=255 << 20)  # 6.25 GiB, 7 chunks a reply
    assert len(capped) == FETCH_REQUESTS_MAX and capped[-1].end == 7 * FETCH_REQUESTS_MAX
    huge = plan(0, 1, 1 << 30, request_max=64 << 20)  # 16 pieces of 64 MiB
    assert [p.nbytes for p in huge] == [64 << 20] * 16
    assert plan(0, 1, 2 << 30, request_max=64 << 20) == []  # 32 pieces: not in 16 requests
