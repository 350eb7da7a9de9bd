"""The pipeline against a real Redis: both publish paths, outages, passwords, drops, failing sources."""

from __future__ import annotations

import json
import threading
import time
from argparse import Namespace

import redis

from stream import events_cli
from stream.events import EVENTS_STREAM, SCHEMA_VERSION, SourceState, events_channel
from stream.identify import NullIdentifier
from stream.ingest import parse_source
from stream.servers import RedisServer, free_port
from stream_helpers import Background, first_occurrences, make_pipeline, read_stream, statuses, stream_cfg, wait_for
from stream_fixtures import redis_server, stream_media  # noqa: F401 (pytest fixtures)

IDENTITY_KEYS = {"schema", "kind", "stream_id", "seq", "window_seq", "start", "end", "wall_start", "wall_end",
                 "person", "confidence", "top_k", "evidence", "transcript", "face_box", "model", "latency_ms"}


def test_events_arrive_on_pubsub_and_stream_with_schema(tmp_path, stream_media, redis_server):
    client = redis.Redis.from_url(redis_server.url)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(events_channel("cam"))
    pubsub.get_message(timeout=1)  # subscription confirmed before publishing starts
    cfg = stream_cfg(tmp_path)
    summary = make_pipeline([parse_source(str(stream_media["av"]), "cam")], cfg, redis_server.url).run()

    stored = read_stream(redis_server.url)
    live = []
    while (message := pubsub.get_message(timeout=0.5)) is not None:
        live.append(json.loads(message["data"]))
    assert len(stored) == summary["events"]["cam"] >= 6
    assert live == stored  # the same events, in the same order, on both paths
    assert [e["seq"] for e in stored] == list(range(len(stored)))
    for event in stored:
        assert set(event) == IDENTITY_KEYS
        assert event["schema"] == SCHEMA_VERSION and event["kind"] == "identity"
        assert event["person"] == "unknown" and event["model"]["name"] == "null"
        assert event["evidence"]["audio"]["rms"] > 0 and event["evidence"]["visual"]["frames"] > 0
        assert event["wall_end"] >= event["wall_start"]
    assert [s["state"] for s in statuses(redis_server.url, "cam")] == ["connected", "ended"]


def test_redis_restart_mid_stream_loses_no_event(tmp_path, stream_media):
    with RedisServer(persist_dir=tmp_path) as server:
        cfg = stream_cfg(tmp_path, realtime=True)
        run = Background(make_pipeline([parse_source(str(stream_media["av"]), "cam")], cfg, server.url))
        wait_for(lambda: len(read_stream(server.url)) >= 2, what="first events")
        server.stop()
        time.sleep(2.5)  # ~2 windows made while Redis is down: they go to the spool
        pipeline = run.pipeline
        assert not pipeline.publisher.up and len(pipeline.publisher.spool) >= 1
        server.start()
        summary = run.join()
        seqs = [e["seq"] for e in read_stream(server.url)]
    assert summary["spool_pending"] == 0 and summary["spool_overflow"] == 0
    assert first_occurrences(seqs) == list(range(summary["events"]["cam"]))  # complete and in order
    assert summary["events"]["cam"] >= 7


def test_redis_down_at_start_spools_then_delivers_in_order(tmp_path, stream_media):
    port = free_port()
    cfg = stream_cfg(tmp_path, realtime=True)
    server = RedisServer(port=port)
    run = Background(make_pipeline([parse_source(str(stream_media["av"]), "cam")], cfg, server.url))
    wait_for(lambda: len(run.pipeline.publisher.spool) >= 3, what="spooled events")
    with server:
        summary = run.join()
        seqs = [e["seq"] for e in read_stream(server.url)]
        status_states = [s["state"] for s in statuses(server.url)]
    assert first_occurrences(seqs) == list(range(summary["events"]["cam"]))
    assert status_states == ["connected", "ended"]  # status events were spooled too


def test_password_url(tmp_path, stream_media):
    with RedisServer(password="s3cret-pw") as server:
        cfg = stream_cfg(tmp_path)
        summary = make_pipeline([parse_source(str(stream_media["av"]), "cam")], cfg, server.url).run()
        assert len(read_stream(server.url)) == summary["events"]["cam"] > 0
        wrong = server.url.replace("s3cret-pw", "wrong")
        summary = make_pipeline([parse_source(str(stream_media["av"]), "cam2")],
                                stream_cfg(tmp_path / "b"), wrong).run()
        assert summary["spool_pending"] > 0  # refused by Redis: kept on disk, not lost


def test_tls_url(tmp_path, stream_media):
    """rediss:// against a redis-server that speaks TLS only, with a self-signed certificate."""
    with RedisServer(tls_dir=tmp_path / "tls", password="tls-pw") as server:
        assert server.url.startswith("rediss://")
        summary = make_pipeline([parse_source(str(stream_media["av"]), "cam")], stream_cfg(tmp_path), server.url).run()
        assert summary["spool_pending"] == 0
        assert len(read_stream(server.url)) == summary["events"]["cam"] > 0
        plain = server.url.replace("rediss://", "redis://").split("?")[0]
        refused = make_pipeline([parse_source(str(stream_media["av"]), "cam2")], stream_cfg(tmp_path / "b"), plain).run()
        assert refused["spool_pending"] > 0  # plain TCP cannot talk to the TLS port: spooled, not lost


def test_corrupt_source_errors_while_other_keeps_publishing(tmp_path, stream_media, redis_server):
    sources = [parse_source(str(stream_media["corrupt"]), "bad"), parse_source(str(stream_media["av"]), "good")]
    pipeline = make_pipeline(sources, stream_cfg(tmp_path), redis_server.url)
    summary = pipeline.run()
    bad = statuses(redis_server.url, "bad")
    assert [s["state"] for s in bad] == ["error"] and bad[0]["detail"]
    assert pipeline.states == {"bad": SourceState.ERROR, "good": SourceState.ENDED}
    assert summary["events"]["good"] >= 6 and "bad" not in summary["events"]


class SlowIdentifier(NullIdentifier):
    def __init__(self):
        self.batches = []

    def identify(self, windows):
        self.batches.append(len(windows))
        time.sleep(0.3)
        return super().identify(windows)


def test_slow_identifier_drops_oldest_and_keeps_seq_gapless(tmp_path, stream_media, redis_server):
    cfg = stream_cfg(tmp_path, queue_windows=2, max_batch=2)
    sources = [parse_source(str(stream_media["av"]), "a"), parse_source(str(stream_media["video"]), "b")]
    identifier = SlowIdentifier()
    summary = make_pipeline(sources, cfg, redis_server.url, identifier).run()
    assert sum(summary["dropped"].values()) > 0  # counted
    assert max(identifier.batches) == 2  # windows of both sources batched together
    events = read_stream(redis_server.url)
    for sid in ("a", "b"):
        mine = [e for e in events if e["stream_id"] == sid]
        assert [e["seq"] for e in mine] == list(range(len(mine)))  # gapless despite drops
        window_seqs = [e["window_seq"] for e in mine]
        assert window_seqs == sorted(window_seqs)


def test_events_cli_consumer_group_reads_and_acks(tmp_path, stream_media, redis_server, capsys):
    make_pipeline([parse_source(str(stream_media["av"]), "cam")], stream_cfg(tmp_path), redis_server.url).run()
    total = len(read_stream(redis_server.url))
    args = Namespace(stream_id=[], group="dash", consumer="c1", redis=redis_server.url, status=False, json=True,
                     count=total, timeout=10.0)
    assert events_cli.run(args, stream_cfg(tmp_path)) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["seq"] for e in printed] == list(range(total))
    client = redis.Redis.from_url(redis_server.url)
    assert client.xpending(EVENTS_STREAM, "dash")["pending"] == 0  # all acknowledged


def test_events_cli_follows_pubsub(tmp_path, stream_media, redis_server, capsys):
    args = Namespace(stream_id=["cam"], group=None, consumer=None, redis=redis_server.url, status=True,
                     json=False, count=4, timeout=20.0)
    reader = threading.Thread(target=events_cli.run, args=(args, stream_cfg(tmp_path)))
    reader.start()
    time.sleep(0.5)  # subscribed
    make_pipeline([parse_source(str(stream_media["av"]), "cam")], stream_cfg(tmp_path), redis_server.url).run()
    reader.join(20)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "[cam] status connected"
    assert lines[1].startswith("[cam #0] 0.0-3.0s unknown (0.00)")
