"""Stream benchmark: real-time factor, event latency and concurrent streams on this machine.

    .venv/bin/python benchmarks/stream_bench.py [--seconds 60] [--streams 1 2 3] [--backend onnx]
        [--model mme2e|mme2e_sparse] [--write]

The stream: a conversation cut from the synthetic corpus (stream/clips.py, several
tiny-corpus dialogs one after the other, the speaker's half letterboxed to 640x360,
25 fps H.264 + AAC), read as a file source. The engine: the ``default`` preset
(dense MME2E, MiniLM-sized text encoder) with random weights, exported to ONNX
(engine/bench.py's random_engine), on [engine] threads; real faster-whisper tiny.en
with VAD (int8); faces on every sampled frame (500 ms) by the stream's tracker (O-Net
follows the last face, the full MTCNN cascade every [stream] face_redetect_s); a real Redis on loopback.
Everything runs in one process, as `mmid stream` does.

Two measurements:
- real-time factor: the clip read as fast as possible (nothing dropped: the queue is
  unbounded for this run), wall time / stream time, with where the time goes
  (ASR, face detection, model) per stream second;
- live: N sources of the clip at real-time pace in one process (N = 1, 2, 3), event
  latency (window end -> event published) p50/p95, dropped windows. A count of
  streams runs in real time when nothing is dropped and latency p95 <= 1.5 s.

--write replaces the "## Stream" section of BENCHMARKS.md with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from engine.config import load_config, replace  # noqa: E402
from stream.events import EVENTS_STREAM  # noqa: E402

CACHE = REPO / ".mmid-cache" / "stream_bench"
SIZE = (640, 360)  # pixels of the benchmark stream
FPS = 25
TARGET_RTF = 0.5
TARGET_P95_S = 1.5
SECTION = "## Stream"


# -- inputs -------------------------------------------------------------------------


def make_clip(seconds: float) -> tuple[Path, float]:
    """The 640x360 25 fps conversation clip (cached) and its duration in seconds."""
    from stream.clips import conversations_clip

    clip = CACHE / f"conversation_{int(seconds)}s.mp4"
    meta = clip.with_suffix(".json")
    if not meta.exists():
        corpus = CACHE / "corpus"
        if not (corpus / "persons.json").exists():
            from training.synth import generate

            generate(corpus, seed=0, size="tiny", workers=0, progress=False)
        dialogs = sorted(json.loads((corpus / "persons.json").read_text())["dialogs"])
        timeline = conversations_clip(corpus, dialogs, clip, fps=FPS, size=SIZE, max_s=seconds)
        meta.write_text(json.dumps({"timeline": timeline}))
    return clip, json.loads(meta.read_text())["timeline"][-1][1]


def make_engine(model: str = "mme2e") -> tuple[Path, float]:
    """The random-weight default-preset engine folder of ``model`` (cached) and the export time
    (0 if cached)."""
    from engine.bench import random_engine

    out = CACHE / f"engine_default_{model}"
    t0 = time.perf_counter()
    cached = (out / "engine.json").exists()
    random_engine("default", model, out, int8=False)
    return out, 0.0 if cached else time.perf_counter() - t0


# -- profiling ------------------------------------------------------------------------


class Stopwatch:
    """Seconds spent in wrapped callables, by name (summed over threads)."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - t0
                self.calls[name] += 1

        return timed

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


def profiled_parts(engine_dir: Path, cfg, watch: Stopwatch):
    from stream.engine_identifier import EngineIdentifier
    from stream.speech import load_transcriber

    identifier = EngineIdentifier.from_path(engine_dir, cfg)
    identifier._faces = watch.wrap("faces (tracking or MTCNN + crop)", identifier._faces)
    # the engine call finds the faces in a helper thread meanwhile (Engine.identify_overlapped):
    # its wall time includes whatever of the face work it waited for
    identifier.engine.identify_overlapped = watch.wrap("model call (features + ONNX, faces overlapped)",
                                                       identifier.engine.identify_overlapped)
    transcriber = load_transcriber(cfg.stream.asr_model, cfg.stream.asr_compute_type)
    return identifier, watch.wrap("asr (tiny.en + VAD)", transcriber)


# -- runs -------------------------------------------------------------------------------


def run_streams(n: int, paced: bool, clip: Path, identifier, transcriber, redis_url: str, tag: str,
                base_cfg) -> dict:
    from stream.identify import sampling_config
    from stream.ingest import parse_source
    from stream.metrics import Metrics
    from stream.pipeline import Pipeline
    from stream.publish import Publisher
    from stream.spool import Spool

    spool = tempfile.mkdtemp(prefix="mmid-bench-spool-")
    stream = {"realtime": paced, "spool_dir": spool}
    if not paced:
        stream["queue_windows"] = 1_000_000  # as fast as possible: measure, never drop
    cfg = sampling_config(replace(base_cfg, stream=stream), identifier)
    ids = [f"{tag}-{i}" for i in range(n)]
    sources = [parse_source(str(clip), sid) for sid in ids]
    metrics = Metrics()
    publisher = Publisher(redis_url, cfg.stream.stream_maxlen, Spool(spool, cfg.stream.spool_max_events), metrics)
    pipeline = Pipeline(sources, identifier, publisher, cfg, metrics, transcriber)
    t0 = time.perf_counter()
    summary = pipeline.run()
    wall = time.perf_counter() - t0
    shutil.rmtree(spool, ignore_errors=True)
    events = [e for e in read_events(redis_url) if e["stream_id"] in ids]
    latency = np.array([e["latency_ms"]["total"] / 1000.0 for e in events]) if events else np.zeros(1)
    return {"streams": n, "paced": paced, "wall_s": wall, "events": len(events),
            "dropped": sum(summary["dropped"].values()), "latency_p50_s": float(np.percentile(latency, 50)),
            "latency_p95_s": float(np.percentile(latency, 95)), "latency_max_s": float(latency.max()),
            "transcripts": sum(1 for e in events if e["transcript"])}


def read_events(url: str) -> list[dict]:
    import redis

    client = redis.Redis.from_url(url)
    try:
        return [json.loads(f[b"data"]) for _, f in client.xrange(EVENTS_STREAM)]
    finally:
        client.close()


# -- report ------------------------------------------------------------------------------


def measure(args) -> dict:
    from stream.servers import RedisServer

    clip, clip_s = make_clip(args.seconds)
    engine_dir, export_s = make_engine(args.model)
    base = replace(load_config(), engine={"backend": args.backend, "threads": args.threads},
                   stream={"asr_model": "tiny.en", "metrics_port": 0})
    watch = Stopwatch()
    identifier, transcriber = profiled_parts(engine_dir, base, watch)
    report = {"clip_s": clip_s, "export_s": export_s, "backend": identifier.info.backend,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "threads": args.threads,
              "face_redetect_s": base.stream.face_redetect_s, "model": args.model}
    with RedisServer() as redis_server:
        run_streams(1, False, clip, identifier, transcriber, redis_server.url, "warmup", base)  # loads, warms caches
        watch.reset()
        fast = run_streams(1, False, clip, identifier, transcriber, redis_server.url, "fast", base)
        fast["rtf"] = fast["wall_s"] / clip_s
        fast["profile_s_per_stream_s"] = {k: v / clip_s for k, v in watch.seconds.items()}
        fast["calls"] = dict(watch.calls)
        report["fast"] = fast
        print(json.dumps(fast), flush=True)
        report["live"] = []
        for n in args.streams:
            watch.reset()
            live = run_streams(n, True, clip, identifier, transcriber, redis_server.url, f"live{n}", base)
            live["busy_fraction"] = sum(watch.seconds.values()) / live["wall_s"]
            live["realtime"] = live["dropped"] == 0 and live["latency_p95_s"] <= TARGET_P95_S
            report["live"].append(live)
            print(json.dumps(live), flush=True)
    return report


def markdown(r: dict) -> str:
    fast = r["fast"]
    one = next((x for x in r["live"] if x["streams"] == 1), r["live"][0])
    ok = [x["streams"] for x in r["live"] if x["realtime"]]
    lines = [
        SECTION, "",
        f"`benchmarks/stream_bench.py` on {r['machine']} (CPU, no GPU); stream: {r['clip_s']:.1f} s conversation "
        f"cut from the synthetic corpus, 640x360, 25 fps H.264 + AAC, file source; engine: `default` preset "
        f"{'sparse MME2E' if r.get('model') == 'mme2e_sparse' else 'MME2E'}, "
        f"random weights, backend `{r['backend']}` ({r['threads'] or 'all'} threads); real faster-whisper tiny.en "
        f"int8 + VAD; faces on each sampled frame (500 ms), tracked by O-Net with a full MTCNN detection every "
        f"{r.get('face_redetect_s', 4.0):g} s; 3 s windows every 1 s; real Redis on loopback.",
        "",
        "| measure | value | target |", "|---|---|---|",
        f"| real-time factor, 1 stream (wall / stream time, read as fast as possible) | {fast['rtf']:.2f} | <= {TARGET_RTF} |",
        f"| event latency p50 / p95, 1 live stream (window end -> published) | {one['latency_p50_s']:.2f} s / "
        f"{one['latency_p95_s']:.2f} s | p95 <= {TARGET_P95_S} s |",
        f"| streams in real time at once (no drops, p95 <= {TARGET_P95_S} s) | {max(ok) if ok else 0} "
        f"(tried {', '.join(str(x['streams']) for x in r['live'])}) | |",
        "",
        "Where the time goes (1 stream, as fast as possible), seconds per stream second:", "",
        "| stage | s / stream s | calls |", "|---|---|---|",
    ]
    for k, v in sorted(fast["profile_s_per_stream_s"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {k} | {v:.3f} | {fast['calls'].get(k, 0)} |")
    lines += ["", "Live runs (sources at real-time pace, one process, one engine):", "",
              "| streams | events | dropped | latency p50 | p95 | max | busy fraction | real time |",
              "|---|---|---|---|---|---|---|---|"]
    for x in r["live"]:
        lines.append(f"| {x['streams']} | {x['events']} | {x['dropped']} | {x['latency_p50_s']:.2f} s | "
                     f"{x['latency_p95_s']:.2f} s | {x['latency_max_s']:.2f} s | {x['busy_fraction']:.2f} | "
                     f"{'yes' if x['realtime'] else 'no'} |")
    return "\n".join(lines) + "\n"


def write_section(text: str, path: Path = REPO / "BENCHMARKS.md") -> None:
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    if SECTION + "\n" in old:
        head, _, rest = old.partition(SECTION + "\n")
        nxt = rest.find("\n## ")
        tail = rest[nxt + 1:] if nxt >= 0 else ""
        new = head + text + ("\n" + tail if tail else "")
    else:
        new = old.rstrip("\n") + "\n\n" + text
    path.write_text(new)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="stream length (whole utterances up to this)")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--backend", default="onnx", choices=["onnx", "torch"])
    parser.add_argument("--model", default="mme2e", choices=["mme2e", "mme2e_sparse"],
                        help="the engine's model (random weights, default preset)")
    parser.add_argument("--threads", type=int, default=0, help="engine threads (0 = all cores)")
    parser.add_argument("--write", action="store_true", help="replace the '## Stream' section of BENCHMARKS.md")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args()
    report = measure(args)
    text = markdown(report)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.write:
        write_section(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
