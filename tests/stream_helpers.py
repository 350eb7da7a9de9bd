"""Helpers shared by the tests/test_stream*.py modules (not a test module)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import redis

from engine.config import Config, load_config, replace
from stream.events import EVENTS_STREAM, STATUS_CHANNEL
from stream.identify import Identifier, NullIdentifier
from stream.ingest import Source
from stream.metrics import Metrics
from stream.pipeline import Pipeline
from stream.publish import Publisher
from stream.spool import Spool


def stream_cfg(tmp_path: Path, **stream) -> Config:
    """Test defaults: no ASR, files as fast as possible, quick reconnects, spool in tmp_path."""
    values = dict(asr_model="off", realtime=False, spool_dir=str(tmp_path / "spool"), open_timeout_s=3.0,
                  read_timeout_s=2.0, reconnect_initial_s=0.2, reconnect_max_s=1.0)
    values.update(stream)
    return replace(load_config(), stream=values)


def make_pipeline(sources: list[Source], cfg: Config, redis_url: str, identifier: Identifier | None = None,
                  transcriber=None) -> Pipeline:
    metrics = Metrics()
    spool = Spool(cfg.stream.spool_dir, cfg.stream.spool_max_events)
    publisher = Publisher(redis_url, cfg.stream.stream_maxlen, spool, metrics, retry_s=0.2)
    return Pipeline(sources, identifier or NullIdentifier(), publisher, cfg, metrics, transcriber)


class Background:
    """Run a pipeline in a thread; .summary once done."""

    def __init__(self, pipeline: Pipeline, duration_s: float | None = None):
        self.pipeline = pipeline
        self.summary: dict | None = None
        self.thread = threading.Thread(target=self._run, args=(duration_s,), daemon=True)
        self.thread.start()

    def _run(self, duration_s):
        self.summary = self.pipeline.run(duration_s)

    def stop(self, timeout_s: float = 20.0) -> dict:
        self.pipeline.stop()
        return self.join(timeout_s)

    def join(self, timeout_s: float = 30.0) -> dict:
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "pipeline did not finish"
        return self.summary


def read_stream(url: str, key: str = EVENTS_STREAM) -> list[dict]:
    client = redis.Redis.from_url(url)
    try:
        return [json.loads(fields[b"data"]) for _, fields in client.xrange(key)]
    finally:
        client.close()


def statuses(url: str, stream_id: str | None = None) -> list[dict]:
    return [e for e in read_stream(url, STATUS_CHANNEL) if stream_id is None or e["stream_id"] == stream_id]


def wait_for(predicate, timeout_s: float = 20.0, poll_s: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def first_occurrences(seqs: list[int]) -> list[int]:
    """Sequence numbers with repeats (at-least-once delivery) removed, order kept."""
    seen, out = set(), []
    for s in seqs:
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out
