"""Prometheus metrics and JSON-lines logs of the stream pipeline.

Each ``Metrics`` owns its registry, so several pipelines (tests) can live in
one process; ``serve(port)`` exposes it on ``/metrics`` when port > 0.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # seconds


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        by_stream = ["stream_id"]
        self.frames = Counter("mmid_frames", "Decoded media items", by_stream + ["kind"], registry=r)
        self.windows = Counter("mmid_windows", "Windows cut", by_stream, registry=r)
        self.dropped = Counter("mmid_windows_dropped", "Oldest windows dropped (queue full)", by_stream, registry=r)
        self.events = Counter("mmid_events", "Identity events handed to the publisher", by_stream, registry=r)
        self.reconnects = Counter("mmid_reconnects", "Source reconnect attempts", by_stream, registry=r)
        self.gap = Counter("mmid_gap_seconds", "Wall seconds a source was lost", by_stream, registry=r)
        self.source_errors = Counter("mmid_source_errors", "Source errors", by_stream, registry=r)
        self.published = Counter("mmid_published", "Events written to Redis", ["kind"], registry=r)
        self.spooled = Counter("mmid_spooled", "Events written to the disk spool", registry=r)
        self.spool_size = Gauge("mmid_spool_events", "Events waiting in the spool", registry=r)
        self.spool_overflow = Counter("mmid_spool_overflow", "Events refused by a full spool", registry=r)
        self.redis_up = Gauge("mmid_redis_up", "1 when the last Redis write succeeded", registry=r)
        self.queue = Gauge("mmid_queue_windows", "Windows waiting for identification", registry=r)
        self.latency = Histogram(
            "mmid_latency_seconds", "Window end to event publish", ["stage"], buckets=LATENCY_BUCKETS_S, registry=r
        )
        self.batch = Histogram("mmid_batch_windows", "Windows per identify call", buckets=(1, 2, 4, 8, 16, 32, 64),
                               registry=r)
        self.rtf = Gauge("mmid_realtime_factor", "Identify seconds per second of window hop", registry=r)
        self.face_frames = Counter(
            "mmid_face_frames", "Sampled frames by how their face was found (engine.face_track.TrackStats): full "
            "cascade, tracked (followed from the previous frame), refreshed (followed, then searched for faces as "
            "large), lost (a followed face O-Net rejected, then the full cascade)", ["how"], registry=r)

    def serve(self, port: int) -> None:
        if port > 0:
            start_http_server(port, addr="127.0.0.1", registry=self.registry)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any ``extra`` fields."""

    _skip = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        data = {
            "ts": round(record.created, 3),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        data.update({k: v for k, v in vars(record).items() if k not in self._skip})
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def setup_logging(level: str = "INFO") -> None:
    """JSON lines on stderr for the ``stream`` loggers."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("stream")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
