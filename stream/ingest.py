"""Open a source with PyAV and decode it as a chain of small generators.

    container = open_container(source, open_s, read_s)
    for item in decode(container, img_interval_s, pace=...):  # AudioChunk | VideoFrame

PyAV's failure modes with live sources shape this module: a hung server
blocks forever unless a timeout is given, so every network source is opened
with ``timeout=(open_s, read_s)``; a killed server ends the demux loop with no
exception, so the caller treats end-of-stream on a live source as a loss.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import av
import numpy as np

SAMPLE_RATE = 16000  # Hz of every AudioChunk
DEFAULT_FRAME_S = 0.04  # frame duration assumed when the stream declares no rate (25 fps)
MAX_PACE_JUMP_S = 5.0  # seconds; a larger timestamp jump re-anchors real-time pacing


class SourceKind(str, Enum):
    FILE = "file"
    RTSP = "rtsp"
    HTTP = "http"
    V4L2 = "v4l2"

    @property
    def live(self) -> bool:
        """Live sources are reconnected at end of stream; files end."""
        return self is not SourceKind.FILE


class RtspTransport(str, Enum):
    TCP = "tcp"
    UDP = "udp"


@dataclass(frozen=True)
class Source:
    url: str
    stream_id: str
    kind: SourceKind
    rtsp_transport: RtspTransport = RtspTransport.TCP

    @property
    def display(self) -> str:
        """The URL with any password replaced, for logs and status events."""
        return re.sub(r"(//[^:/@]+:)[^@/]+@", r"\1***@", self.url)


def parse_source(text: str, stream_id: str | None = None, rtsp_transport: str = "tcp") -> Source:
    """Classify ``text`` as a file, rtsp://, http(s):// or /dev/videoN source."""
    lower = text.lower()
    if lower.startswith(("rtsp://", "rtsps://")):
        kind = SourceKind.RTSP
    elif lower.startswith(("http://", "https://")):
        kind = SourceKind.HTTP
    elif re.fullmatch(r"/dev/video\d+", text):
        kind = SourceKind.V4L2
    elif "://" in text:
        raise ValueError(f"unsupported source {text!r}: use a file, rtsp://, http(s):// or /dev/videoN")
    else:
        kind = SourceKind.FILE
    if stream_id is None:
        stream_id = _default_stream_id(text, kind)
    return Source(text, stream_id, kind, RtspTransport(rtsp_transport))


def _default_stream_id(text: str, kind: SourceKind) -> str:
    name = Path(text.split("?", 1)[0].rstrip("/")).stem if kind is SourceKind.FILE else text.split("://")[-1]
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name.split("@")[-1]).strip("-") or "stream"


@dataclass(frozen=True, eq=False)
class VideoFrame:
    time: float | None  # seconds of source time (None: frame had no PTS)
    duration: float  # seconds one frame lasts
    wall: float  # unix seconds when decoded
    image: np.ndarray | None  # RGB uint8 (H, W, 3) when sampled, else None


@dataclass(frozen=True, eq=False)
class AudioChunk:
    time: float | None  # seconds of source time of the first sample
    wall: float
    samples: np.ndarray  # float32 (N,) mono at SAMPLE_RATE


def open_container(source: Source, open_timeout_s: float, read_timeout_s: float) -> Any:
    """av.open with timeouts on every network source (PyAV blocks forever otherwise)."""
    if source.kind is SourceKind.FILE:
        return av.open(source.url)
    options: dict[str, str] = {}
    fmt = None
    if source.kind is SourceKind.RTSP:
        options["rtsp_transport"] = source.rtsp_transport.value
    elif source.kind is SourceKind.V4L2:
        fmt = "v4l2"
    return av.open(source.url, format=fmt, options=options, timeout=(open_timeout_s, read_timeout_s))


def decode(
    container: Any, img_interval_s: float, pace: bool = False, should_stop: Any = None
) -> Iterator[AudioChunk | VideoFrame]:
    """Decode the first audio and first video stream; sample video every img_interval_s."""
    streams = [s for s in (_first(container.streams.audio), _first(container.streams.video)) if s]
    if not streams:
        raise ValueError("source has neither audio nor video")
    packets = container.demux(*streams)
    if should_stop is not None:
        packets = _until(packets, should_stop)
    items = _decode_packets(packets, img_interval_s)
    return _paced(items) if pace else items


def _first(streams: Any) -> Any:
    return streams[0] if len(streams) else None


def _until(packets: Iterator[Any], should_stop: Any) -> Iterator[Any]:
    for packet in packets:
        if should_stop():
            return
        yield packet


def _frames(packets: Iterator[Any]) -> Iterator[Any]:
    """Decoded frames; packets that fail to decode are skipped, as faster-whisper does."""
    for packet in packets:
        try:
            yield from packet.decode()
        except av.error.InvalidDataError:
            continue


def _decode_packets(packets: Iterator[Any], img_interval_s: float) -> Iterator[AudioChunk | VideoFrame]:
    resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
    next_sample = None  # source time of the next video frame to keep
    for frame in _frames(packets):
        wall = time.time()
        if isinstance(frame, av.AudioFrame):
            samples = _resample(resampler, frame)
            yield AudioChunk(frame.time, wall, samples)
        elif isinstance(frame, av.VideoFrame):
            t = frame.time
            keep = t is None or next_sample is None or t >= next_sample - 1e-6
            if keep and t is not None:
                next_sample = (t if next_sample is None else next_sample) + img_interval_s
                while next_sample <= t:  # skip sample slots the stream jumped over
                    next_sample += img_interval_s
            image = frame.to_ndarray(format="rgb24") if keep else None
            yield VideoFrame(t, _frame_duration(frame), wall, image)
    tail = _resample(resampler, None)
    if tail.size:
        yield AudioChunk(None, time.time(), tail)


def _resample(resampler: av.AudioResampler, frame: Any) -> np.ndarray:
    out = [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
    return np.concatenate(out).astype(np.float32, copy=False) if out else np.zeros(0, np.float32)


def _frame_duration(frame: Any) -> float:
    rate = frame.time_base and frame.duration and float(frame.duration * frame.time_base)
    return rate if rate and rate > 0 else DEFAULT_FRAME_S


def _paced(items: Iterator[AudioChunk | VideoFrame]) -> Iterator[AudioChunk | VideoFrame]:
    """Yield no faster than real time (files played as if live)."""
    t0 = wall0 = None
    for item in items:
        if item.time is not None:
            if t0 is None:
                t0, wall0 = item.time, time.monotonic()
            delay = (item.time - t0) - (time.monotonic() - wall0)
            if delay > MAX_PACE_JUMP_S or delay < -MAX_PACE_JUMP_S:  # timestamp jump: re-anchor
                t0, wall0, delay = item.time, time.monotonic(), 0.0
            if delay > 0:
                time.sleep(delay)
        yield item
