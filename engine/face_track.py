"""Face tracking between sampled frames of a source: MTCNN's last stage on the last box.

The full MTCNN cascade (engine/face_detect.py) searches the whole frame: a P-Net
pass per pyramid scale, R-Net on every proposal, O-Net on the survivors. In a
stream the speaker's face moves little between two sampled frames (500 ms), so
``FaceTracker`` runs only the cascade's last stage for a frame whose source had a
face in its previous sampled frame: O-Net on the square around the previous
box (the input the cascade itself gives O-Net), which scores it and regresses it
onto the face where it is now; a second pass from the square of that box
brings it closer still. Two 48x48 O-Net crops per frame instead of the whole
search.

The full cascade runs instead when there is no track to follow:
- the source's first frame, or a frame more than ``max_gap_s`` after the
  source's previous one (a reconnect, a seek) or before it;
- the previous frame had no face, or O-Net scores the tracked square below
  MTCNN's own O-Net threshold (the face left, turned away, or moved too far);
- ``redetect_s`` seconds of stream time have passed since the source's last full
  detection, so that a new or larger face is picked up (the cascade reports the
  largest face; a track keeps the face it follows).

Tracking is for the CPU, where the cascade costs ~26 ms a frame (224x224, 2
threads) and a followed frame 5-7 ms. On a GPU the batched cascade detects
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

from engine.face_detect import THRESHOLDS, area_crops, clip_box, integral_image, normalise, regress, square
from engine.faces import FACE_MARGIN, FACE_SIZE, crop_faces, crops_of_boxes, load_detector

REDETECT_S = 4.0  # stream seconds between full detections of a tracked source
MAX_GAP_S = 2.0  # a frame further than this from the source's previous frame is detected afresh
MAX_SOURCES = 1024  # tracks kept at most (least recently used dropped)
STEPS = 2  # O-Net passes per tracked frame, each from the square of the last one's box


@dataclass
class Track:
    box: np.ndarray | None  # float32 (4,) x1, y1, x2, y2 of the face followed; None: no face last frame
    time: float  # stream seconds of the frame the box is from
    full_time: float  # stream seconds of the source's last full detection


@dataclass
class TrackStats:
    full: int = 0  # frames through the full cascade
    tracked: int = 0  # frames whose face O-Net followed from the previous frame
    lost: int = 0  # tracked frames O-Net rejected (then fully detected)


class FaceTracker:
    """``crop(items)``: face crops of (source, stream time, RGB frame) items, tracking each
    source's face between calls. ``redetect_s`` 0 turns tracking off (every frame detected),
    as does a CUDA ``device`` (see the module doc)."""

    def __init__(self, size: int = FACE_SIZE, margin: int = FACE_MARGIN, device: str = "cpu",
                 redetect_s: float = REDETECT_S, max_gap_s: float = MAX_GAP_S, max_sources: int = MAX_SOURCES,
                 steps: int = STEPS):
        self.size, self.margin, self.device, self.steps = size, margin, str(device), steps
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
        for i in sorted(range(n), key=lambda i: items[i][1]):
            by_source.setdefault(items[i][0], []).append(i)
        for rank in range(max((len(v) for v in by_source.values()), default=0)):
            step = [v[rank] for v in by_source.values() if rank < len(v)]
            self._step([items[i] for i in step], crops, boxes, step)
        return crops, ~np.isnan(boxes).any(axis=1), boxes

    def _step(self, items: list[tuple[str, float, np.ndarray]], crops: np.ndarray, boxes: np.ndarray,
              where: list[int]) -> None:
        """One frame per source: follow what can be followed, detect the rest in one cascade call."""
        follow = [k for k, (source, t, _) in enumerate(items) if self._followable(source, t)]
        full = sorted(set(range(len(items))) - set(follow))
        if follow:
            got, cut = self._follow([items[k][2] for k in follow], [self.tracks[items[k][0]].box for k in follow])
            for k, box, crop in zip(follow, got, cut):
                if np.isnan(box).any():  # lost: the full cascade below
                    full.append(k)
                    self.stats.lost += 1
                    continue
                boxes[where[k]], crops[where[k]] = box, crop
                self._remember(items[k][0], items[k][1], box, full=False)
                self.stats.tracked += 1
        if full:
            c, _, b = crop_faces([items[k][2] for k in full], self.size, self.margin, self.device)
            self.stats.full += len(full)
            for k, crop, box in zip(full, c, b):
                boxes[where[k]], crops[where[k]] = box, crop
                self._remember(items[k][0], items[k][1], None if np.isnan(box).any() else box, full=True)

    def _followable(self, source: str, t: float) -> bool:
        track = self.tracks.get(source)
        return (self.redetect_s > 0 and track is not None and track.box is not None
                and track.time < t <= track.time + self.max_gap_s and t - track.full_time < self.redetect_s)

    def _follow(self, frames: list[np.ndarray], previous: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """O-Net from the square around each previous box, ``steps`` times -> new boxes float32
        (n, 4), NaN where O-Net scores the last square below its threshold, and their crops
        uint8 (n, size, size, 3) (rows of lost faces unset)."""
        boxes = np.full((len(frames), 4), np.nan, np.float32)
        crops = np.zeros((len(frames), self.size, self.size, 3), np.uint8)
        detector = load_detector(self.device)
        for group in _same_size(list(range(len(frames))), frames):
            x = torch.from_numpy(np.stack([frames[j] for j in group])).to(detector.device)  # (n, H, W, 3)
            h, w = x.shape[1:3]
            table = integral_image(x)  # (n, 3, H+1, W+1)
            box = torch.from_numpy(np.stack([previous[j] for j in group])).to(detector.device)  # (n, 4)
            image = torch.arange(len(group), device=detector.device)
            for _ in range(self.steps):
                start = square(box)  # what the cascade hands O-Net: a square box
                net_in = normalise(area_crops(table, image, *clip_box(start, w, h), 48))  # (n, 3, 48, 48)
                reg, _, prob = detector.onet(net_in)
                box = regress(start, reg.to(start.device))
            got = box.cpu().numpy()
            ok = (prob[:, 1] > THRESHOLDS[2]).cpu().numpy() & (got[:, 2] > got[:, 0]) & (got[:, 3] > got[:, 1])
            got[~ok] = np.nan
            boxes[group] = got
            crops[group] = crops_of_boxes(table, got, self.size, self.margin)
        return boxes, crops

    def _remember(self, source: str, t: float, box: np.ndarray | None, full: bool) -> None:
        old = self.tracks.get(source)
        self.tracks[source] = Track(box=None if box is None else np.asarray(box, np.float32).copy(), time=t,
                                    full_time=t if full or old is None else old.full_time)
        self.tracks.move_to_end(source)
        while len(self.tracks) > self.max_sources:
            self.tracks.popitem(last=False)


def _same_size(indices: list[int], frames: Sequence[np.ndarray]) -> list[list[int]]:
    """``indices`` grouped by the shape of ``frames[i]`` (one batched call per group)."""
    groups: dict[tuple, list[int]] = {}
    for i in indices:
        groups.setdefault(frames[i].shape, []).append(i)
    return list(groups.values())
