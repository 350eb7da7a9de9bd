"""Cut decoded media into overlapping windows by presentation time.

Stream time starts at 0 at the first timestamp seen (audio or video) and
keeps counting across reconnects: a new segment (after a loss) starts at the
previous segment's last time plus the wall-clock gap. Window ``k`` covers
``[k * hop_s, k * hop_s + window_s)`` of stream time; ``seq == k``.

A window is emitted once every modality seen so far has reached its end, or
once any modality is ``LAG_TOLERANCE_S`` past it (a stalled track must not
hold the other back).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from stream.ingest import AudioChunk, VideoFrame

SAMPLE_RATE = 16000  # Hz, mono float32 audio in every window
LAG_TOLERANCE_S = 2.0  # seconds one track may run ahead before the other is ignored
JUMP_TOLERANCE_S = 0.05  # audio timestamp jitter accepted without padding or trimming


@dataclass(frozen=True, eq=False)
class Window:
    stream_id: str
    seq: int
    start: float  # seconds of stream time
    end: float
    wall_start: float  # unix seconds when the first sample of the window was read
    wall_end: float  # unix seconds when the window was complete
    frames: tuple[np.ndarray, ...]  # RGB uint8 (H, W, 3), one per img_interval
    frame_times: tuple[float, ...]  # stream time of each frame
    audio: np.ndarray  # float32 (N,) at SAMPLE_RATE, may be empty
    transcript: str = ""
    meta: dict = field(default_factory=dict)  # free-form (e.g. source url)
    # index of audio[0] among the samples of this source segment (-1: unknown); windows
    # cut their audio chunks on that segment's grid (engine.features.grid_mel_chunks)
    audio_offset: int = -1

    @property
    def has_audio(self) -> bool:
        return self.audio.size > 0

    @property
    def has_video(self) -> bool:
        return len(self.frames) > 0


class Windower:
    """Turns AudioChunk/VideoFrame items of one source into Windows."""

    def __init__(self, stream_id: str, window_s: float, hop_s: float, sample_rate: int = SAMPLE_RATE):
        if not 0 < hop_s <= window_s:
            raise ValueError(f"need 0 < hop_s <= window_s, got hop_s={hop_s} window_s={window_s}")
        self.stream_id = stream_id
        self.window_s = window_s
        self.hop_s = hop_s
        self.sample_rate = sample_rate
        self.next_seq = 0
        self._base = 0.0  # stream time of the current segment's origin
        self._latest_end = 0.0  # greatest stream time reached (any segment)
        self._last_emitted_end = 0.0
        self._new_segment_state()

    def _new_segment_state(self) -> None:
        self._origin: float | None = None  # source time mapped to self._base
        self._audio: list[np.ndarray] = []
        self._audio_t0: float | None = None  # stream time of the first buffered sample
        self._audio_n = 0
        self._audio_dropped = 0  # samples of this segment trimmed from the front of the buffer
        self._frames: deque[tuple[float, np.ndarray]] = deque()
        self._reached: dict[str, float] = {}  # modality -> latest stream time
        self._walls: deque[tuple[float, float]] = deque()  # (stream time, wall)

    # -- time ---------------------------------------------------------------
    def _to_stream_time(self, source_time: float | None, kind: str) -> float:
        if source_time is None:  # no PTS: continue from this track's own end
            return self._reached.get(kind, self._base)
        if self._origin is None:
            self._origin = source_time
        return self._base + (source_time - self._origin)

    def new_segment(self, gap_s: float) -> None:
        """Start after a loss: stream time resumes gap_s after the latest time."""
        self._base = self._latest_end + max(gap_s, 0.0)
        self.next_seq = max(self.next_seq, math.ceil(self._base / self.hop_s - 1e-9))
        self._new_segment_state()

    # -- input --------------------------------------------------------------
    def push(self, item: AudioChunk | VideoFrame) -> list[Window]:
        if isinstance(item, AudioChunk):
            self._push_audio(item)
        else:
            self._push_video(item)
        return self._ready_windows()

    def _push_video(self, frame: VideoFrame) -> None:
        t = self._to_stream_time(frame.time, "video")
        if frame.image is not None and t >= self._window_start(self.next_seq):
            self._frames.append((t, frame.image))
        self._advance("video", t + frame.duration, frame.wall)

    def _push_audio(self, chunk: AudioChunk) -> None:
        samples = chunk.samples
        if samples.size == 0:
            return
        t = self._to_stream_time(chunk.time, "audio")
        if self._audio_t0 is None:
            self._audio_t0 = t
        expected = self._audio_t0 + self._audio_n / self.sample_rate
        if t > expected + JUMP_TOLERANCE_S:  # a hole in the audio: fill with silence
            self._append_audio(np.zeros(round((t - expected) * self.sample_rate), np.float32))
        elif t < expected - JUMP_TOLERANCE_S:  # overlap: drop what we already have
            samples = samples[round((expected - t) * self.sample_rate) :]
        self._append_audio(samples.astype(np.float32, copy=False))
        end = self._audio_t0 + self._audio_n / self.sample_rate
        self._advance("audio", end, chunk.wall)

    def _append_audio(self, samples: np.ndarray) -> None:
        if samples.size:
            self._audio.append(samples)
            self._audio_n += samples.size

    def _advance(self, kind: str, t: float, wall: float) -> None:
        self._reached[kind] = max(self._reached.get(kind, t), t)
        self._latest_end = max(self._latest_end, t)
        self._walls.append((t, wall))

    # -- output -------------------------------------------------------------
    def _window_start(self, seq: int) -> float:
        return seq * self.hop_s

    def _is_ready(self, end: float) -> bool:
        if not self._reached:
            return False
        reached = self._reached.values()
        return min(reached) >= end or max(reached) >= end + LAG_TOLERANCE_S

    def _ready_windows(self) -> list[Window]:
        out = []
        while self._is_ready(self._window_start(self.next_seq) + self.window_s):
            start = self._window_start(self.next_seq)
            out.append(self._cut(start, start + self.window_s))
        return out

    def flush(self) -> list[Window]:
        """Emit what is ready plus one last partial window over uncovered data."""
        out = self._ready_windows()
        latest = self._latest_end
        start = self._window_start(self.next_seq)
        if self._reached and latest > self._last_emitted_end + 1e-3 and latest > start:
            out.append(self._cut(start, latest))
        return out

    def _cut(self, start: float, end: float) -> Window:
        frames = [(t, img) for t, img in self._frames if start <= t < end]
        audio, offset = self._audio_between(start, end)
        wall_start = next((w for t, w in self._walls if t >= start), self._walls[-1][1])
        wall_end = next((w for t, w in self._walls if t >= end), self._walls[-1][1])
        window = Window(
            stream_id=self.stream_id,
            seq=self.next_seq,
            start=round(start, 6),
            end=round(end, 6),
            wall_start=wall_start,
            wall_end=wall_end,
            frames=tuple(img for _, img in frames),
            frame_times=tuple(round(t, 6) for t, _ in frames),
            audio=audio,
            audio_offset=offset,
        )
        self.next_seq += 1
        self._last_emitted_end = end
        self._trim(self._window_start(self.next_seq))
        return window

    def _audio_between(self, start: float, end: float) -> tuple[np.ndarray, int]:
        """-> (samples of [start, end), index of the first among the segment's samples; -1 if none)."""
        if self._audio_t0 is None or not self._audio:
            return np.zeros(0, np.float32), -1
        if len(self._audio) > 1:
            self._audio = [np.concatenate(self._audio)]
        buf = self._audio[0]
        i = min(max(0, round((start - self._audio_t0) * self.sample_rate)), buf.size)
        j = max(0, round((end - self._audio_t0) * self.sample_rate))
        return buf[i:j].copy(), self._audio_dropped + i

    def _trim(self, keep_from: float) -> None:
        while self._frames and self._frames[0][0] < keep_from:
            self._frames.popleft()
        while len(self._walls) > 1 and self._walls[1][0] < keep_from:
            self._walls.popleft()
        if self._audio_t0 is not None and self._audio:
            drop = round((keep_from - self._audio_t0) * self.sample_rate)
            if drop > 0:
                buf = np.concatenate(self._audio) if len(self._audio) > 1 else self._audio[0]
                drop = min(drop, buf.size)
                self._audio = [buf[drop:]]
                self._audio_t0 += drop / self.sample_rate
                self._audio_n -= drop
                self._audio_dropped += drop
