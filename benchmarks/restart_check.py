"""Issue 6's acceptance run: `mmid stream` for a minute against a real RTSP server and
a real Redis on loopback, the source and Redis each restarted once, counted by an
independent redis-py reader.

    .venv/bin/python benchmarks/restart_check.py [--engine models/demo-tiny] [--seconds 60]

Redis keeps its data across the restart (append-only file), so the durable
Stream ``mmid:events`` must end up holding every sequence number 0..N-1 exactly
once (repeats after a failure are allowed by the schema and dropped here by
(stream_id, seq)). Prints one JSON line: events, distinct sequence numbers,
gaps, repeats, status states seen.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from stream.clips import conversations_clip  # noqa: E402
from stream.servers import RedisServer, RtspServer  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default=str(REPO / "models" / "demo-tiny"))
    parser.add_argument("--corpus", default=str(REPO / ".mmid-cache" / "demo" / "corpus-tiny-0"))
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mmid-restart-"))
    demo = json.loads((Path(args.engine) / "demo.json").read_text())
    clip = work / "clip.mp4"
    conversations_clip(args.corpus, demo["test_dialogs"], clip, max_s=args.seconds)
    with RedisServer(persist_dir=work) as server, RtspServer(clip) as rtsp:
        cmd = [str(REPO / ".venv" / "bin" / "mmid"), "stream", "--source", rtsp.url, "--stream-id", "cam",
               "--engine", args.engine, "--redis", server.url, "--duration", str(args.seconds),
               "--set", f"stream.spool_dir=\"{work / 'spool'}\"", "--set", "stream.reconnect_max_s=2.0"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        time.sleep(args.seconds / 3)
        rtsp.stop()  # the source goes away ...
        time.sleep(3)
        rtsp.start()  # ... and comes back on the same port
        time.sleep(args.seconds / 3 - 3)
        server.stop()  # Redis goes away ...
        time.sleep(4)
        server.start()  # ... and comes back with its data
        summary = json.loads(proc.communicate(timeout=args.seconds + 120)[0].strip().splitlines()[-1])
        reader = redis.Redis.from_url(server.url)
        events = [json.loads(f[b"data"]) for _, f in reader.xrange("mmid:events")]
        states = [json.loads(f[b"data"])["state"] for _, f in reader.xrange("mmid:status")]
    seqs = [e["seq"] for e in events if e["stream_id"] == "cam"]
    distinct = sorted(set(seqs))
    result = {
        "exit_code": proc.returncode,
        "events": len(seqs),
        "distinct_seq": len(distinct),
        "gaps": (distinct[-1] + 1 - len(distinct)) if distinct else None,
        "repeats": len(seqs) - len(distinct),
        "status_states": states,
        "stream_summary": summary,
    }
    print(json.dumps(result))
    return 0 if result["gaps"] == 0 and proc.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
