"""Face-detection throughput of facenet-pytorch's MTCNN on CUDA (what bounds the
GPU window scope of `mmid bench`), for two minimum face sizes and two batch sizes,
on the bench's 224x224 face frames. Run from the repo root on a CUDA machine:

    python3 benchmarks/mtcnn_time.py
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
from engine.faces import FACE_MARGIN, FACE_SIZE  # noqa: E402

REPEATS = 5


def main() -> None:
    frames = np.stack(stream_frames(64))  # (64, 224, 224, 3) uint8
    for min_face in (20, 40):  # 20: facenet's default, the one engine/faces.py uses
        mtcnn = MTCNN(image_size=FACE_SIZE, margin=FACE_MARGIN, post_process=False, select_largest=True,
                      keep_all=False, device="cuda", min_face_size=min_face)
        for batch in (8, 64):
            x = frames[:batch]
            mtcnn.detect(x)  # warm-up
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(REPEATS):
                boxes, _ = mtcnn.detect(x)
            torch.cuda.synchronize()
            seconds = (time.perf_counter() - start) / REPEATS
            found = sum(b is not None for b in boxes)
            print(f"mtcnn cuda min_face {min_face} batch {batch}: {seconds * 1000:.1f} ms, "
                  f"{batch / seconds:.0f} frames/s, found {found}")


if __name__ == "__main__":
    main()
