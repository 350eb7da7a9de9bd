"""Where a whole-window step's time goes: the bench's window scope taken apart.

    python benchmarks/window_parts.py [--backend torch-cuda-graphs] [--batches 32,128] [--steps 5] \\
        [--threads 8] [--corpus CORPUS] ENGINE [ENGINE ...]

For each engine folder (an exported engine or a run folder, as ``mmid bench --engine``
takes) and batch size it runs whole-window steps as ``mmid bench``'s window scope does
(``engine.bench.window_steps``: windows in stream order, new frames' faces tracked or
detected once), then times the parts of the same kind of step one after another on
fresh windows: the faces of the batch's new frames (the helper thread's work), the
log-mels and tokens (``Engine.collate_raw``), the face tensors (``face_batch``) and
the backend's forward. The step overlaps the faces with the log-mels and tokens, so
it takes less than the parts' sum. Prints one line per engine and batch (ms per step
and per window); ``--json``: one JSON object per line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from engine.bench import FaceCache, Stream, _sync, open_engine, window_steps  # noqa: E402
from engine.config import load_config  # noqa: E402
from engine.features import face_batch  # noqa: E402


def parts(engine, stream: Stream, batch: int, steps: int, cfg) -> dict[str, float]:
    """Median ms per step of each part and of the whole step, at ``batch`` windows."""
    device = engine.backend.device
    redetect, track = cfg.stream.face_redetect_s, cfg.stream.face_track_steps
    step = window_steps(engine, stream, batch, redetect, track)
    step()  # warm-up: shapes, graphs, caches
    times: dict[str, list[float]] = {"step": [], "faces": [], "collate": [], "face_batch": [], "forward": []}
    for _ in range(steps):
        t = time.perf_counter()
        step()
        _sync(device)
        times["step"].append(time.perf_counter() - t)
    cache = FaceCache(stream, engine.feature_params, device, redetect, track)
    first = (steps + 1) * batch + 1  # windows the steps above have not used: new frames, new audio
    cache.get(stream.window(first)[0])
    size = engine.feature_params.face_size
    blank = (np.zeros((0, size, size, 3), np.uint8), np.zeros(0, bool))
    for k in range(steps + 1):
        spans = [stream.window(first + k * batch + i) for i in range(batch)]
        t0 = time.perf_counter()
        cache.detect(i for frames, *_ in spans for i in frames)
        faces = [cache.get(frames) for frames, *_ in spans]
        t1 = time.perf_counter()
        b = engine.collate_raw([(*blank, audio, text, offset) for _, audio, text, offset in spans],
                               [f"parts-{batch}"] * batch)
        t2 = time.perf_counter()
        with engine.host_threads():
            tensors, mask = face_batch([f[0] for f in faces], [f[1] for f in faces], engine.feature_params)
        t3 = time.perf_counter()
        engine.backend.run(dataclasses.replace(b, faces=tensors, face_mask=mask))
        _sync(device)
        t4 = time.perf_counter()
        if k:  # the first round is a warm-up
            for name, dt in (("faces", t1 - t0), ("collate", t2 - t1), ("face_batch", t3 - t2), ("forward", t4 - t3)):
                times[name].append(dt)
    return {name: float(np.median(v)) * 1000.0 for name, v in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("engines", nargs="+")
    ap.add_argument("--backend", default="torch-cuda-graphs")
    ap.add_argument("--batches", default="32,128")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--corpus", type=Path)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config()
    batches = [int(b) for b in args.batches.split(",")]
    stream = None
    for path in args.engines:
        engine = open_engine(Path(path), args.backend, args.threads, cfg.engine.feature_cache)
        stream = stream or Stream.make(engine.feature_params, args.corpus,
                                       Stream.seconds_for(2 * (args.steps + 2) * max(batches)) + 1.0)
        for batch in batches:
            ms = parts(engine, stream, batch, args.steps, cfg)
            row = {"engine": str(path), "backend": args.backend, "batch": batch,
                   **{f"{k}_ms": round(v, 2) for k, v in ms.items()},
                   "windows_per_s": round(batch / ms["step"] * 1000.0, 1)}
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                print(f"{Path(path).name} {args.backend} batch {batch}: step {ms['step']:.1f} ms "
                      f"({row['windows_per_s']} windows/s); parts, ms per window: "
                      + ", ".join(f"{k} {v / batch:.3f}" for k, v in ms.items() if k != "step"), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
