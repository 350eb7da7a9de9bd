"""Face tracking between sampled frames of a source: MTCNN's last stage on the last box.

The full MTCNN cascade (engine/face_detect.py) searches the whole frame: a P-Net
pass per pyramid scale, R-Net on every proposal, O-Net on the survivors. In a
stream the speaker's face moves little between two sampled frames (500 ms), so
``FaceTracker`` runs only the cascade's last stage for a frame whose source had a
face in its previous sampled frame: O-Net on the square around the previous
box (the input the cascade itself gives O-Net), which scores it and regresses it
onto the face where it is now; a second pass from the square of that box
brings it closer still. Two 48x48 O-Net crops per frame instead of the whole
search (``steps``, ``[stream] face_track_steps``: one pass costs less and
lands further from the cascade's box, BENCHMARKS.md).

The full cascade runs instead when there is no track to follow:
- the source's first frame, or a frame more than ``max_gap_s`` after the
  source's previous one (a reconnect, a seek) or before it;
- the previous frame had no face, or O-Net scores the tracked square below
  MTCNN's own O-Net threshold (the face left, turned away, or moved too far).

Every ``redetect_s`` seconds of stream time a followed frame is also searched
afresh, so that a new or larger face is picked up (the cascade reports the
largest face; a track keeps the face it follows) and the box cannot drift. That
search looks only for faces at least ``REFRESH_MIN_FACE`` times the followed
face's side (the pyramid's scales for smaller faces, which cost most of a
cascade, are skipped: a face that much smaller would not be the largest), and
its box replaces the followed one when it is the same face (IoU above
``SAME_FACE_IOU``) or a larger one; when it finds nothing the followed box
stays.

Tracking is for the CPU, where the cascade costs ~26 ms a frame (224x224, 2
threads) and a followed frame 4-6 ms. The tracker's networks run on one CPU
thread (``threads``): in the stream and the bench it works in a helper thread
beside the model's own (``Engine.identify_overlapped``), and its calls are too
small to gain from a second. On a GPU the batched cascade detects
thousands of frames per second in one call (BENCHMARKS.md, Whole window on the
H200), while following is one small call per frame of a source in time order, so
a tracker on a CUDA device runs the cascade on every frame.

Crops are cut from the boxes exactly as ``crop_faces`` cuts them (same margin
rule, same area resampling, same centre-square fallback). Agreement of tracked
and fully detected boxes on synthetic-corpus videos is measured by
``benchmarks/face_track_check.py`` (BENCHMARKS.md).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from engine.face_detect import MIN_FACE, THRESHOLDS, area_crop_np, normalise
from engine.faces import FACE_MARGIN, FACE_SIZE, crop_faces, crop_region, load_detector

REDETECT_S = 4.0  # stream seconds between searches of a tracked source's frame for faces as large
MAX_GAP_S = 2.0  # a frame further than this from the source's previous frame is detected afresh
MAX_SOURCES = 1024  # tracks kept at most (least recently used dropped)
STEPS = 2  # O-Net passes per tracked frame, each from the square of the last one's box
REFRESH_MIN_FACE = 0.5  # a periodic search looks for faces at least this fraction of the followed face's side
SAME_FACE_IOU = 0.3  # a found box overlapping the followed one more than this is the same face
THREADS = 1  # CPU threads of the tracker's detector


@dataclass
class Track:
    box: np.ndarray | None  # float32 (4,) x1, y1, x2, y2 of the face followed; None: no face last frame
    time: float  # stream seconds of the frame the box is from
    full_time: float  # stream seconds of the source's last detection (full, or the periodic search)


@dataclass
class TrackStats:
    full: int = 0  # frames through the full cascade
    tracked: int = 0  # frames whose face O-Net followed from the previous frame
    lost: int = 0  # tracked frames O-Net rejected (then fully detected)
    refreshed: int = 0  # followed frames also searched for faces as large (every redetect_s)
    cascade_calls: int = 0  # calls of the full cascade (each on all the frames it detects at once)


class FaceTracker:
    """``crop(items)``: face crops of (source, stream time, RGB frame) items, tracking each
    source's face between calls. ``redetect_s`` 0 turns tracking off (every frame detected,
    all of a call's frames in one cascade call), as does a CUDA ``device`` (see the module doc)."""

    def __init__(self, size: int = FACE_SIZE, margin: int = FACE_MARGIN, device: str = "cpu",
                 redetect_s: float = REDETECT_S, max_gap_s: float = MAX_GAP_S, max_sources: int = MAX_SOURCES,
                 steps: int = STEPS, threads: int = THREADS):
        if steps < 1:
            raise ValueError(f"FaceTracker steps={steps}: at least one O-Net pass per followed frame")
        self.size, self.margin, self.device, self.steps, self.threads = size, margin, str(device), steps, threads
        self.redetect_s = redetect_s if torch.device(device).type == "cpu" else 0.0
        self.max_gap_s, self.max_sources = max_gap_s, max_sources
        self.tracks: OrderedDict[str, Track] = OrderedDict()
        self.stats = TrackStats()

    def crop(self, items: Sequence[tuple[str, float, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """[(source, time s, uint8 (H, W, 3)), ...] -> crops uint8 (F, size, size, 3), found bool (F,),
        boxes float32 (F, 4) (NaN where no face), in the order given. A source's frames are
        taken in time order; the k-th frames of all sources go together, one batch per step."""
        n = len(items)
        crops = np.zeros((n, self.size, self.size, 3), np.uint8)
        boxes = np.full((n, 4), np.nan, np.float32)
        by_source: dict[str, list[int]] = {}
        order = sorted(range(n), key=lambda i: items[i][1])
        if self.redetect_s <= 0:  # no tracking: no frame depends on another, so one cascade call for all
            self._detect([items[i] for i in order], crops, boxes, order)
            return crops, ~np.isnan(boxes).any(axis=1), boxes
        for i in order:
            by_source.setdefault(items[i][0], []).append(i)
        for rank in range(max((len(v) for v in by_source.values()), default=0)):
            step = [v[rank] for v in by_source.values() if rank < len(v)]
            self._step([items[i] for i in step], crops, boxes, step)
        return crops, ~np.isnan(boxes).any(axis=1), boxes

    def _step(self, items: list[tuple[str, float, np.ndarray]], crops: np.ndarray, boxes: np.ndarray,
              where: list[int]) -> None:
        """One frame per source: follow what can be followed (searching afresh for faces as
        large where ``redetect_s`` has passed), detect the rest in one cascade call."""
        follow = [k for k, (source, t, _) in enumerate(items) if self._followable(source, t)]
        full = sorted(set(range(len(items))) - set(follow))
        if follow:
            got, cut = self._follow([items[k][2] for k in follow], [self.tracks[items[k][0]].box for k in follow])
            for k, box, crop in zip(follow, got, cut):
                source, t, frame = items[k]
                if np.isnan(box).any():  # lost: the full cascade below
                    full.append(k)
                    self.stats.lost += 1
                    continue
                refresh = t - self.tracks[source].full_time >= self.redetect_s
                if refresh:
                    box, crop = self._refresh(frame, box, crop)
                    self.stats.refreshed += 1
                else:
                    self.stats.tracked += 1
                boxes[where[k]], crops[where[k]] = box, crop
                self._remember(source, t, box, full=refresh)
        if full:
            self._detect([items[k] for k in full], crops, boxes, [where[k] for k in full])

    def _detect(self, items: list[tuple[str, float, np.ndarray]], crops: np.ndarray, boxes: np.ndarray,
                where: list[int]) -> None:
        """The full cascade on every item's frame in one call (items of a source in time order)."""
        c, _, b = crop_faces([frame for _, _, frame in items], self.size, self.margin, self.device, threads=self.threads)
        self.stats.full += len(items)
        self.stats.cascade_calls += 1
        for (source, t, _), w, crop, box in zip(items, where, c, b):
            boxes[w], crops[w] = box, crop
            self._remember(source, t, None if np.isnan(box).any() else box, full=True)

    def _followable(self, source: str, t: float) -> bool:
        track = self.tracks.get(source)
        return (self.redetect_s > 0 and track is not None and track.box is not None
                and track.time < t <= track.time + self.max_gap_s)

    def _refresh(self, frame: np.ndarray, box: np.ndarray, crop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The cascade on ``frame`` for faces at least REFRESH_MIN_FACE of the followed ``box``'s
        side: its box and crop when it is the same face or a larger one, else ``box``, ``crop``."""
        side = float(min(box[2] - box[0], box[3] - box[1]))
        c, found, b = crop_faces([frame], self.size, self.margin, self.device,
                                 min_face=max(MIN_FACE, REFRESH_MIN_FACE * side), threads=self.threads)
        if found[0] and (_area(b[0]) >= _area(box) or _iou(b[0], box) > SAME_FACE_IOU):
            return b[0], c[0]
        return box, crop

    def _follow(self, frames: list[np.ndarray], previous: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """O-Net from the square around each previous box, ``steps`` times -> new boxes float32
        (n, 4), NaN where O-Net scores the last square below its threshold, and their crops
        uint8 (n, size, size, 3) (rows of lost faces unset). The cascade's box rules and crops
        (``square``, ``clip_box``, ``regress``, ``area_crops``, ``crops_of_boxes``) in NumPy, on
        each frame's few regions: the same numbers, without the whole frame's integral image."""
        n = len(frames)
        crops = np.zeros((n, self.size, self.size, 3), np.uint8)
        detector = load_detector(self.device, self.threads)
        box = np.stack(previous).astype(np.float32)  # (n, 4)
        for _ in range(self.steps):
            start = _square(box)  # what the cascade hands O-Net: a square box
            net_in = np.stack([area_crop_np(frame, *_clip_box(b, frame.shape[1], frame.shape[0]), 48)
                               for frame, b in zip(frames, start)])  # (n, 3, 48, 48)
            reg, _, prob = (o.cpu().numpy() for o in detector.onet(torch.from_numpy(normalise(net_in))))
            box = _regress(start, reg)
        ok = (prob[:, 1] > THRESHOLDS[2]) & (box[:, 2] > box[:, 0]) & (box[:, 3] > box[:, 1])
        box[~ok] = np.nan
        for i in np.flatnonzero(ok):
            h, w = frames[i].shape[:2]
            pixels = area_crop_np(frames[i], *crop_region(box[i], h, w, self.size, self.margin), self.size)
            crops[i] = np.clip(np.round(pixels), 0, 255).astype(np.uint8).transpose(1, 2, 0)
        return box, crops

    def _remember(self, source: str, t: float, box: np.ndarray | None, full: bool) -> None:
        old = self.tracks.get(source)
        self.tracks[source] = Track(box=None if box is None else np.asarray(box, np.float32).copy(), time=t,
                                    full_time=t if full or old is None else old.full_time)
        self.tracks.move_to_end(source)
        while len(self.tracks) > self.max_sources:
            self.tracks.popitem(last=False)


# face_detect's box rules (square, regress, clip_box) on float32 NumPy arrays (n, 4) x1, y1, x2, y2,
# operation for operation (tests/test_face_track.py compares them)


def _square(boxes: np.ndarray) -> np.ndarray:
    wh = boxes[:, 2:4] - boxes[:, 0:2]
    side = wh.max(axis=1, keepdims=True)
    top_left = boxes[:, 0:2] + wh * 0.5 - side * 0.5
    return np.concatenate([top_left, top_left + side], axis=1)


def _regress(boxes: np.ndarray, reg: np.ndarray) -> np.ndarray:
    size = np.tile(boxes[:, 2:4] - boxes[:, 0:2] + 1, (1, 2))
    return boxes + reg * size


def _clip_box(box: np.ndarray, w: int, h: int) -> tuple[int, int, int, int]:
    """One box's y0, y1, x0, x1 as ``clip_box``."""
    x1_, y1_, x2_, y2_ = (int(v) for v in np.trunc(box))
    x0, y0 = min(max(x1_, 1), w) - 1, min(max(y1_, 1), h) - 1
    return y0, max(min(y2_, h), y0 + 1), x0, max(min(x2_, w), x0 + 1)


def _area(box: np.ndarray) -> float:
    return float(max(box[2] - box[0], 0.0) * max(box[3] - box[1], 0.0))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boxes x1, y1, x2, y2."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = float(max(w, 0.0) * max(h, 0.0))
    union = _area(a) + _area(b) - inter
    return inter / union if union > 0 else 0.0
