"""Event schema: what `mmid stream` publishes and `mmid events` reads.

Two kinds of JSON objects travel through Redis, both with a ``schema``
version and a ``kind`` field:

- ``identity``: one per identified window, PUBLISHed on
  ``mmid:events:{stream_id}`` and XADDed to the Stream ``mmid:events``
  (field ``data`` holds the JSON).
- ``status``: one per source state change (connected, reconnecting, ended,
  error), PUBLISHed on ``mmid:status`` and XADDed to the Stream
  ``mmid:status`` (pub/sub channels and keys are separate namespaces).

``seq`` is per stream id and per kind, starts at 0 and has no gaps: a
window dropped before identification never receives a number. Delivery is
at least once (an event may repeat after a Redis failure); consumers drop
repeats by ``(stream_id, seq)``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

SCHEMA_VERSION = 1
EVENTS_STREAM = "mmid:events"  # Redis Stream key of identity events
STATUS_CHANNEL = "mmid:status"  # pub/sub channel and Stream key of status events
UNKNOWN = "unknown"  # person reported below the unknown threshold


def events_channel(stream_id: str) -> str:
    return f"mmid:events:{stream_id}"


class SourceState(str, Enum):
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    ENDED = "ended"
    ERROR = "error"


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    backend: str


@dataclass(frozen=True)
class IdentityEvent:
    stream_id: str
    seq: int
    window_seq: int  # index of the window in its stream (gaps = dropped windows)
    start: float  # window start, seconds of stream time
    end: float
    wall_start: float  # unix seconds when the window's first sample was read
    wall_end: float
    person: str  # UNKNOWN when confidence < unknown_threshold
    confidence: float
    top_k: tuple[tuple[str, float], ...]
    evidence: dict[str, Any]  # per modality: {"text": ..., "audio": ..., "visual": ...}
    transcript: str
    face_box: tuple[float, float, float, float] | None  # x1, y1, x2, y2 in frame pixels
    model: ModelInfo
    latency_ms: dict[str, float]  # e.g. {"queue": .., "identify": .., "total": ..}
    kind: str = "identity"
    schema: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))


@dataclass(frozen=True)
class StatusEvent:
    stream_id: str
    seq: int
    state: SourceState
    source: str  # the source URL or path (password removed)
    wall_time: float
    detail: str = ""
    counters: dict[str, float] = field(default_factory=dict)  # reconnects, gap_s, frames...
    kind: str = "status"
    schema: int = SCHEMA_VERSION

    def to_json(self) -> str:
        data = asdict(self)
        data["state"] = self.state.value
        return json.dumps(data, separators=(",", ":"))


Event = IdentityEvent | StatusEvent


def parse_event(text: str | bytes) -> dict[str, Any]:
    """Decode one published event, checking its schema version."""
    data = json.loads(text)
    if not isinstance(data, dict) or data.get("schema") != SCHEMA_VERSION:
        raise ValueError(f"not an mmid event of schema {SCHEMA_VERSION}: {str(text)[:80]!r}")
    return data
