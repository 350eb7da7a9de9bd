"""Live sources and the CLI process: a real GStreamer RTSP server killed and restarted, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from stream.ingest import parse_source
from stream_helpers import Background, make_pipeline, read_stream, statuses, stream_cfg, wait_for
from stream_fixtures import redis_server, rtsp_server, stream_media  # noqa: F401 (pytest fixtures)

REPO = Path(__file__).resolve().parent.parent


def states(url, sid):
    return [s["state"] for s in statuses(url, sid)]


def test_rtsp_server_killed_and_restarted_resumes_publishing(tmp_path, rtsp_server, redis_server):
    cfg = stream_cfg(tmp_path)
    run = Background(make_pipeline([parse_source(rtsp_server.url, "cam")], cfg, redis_server.url))
    wait_for(lambda: len(read_stream(redis_server.url)) >= 2, what="events over RTSP")
    rtsp_server.kill()
    wait_for(lambda: "reconnecting" in states(redis_server.url, "cam"), what="reconnecting status")
    before = len(read_stream(redis_server.url))
    wait_for(lambda: states(redis_server.url, "cam").count("reconnecting") >= 2, what="a refused reconnect")
    rtsp_server.start()  # same port
    wait_for(lambda: states(redis_server.url, "cam").count("connected") >= 2, what="connected again")
    wait_for(lambda: len(read_stream(redis_server.url)) >= before + 2, what="events after reconnect")
    summary = run.stop()
    events = read_stream(redis_server.url)
    assert [e["seq"] for e in events] == list(range(len(events)))  # one gapless sequence across the loss
    starts = [e["start"] for e in events]
    assert starts == sorted(starts)  # stream time keeps counting across the gap
    reconnected = [s for s in statuses(redis_server.url, "cam") if s["state"] == "connected"][-1]
    assert reconnected["counters"]["reconnects"] >= 1
    assert states(redis_server.url, "cam")[-1] == "ended"
    assert summary["events"]["cam"] == len(events)


def test_rtsp_over_udp(tmp_path, rtsp_server, redis_server):
    cfg = stream_cfg(tmp_path)
    run = Background(make_pipeline([parse_source(rtsp_server.url, "udp", "udp")], cfg, redis_server.url))
    wait_for(lambda: len(read_stream(redis_server.url)) >= 2, what="events over RTSP/UDP")
    run.stop()
    event = read_stream(redis_server.url)[0]
    assert event["evidence"]["audio"]["present"] and event["evidence"]["visual"]["frames"] > 0


def test_http_source_is_live(tmp_path, stream_media, redis_server):
    handler = partial(SimpleHTTPRequestHandler, directory=str(stream_media["ts"].parent))
    handler.log_message = lambda *a: None
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/{stream_media['ts'].name}"
    try:
        run = Background(make_pipeline([parse_source(url, "web")], stream_cfg(tmp_path), redis_server.url))
        # the server's response ends after the file: a live source reconnects and goes on
        wait_for(lambda: states(redis_server.url, "web").count("connected") >= 2, what="reconnect after EOF")
        run.stop()
    finally:
        httpd.shutdown()
        httpd.server_close()
    events = read_stream(redis_server.url)
    assert len(events) >= 7 and [e["seq"] for e in events] == list(range(len(events)))


def test_sigterm_flushes_and_exits_zero(tmp_path, stream_media, redis_server):
    cmd = [sys.executable, "-m", "engine.cli", "--set", "stream.asr_model=off", "--set", "stream.realtime=true",
           "--set", f'stream.spool_dir="{tmp_path / "spool"}"', "stream", "--source", str(stream_media["av"]),
           "--stream-id", "cam", "--redis", redis_server.url]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        wait_for(lambda: len(read_stream(redis_server.url)) >= 1, what="first event from the CLI")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    summary = json.loads(out.strip().splitlines()[-1])
    events = read_stream(redis_server.url)
    assert summary["events"]["cam"] == len(events) >= 2  # the flushed partial window was published too
    assert [e["seq"] for e in events] == list(range(len(events)))
    assert events[-1]["end"] - events[-1]["start"] < 3.0  # the tail window, cut at the stop
    assert summary["spool_pending"] == 0
    assert states(redis_server.url, "cam") == ["connected", "ended"]
    for line in err.strip().splitlines():
        json.loads(line)  # logs are JSON lines
