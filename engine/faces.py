"""Face crops with MTCNN (facenet-pytorch), shared by ``mmid prepare`` and the stream.

``crop_faces`` takes RGB frames and returns one 48x48 crop per frame: the
largest detected face with a margin (the facenet-pytorch margin rule), or, when
no face is found, a fallback: the centre square of the frame resized to 48x48.
Resizing is torch ``area`` interpolation rounded to uint8 in both cases.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

FACE_SIZE = 48  # pixels, side of the square crop (the paper's 48x48)
FACE_MARGIN = 2  # pixels of margin in the final crop (facenet-pytorch convention)
DETECT_BATCH = 32  # frames per MTCNN call when frames share a size


@functools.lru_cache(maxsize=4)
def load_mtcnn(image_size: int = FACE_SIZE, margin: int = FACE_MARGIN, device: str = "cpu"):
    """The MTCNN detector, created once per process and device (weights ship in the wheel)."""
    try:
        from facenet_pytorch import MTCNN
    except ImportError as exc:
        raise ImportError(
            "face detection needs facenet-pytorch: pip install --no-deps facenet-pytorch==2.6.0 "
            "(see scripts/setup.sh)"
        ) from exc
    return MTCNN(
        image_size=image_size, margin=margin, post_process=False,
        select_largest=True, keep_all=False, device=device,
    )


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


def _largest(boxes) -> np.ndarray | None:
    if boxes is None:
        return None
    boxes = np.asarray(boxes).astype(np.float32).reshape(-1, 4)
    if len(boxes) == 0:
        return None
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return boxes[int(np.argmax(areas))]


def _detect(frames: list[np.ndarray], mtcnn) -> list[np.ndarray | None]:
    """Largest face box per frame; one MTCNN call per run of same-sized frames."""
    out: list[np.ndarray | None] = []
    i = 0
    while i < len(frames):
        j = i + 1
        while j < len(frames) and j - i < DETECT_BATCH and frames[j].shape == frames[i].shape:
            j += 1
        with torch.no_grad():
            boxes, _ = mtcnn.detect(np.stack(frames[i:j]))
        out.extend(_largest(b) for b in boxes)
        i = j
    return out


def crop_faces(
    frames: Sequence[np.ndarray], size: int = FACE_SIZE, margin: int = FACE_MARGIN, device: str = "cpu"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RGB uint8 frames (H, W, 3) -> (crops uint8 (F, size, size, 3), found bool (F,),
    boxes float32 (F, 4) with NaN where no face was found). ``device``: where MTCNN runs."""
    frames = [np.ascontiguousarray(f, dtype=np.uint8) for f in frames]
    crops = np.zeros((len(frames), size, size, 3), dtype=np.uint8)
    found = np.zeros(len(frames), dtype=bool)
    boxes = np.full((len(frames), 4), np.nan, dtype=np.float32)
    if not frames:
        return crops, found, boxes
    for k, (frame, box) in enumerate(zip(frames, _detect(frames, load_mtcnn(size, margin, device)))):
        if box is None:
            crops[k] = centre_crop(frame, size)
        else:
            crops[k], found[k], boxes[k] = crop_box(frame, box, size, margin), True, box
    return crops, found, boxes
