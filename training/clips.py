"""``mmid prepare clips``: your own recordings -> a prepared DATA folder.

    DIR/<person>/talk1.mp4          video with audio
    DIR/<person>/talk1.txt          optional transcript sidecar
    DIR/<person>/memo.wav + memo.jpg  audio plus a still image of the face
                                    (an image with the audio's stem, else
                                    every image in the person's folder)

Each source file is one "dialog" of one person. Utterances come from:
- a sidecar whose lines read ``[START-END] text`` (seconds): those spans;
- any other sidecar: the whole file is one utterance with that text;
- no sidecar: faster-whisper with its VAD (stream/asr.py) cuts and transcribes.
Frames are sampled every img_interval ms and searched whole for a face (as
the stream does); the output format and splits are those of ``mmid prepare
iemocap`` (dialog split grouped by person).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import numpy as np

from engine.config import Config
from engine.features import decode_audio
from training.prepare import (
    SAMPLE_RATE, DialogResult, Planned, fit_times, guarded, read_part,
    run_jobs, sample_frames, warn, write_dataset, write_part,
)

VIDEO_EXT = {".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v"}
AUDIO_EXT = {".wav", ".mp3", ".flac", ".m4a", ".ogg", ".opus"}
IMAGE_EXT = {".jpg", ".jpeg", ".png", ".bmp"}
SPAN_RE = re.compile(r"^\[\s*(?P<start>[\d.]+)\s*-\s*(?P<end>[\d.]+)\s*\]:?\s*(?P<text>.*)$")


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-") or "x"


def find_sources(src: Path) -> tuple[list[tuple[str, Path, tuple[Path, ...]]], list[str]]:
    """(person, media file, still images) per source file; plus ignored files."""
    sources, ignored = [], []
    for folder in sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        images = [p for p in files if p.suffix.lower() in IMAGE_EXT]
        for path in files:
            ext = path.suffix.lower()
            if ext in VIDEO_EXT:
                sources.append((folder.name, path, ()))
            elif ext in AUDIO_EXT:
                own = [p for p in images if p.stem == path.stem]
                sources.append((folder.name, path, tuple(own or images)))
            elif ext not in IMAGE_EXT and ext != ".txt":
                ignored.append(str(path.relative_to(src)))
    return sources, ignored


def read_sidecar(path: Path, duration: float) -> list[tuple[float, float, str]]:
    """Spans from ``[START-END] text`` lines, else the whole file with all the text."""
    lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    spans = [SPAN_RE.match(line) for line in lines]
    if lines and all(spans):
        return [(float(m.group("start")), float(m.group("end")), m.group("text").strip()) for m in spans]
    return [(0.0, duration, " ".join(lines))]


def find_segments(media: Path, mono: np.ndarray, cfg: Config, res: DialogResult) -> list[tuple[float, float, str]]:
    sidecar = media.with_suffix(".txt")
    if sidecar.exists():
        return read_sidecar(sidecar, mono.shape[0] / SAMPLE_RATE)
    from stream.asr import load_whisper, transcribe

    model = load_whisper(cfg.stream.asr_model, cfg.stream.asr_compute_type)
    segments = [(s.start, s.end, s.text) for s in transcribe(model, mono, vad=True)]
    res.event("note", "transcribed", detail=f"{media.name}: {len(segments)} segments by {cfg.stream.asr_model}")
    return segments


def still_crops(images: tuple[Path, ...], cfg: Config, res: DialogResult) -> tuple[np.ndarray, np.ndarray]:
    """Face crops of still images (one per image, at most max_frames)."""
    from PIL import Image

    from engine.faces import crop_faces

    frames = []
    for path in images[: cfg.features.max_frames]:
        try:
            with Image.open(path) as im:
                frames.append(np.asarray(im.convert("RGB")))
        except OSError as exc:
            res.event("repair", "image_unreadable", detail=f"{path.name}: {exc}")
    crops, found, _ = crop_faces(frames, cfg.prepare.face_size, cfg.prepare.face_margin)
    return crops, found


def prepare_clip(person: str, media: Path, images: tuple[Path, ...], out: Path, cfg: Config) -> DialogResult:
    dialog = safe_name(f"{person}_{media.stem}")
    return guarded(_prepare_clip, dialog, dialog, person, media, images, out, cfg)


def _prepare_clip(dialog: str, person: str, media: Path, images: tuple[Path, ...], out: Path, cfg: Config) -> DialogResult:
    import av

    from training.prepare import write_utterance

    res = DialogResult(dialog)
    try:
        audio = decode_audio(media, SAMPLE_RATE)
    except (av.error.FFmpegError, ValueError) as exc:
        res.event("skip", "audio_unreadable", detail=f"{media.name}: {exc}")
        write_part(out, res)
        return res
    mono = audio.mean(axis=0, keepdims=True)  # (1, N)
    media_end = mono.shape[1] / SAMPLE_RATE
    segments = find_segments(media, mono[0], cfg, res)
    if not segments:
        res.event("skip", "no_speech", detail=f"{media.name}: no utterance found")
    planned = [Planned(f"{dialog}_{k:03d}", s, e, text, None, "full", 0) for k, (s, e, text) in enumerate(segments)]
    planned = fit_times(planned, media_end, cfg, res)
    if media.suffix.lower() in VIDEO_EXT:
        sample_frames(media, planned, cfg, res, lambda image, u: image)
    elif images:
        crops, found = still_crops(images, cfg, res)
        for u in planned:
            u.times = list(range(len(crops)))
            u.crops, u.found = dict(enumerate(crops)), dict(enumerate(found.tolist()))
    else:
        res.event("repair", "no_image", detail=f"{media.name}: no still image: faces absent")
        for u in planned:
            u.times = []
    res.media_s = media_end
    for u in planned:
        res.rows.append(write_utterance(u, person, person, mono, out, cfg, res))
    write_part(out, res)
    return res


def prepare_clips(src: Path, out: Path, cfg: Config, workers: int | None = None) -> dict:
    """Prepare DIR/<person>/ recordings into ``out``; returns the report."""
    src, out = Path(src), Path(out)
    sources, ignored = find_sources(src)
    if not sources:
        raise FileNotFoundError(f"{src} holds no <person>/ folders with video or audio files")
    out.mkdir(parents=True, exist_ok=True)
    results, todo = [], []
    for person, media, images in sources:
        done = read_part(out, safe_name(f"{person}_{media.stem}"))
        if done:
            results.append(done)
        else:
            todo.append((person, media, images, out, cfg))
    workers = workers if workers is not None else cfg.prepare.workers
    workers = workers or os.cpu_count() or 1
    t0 = time.perf_counter()
    fresh = []
    for res in run_jobs(todo, prepare_clip, workers, "prepare clips"):
        warn(res)
        fresh.append(res)
    extra = [{"action": "note", "reason": "unknown_file", "dialog": None, "utterance": None, "detail": p} for p in ignored]
    info = {"source": str(src), "kind": "clips", "group_key": "session", "dialogs_prepared": len(fresh),
            "dialogs_resumed": len(results), "workers": workers, "wall_s": round(time.perf_counter() - t0, 2),
            "media_s": round(sum(r.media_s for r in fresh), 2)}
    return write_dataset(out, results + fresh, cfg, extra, info)
