"""Incremental transcripts for overlapping windows.

Windows overlap (3 s long every 1 s), so transcribing each window would
transcribe every second of audio three times, and each faster-whisper call
costs about the same whatever its length (it pads to 30 s: ~1.3 s on our 2
CPU cores for tiny.en). A ``SpeechTracker`` therefore keeps, per source, the
audio not yet transcribed; once ``step_s`` of it has gathered it transcribes
it exactly once (with VAD) and commits every segment found. The cut is put
at the quietest ``QUIET_FRAME_S`` frame of the last ``SETTLE_S`` so that a
word is rarely split; audio after the cut waits for the next call. Each
window carries the text of the committed segments whose midpoint lies in
it, so a window's last second or so of speech appears in later windows.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from stream.windows import SAMPLE_RATE, Window

SETTLE_S = 1.0  # seconds at the end of the pending audio searched for a quiet cut
QUIET_FRAME_S = 0.05  # seconds per energy frame when looking for the cut
KEEP_SEGMENTS_S = 60.0  # seconds of committed segments kept for lookup


class SegmentLike(Protocol):
    start: float
    end: float
    text: str


@dataclass(frozen=True)
class TimedText:
    start: float  # seconds of stream time
    end: float
    text: str


Transcribe = Callable[[np.ndarray], Sequence[SegmentLike]]


def text_between(segments: Sequence[SegmentLike], start: float, end: float) -> str:
    """A window's transcript: the text of the segments whose midpoint lies in [start, end),
    in order. Neighbouring windows mostly get the same text (a segment's midpoint is in
    window_s / hop_s of them), which the engine's text cache relies on."""
    parts = [s.text.strip() for s in segments if start <= (s.start + s.end) / 2 < end]
    return " ".join(parts).strip()


def load_transcriber(model_name: str, compute_type: str) -> Transcribe | None:
    """faster-whisper through stream.asr, shared by all sources; None when model is "off"."""
    if model_name.lower() in ("", "off", "none"):
        return None
    from stream import asr  # imported here: loading the model is heavy

    model = asr.load_whisper(model=model_name, compute_type=compute_type)
    lock = threading.Lock()  # one transcription at a time: 2 cores are shared anyway
    asr.transcribe(model, np.zeros(SAMPLE_RATE, np.float32), vad=True)  # warm up: VAD and decoder loaded now

    def transcribe(audio: np.ndarray) -> Sequence[SegmentLike]:
        with lock:
            return asr.transcribe(model, audio, vad=True)

    return transcribe


class SpeechTracker:
    """Per-source ASR state: audio not yet transcribed and the committed segments.

    With ``background=True`` a due transcription runs in a helper thread, so
    the source thread (decoding a live feed) never waits for faster-whisper:
    windows carry the text committed so far, and the last window of a source
    (``final``) waits for everything.
    """

    def __init__(self, transcribe: Transcribe, step_s: float, settle_s: float = SETTLE_S,
                 sample_rate: int = SAMPLE_RATE, background: bool = False):
        self._transcribe = transcribe
        self.step_s = step_s
        self.settle_s = min(settle_s, step_s / 2)
        self.sample_rate = sample_rate
        self.background = background
        self.calls = 0  # transcription calls made
        self.seconds_transcribed = 0.0  # audio seconds passed to the model
        self._pending = np.zeros(0, np.float32)
        self._pending_t0: float | None = None  # stream time of the first pending sample
        self._fed_until: float | None = None  # stream time up to which audio was received
        self._committed: list[TimedText] = []
        self._lock = threading.Condition()  # guards the state above between source, helper and worker
        self._job: threading.Thread | None = None
        self._done_until = float("-inf")  # stream time up to which audio has been transcribed

    def annotate(self, window: Window, final: bool = False) -> Window:
        """Feed the window's new audio, transcribe when due (or all of it when final)."""
        self._feed(window)
        if final:
            self._wait()
            self._run(final=True)
        elif self._pending_s() >= self.step_s:
            if not self.background:
                self._run()
            elif self._job is None or not self._job.is_alive():
                self._job = threading.Thread(target=self._run, name="asr", daemon=True)
                self._job.start()
        return dataclasses.replace(window, transcript=self.text_between(window.start, window.end))

    def wait_for(self, t: float, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` until audio up to stream time ``t`` is transcribed."""
        with self._lock:
            return self._lock.wait_for(lambda: self._done_until >= t, timeout=max(0.0, timeout_s))

    def text_between(self, start: float, end: float) -> str:
        with self._lock:
            return text_between(self._committed, start, end)

    def _pending_s(self) -> float:
        return self._pending.size / self.sample_rate

    def _wait(self) -> None:
        if self._job is not None:
            self._job.join()
            self._job = None

    def _feed(self, window: Window) -> None:
        if window.audio.size == 0:
            return
        start = window.start
        if self._fed_until is not None and start > self._fed_until + 1.0 / self.sample_rate:
            self._wait()
            self._run(final=True)  # a gap (reconnect): close what we have
            self._fed_until = None
        skip = 0 if self._fed_until is None else max(0, round((self._fed_until - start) * self.sample_rate))
        new = window.audio[skip:]
        if new.size == 0:
            return
        with self._lock:
            if self._pending.size == 0:
                self._pending_t0 = start + skip / self.sample_rate
            self._pending = np.concatenate([self._pending, new])
        self._fed_until = start + window.audio.size / self.sample_rate

    def flush(self) -> list[TimedText]:
        """Transcribe what is pending (end of source) and return the committed segments."""
        self._wait()
        self._run(final=True)
        with self._lock:
            return list(self._committed)

    def _quiet_cut(self, pending: np.ndarray) -> int:
        """Sample index of the quietest frame's middle in the last settle_s of ``pending``."""
        frame = max(1, round(QUIET_FRAME_S * self.sample_rate))
        lo = max(0, pending.size - round(self.settle_s * self.sample_rate))
        tail = pending[lo : lo + (pending.size - lo) // frame * frame]
        if tail.size < frame:
            return pending.size
        energy = np.square(tail).reshape(-1, frame).mean(axis=1)
        return lo + int(np.argmin(energy)) * frame + frame // 2

    def _run(self, final: bool = False) -> None:
        """Take the due audio, transcribe it (outside the lock), commit its segments."""
        with self._lock:
            if self._pending.size == 0 or self._pending_t0 is None:
                return
            cut = self._pending.size if final else self._quiet_cut(self._pending)
            audio, t0 = self._pending[:cut], self._pending_t0
            self._pending = self._pending[cut:]
            self._pending_t0 = t0 + cut / self.sample_rate
            self.calls += 1
            self.seconds_transcribed += audio.size / self.sample_rate
        segments = [TimedText(t0 + s.start, t0 + s.end, s.text) for s in self._transcribe(audio)]
        with self._lock:
            self._committed.extend(segments)
            horizon = self._pending_t0 - KEEP_SEGMENTS_S
            self._committed = [s for s in self._committed if s.end >= horizon]
            self._done_until = max(self._done_until, t0 + audio.size / self.sample_rate)
            self._lock.notify_all()


def describe(tracker: SpeechTracker | None) -> dict[str, Any]:
    """Counters for logs and tests."""
    if tracker is None:
        return {}
    return {"asr_calls": tracker.calls, "asr_seconds": round(tracker.seconds_transcribed, 3)}
