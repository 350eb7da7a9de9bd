"""Publish events to Redis, through the disk spool while Redis is unreachable.

Each event is written twice in one MULTI/EXEC transaction: PUBLISH for live
followers and XADD (approximate MAXLEN) for durable consumers. When a write
fails the event goes to the spool and the publisher stays "down": later
events go straight to the spool, and every ``retry_s`` a write is tried
again by first draining the spool oldest first. So events reach Redis in
the order they were made and none is lost within the spool's bound. A
transaction cut by a failure may have been applied: delivery is at least
once, consumers drop repeats by (stream_id, seq).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from stream.events import EVENTS_STREAM, STATUS_CHANNEL, Event, events_channel
from stream.metrics import Metrics
from stream.spool import Spool

log = logging.getLogger("stream.publish")

RETRY_S = 1.0  # seconds between attempts to reach Redis while it is down
SOCKET_TIMEOUT_S = 2.0  # seconds a Redis command may take before Redis counts as down
REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


def connect(url: str) -> redis.Redis:
    """A client that fails fast (no hidden retries): the spool is our retry."""
    return redis.Redis.from_url(
        url,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=SOCKET_TIMEOUT_S,
        retry=Retry(NoBackoff(), 0),
    )


class Publisher:
    def __init__(self, url: str, maxlen: int, spool: Spool, metrics: Metrics, retry_s: float = RETRY_S):
        self.maxlen = maxlen
        self.spool = spool
        self.metrics = metrics
        self.retry_s = retry_s
        self._client = connect(url)
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._last_try = 0.0
        metrics.spool_size.set(len(spool))

    @property
    def up(self) -> bool:
        return self._down_since is None

    def publish(self, event: Event) -> None:
        """Deliver or spool one event; never raises for Redis failures. Thread-safe."""
        record = json.loads(event.to_json())
        with self._lock:
            if self._try_deliver_backlog():
                try:
                    self._write(record)
                    return
                except REDIS_ERRORS as exc:
                    self._mark_down(exc)
            self._to_spool(record)

    def tick(self) -> None:
        """Drain the spool if Redis is back (call when idle)."""
        with self._lock:
            self._try_deliver_backlog()

    def close(self, timeout_s: float = 5.0) -> dict[str, Any]:
        """Try for up to timeout_s to empty the spool; what is left stays on disk for the next run."""
        deadline = time.monotonic() + timeout_s
        while len(self.spool) and time.monotonic() < deadline:
            with self._lock:
                self._last_try = 0.0
                if self._try_deliver_backlog():
                    break
            time.sleep(min(self.retry_s, 0.2))
        self._client.close()
        return {"spool_pending": len(self.spool), "spool_overflow": self.spool.overflow, "redis_up": self.up}

    # -- internals (called with the lock held) ---------------------------------
    def _try_deliver_backlog(self) -> bool:
        """True when the spool is empty and Redis is believed up."""
        if self._down_since is not None and time.monotonic() - self._last_try < self.retry_s:
            return False
        self._last_try = time.monotonic()
        try:
            if len(self.spool):
                n = self.spool.drain(self._write)
                log.info("spool drained", extra={"events": n})
            elif self._down_since is not None:
                self._client.ping()
        except REDIS_ERRORS as exc:
            self._mark_down(exc)
            return False
        finally:
            self.metrics.spool_size.set(len(self.spool))
        if self._down_since is not None:
            log.info("redis reachable again", extra={"down_s": round(time.monotonic() - self._down_since, 3)})
            self._down_since = None
            self.metrics.redis_up.set(1)
        return True

    def _write(self, record: dict[str, Any]) -> None:
        text = json.dumps(record, separators=(",", ":"))
        if record["kind"] == "status":
            channel, stream = STATUS_CHANNEL, STATUS_CHANNEL
        else:
            channel, stream = events_channel(record["stream_id"]), EVENTS_STREAM
        pipe = self._client.pipeline(transaction=True)
        pipe.publish(channel, text)
        pipe.xadd(stream, {"data": text}, maxlen=self.maxlen, approximate=True)
        pipe.execute()
        self.metrics.published.labels(record["kind"]).inc()
        self.metrics.redis_up.set(1)

    def _mark_down(self, exc: BaseException) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning("redis unreachable, spooling events", extra={"error": repr(exc)})
        self._last_try = time.monotonic()
        self.metrics.redis_up.set(0)

    def _to_spool(self, record: dict[str, Any]) -> None:
        if self.spool.append(record):
            self.metrics.spooled.inc()
        else:
            self.metrics.spool_overflow.inc()
            if self.spool.overflow in (1, 10, 100) or self.spool.overflow % 1000 == 0:
                log.error("spool full, event dropped", extra={"overflow": self.spool.overflow})
        self.metrics.spool_size.set(len(self.spool))
