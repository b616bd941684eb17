"""The controller API's request bodies, as LMCache 0.5.6's controller declares them (pydantic).

FastAPI validates every body against these, so a malformed one gets the same 422 ``detail``
list LMCache's controller gives. Two deliberate differences, both wider or safer:
``QueryInstanceRequest.event_id`` is optional (LMCache requires it and never reads it), and
token ids must fit 32 bits (LMCache takes any integer; the chunk hash packs them as uint32).

This module knows nothing of routing or of how the calls are answered.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field

MAX_TOKEN_ID = 0xFFFFFFFF
TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]


class LookupRequest(BaseModel):
    tokens: list[TokenId]


class QueryInstanceRequest(BaseModel):
    event_id: str = ""
    ip: str


class HealthRequest(BaseModel):
    instance_id: str


class CheckFinishRequest(BaseModel):
    event_id: str


class QueryWorkerInfoRequest(BaseModel):
    instance_id: str
    worker_ids: list[int] | None = None


class ClearRequest(BaseModel):
    instance_id: str
    location: str


class PinRequest(BaseModel):
    instance_id: str
    location: str
    tokens: list[int]


class CompressRequest(BaseModel):
    instance_id: str
    method: str
    location: str
    tokens: list[int] | None = []


class MoveRequest(BaseModel):
    old_position: tuple[str, str]
    new_position: tuple[str, str]
    tokens: list[int] | None = []
    should_copy: bool | None = False


UNSUPPORTED_MODELS: dict[str, type[BaseModel]] = {
    "/clear": ClearRequest,
    "/pin": PinRequest,
    "/compress": CompressRequest,
    "/decompress": CompressRequest,  # LMCache's DecompressRequest has the same fields
    "/move": MoveRequest,
}
"""The calls meshkv answers 501: their bodies are still validated first, as LMCache does."""
