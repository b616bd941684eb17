"""CopyQueue's ordering against the forward, through a fake of the copy device's streams.

`FakeCudaDevice` stands in only for CUDA (CI has none): it has a forward and a copy stream,
events that complete when the test says so, pinned and pageable host memory, and it records
every event, stream wait, allocation and copy in one log. The tensors are real CPU tensors of
vLLM-allocated caches, so the bytes moved are checked too. `CpuCopyDevice` runs unfaked.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("vllm")

from vllm.v1.kv_cache_layout import KVCacheLayout

from meshkv.connector import copy_queue
from meshkv.connector.copy_device import CpuCopyDevice, copy_device_for
from meshkv.connector.copy_queue import SAVES_IN_FLIGHT_MAX, CopyQueue
from meshkv.connector.geometry import BlockCopier, UnsupportedCache
from tests.test_connector_geometry import NUM_BLOCKS, NUM_LAYERS, as_bytes, geometry, make_caches


class FakeEvent:
    def __init__(self, device: FakeCudaDevice, number: int) -> None:
        self.device, self.number, self.completed = device, number, False

    def record(self, stream: FakeStream) -> None:
        self.device.log.append(("record", self.number, stream.name))

    def query(self) -> bool:
        return self.completed

    def synchronize(self) -> None:
        self.device.log.append(("host waits", self.number))
        self.completed = True


class FakeStream:
    def __init__(self, device: FakeCudaDevice, name: str) -> None:
        self.device, self.name = device, name

    def wait_event(self, event: FakeEvent) -> None:
        self.device.log.append(("wait", self.name, event.number))


class FakeCudaDevice:
    overlaps_forward = True
    staging_is_host = False

    def __init__(self) -> None:
        self.log: list[tuple] = []
        self.events: list[FakeEvent] = []
        self.forward = FakeStream(self, "forward")
        self.copy = FakeStream(self, "copy")
        self.current = self.forward
        self.pinned: dict[int, int] = {}  # page-locked ranges: start -> bytes

    def forward_stream(self) -> FakeStream:
        return self.forward

    def copy_stream(self) -> FakeStream:
        return self.copy

    def event(self) -> FakeEvent:
        self.events.append(FakeEvent(self, len(self.events)))
        return self.events[-1]

    @contextlib.contextmanager
    def on_copy_stream(self):
        previous, self.current = self.current, self.copy
        try:
            yield
        finally:
            self.current = previous

    def device_buffer(self, nbytes: int) -> torch.Tensor:
        self.log.append(("device buffer", self.current.name))
        return torch.empty(nbytes, dtype=torch.uint8)

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        self.pinned[buffer.data_ptr()] = nbytes
        self.log.append(("pinned buffer",))
        return buffer

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        return host.clone()

    def pin(self, buffer: np.ndarray) -> bool:
        self.pinned[buffer.ctypes.data] = buffer.nbytes
        return True

    def unpin(self, buffer: np.ndarray) -> None:
        self.pinned.pop(buffer.ctypes.data, None)

    def is_pinned(self, tensor: torch.Tensor) -> bool:
        at = tensor.data_ptr()
        return any(start <= at < start + size for start, size in self.pinned.items())

    def complete_all(self) -> None:
        for event in self.events:
            event.completed = True

    def entries(self, kind: str) -> list[tuple]:
        return [entry for entry in self.log if entry[0] == kind]


class RecordingCopier(BlockCopier):
    """The real copier, logging which stream each batched copy was issued on."""

    def __init__(self, device: FakeCudaDevice, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._fake = device

    def gather_layer(self, layer, block_ids, out) -> None:
        self._fake.log.append(("gather", layer, self._fake.current.name, len(block_ids)))
        super().gather_layer(layer, block_ids, out)

    def scatter_layer(self, layer, block_ids, src) -> None:
        self._fake.log.append(("scatter", layer, self._fake.current.name))
        super().scatter_layer(layer, block_ids, src)


def fake_queue(seed: int) -> tuple[CopyQueue, FakeCudaDevice, dict[str, torch.Tensor]]:
    caches = make_caches(KVCacheLayout.LBNHC, seed=seed)  # FlashAttention's default layout
    device = FakeCudaDevice()
    copier = RecordingCopier(device, geometry(caches), caches, num_blocks=NUM_BLOCKS)
    return CopyQueue(device, copier), device, caches


def block_bytes(caches, block: int) -> torch.Tensor:
    return torch.cat([as_bytes(tensor[block]) for tensor in caches.values()])


def saved_chunks(queue: CopyQueue, chunks: list[list[int]], *, layers=range(NUM_LAYERS)):
    got: list[list[np.ndarray]] = []
    assert queue.open_saves(chunks, got.append) == len(chunks)
    for layer in layers:
        queue.save_layer(layer)
    queue.close_saves()
    return got


def test_each_layers_save_is_one_gather_on_the_copy_stream_after_that_layers_forward():
    queue, device, _ = fake_queue(seed=1)
    got = saved_chunks(queue, [[3, 4], [7, 8], [0, 1]])
    gathers = device.entries("gather")
    assert [(layer, stream, chunks) for _, layer, stream, chunks in gathers] == [
        (layer, "copy", 3) for layer in range(NUM_LAYERS)
    ]  # one batched copy per layer for all the step's chunks, never one per chunk
    for layer in range(NUM_LAYERS):
        at = device.log.index(gathers[layer])
        ready = device.log[at - 1][2]
        assert device.log[at - 2] == ("record", ready, "forward")
        assert device.log[at - 1] == ("wait", "copy", ready)
    assert got == []  # the copy to host memory has not completed: nothing handed over


def test_saves_are_handed_over_only_once_their_copy_completed_and_bit_exact():
    queue, device, caches = fake_queue(seed=2)
    got = saved_chunks(queue, [[3, 4], [7, 8]])
    gathered, waited, pinned, done = device.log[-4:]
    assert gathered[0] == "record" and gathered[2] == "copy"
    assert waited == ("wait", "forward", gathered[1])  # blocks are reusable next step
    assert done[0] == "record" and done[2] == "copy"
    assert pinned == ("pinned buffer",)  # the device writes page-locked memory only
    queue.poll()
    assert got == []
    device.complete_all()
    queue.poll()
    (chunks,) = got
    g = queue.copier.geometry
    for chunk, ids in zip(chunks, ([3, 4], [7, 8]), strict=True):
        view = torch.from_numpy(chunk).view(g.num_layers, g.blocks_per_chunk, -1)
        for layer, tensor in enumerate(caches.values()):
            for position, block in enumerate(ids):
                assert torch.equal(view[layer, position], as_bytes(tensor[block]))
    assert not device.entries("host waits")


def test_layers_the_forward_did_not_report_are_gathered_after_it_once():
    queue, device, _ = fake_queue(seed=3)
    saved_chunks(queue, [[3, 4]], layers=[2, 2])
    assert [entry[1] for entry in device.entries("gather")] == [2, 0, 1, 3]


def test_a_synchronous_load_holds_the_forward_until_its_copy_and_checks_after_it():
    source_queue, source_device, source = fake_queue(seed=4)
    got = saved_chunks(source_queue, [[1, 2], [5, 6]])
    source_device.complete_all()
    source_queue.poll()
    (sources,) = got
    queue, device, caches = fake_queue(seed=5)
    for array in sources:
        device.pin(array)
    loaded: list[bool] = []
    events = len(device.events)
    queue.load(sources, [9, 10, 11], skip_blocks=1, on_loaded=lambda: loaded.append(True))
    after, done = device.events[events], device.events[-1]
    assert device.log[0] == ("record", after.number, "forward")
    assert device.log[1] == ("wait", "copy", after.number)
    assert {entry[2] for entry in device.entries("scatter")} == {"copy"}
    assert device.log[-2:] == [("record", done.number, "copy"), ("wait", "forward", done.number)]
    assert len(device.entries("scatter")) == 2 * NUM_LAYERS  # the skipped head, then the rest
    assert ("pinned buffer",) not in device.log  # the sources are pinned: no bounce
    queue.poll()
    assert loaded == []  # not complete: the slots are not checked nor released yet
    queue.poll(settle=True)
    assert device.log[-1] == ("host waits", done.number) and loaded == [True]
    assert torch.equal(block_bytes(caches, 9), block_bytes(source, 2))
    assert torch.equal(block_bytes(caches, 10), block_bytes(source, 5))
    assert torch.equal(block_bytes(caches, 11), block_bytes(source, 6))


def test_an_async_load_starts_after_its_orders_event_and_finishes_only_when_complete():
    queue, device, caches = fake_queue(seed=6)
    chunk = np.arange(queue.copier.geometry.chunk_bytes, dtype=np.uint64).astype(np.uint8)
    mark = device.event()
    mark.record(device.forward)
    loaded: list[bool] = []
    queue.load([chunk], [4, 5], skip_blocks=0, on_loaded=lambda: loaded.append(True), after=mark)
    assert ("wait", "copy", mark.number) in device.log
    assert not [entry for entry in device.entries("wait") if entry[1] == "forward"]
    assert ("pinned buffer",) in device.log  # a pageable source is bounced, never copied from
    queue.poll(settle=True)  # settling is for synchronous loads only
    assert loaded == [] and not device.entries("host waits")
    device.complete_all()
    queue.poll()
    assert loaded == [True]
    g = queue.copier.geometry
    expected = torch.from_numpy(chunk).view(g.num_layers, g.blocks_per_chunk, -1)
    for layer, tensor in enumerate(caches.values()):
        assert torch.equal(as_bytes(tensor[4]), expected[layer, 0])
        assert torch.equal(as_bytes(tensor[5]), expected[layer, 1])


def test_a_load_larger_than_the_staging_bound_goes_in_groups(monkeypatch):
    g = fake_queue(seed=0)[0].copier.geometry
    monkeypatch.setattr(copy_queue, "COPY_BATCH_BYTES_MAX", 2 * g.chunk_bytes)
    queue, device, caches = fake_queue(seed=7)
    chunks = [np.full(g.chunk_bytes, value, dtype=np.uint8) for value in (11, 22, 33)]
    ids = [1, 2, 3, 4, 5]  # the first chunk's first block is the engine's already
    queue.load(chunks, ids, skip_blocks=1, on_loaded=lambda: None)
    assert [entry for entry in device.log if entry[0] == "device buffer"] == [
        ("device buffer", "copy")
    ] * 2
    for block, value in zip(ids, (11, 22, 22, 33, 33), strict=True):
        assert set(block_bytes(caches, block).tolist()) == {value}


def test_saves_past_the_in_flight_bound_are_dropped_rather_than_waited_for():
    queue, device, _ = fake_queue(seed=8)
    for _ in range(SAVES_IN_FLIGHT_MAX):
        saved_chunks(queue, [[1, 2]])
    assert queue.open_saves([[1, 2]], lambda chunks: None) == 0
    assert not device.entries("host waits")
    device.complete_all()
    assert queue.open_saves([[1, 2]], lambda chunks: None) == 1


def test_the_cpu_device_copies_synchronously_and_hands_over_at_once():
    caches = make_caches(KVCacheLayout.LBHNC, seed=9)  # the CPU backend's layout
    queue = CopyQueue(CpuCopyDevice(), BlockCopier(geometry(caches), caches, num_blocks=12))
    got: list[list[np.ndarray]] = []
    queue.open_saves([[3, 4], [5, 6]], got.append)
    queue.close_saves()
    (chunks,) = got
    loaded: list[bool] = []
    queue.load(chunks, [7, 8, 9], skip_blocks=1, on_loaded=lambda: loaded.append(True))
    assert loaded == [True] and queue.in_flight == 0
    for target, source in ((7, 4), (8, 5), (9, 6)):
        assert torch.equal(block_bytes(caches, target), block_bytes(caches, source))


def test_a_cache_on_another_kind_of_device_is_unsupported():
    assert isinstance(copy_device_for(torch.device("cpu")), CpuCopyDevice)
    with pytest.raises(UnsupportedCache, match="meta"):
        copy_device_for(torch.device("meta"))


SOURCE = make_caches(KVCacheLayout.BLNHC, seed=10)  # block-outermost: strided dimension 0


@settings(max_examples=30, deadline=None)
@given(data=st.data(), staged=st.booleans())
def test_any_load_writes_exactly_its_blocks(data, staged):
    """Any chunks, any skip, any distinct target blocks, in groups or one by one."""
    g = geometry(SOURCE)
    per = g.blocks_per_chunk
    count = data.draw(st.integers(1, 3), label="chunks")
    skip = data.draw(st.integers(0, per - 1), label="skip")
    blocks = data.draw(st.permutations(range(NUM_BLOCKS)), label="blocks")
    sources, targets = blocks[: count * per], blocks[count * per :][: count * per - skip]
    source_queue = CopyQueue(CpuCopyDevice(), BlockCopier(g, SOURCE, num_blocks=NUM_BLOCKS))
    got: list[list[np.ndarray]] = []
    source_queue.open_saves([sources[c * per : (c + 1) * per] for c in range(count)], got.append)
    source_queue.close_saves()
    caches = make_caches(KVCacheLayout.BLNHC, seed=11)
    before = {name: tensor.clone() for name, tensor in caches.items()}
    device = FakeCudaDevice() if staged else CpuCopyDevice()
    queue = CopyQueue(device, BlockCopier(g, caches, num_blocks=NUM_BLOCKS))
    queue.load(got[0], targets, skip_blocks=skip, on_loaded=lambda: None)
    for target, source in zip(targets, sources[skip:], strict=True):
        assert torch.equal(block_bytes(caches, target), block_bytes(SOURCE, source))
    for block in set(range(NUM_BLOCKS)) - set(targets):
        assert torch.equal(block_bytes(caches, block), block_bytes(before, block))
