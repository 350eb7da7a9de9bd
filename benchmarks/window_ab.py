"""Whole-window A/B of engine folders, interleaved in one process.

    .venv/bin/python benchmarks/window_ab.py [--batch 1] [--steps 200] [--backend onnx-cached-int8] \\
        [--block 1] [--corpus CORPUS] [--set section.key=value ...] [--json] [--graphs] \\
        [LABEL=]ENGINE [[LABEL=]ENGINE ...]

`mmid bench` times each row's steps together, one row after another; on a host
whose speed moves within minutes (BENCHMARKS.md) two rows timed even seconds apart
may not be comparable. Here
every engine takes one window step in turn (the bench's window scope,
``engine.bench.window_steps``: its own stream of the same content, its own source
name and face tracker), the order reversed every other round, so a change of the
host's speed falls on all of them alike. ``--block N``: N steps per turn instead
of one, so that an engine's weights stay in the CPU's caches within its turn (one
step per turn makes every engine start its step after another engine's, as no
single-engine process does) while the turns still spread the host's changes. Per engine it prints p50, mean and p95 ms per
step and windows/s, and, for the cached ONNX backend, the same for the steps whose
windows brought a transcript not seen before (the text encoder ran) and for the
others: the split that shows what a text-guided sparse model pays when a
transcript changes (it reruns its sparse stages for every frame and chunk of the
window). ``--graphs``: also, per engine, the time of each of the cached backend's
graphs per step (calls per step, items per call), which shows where two engines'
steps differ.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from engine.bench import Stream, open_engine, summarise, window_steps  # noqa: E402
from engine.config import load_config  # noqa: E402


def text_misses(engine) -> int | None:
    """Transcripts the engine's text encoder has run on so far (cached backends), else None."""
    stats = getattr(engine.backend, "stats", None)
    return stats()["text"]["misses"] if stats is not None else None


class TimedSession:
    """An ONNX Runtime session whose ``run`` calls add their time and item count (the first
    feed's leading dimension) to ``totals[name]`` = [seconds, calls, items]."""

    def __init__(self, name: str, session, totals: dict[str, list]):
        self.name, self.session, self.totals = name, session, totals

    def run(self, outputs, feeds):
        start = time.perf_counter()
        result = self.session.run(outputs, feeds)
        total = self.totals.setdefault(self.name, [0.0, 0, 0])
        total[0] += time.perf_counter() - start
        total[1] += 1
        total[2] += len(next(iter(feeds.values())))
        return result

    def __getattr__(self, attr: str):
        return getattr(self.session, attr)


def time_graphs(engine) -> dict[str, list] | None:
    """Wrap the cached backend's graph sessions in ``TimedSession``s -> their totals (None for
    another backend)."""
    sessions = getattr(engine.backend, "sessions", None)
    if not isinstance(sessions, dict):
        return None
    totals: dict[str, list] = {}
    engine.backend.sessions = {k: TimedSession(k, v, totals) for k, v in sessions.items()}
    return totals


def summary(times_ms: list[float], batch: int) -> dict:
    """``engine.bench.summarise`` (p50, p95, windows/s) plus the step count and mean."""
    if not times_ms:
        return {"steps": 0}
    return {"steps": len(times_ms), "mean_ms": round(float(np.mean(times_ms)), 2),
            **summarise([t / 1000.0 for t in times_ms], batch)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engines", nargs="+", help="engine folders, each optionally LABEL=FOLDER")
    parser.add_argument("--backend", default="onnx-cached-int8", help="as mmid bench --backends (one)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=200, help="timed steps per engine")
    parser.add_argument("--block", type=int, default=1, help="consecutive steps per engine and turn")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--corpus", type=Path, help="synthetic corpus folder for real face frames (mmid synth)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override, as for mmid (e.g. stream.face_track_steps=1)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--graphs", action="store_true", help="also each graph's time per step (cached backends)")
    args = parser.parse_args()
    cfg = load_config(overrides=args.set)
    torch.set_num_threads(args.threads)
    runs = []
    pool_s = Stream.seconds_for((args.steps + 2) * args.batch + 1) + 1.0  # nothing repeats within the run
    for spec in args.engines:
        label, _, folder = spec.rpartition("=")
        engine = open_engine(Path(folder), args.backend, args.threads, cfg.engine.feature_cache)
        stream = Stream.make(engine.feature_params, args.corpus, pool_s)
        step = window_steps(engine, stream, args.batch, cfg.stream.face_redetect_s, cfg.stream.face_track_steps,
                            source=f"ab-{len(runs)}")
        runs.append({"label": label or folder, "engine": engine, "step": step, "times": [], "new_text": []})
    for run in runs:
        run["step"]()  # warm-up
        run["graphs"] = time_graphs(run["engine"]) if args.graphs else None
    block = max(1, args.block)
    for turn in range(-(-args.steps // block)):
        for run in runs if turn % 2 == 0 else runs[::-1]:
            for _ in range(min(block, args.steps - turn * block)):
                before = text_misses(run["engine"])
                t = time.perf_counter()
                run["step"]()
                run["times"].append((time.perf_counter() - t) * 1000.0)
                after = text_misses(run["engine"])
                run["new_text"].append(None if before is None else after > before)
    for run in runs:
        rows = [("all", run["times"])]
        if run["new_text"][0] is not None:
            rows += [("new transcript", [t for t, n in zip(run["times"], run["new_text"]) if n]),
                     ("same transcript", [t for t, n in zip(run["times"], run["new_text"]) if not n])]
        for steps, times in rows:
            row = {"engine": run["label"], "backend": run["engine"].backend_name, "batch": args.batch, "steps_of": steps,
                   **summary(times, args.batch)}
            if args.json:
                print(json.dumps(row))
            elif row["steps"]:
                print(f"{row['engine']:>24s} b{args.batch} {steps:>15s} n={row['steps']:4d}  p50 {row['p50_ms']:8.2f}  "
                      f"mean {row['mean_ms']:8.2f}  p95 {row['p95_ms']:8.2f} ms  {row['windows_per_s']:7.2f} windows/s")
        for graph, (seconds, calls, items) in sorted((run["graphs"] or {}).items()):
            row = {"engine": run["label"], "batch": args.batch, "graph": graph,
                   "ms_per_step": round(seconds * 1000.0 / args.steps, 2), "calls_per_step": round(calls / args.steps, 2),
                   "items_per_call": round(items / max(calls, 1), 2)}
            if args.json:
                print(json.dumps(row))
            else:
                print(f"{row['engine']:>24s} b{args.batch} {graph:>15s} {row['ms_per_step']:8.2f} ms a step  "
                      f"{row['calls_per_step']:5.2f} calls a step  {row['items_per_call']:6.2f} items a call")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
