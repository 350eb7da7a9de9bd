"""`mmid stream`: identify who speaks in live sources and publish events to Redis.

    mmid stream --source clip.mp4 --source rtsp://127.0.0.1:8554/cam --redis redis://127.0.0.1:6379/0

SIGINT/SIGTERM stop the sources, flush their last windows and the events,
and exit 0. Logs are JSON lines on stderr; the final summary is one JSON
line on stdout.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys

from engine.config import Config, ConfigError
from stream.events import SourceState
from stream.identify import load_identifier, sampling_config
from stream.ingest import parse_source
from stream.metrics import Metrics, setup_logging
from stream.pipeline import Pipeline
from stream.publish import Publisher
from stream.speech import load_transcriber
from stream.spool import Spool


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", action="append", required=True, metavar="SRC",
                        help="file, rtsp://, http(s):// or /dev/videoN (repeatable)")
    parser.add_argument("--stream-id", action="append", default=[], metavar="NAME",
                        help="name of each source, in --source order (default: from the source)")
    parser.add_argument("--engine", default="null",
                        help="identifier: an engine folder (mmid export) or run folder (mmid train), 'null' "
                             "(always unknown) or 'package.module:factory' (default: null)")
    parser.add_argument("--redis", metavar="URL", help="Redis URL (default: stream.redis_url)")
    parser.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
    parser.add_argument("--rtsp-transport", choices=["tcp", "udp"], default="tcp")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def run(args: argparse.Namespace, cfg: Config) -> int:
    setup_logging(args.log_level)
    sc = cfg.stream
    if args.stream_id and len(args.stream_id) != len(args.source):
        raise ConfigError(f"--stream-id given {len(args.stream_id)} times for {len(args.source)} sources")
    ids = args.stream_id or [None] * len(args.source)
    try:
        sources = [parse_source(s, i, args.rtsp_transport) for s, i in zip(args.source, ids)]
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    metrics = Metrics()
    metrics.serve(sc.metrics_port)
    identifier = load_identifier(args.engine, cfg)
    cfg = sampling_config(cfg, identifier)
    transcriber = load_transcriber(sc.asr_model, sc.asr_compute_type)
    publisher = Publisher(args.redis or sc.redis_url, sc.stream_maxlen, Spool(sc.spool_dir, sc.spool_max_events),
                          metrics)
    pipeline = Pipeline(sources, identifier, publisher, cfg, metrics, transcriber)
    previous = {sig: signal.signal(sig, lambda *_: pipeline.stop()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        summary = pipeline.run(args.duration)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    summary["states"] = {sid: state.value for sid, state in pipeline.states.items()}
    print(json.dumps(summary), flush=True)
    all_failed = pipeline.states and all(s is SourceState.ERROR for s in pipeline.states.values())
    return 1 if all_failed else 0


if __name__ == "__main__":
    from engine.cli import main

    sys.exit(main(["stream", *sys.argv[1:]]))
