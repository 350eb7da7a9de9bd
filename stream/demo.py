"""`mmid demo`: the whole system end to end on embedded defaults.

1. a synthetic IEMOCAP-layout corpus (`mmid synth --size tiny`, cached);
2. a trained engine: the small one shipped in ``models/demo-tiny`` (made by
   ``scripts/make_demo_engine.sh`` with `mmid prepare`, `mmid train`,
   `mmid export`), or one trained here when it is missing;
3. a two-person conversation cut from a dialog the engine never saw in
   training (its dialog-split test set), showing whoever speaks;
4. an embedded Redis and, when GStreamer's RTSP server is installed, a local
   RTSP server; otherwise the file is played at real-time pace;
5. the live pipeline publishes identity events, a subscriber prints each one
   as Redis delivers it, and a summary compares them with the ground truth.

Everything it starts, it stops. This module is the only part of ``stream``
that may import ``training`` (to make a corpus or an engine).
"""

from __future__ import annotations

import argparse
import json
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.config import Config, replace

REPO = Path(__file__).resolve().parent.parent
SHIPPED_ENGINE = REPO / "models" / "demo-tiny"
DEMO_FILE = "demo.json"  # beside the shipped engine: corpus seed/size and test dialogs
STREAM_ID = "demo"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", type=Path, default=REPO / ".mmid-cache" / "demo",
                        help="folder for the corpus, clip and spool (default: .mmid-cache/demo)")
    parser.add_argument("--engine", type=Path, default=SHIPPED_ENGINE,
                        help="engine folder with demo.json (default: the shipped models/demo-tiny)")
    parser.add_argument("--dialog", help="test dialog to stream (default: the first test dialog)")
    parser.add_argument("--no-rtsp", action="store_true", help="play the file at real-time pace instead of RTSP")
    parser.add_argument("--quiet", action="store_true", help="print only the summary")


@dataclass(frozen=True)
class Received:
    """One identity event as the subscriber got it from Redis."""

    event: dict
    received_wall: float


def ensure_engine(engine_dir: Path, work: Path, cfg: Config) -> Path:
    """The engine folder to use; trains and exports one into ``work`` when it is missing."""
    if (engine_dir / DEMO_FILE).exists():
        return engine_dir
    made = work / "engine"
    if (made / DEMO_FILE).exists():
        return made
    print(f"[demo] no engine at {engine_dir}: training a tiny one (a few minutes)", flush=True)
    from training.demo_engine import make_demo_engine

    return make_demo_engine(work / "build", made, cfg)


def ensure_corpus(work: Path, seed: int, size: str) -> Path:
    """The synthetic corpus the engine was trained on (same seed: same persons)."""
    from training.synth import generate

    corpus = work / f"corpus-{size}-{seed}"
    if not (corpus / "persons.json").exists():
        print(f"[demo] generating the synthetic corpus (size {size}, seed {seed})", flush=True)
        if corpus.exists():
            shutil.rmtree(corpus)
        generate(corpus, seed=seed, size=size, workers=0, progress=True)
    return corpus


class Subscriber:
    """Follows ``mmid:events:{stream}`` on Redis in a thread and keeps what arrives."""

    def __init__(self, url: str, stream_id: str, quiet: bool, truth_at, last_end: float, on_last):
        import redis

        self.client = redis.Redis.from_url(url)
        self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe(f"mmid:events:{stream_id}")
        self.received: list[Received] = []
        self.quiet = quiet
        self.truth_at = truth_at
        self.last_end = last_end  # stream time of the clip's end: its last window ends here
        self.on_last = on_last  # called once the last window's event has arrived
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="demo-subscriber", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            msg = self.pubsub.get_message(timeout=0.2)
            if msg is None or msg.get("type") != "message":
                continue
            event = json.loads(msg["data"])
            self.received.append(Received(event, time.time()))
            if not self.quiet:
                print(format_event(event, self.truth_at(event["start"], event["end"])), flush=True)
            if event["end"] >= self.last_end:
                self.on_last()

    def close(self) -> None:
        time.sleep(0.5)  # let the last published events arrive
        self._stop.set()
        self.thread.join(timeout=2)
        self.pubsub.close()
        self.client.close()


def format_event(event: dict, truth: str | None) -> str:
    text = (event.get("transcript") or "").strip()
    text = f' "{text[:48]}"' if text else ""
    mark = "" if truth is None else ("  ok" if event["person"] == truth else f"  (truth {truth})")
    return (f"[{event['start']:6.1f}-{event['end']:5.1f}s] #{event['seq']:<3d} {event['person']:<8} "
            f"{event['confidence']:.2f}{mark}{text}")


def truth_lookup(timeline: list[tuple[float, float, str]]):
    """(start, end) -> the person who speaks longest inside the window, or None (silence)."""

    def at(start: float, end: float) -> str | None:
        spoken: dict[str, float] = {}
        for s, e, person in timeline:
            overlap = min(e, end) - max(s, start)
            if overlap > 0:
                spoken[person] = spoken.get(person, 0.0) + overlap
        return max(spoken, key=spoken.get) if spoken else None

    return at


def summarise(received: list[Received], timeline, clip_s: float, wall_s: float, cpu_s: float, engine: str) -> dict:
    """Numbers computed only from what the subscriber received."""
    truth_at = truth_lookup(timeline)
    events = [r.event for r in received]
    scored = [(e["person"], truth_at(e["start"], e["end"])) for e in events]
    judged = [(p, t) for p, t in scored if t is not None]
    latency = [max(0.0, r.received_wall - r.event["wall_end"]) * 1000 for r in received if "wall_end" in r.event]
    seqs = sorted(e["seq"] for e in events)
    return {
        "engine": engine,
        "windows": len(events),
        "sequence_gaps": (seqs[-1] - seqs[0] + 1 - len(seqs)) if seqs else 0,
        "windows_with_speech": len(judged),
        "accuracy": float(np.mean([p == t for p, t in judged])) if judged else None,
        "persons_true": sorted({t for _, t in judged}),
        "persons_identified": sorted({p for p, _ in scored}),
        "clip_s": round(clip_s, 2),
        "wall_s": round(wall_s, 2),
        "real_time_factor": cpu_s / clip_s,  # CPU seconds of the whole pipeline per stream second
        "latency_ms_p50": float(np.percentile(latency, 50)) if latency else None,
        "latency_ms_p95": float(np.percentile(latency, 95)) if latency else None,
    }


def print_summary(summary: dict) -> None:
    acc = "n/a" if summary["accuracy"] is None else f"{summary['accuracy'] * 100:.1f}%"
    lines = [
        "",
        "=" * 64,
        f" mmid demo summary ({summary['engine']})",
        "-" * 64,
        f" windows received from Redis : {summary['windows']} (sequence gaps: {summary['sequence_gaps']})",
        f" windows with speech         : {summary['windows_with_speech']}",
        f" persons speaking (truth)    : {', '.join(summary['persons_true'])}",
        f" persons identified          : {', '.join(summary['persons_identified'])}",
        f" accuracy vs ground truth    : {acc}",
        f" real-time factor            : {summary['real_time_factor']:.2f} (pipeline CPU seconds / stream second)",
        f" event latency p50 / p95     : {_ms(summary['latency_ms_p50'])} / {_ms(summary['latency_ms_p95'])}"
        " (window end -> received)",
        f" clip {summary['clip_s']} s streamed in {summary['wall_s']} s",
        "=" * 64,
    ]
    print("\n".join(lines), flush=True)


def _ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0f} ms"


def run_demo(args: argparse.Namespace, cfg: Config) -> tuple[dict, list[Received], list[tuple[float, float, str]]]:
    """Run the demo; return the summary, the events as received from Redis, and the ground truth."""
    from stream.clips import conversation_clip
    from stream.identify import load_identifier
    from stream.ingest import parse_source
    from stream.metrics import Metrics
    from stream.pipeline import Pipeline
    from stream.publish import Publisher
    from stream.servers import RedisServer, RtspServer, rtsp_available
    from stream.speech import load_transcriber
    from stream.spool import Spool

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    engine_dir = ensure_engine(Path(args.engine), work, cfg)
    demo = json.loads((engine_dir / DEMO_FILE).read_text())
    corpus = ensure_corpus(work, demo["seed"], demo["size"])
    dialog = args.dialog or demo["test_dialogs"][0]
    clip = work / f"{dialog}.mp4"
    timeline = conversation_clip(corpus, dialog, clip)
    clip_s = max(e for _, e, _ in timeline) + 0.5
    print(f"[demo] engine {engine_dir.name}; streaming test dialog {dialog} ({clip_s:.1f} s, "
          f"{len({p for _, _, p in timeline})} persons)", flush=True)
    spool = work / "spool"
    shutil.rmtree(spool, ignore_errors=True)
    cfg = replace(cfg, stream={"realtime": True})
    use_rtsp = not args.no_rtsp and rtsp_available()
    with RedisServer() as redis_server:
        rtsp = RtspServer(clip) if use_rtsp else None
        try:
            if rtsp is not None:
                rtsp.start()
            url = rtsp.url if rtsp is not None else str(clip)
            print(f"[demo] redis at {redis_server.url}; source {url}", flush=True)
            metrics = Metrics()
            identifier = load_identifier(str(engine_dir), cfg)
            transcriber = load_transcriber(cfg.stream.asr_model, cfg.stream.asr_compute_type)
            publisher = Publisher(redis_server.url, cfg.stream.stream_maxlen,
                                  Spool(str(spool), cfg.stream.spool_max_events), metrics)
            pipeline = Pipeline([parse_source(url, STREAM_ID, "tcp")], identifier, publisher, cfg, metrics,
                                transcriber)
            # the clip's last window ends at the end of its audio; stop there rather than replay the clip
            sub = Subscriber(redis_server.url, STREAM_ID, args.quiet, truth_lookup(timeline),
                             last_end=timeline[-1][1] - cfg.stream.hop_s, on_last=pipeline.stop)
            started, cpu0 = time.time(), time.process_time()
            pipeline.run(duration_s=clip_s + 15.0)  # a bound, in case the clip's end never arrives
            wall, cpu = time.time() - started, time.process_time() - cpu0
            sub.close()
        finally:
            if rtsp is not None:
                rtsp.stop()
    summary = summarise(sub.received, timeline, clip_s, wall, cpu, f"{engine_dir.name}, {identifier.info.backend}")
    return summary, sub.received, timeline


def run(args: argparse.Namespace, cfg: Config) -> int:
    summary, _, _ = run_demo(args, cfg)
    print_summary(summary)
    (Path(args.workdir) / "summary.json").write_text(json.dumps(summary, indent=2))
    return 0 if summary["windows"] > 0 else 1
