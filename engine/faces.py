"""Face crops with MTCNN, shared by ``mmid prepare`` and the stream.

Detection is ``engine.face_detect.BatchedMTCNN``: facenet-pytorch's P/R/O-Net
weights in a cascade batched end to end (same boxes as ``MTCNN.detect`` to float
rounding, several times faster on a GPU).

``crop_faces`` takes RGB frames and returns one 48x48 crop per frame: the
largest detected face with a margin (the facenet-pytorch margin rule), or, when
no face is found, a fallback: the centre square of the frame resized to 48x48.
Resizing is torch ``area`` interpolation rounded to uint8 in both cases.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from engine.face_detect import load_detector

FACE_SIZE = 48  # pixels, side of the square crop (the paper's 48x48)
FACE_MARGIN = 2  # pixels of margin in the final crop (facenet-pytorch convention)
DETECT_BATCH = 64  # frames per detector call when frames share a size ...
DETECT_PIXELS = 8_000_000  # ... and at most this many pixels (bounds the integral images' memory)


def _resize(region: np.ndarray, size: int) -> np.ndarray:
    """uint8 (h, w, 3) -> uint8 (size, size, 3) by area interpolation."""
    x = torch.from_numpy(np.ascontiguousarray(region)).permute(2, 0, 1).unsqueeze(0).float()
    y = F.interpolate(x, size=(size, size), mode="area")
    return y.squeeze(0).permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def crop_box(frame: np.ndarray, box: np.ndarray, size: int = FACE_SIZE, margin: int = FACE_MARGIN) -> np.ndarray:
    """Crop box (x1, y1, x2, y2) plus margin (in output pixels) and resize to size x size."""
    h, w = frame.shape[:2]
    mx = margin * (box[2] - box[0]) / (size - margin)
    my = margin * (box[3] - box[1]) / (size - margin)
    x1, y1 = int(max(box[0] - mx / 2, 0)), int(max(box[1] - my / 2, 0))
    x2, y2 = int(min(box[2] + mx / 2, w)), int(min(box[3] + my / 2, h))
    if x2 <= x1 or y2 <= y1:
        return centre_crop(frame, size)
    return _resize(frame[y1:y2, x1:x2], size)


def centre_crop(frame: np.ndarray, size: int = FACE_SIZE) -> np.ndarray:
    """The fallback crop: the centre square of the frame resized to size x size."""
    h, w = frame.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return _resize(frame[top : top + s, left : left + s], size)


def _detect(frames: list[np.ndarray], device: str) -> list[np.ndarray | None]:
    """Largest face box per frame; one detector call per run of same-sized frames."""
    detector = load_detector(device)
    out: list[np.ndarray | None] = []
    i = 0
    while i < len(frames):
        j = i + 1
        most = max(1, min(DETECT_BATCH, DETECT_PIXELS // (frames[i].shape[0] * frames[i].shape[1])))
        while j < len(frames) and j - i < most and frames[j].shape == frames[i].shape:
            j += 1
        boxes = detector.largest_boxes(torch.from_numpy(np.stack(frames[i:j]))).numpy()  # (j-i, 4)
        out.extend(None if np.isnan(b).any() else b for b in boxes)
        i = j
    return out


def crop_faces(
    frames: Sequence[np.ndarray], size: int = FACE_SIZE, margin: int = FACE_MARGIN, device: str = "cpu"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RGB uint8 frames (H, W, 3) -> (crops uint8 (F, size, size, 3), found bool (F,),
    boxes float32 (F, 4) with NaN where no face was found). ``device``: where detection runs."""
    frames = [np.ascontiguousarray(f, dtype=np.uint8) for f in frames]
    crops = np.zeros((len(frames), size, size, 3), dtype=np.uint8)
    found = np.zeros(len(frames), dtype=bool)
    boxes = np.full((len(frames), 4), np.nan, dtype=np.float32)
    if not frames:
        return crops, found, boxes
    for k, (frame, box) in enumerate(zip(frames, _detect(frames, device))):
        if box is None:
            crops[k] = centre_crop(frame, size)
        else:
            crops[k], found[k], boxes[k] = crop_box(frame, box, size, margin), True, box
    return crops, found, boxes
