"""Test and demo clips cut from the synthetic corpus (``mmid synth``).

    timeline = single_speaker_clip(corpus, "Ses01F", "ses01f.mp4", max_s=20.0)
    timeline = conversation_clip(corpus, "Ses01F_impro02a", "talk.mp4")
    timeline = conversations_clip(corpus, dialogs, "long.mp4", size=(640, 360), max_s=60)

Both take ``corpus`` = the folder that holds ``IEMOCAP_full_release/`` and
``persons.json`` (the generator's ground truth), cut the annotated utterances
(ids ``..._F003``; overlapped ``XX`` turns are left out) and concatenate them
back to back, so the clip is all speech. Each utterance shows only its
speaker: that person's half of the 720x480 split-screen (360x480) and that
person's channel of the dialog wav (the dialog-prefix actor is on the left
half and channel 0). Frames are those of the utterance's time range, resampled
to ``fps`` (the latest source frame at each output time).

The clip is an MP4 with H.264 video (yuv420p) and AAC audio (16 kHz mono), the
format the RTSP test server serves. Both functions return the ground-truth
timeline ``[(start, end, person), ...]`` in seconds of clip time, one entry
per utterance, in order, contiguous (each ``start`` is the previous ``end``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from engine.features import decode_audio

SAMPLE_RATE = 16000  # Hz of the clip's audio
FPS = 25  # frames per second of the clip's video
HALF_W, FRAME_H = 360, 480  # pixels: one half of the corpus's 720x480 split-screen
ANNOTATED_RE = re.compile(r"_[FM]\d{3}$")  # utterance ids with a number (not the XX turns)

Timeline = list[tuple[float, float, str]]


@dataclass(frozen=True)
class Segment:
    """One utterance as it goes into a clip."""

    dialog: str
    start: float  # seconds of dialog time
    end: float
    person: str
    side: int  # 0: left half and wav channel 0; 1: right half and channel 1


def single_speaker_clip(corpus_dir: str | Path, person: str, out_path: str | Path, max_s: float = 30.0,
                        dialogs: set[str] | None = None, fps: int = FPS,
                        size: tuple[int, int] | None = None) -> Timeline:
    """A clip of ``person`` alone: their utterances (in dialog order, then time), at most
    ``max_s`` seconds (the last utterance cut), only from ``dialogs`` when given.
    ``size``: (width, height) of the clip (letterboxed), default the half-frame 360x480."""
    truth = _ground_truth(corpus_dir)
    segments = [s for s in _segments(truth) if s.person == person and (dialogs is None or s.dialog in dialogs)]
    if not segments:
        raise ValueError(f"no annotated utterances of {person!r} in {corpus_dir}"
                         + (f" within dialogs {sorted(dialogs)}" if dialogs is not None else ""))
    segments.sort(key=lambda s: (s.dialog, s.start))
    kept, total = [], 0.0
    for s in segments:
        if total >= max_s:
            break
        end = min(s.end, s.start + (max_s - total))
        kept.append(Segment(s.dialog, s.start, end, s.person, s.side))
        total += end - s.start
    return write_clip(corpus_dir, kept, out_path, fps, size)


def conversation_clip(corpus_dir: str | Path, dialog: str, out_path: str | Path, fps: int = FPS,
                      size: tuple[int, int] | None = None) -> Timeline:
    """A two-person conversation cut like a broadcast: for each annotated utterance of
    ``dialog`` in time order, the speaker's half-frame and the speaker's channel.
    ``size``: (width, height) of the clip (letterboxed), default the half-frame 360x480.
    Returns the ground truth [(start, end, person), ...] in clip time."""
    return conversations_clip(corpus_dir, [dialog], out_path, fps=fps, size=size)


def conversations_clip(corpus_dir: str | Path, dialogs: list[str], out_path: str | Path, fps: int = FPS,
                       size: tuple[int, int] | None = None, max_s: float | None = None) -> Timeline:
    """``conversation_clip`` of several dialogs one after the other (longer test streams),
    stopping before the first utterance that would end after ``max_s`` when given."""
    truth = _ground_truth(corpus_dir)
    segments: list[Segment] = []
    for dialog in dialogs:
        if dialog not in truth["dialogs"]:
            raise ValueError(f"no dialog {dialog!r} in {corpus_dir}/persons.json")
        mine = sorted((s for s in _segments(truth) if s.dialog == dialog), key=lambda s: s.start)
        if not mine:
            raise ValueError(f"dialog {dialog!r} has no annotated utterances")
        segments += mine
    if max_s is not None:
        total, kept = 0.0, []
        for s in segments:
            total += s.end - s.start
            if total > max_s and kept:
                break
            kept.append(s)
        segments = kept
    return write_clip(corpus_dir, segments, out_path, fps, size)


# -- reading the corpus -----------------------------------------------------------


def _ground_truth(corpus_dir: str | Path) -> dict:
    path = Path(corpus_dir) / "persons.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: corpus_dir must be the folder written by `mmid synth`")
    return json.loads(path.read_text())


def _segments(truth: dict) -> list[Segment]:
    out = []
    for utt_id, u in truth["utterances"].items():
        if not ANNOTATED_RE.search(utt_id) or u["end"] <= u["start"]:
            continue
        side = 0 if truth["dialogs"][u["dialog"]]["left"] == u["person"] else 1
        out.append(Segment(u["dialog"], float(u["start"]), float(u["end"]), u["person"], side))
    return out


def _media(corpus_dir: str | Path, dialog: str, kind: str) -> Path:
    session = f"Session{int(dialog[3:5])}"
    root = Path(corpus_dir) / "IEMOCAP_full_release" / session / "dialog"
    path = root / ("avi/DivX" if kind == "avi" else "wav") / f"{dialog}.{kind}"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found")
    return path


def _source_frames(avi: Path) -> Iterator[tuple[float, av.VideoFrame]]:
    with av.open(str(avi)) as container:
        for frame in container.decode(video=0):
            if frame.time is not None:
                yield frame.time, frame


def _half(frame: av.VideoFrame, side: int, size: tuple[int, int] | None) -> np.ndarray:
    """RGB uint8 of one half of the split-screen; with size (width, height), scaled to fit
    inside it with the aspect ratio kept, centred on black (letterbox)."""
    image = frame.to_ndarray(format="rgb24")
    w = image.shape[1] // 2
    half = np.ascontiguousarray(image[:, side * w : (side + 1) * w])
    if size is None or (half.shape[1], half.shape[0]) == tuple(size):
        return half
    width, height = size
    scale = min(width / half.shape[1], height / half.shape[0])
    fw, fh = max(2, round(half.shape[1] * scale) // 2 * 2), max(2, round(half.shape[0] * scale) // 2 * 2)
    fitted = av.VideoFrame.from_ndarray(half, format="rgb24").reformat(width=fw, height=fh).to_ndarray(format="rgb24")
    canvas = np.zeros((height, width, 3), np.uint8)
    top, left = (height - fh) // 2, (width - fw) // 2
    canvas[top : top + fh, left : left + fw] = fitted
    return canvas


# -- writing ------------------------------------------------------------------------


def write_clip(corpus_dir: str | Path, segments: list[Segment], out_path: str | Path, fps: int = FPS,
               size: tuple[int, int] | None = None) -> Timeline:
    """Concatenate segments into an H.264 + AAC MP4; return the timeline in clip time."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size or (HALF_W, FRAME_H)
    timeline: Timeline = []
    with av.open(str(out_path), "w") as container:
        video = container.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.options = {"preset": "veryfast"}
        video.codec_context.gop_size = fps  # a keyframe every second: live clients join quickly
        audio = container.add_stream("aac", rate=SAMPLE_RATE, layout="mono")
        n_frames, n_samples, clock = 0, 0, 0.0
        for seg in segments:
            end = clock + (seg.end - seg.start)
            n_frames = _write_video(container, video, seg, clock, end, n_frames, fps, (width, height), corpus_dir)
            n_samples = _write_audio(container, audio, seg, end, n_samples, corpus_dir)
            timeline.append((round(clock, 6), round(end, 6), seg.person))
            clock = end
        for stream in (video, audio):
            for packet in stream.encode(None):
                container.mux(packet)
    return timeline


def _write_video(container, stream, seg: Segment, clock: float, end: float, n_frames: int, fps: int,
                 size: tuple[int, int], corpus_dir) -> int:
    """Frames with output index n_frames.. whose clip time falls before end; returns the next index."""
    source = _source_frames(_media(corpus_dir, seg.dialog, "avi"))
    current = None
    upcoming = next(source, None)
    while n_frames / fps < end - 1e-9:
        source_t = seg.start + (n_frames / fps - clock)
        while upcoming is not None and upcoming[0] <= source_t + 1e-6:
            current, upcoming = upcoming, next(source, None)
        if current is None:
            current = upcoming
        if current is None:
            raise ValueError(f"{seg.dialog}: no video frames")
        frame = av.VideoFrame.from_ndarray(_half(current[1], seg.side, size), format="rgb24")
        frame.pts, frame.time_base = n_frames, Fraction(1, fps)
        for packet in stream.encode(frame):
            container.mux(packet)
        n_frames += 1
    source.close()
    return n_frames


def _write_audio(container, stream, seg: Segment, end: float, n_samples: int, corpus_dir) -> int:
    """The speaker's channel from seg.start, up to clip time end; returns the samples written."""
    channels = decode_audio(_media(corpus_dir, seg.dialog, "wav"), SAMPLE_RATE)
    channel = channels[min(seg.side, channels.shape[0] - 1)]
    want = round(end * SAMPLE_RATE) - n_samples
    i = round(seg.start * SAMPLE_RATE)
    samples = channel[i : i + want]
    if samples.size < want:  # the wav ended early: pad with silence
        samples = np.concatenate([samples, np.zeros(want - samples.size, np.float32)])
    frame = av.AudioFrame.from_ndarray(samples.astype(np.float32)[None, :], format="fltp", layout="mono")
    frame.sample_rate, frame.pts, frame.time_base = SAMPLE_RATE, n_samples, Fraction(1, SAMPLE_RATE)
    for packet in stream.encode(frame):
        container.mux(packet)
    return n_samples + want
