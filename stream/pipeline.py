"""Sources -> windows -> (speech) -> one identification worker -> publisher.

    pipeline = Pipeline(sources, identifier, publisher, cfg, metrics, transcriber)
    pipeline.run(duration_s=None)   # returns when every source ended or stop() was called

One thread per source decodes, windows and transcribes, then puts windows
on one bounded queue shared by all sources (oldest dropped and counted when
full). A single worker takes up to ``max_batch`` windows at a time, from any
sources, calls ``identifier.identify`` and publishes one event per window.
Errors are caught at each thread boundary and become status events; one
source failing never stops the others.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from dataclasses import dataclass

import av

from engine.config import Config
from stream.events import UNKNOWN, IdentityEvent, SourceState, StatusEvent
from stream.identify import Identifier, WindowResult
from stream.ingest import Source, decode, open_container
from stream.metrics import Metrics
from stream.publish import Publisher
from stream.speech import SpeechTracker, Transcribe
from stream.windows import Window, Windower

log = logging.getLogger("stream.pipeline")

SOURCE_ERRORS = (av.error.FFmpegError, OSError, ValueError)  # a source that cannot be read
IDLE_POLL_S = 0.2  # seconds the worker waits for windows before checking the spool


@dataclass(frozen=True)
class Queued:
    window: Window
    enqueued: float  # time.monotonic() when queued


class WindowQueue:
    """Bounded FIFO shared by all sources; a full queue drops its oldest window."""

    def __init__(self, maxsize: int, producers: int):
        self._items: collections.deque[Queued] = collections.deque()
        self._maxsize = maxsize
        self._open = producers  # producers that have not sent their stop sentinel
        self._cond = threading.Condition()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: Queued) -> Queued | None:
        """Add item; return the dropped oldest one, if any."""
        with self._cond:
            dropped = self._items.popleft() if len(self._items) >= self._maxsize else None
            self._items.append(item)
            self._cond.notify()
            return dropped

    def producer_done(self) -> None:
        """The stop sentinel of one producer."""
        with self._cond:
            self._open -= 1
            self._cond.notify_all()

    def get_batch(self, max_n: int, timeout: float) -> list[Queued] | None:
        """Up to max_n items; [] on timeout; None once all producers are done and it is empty."""
        with self._cond:
            if not self._items and self._open > 0:
                self._cond.wait(timeout)
            if not self._items:
                return None if self._open <= 0 else []
            return [self._items.popleft() for _ in range(min(max_n, len(self._items)))]


class Pipeline:
    def __init__(
        self,
        sources: list[Source],
        identifier: Identifier,
        publisher: Publisher,
        cfg: Config,
        metrics: Metrics,
        transcriber: Transcribe | None = None,
    ):
        ids = [s.stream_id for s in sources]
        if len(set(ids)) != len(ids):
            raise ValueError(f"stream ids must be unique, got {ids}")
        self.sources = sources
        self.identifier = identifier
        self.publisher = publisher
        self.cfg = cfg
        self.metrics = metrics
        self.transcriber = transcriber
        self.queue = WindowQueue(cfg.stream.queue_windows, len(sources))
        self.trackers: dict[str, SpeechTracker] = {}
        self.dropped: collections.Counter[str] = collections.Counter()
        self.states: dict[str, SourceState] = {}  # last state of each source
        self._stop = threading.Event()
        self._seq: collections.Counter[tuple[str, str]] = collections.Counter()
        self._seq_lock = threading.Lock()
        self._faces_counted = self._face_counts()  # counted from here on

    def stop(self) -> None:
        self._stop.set()

    def run(self, duration_s: float | None = None) -> dict:
        threads = [threading.Thread(target=self._source_thread, args=(s,), name=f"source-{s.stream_id}", daemon=True)
                   for s in self.sources]
        worker = threading.Thread(target=self._worker_thread, name="identify", daemon=True)
        for t in threads + [worker]:
            t.start()
        deadline = None if duration_s is None else time.monotonic() + duration_s
        while worker.is_alive():
            if deadline is not None and time.monotonic() >= deadline:
                self.stop()
            worker.join(IDLE_POLL_S)
        for t in threads:
            t.join(timeout=1.0)
        summary = self.publisher.close()
        summary["dropped"] = dict(self.dropped)
        summary["events"] = {sid: n for (sid, kind), n in self._seq.items() if kind == "identity"}
        log.info("pipeline finished", extra=summary)
        return summary

    def _next_seq(self, stream_id: str, kind: str) -> int:
        with self._seq_lock:
            n = self._seq[(stream_id, kind)]
            self._seq[(stream_id, kind)] += 1
            return n

    def _status(self, source: Source, state: SourceState, detail: str = "", **counters: float) -> None:
        event = StatusEvent(source.stream_id, self._next_seq(source.stream_id, "status"), state,
                            source.display, time.time(), detail, dict(counters))
        self.states[source.stream_id] = state
        log.info("source %s", state.value, extra={"stream_id": source.stream_id, "detail": detail, **counters})
        self.publisher.publish(event)

    # -- one thread per source ---------------------------------------------------
    def _source_thread(self, source: Source) -> None:
        try:
            self._read_source(source)
        except Exception as exc:  # the thread boundary: report, never crash the others
            log.exception("source failed", extra={"stream_id": source.stream_id})
            self.metrics.source_errors.labels(source.stream_id).inc()
            self._status(source, SourceState.ERROR, f"{type(exc).__name__}: {exc}")
        finally:
            self.queue.producer_done()

    def _read_source(self, source: Source) -> None:
        sc = self.cfg.stream
        windower = Windower(source.stream_id, sc.window_s, sc.hop_s)
        tracker = (SpeechTracker(self.transcriber, step_s=sc.asr_step_s, background=sc.asr_background)
                   if self.transcriber else None)
        if tracker:
            self.trackers[source.stream_id] = tracker
        failures, reconnects, lost_at = 0, 0, None
        while not self._stop.is_set():
            try:
                container = open_container(source, sc.open_timeout_s, sc.read_timeout_s)
            except SOURCE_ERRORS as exc:
                if not source.kind.live:
                    raise
                failures += 1
                if not self._wait_reconnect(source, failures, reconnects, exc):
                    return
                reconnects += 1
                continue
            if lost_at is not None:
                gap = time.time() - lost_at
                windower.new_segment(gap)
                self.metrics.gap.labels(source.stream_id).inc(gap)
            failures = 0
            self._status(source, SourceState.CONNECTED, reconnects=reconnects)
            error = self._pump(source, container, windower, tracker)
            if self._stop.is_set() or not source.kind.live:
                self._emit(windower.flush(), tracker, final=True)
                if error is not None:
                    raise error
                self._status(source, SourceState.ENDED, windows=windower.next_seq)
                return
            # a live source that ended or failed: a loss
            self._emit(windower.flush(), tracker, final=True)
            lost_at, failures = time.time(), 1
            if not self._wait_reconnect(source, failures, reconnects, error or EOFError("end of live stream")):
                return
            reconnects += 1
        self._emit(windower.flush(), tracker, final=True)
        self._status(source, SourceState.ENDED, windows=windower.next_seq)

    def _pump(self, source: Source, container, windower: Windower, tracker: SpeechTracker | None):
        """Decode until end/stop; return the error that ended it, if any."""
        pace = self.cfg.stream.realtime and not source.kind.live
        frames = self.metrics.frames
        try:
            items = decode(container, self.cfg.prepare.img_interval_ms / 1000.0, pace, self._stop.is_set)
            for item in items:
                frames.labels(source.stream_id, "video" if hasattr(item, "image") else "audio").inc()
                self._emit(windower.push(item), tracker)
        except SOURCE_ERRORS as exc:
            return exc
        finally:
            container.close()
        return None

    def _wait_reconnect(self, source: Source, failures: int, reconnects: int, exc: BaseException) -> bool:
        """Back off before the next attempt; False when attempts are used up or stopping."""
        sc = self.cfg.stream
        if sc.reconnect_attempts and failures > sc.reconnect_attempts:
            self._status(source, SourceState.ERROR, f"gave up after {failures - 1} attempts: {exc}")
            return False
        delay = min(sc.reconnect_initial_s * 2 ** (failures - 1), sc.reconnect_max_s)
        self.metrics.reconnects.labels(source.stream_id).inc()
        self._status(source, SourceState.RECONNECTING, f"{type(exc).__name__}: {exc}",
                     attempt=failures, delay_s=round(delay, 3), reconnects=reconnects)
        return not self._stop.wait(delay)

    def _emit(self, windows: list[Window], tracker: SpeechTracker | None, final: bool = False) -> None:
        """Queue windows; final: the source's last ones (transcribe all pending audio)."""
        for i, window in enumerate(windows):
            if tracker is not None:
                window = tracker.annotate(window, final=final and i == len(windows) - 1)
            self.metrics.windows.labels(window.stream_id).inc()
            dropped = self.queue.put(Queued(window, time.monotonic()))
            if dropped is not None:
                self.dropped[dropped.window.stream_id] += 1
                self.metrics.dropped.labels(dropped.window.stream_id).inc()
            self.metrics.queue.set(len(self.queue))

    # -- the identification worker ---------------------------------------------
    def _worker_thread(self) -> None:
        while True:
            batch = self.queue.get_batch(self.cfg.stream.max_batch, IDLE_POLL_S)
            if batch is None:
                return
            if not batch:
                self.publisher.tick()
                continue
            self.metrics.queue.set(len(self.queue))
            self._identify(batch)

    def _late_transcripts(self, batch: list[Queued]) -> list[Queued]:
        """With background ASR, give each window the text committed by now, after waiting up to
        ``asr_wait_s`` (from when it was queued) for its audio to be transcribed."""
        if not self.cfg.stream.asr_background:
            return batch
        out = []
        for q in batch:
            tracker = self.trackers.get(q.window.stream_id)
            if tracker is not None and q.window.has_audio:
                tracker.wait_for(q.window.end, self.cfg.stream.asr_wait_s - (time.monotonic() - q.enqueued))
                text = tracker.text_between(q.window.start, q.window.end)
                q = dataclasses.replace(q, window=dataclasses.replace(q.window, transcript=text))
            out.append(q)
        return out

    def _identify(self, batch: list[Queued]) -> None:
        batch = self._late_transcripts(batch)
        started = time.monotonic()
        try:
            results = self.identifier.identify([q.window for q in batch])
            if len(results) != len(batch):
                raise ValueError(f"identifier returned {len(results)} results for {len(batch)} windows")
        except Exception as exc:  # the identifier is plugged in: report and keep streaming
            log.exception("identify failed", extra={"windows": len(batch)})
            for sid in sorted({q.window.stream_id for q in batch}):
                source = next(s for s in self.sources if s.stream_id == sid)
                self._status(source, SourceState.ERROR, f"identify failed: {type(exc).__name__}: {exc}")
            return
        identify_s = time.monotonic() - started
        self.metrics.batch.observe(len(batch))
        self.metrics.latency.labels("identify").observe(identify_s)
        self.metrics.rtf.set(identify_s / (len(batch) * self.cfg.stream.hop_s))
        self._count_faces()
        for q, result in zip(batch, results):
            self.publisher.publish(self._event(q, result, started, identify_s))
            self.metrics.events.labels(q.window.stream_id).inc()

    def _face_counts(self) -> dict[str, int]:
        """The identifier's ``face_counts()`` (an identifier that finds no faces has none)."""
        counts = getattr(self.identifier, "face_counts", None)
        return counts() if counts is not None else {}

    def _count_faces(self) -> None:
        """The identifier's face frames since the last call into ``mmid_face_frames{how}``."""
        for how, now in self._face_counts().items():
            self.metrics.face_frames.labels(how).inc(now - self._faces_counted.get(how, 0))
            self._faces_counted[how] = now

    def _event(self, q: Queued, r: WindowResult, started: float, identify_s: float) -> IdentityEvent:
        sc = self.cfg.stream
        w = q.window
        queue_s = started - q.enqueued
        total_s = max(0.0, time.time() - w.wall_end)
        self.metrics.latency.labels("queue").observe(queue_s)
        self.metrics.latency.labels("total").observe(total_s)
        return IdentityEvent(
            stream_id=w.stream_id,
            seq=self._next_seq(w.stream_id, "identity"),
            window_seq=w.seq,
            start=w.start,
            end=w.end,
            wall_start=w.wall_start,
            wall_end=w.wall_end,
            person=r.person if r.confidence >= sc.unknown_threshold else UNKNOWN,
            confidence=float(r.confidence),
            top_k=tuple((p, float(s)) for p, s in r.top_k[: sc.top_k]),
            evidence=r.evidence,
            transcript=w.transcript,
            face_box=r.face_box,
            model=self.identifier.info,
            latency_ms={"queue": round(queue_s * 1000, 3), "identify": round(identify_s * 1000, 3),
                        "total": round(total_s * 1000, 3)},
        )
