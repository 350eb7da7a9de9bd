"""Face-detection throughput: facenet-pytorch's ``MTCNN.detect`` against our batched
cascade (``engine.face_detect.BatchedMTCNN``, the same networks and weights), on the
bench's 224x224 face frames, at several batch sizes, with the largest boxes of the
two compared. Run from the repo root (``cuda`` by default, or ``cpu``):

    python3 benchmarks/mtcnn_time.py [cuda|cpu]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from facenet_pytorch import MTCNN

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine.bench import stream_frames  # noqa: E402
from engine.face_detect import BatchedMTCNN  # noqa: E402

REPEATS = 5
BATCHES = (8, 64, 256)


def timed(fn, device: str) -> float:
    fn()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(REPEATS):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / REPEATS


def largest(boxes) -> np.ndarray:
    if boxes is None or len(boxes) == 0:
        return np.full(4, np.nan, np.float32)
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    return b[np.argmax((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))]


def main(device: str) -> None:
    frames = np.stack(stream_frames(max(BATCHES)))  # (256, 224, 224, 3) uint8
    facenet = MTCNN(post_process=False, select_largest=True, keep_all=False, device=device)
    ours = BatchedMTCNN(device)
    for batch in BATCHES:
        x = frames[:batch]
        t_ref = timed(lambda: facenet.detect(x), device)
        t_new = timed(lambda: ours.largest_boxes(torch.from_numpy(x)), device)
        ref = np.stack([largest(b) for b in facenet.detect(x)[0]])
        new = ours.largest_boxes(torch.from_numpy(x)).numpy()
        same = np.isnan(ref).any(1) == np.isnan(new).any(1)
        both = ~np.isnan(ref).any(1) & ~np.isnan(new).any(1)
        diff = float(np.abs(ref[both] - new[both]).max()) if both.any() else float("nan")
        print(f"{device} batch {batch}: facenet {t_ref * 1000:.1f} ms ({batch / t_ref:.0f} frames/s), "
              f"batched {t_new * 1000:.1f} ms ({batch / t_new:.0f} frames/s); faces found {int(both.sum())}/{batch}, "
              f"same found/not-found {int(same.sum())}/{batch}, largest-box max diff {diff:.4f} px")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "cuda")
