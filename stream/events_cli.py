"""`mmid events`: follow identity events from Redis in a terminal.

    mmid events                          # pub/sub, every stream, live only
    mmid events --stream-id cam1         # pub/sub, one stream
    mmid events --group dashboard        # consumer group on the Stream mmid:events: XREADGROUP + XACK,
                                         # picks up where the group left off (group created if missing)

One line per event: a short human summary, or the event JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from typing import Any

import redis

from engine.config import Config
from stream.events import EVENTS_STREAM, STATUS_CHANNEL, events_channel, parse_event

BLOCK_MS = 500  # milliseconds each XREADGROUP waits for new entries


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stream-id", action="append", default=[], metavar="NAME",
                        help="only these streams (repeatable; default: all)")
    parser.add_argument("--group", metavar="NAME", help="read the Stream through this consumer group, with XACK")
    parser.add_argument("--consumer", metavar="NAME", help="consumer name in the group (default: host-pid)")
    parser.add_argument("--redis", metavar="URL", help="Redis URL (default: stream.redis_url)")
    parser.add_argument("--status", action="store_true", help="also show source status events (pub/sub)")
    parser.add_argument("--json", action="store_true", help="print each event as JSON")
    parser.add_argument("--count", type=int, metavar="N", help="exit after N events")
    parser.add_argument("--timeout", type=float, metavar="S", help="exit after S seconds")


def format_event(event: dict[str, Any]) -> str:
    if event["kind"] == "status":
        return f"[{event['stream_id']}] status {event['state']} {event.get('detail', '')}".rstrip()
    text = f' "{event["transcript"]}"' if event.get("transcript") else ""
    return (f"[{event['stream_id']} #{event['seq']}] {event['start']:.1f}-{event['end']:.1f}s "
            f"{event['person']} ({event['confidence']:.2f}){text}")


def run(args: argparse.Namespace, cfg: Config) -> int:
    client = redis.Redis.from_url(args.redis or cfg.stream.redis_url)
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    wanted = set(args.stream_id)
    shown = 0
    read = _read_group(client, args) if args.group else _read_pubsub(client, args)
    try:
        for event in read:
            if event is not None and (not wanted or event["stream_id"] in wanted):
                print(json.dumps(event) if args.json else format_event(event), flush=True)
                shown += 1
            if (args.count and shown >= args.count) or (deadline and time.monotonic() >= deadline):
                break
    except KeyboardInterrupt:
        pass
    finally:
        client.close()
    return 0


def _read_pubsub(client: redis.Redis, args: argparse.Namespace):
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    if args.stream_id:
        pubsub.subscribe(*[events_channel(s) for s in args.stream_id])
    else:
        pubsub.psubscribe(events_channel("*"))
    if args.status:
        pubsub.subscribe(STATUS_CHANNEL)
    try:
        while True:
            message = pubsub.get_message(timeout=BLOCK_MS / 1000)
            yield None if message is None else parse_event(message["data"])
    finally:
        pubsub.close()


def _read_group(client: redis.Redis, args: argparse.Namespace):
    consumer = args.consumer or f"{socket.gethostname()}-{os.getpid()}"
    try:
        client.xgroup_create(EVENTS_STREAM, args.group, id="0", mkstream=True)
    except redis.exceptions.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
    while True:
        replies = client.xreadgroup(args.group, consumer, {EVENTS_STREAM: ">"}, count=100, block=BLOCK_MS)
        if not replies:
            yield None
            continue
        for _, entries in replies:
            for entry_id, fields in entries:
                try:
                    yield parse_event(fields[b"data"])
                finally:  # acknowledged once shown, also when the reader stops here
                    client.xack(EVENTS_STREAM, args.group, entry_id)


if __name__ == "__main__":
    from engine.cli import main

    sys.exit(main(["events", *sys.argv[1:]]))
