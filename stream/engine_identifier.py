"""The trained engine behind the stream's Identifier protocol.

    identifier = EngineIdentifier.from_path("ENGINE", cfg)   # engine or run folder
    results = identifier.identify(windows)                    # one WindowResult per window

Per call, every window handed over (from any sources) goes through the shared
feature code and one ``engine.identify_overlapped`` batch (faces are found in a
helper thread while the audio and text features are computed):

- faces: the window's sampled frames (one every ``feature_params.img_interval_ms``:
  `mmid stream` sets the pipeline's sampling to it through
  ``stream.identify.sampling_config``, and denser frames are thinned here) through
  ``engine.face_track.FaceTracker``: the face of a stream's previous sampled frame
  is followed by MTCNN's O-Net, the full cascade (``engine.faces.crop_faces``)
  runs on a stream's first frame, after a lost track and every
  ``[stream] face_redetect_s`` seconds; crops are cut by the same margin rule and
  centre-crop fallback as in training. Windows overlap (3 s every 1 s: each frame
  is in three windows), so crops are cached per (stream id, frame time) in a
  bounded LRU (checked against a fingerprint of the frame) and a frame is
  processed once; the frames new to a call go to the tracker together.
- audio: the window's 16 kHz mono samples; text: its transcript.

Each result carries the fused top person, the top-k, and per-modality
evidence: for "text", "audio" and "visual", whether the modality was present
and that modality's probability of the top person (null when absent), plus
the face box of the largest face in the window's frames.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from engine.config import Config
from engine.face_track import FaceTracker
from engine.faces import crop_faces
from engine.runtime import ENGINE_FILE, MODALITIES, Engine, Identification
from stream.events import ModelInfo
from stream.identify import WindowResult
from stream.windows import Window

log = logging.getLogger("stream.engine")

FACE_CACHE_FRAMES = 2048  # cached crops at most (~7 KB each at 48x48): a few hundred windows of all sources
TIME_EPS_S = 1e-3  # seconds of slack when thinning frames to the model's interval
# a window whose frames are all at least this fraction of the model's interval apart is taken as
# already sampled (the stream's decoder keeps the first frame at or after each interval slot, so
# at 25 fps its frames are 0.48 or 0.52 s apart); closer frames are thinned on a fixed time grid
SAMPLED_GAP = 0.75

FaceEntry = tuple[np.ndarray, bool, np.ndarray]  # crop uint8 (S, S, 3), face found, box float32 (4,) or NaN
FINGERPRINT_STEP = 16  # pixels between the samples that fingerprint a cached frame


def fingerprint(frame: np.ndarray) -> bytes:
    """A cheap digest of a frame: tells a cached frame from another one at the same key
    (a stream id reused by a later run in the same process)."""
    return hashlib.blake2b(np.ascontiguousarray(frame[::FINGERPRINT_STEP, ::FINGERPRINT_STEP]).tobytes(),
                           digest_size=8).digest()


class FaceCache:
    """Bounded LRU of face crops keyed by (stream id, frame time in stream seconds),
    checked against the frame's fingerprint."""

    def __init__(self, max_frames: int = FACE_CACHE_FRAMES):
        if max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames}")
        self.max_frames = max_frames
        self.detected = 0  # frames run through face detection or tracking (engine.face_track)
        self.hits = 0  # frames served from the cache
        self._entries: OrderedDict[tuple[str, float], tuple[bytes, FaceEntry]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple[str, float], frame: np.ndarray) -> FaceEntry | None:
        item = self._entries.get(key)
        if item is None or item[0] != fingerprint(frame):
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return item[1]

    def put(self, key: tuple[str, float], frame: np.ndarray, entry: FaceEntry) -> None:
        self._entries[key] = (fingerprint(frame), entry)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_frames:
            self._entries.popitem(last=False)


def model_info(engine: Engine, path: str | Path | None = None) -> ModelInfo:
    """Name (architecture), version (hash of the folder's metadata) and backend."""
    version = "unversioned"
    if path is not None:
        meta = next((Path(path) / f for f in (ENGINE_FILE, "model.json") if (Path(path) / f).exists()), None)
        if meta is not None:
            version = hashlib.sha1(meta.read_bytes()).hexdigest()[:12]
    return ModelInfo(name=engine.dims.name, version=version, backend=engine.backend_name)


class EngineIdentifier:
    """Identifier over an ``engine.runtime.Engine`` (any backend)."""

    def __init__(self, engine: Engine, cfg: Config, info: ModelInfo | None = None,
                 cache_frames: int = FACE_CACHE_FRAMES):
        self.engine = engine
        # MTCNN runs where the model does (a CUDA engine detects faces on the GPU too)
        self.detect_device = "cuda" if getattr(engine.backend, "device", "cpu").startswith("cuda") else "cpu"
        self.params = engine.feature_params
        self.top_k = max(1, cfg.stream.top_k)
        self.info = info or model_info(engine)
        self.img_interval_ms = self.params.img_interval_ms  # read by stream.identify.sampling_config
        self.faces = FaceCache(cache_frames)
        self.tracker = FaceTracker(self.params.face_size, self.params.face_margin, self.detect_device,
                                   redetect_s=cfg.stream.face_redetect_s, steps=cfg.stream.face_track_steps)
        self._interval_s = self.params.img_interval_ms / 1000.0
        self._warned_sparse = False

    def face_counts(self) -> dict[str, int]:
        """Sampled frames so far by how their face was found (the tracker's ``TrackStats``)."""
        stats = self.tracker.stats
        return {"full": stats.full, "tracked": stats.tracked, "refreshed": stats.refreshed, "lost": stats.lost}

    @classmethod
    def from_path(cls, path: str | Path, cfg: Config) -> "EngineIdentifier":
        """Load an engine folder (``mmid export``) or a run folder with [engine] backend and threads."""
        engine = Engine.load(path, backend=cfg.engine.backend, threads=cfg.engine.threads,
                             feature_cache=cfg.engine.feature_cache, int8=cfg.engine.int8,
                             cuda_graphs=cfg.engine.cuda_graphs, half=cfg.engine.cuda_graphs and cfg.engine.fp16)
        identifier = cls(engine, cfg, model_info(engine, path))
        identifier.warm_up()
        return identifier

    def warm_up(self) -> None:
        """Load MTCNN and run the backend once, so the first live window does not pay for it."""
        size = self.params.face_size
        frame = np.zeros((2 * size, 2 * size, 3), np.uint8)
        crops, found, _ = crop_faces([frame], size, self.params.face_margin, self.detect_device,
                                     threads=self.tracker.threads)  # the tracker's detector
        audio = np.zeros(self.params.sample_rate, np.float32)
        self.engine.identify_raw([(crops, np.ones_like(found), audio, "hello")])

    def identify(self, windows: list[Window]) -> list[WindowResult]:
        if not windows:
            return []
        faces: list[tuple[np.ndarray, np.ndarray, tuple | None]] = []

        def find_faces() -> list[tuple[np.ndarray, np.ndarray]]:  # in the engine's helper thread
            faces.extend(self._faces(windows))
            return [(crops, found) for crops, found, _ in faces]

        answers = self.engine.identify_overlapped([(w.audio, w.transcript, w.audio_offset) for w in windows],
                                                  find_faces, [w.stream_id for w in windows])
        return [self._result(a, box) for a, (_, _, box) in zip(answers, faces)]

    # -- faces ------------------------------------------------------------------
    def sampled(self, window: Window) -> list[int]:
        """Indices of the window's frames one img_interval apart (the model's sampling): all of
        them when no two are closer than SAMPLED_GAP intervals (the stream's decoder already
        thinned them, stream/ingest.py), else the first frame of each interval slot of stream
        time (slot k = [k, k + 1) intervals). Neither rule looks at where the window starts, so
        overlapping windows of a source share their sampled frames. (Keeping the next frame at
        least one interval after the last kept one, the rule before, dropped every other frame
        of a 25 fps stream, whose decoder keeps 0.0, 0.52, 1.0, ..., and let windows starting at
        different times keep different frames.)"""
        times = np.asarray(window.frame_times, dtype=np.float64)
        gaps = np.diff(times)
        if not self._warned_sparse and gaps.size and np.median(gaps) > 1.5 * self._interval_s:
            self._warned_sparse = True
            log.warning("frames arrive every %.3f s, the model was trained on one every %.3f s",
                        float(np.median(gaps)), self._interval_s)
        if not gaps.size or gaps.min() >= SAMPLED_GAP * self._interval_s:
            return list(range(len(times)))
        slots = np.floor((times + TIME_EPS_S) / self._interval_s)
        return [i for i in range(len(times)) if i == 0 or slots[i] != slots[i - 1]]

    def _faces(self, windows: list[Window]) -> list[tuple[np.ndarray, np.ndarray, tuple | None]]:
        """Per window: crops (F, S, S, 3), found (F,), largest face box; new frames detected in one call."""
        keys = [[(w.stream_id, w.frame_times[i]) for i in self.sampled(w)] for w in windows]
        known: dict[tuple[str, float], FaceEntry] = {}
        todo: dict[tuple[str, float], np.ndarray] = {}
        for w, ks in zip(windows, keys):
            by_time = dict(zip(w.frame_times, w.frames))
            for k in ks:
                if k in known or k in todo:
                    continue
                entry = self.faces.get(k, by_time[k[1]])
                if entry is None:
                    todo[k] = by_time[k[1]]
                else:
                    known[k] = entry
        if todo:
            crops, found, boxes = self.tracker.crop([(k[0], k[1], frame) for k, frame in todo.items()])
            self.faces.detected += len(todo)
            for (k, frame), c, f, b in zip(todo.items(), crops, found, boxes):
                known[k] = (c, bool(f), b)
                self.faces.put(k, frame, known[k])
        return [self._window_faces([known[k] for k in ks]) for ks in keys]

    def _window_faces(self, entries: list[FaceEntry]) -> tuple[np.ndarray, np.ndarray, tuple | None]:
        if not entries:
            size = self.params.face_size
            return np.zeros((0, size, size, 3), np.uint8), np.zeros(0, bool), None
        crops = np.stack([e[0] for e in entries])
        found = np.array([e[1] for e in entries], dtype=bool)
        return crops, found, largest_box([e[2] for e in entries if e[1]])

    # -- results ----------------------------------------------------------------
    def _result(self, a: Identification, face_box: tuple | None) -> WindowResult:
        persons = self.engine.persons
        evidence: dict[str, Any] = {}
        for m, name in enumerate(MODALITIES):
            present = bool(a.present[m])
            p = float(a.modality_probabilities[m, a.index]) if present else None
            best = int(np.argmax(a.modality_probabilities[m])) if present else None
            evidence[name] = {"present": present, "probability": p,
                              "best": persons[best] if best is not None else None}
        return WindowResult(person=a.person, confidence=float(a.confidence), top_k=tuple(a.top(persons, self.top_k)),
                            evidence=evidence, face_box=face_box)


def largest_box(boxes: list[np.ndarray]) -> tuple[float, float, float, float] | None:
    """The box (x1, y1, x2, y2) of largest area, rounded to 0.1 pixel; None when there is none."""
    if not boxes:
        return None
    areas = [(b[2] - b[0]) * (b[3] - b[1]) for b in boxes]
    b = boxes[int(np.argmax(areas))]
    return tuple(round(float(v), 1) for v in b)
