"""Face crops with MTCNN, shared by ``mmid prepare`` and the stream.

Detection is ``engine.face_detect.BatchedMTCNN``: facenet-pytorch's P/R/O-Net
weights in a cascade batched end to end (same boxes as ``MTCNN.detect`` to float
rounding, several times faster on a GPU).

``crop_faces`` takes RGB frames and returns one 48x48 crop per frame: the
largest detected face with a margin (the facenet-pytorch margin rule), or, when
no face is found, a fallback: the centre square of the frame resized to 48x48.
Resizing is area interpolation (the bins of torch's ``F.interpolate(mode="area")``)
rounded to uint8 in both cases, for all frames of a call in one gather from the
integral image that detection uses, on the detector's device.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from engine.face_detect import area_crops, integral_image, load_detector

FACE_SIZE = 48  # pixels, side of the square crop (the paper's 48x48)
FACE_MARGIN = 2  # pixels of margin in the final crop (facenet-pytorch convention)
DETECT_BATCH = 64  # frames per detector call when frames share a size ...
DETECT_PIXELS = 8_000_000  # ... and at most this many pixels (bounds the integral images' memory)
# On a CUDA GPU larger calls: the batched cascade's per-call cost is mostly fixed (H200, 224x224
# frames: 26.6 ms for 64 frames, 61 ms for 256), and its memory (the integral images, 12 bytes a
# pixel, and P-Net's first maps) is no concern at these sizes.
DETECT_BATCH_CUDA = 256
DETECT_PIXELS_CUDA = 16_000_000


def crop_region(box: np.ndarray, h: int, w: int, size: int = FACE_SIZE, margin: int = FACE_MARGIN
                ) -> tuple[int, int, int, int]:
    """Rows [y0, y1) and columns [x0, x1) of the crop of box (x1, y1, x2, y2) plus
    ``margin`` output pixels (facenet-pytorch's rule); the centre square when that is empty."""
    mx = margin * (box[2] - box[0]) / (size - margin)
    my = margin * (box[3] - box[1]) / (size - margin)
    x0, y0 = int(max(box[0] - mx / 2, 0)), int(max(box[1] - my / 2, 0))
    x1, y1 = int(min(box[2] + mx / 2, w)), int(min(box[3] + my / 2, h))
    if x1 <= x0 or y1 <= y0:
        return centre_region(h, w)
    return y0, y1, x0, x1


def centre_region(h: int, w: int) -> tuple[int, int, int, int]:
    """The fallback crop: the centre square of an h x w frame."""
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return top, top + s, left, left + s


def _groups(frames: list[np.ndarray], device: str | torch.device = "cpu") -> list[tuple[int, int]]:
    """[start, stop) runs of same-sized frames, each within the batch and pixel limits of
    ``device`` (larger on a CUDA GPU)."""
    cuda = str(device).startswith("cuda")
    batch, pixels = (DETECT_BATCH_CUDA, DETECT_PIXELS_CUDA) if cuda else (DETECT_BATCH, DETECT_PIXELS)
    runs, i = [], 0
    while i < len(frames):
        most = max(1, min(batch, pixels // (frames[i].shape[0] * frames[i].shape[1])))
        j = i + 1
        while j < len(frames) and j - i < most and frames[j].shape == frames[i].shape:
            j += 1
        runs.append((i, j))
        i = j
    return runs


def crop_faces(
    frames: Sequence[np.ndarray], size: int = FACE_SIZE, margin: int = FACE_MARGIN, device: str = "cpu",
    min_face: float | None = None, threads: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RGB uint8 frames (H, W, 3) -> (crops uint8 (F, size, size, 3), found bool (F,),
    boxes float32 (F, 4) with NaN where no face was found). ``device``: where detection
    and resampling run; ``min_face``: smallest face searched for in pixels (default
    MTCNN's 20); ``threads``: the detector's CPU threads (0: torch's)."""
    frames = [np.ascontiguousarray(f, dtype=np.uint8) for f in frames]
    crops = np.zeros((len(frames), size, size, 3), dtype=np.uint8)
    boxes = np.full((len(frames), 4), np.nan, dtype=np.float32)
    detector = load_detector(str(device), threads)
    for i, j in _groups(frames, detector.device):
        x = torch.from_numpy(np.stack(frames[i:j])).to(detector.device)  # (n, H, W, 3)
        table = integral_image(x)  # (n, 3, H+1, W+1)
        boxes[i:j] = detector.largest_boxes(x, table, min_face).numpy()  # (n, 4)
        crops[i:j] = crops_of_boxes(table, boxes[i:j], size, margin)
    return crops, ~np.isnan(boxes).any(axis=1), boxes


def crops_of_boxes(table: torch.Tensor, boxes: np.ndarray, size: int = FACE_SIZE, margin: int = FACE_MARGIN
                   ) -> np.ndarray:
    """Crops uint8 (n, size, size, 3) of same-sized frames given their ``integral_image``
    (n, 3, H+1, W+1) and face boxes (n, 4), NaN rows taking the centre-square fallback."""
    h, w = table.shape[2] - 1, table.shape[3] - 1
    hit = ~np.isnan(boxes).any(axis=1)
    regions = [crop_region(b, h, w, size, margin) if ok else centre_region(h, w) for b, ok in zip(boxes, hit)]
    y0, y1, x0, x1 = (torch.tensor(v, device=table.device) for v in zip(*regions))
    image = torch.arange(len(boxes), device=table.device)
    pixels = area_crops(table, image, y0, y1, x0, x1, size)  # (n, 3, size, size) float
    return pixels.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
