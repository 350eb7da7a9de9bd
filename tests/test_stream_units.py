"""Windows, speech, spool, queue and metrics, on real decoded clips (no servers)."""

from __future__ import annotations

import json
import threading
import urllib.request

import numpy as np
import pytest

from stream import spool as spool_module
from stream.identify import NullIdentifier
from stream.ingest import AudioChunk, VideoFrame, decode, open_container, parse_source
from stream.metrics import Metrics
from stream.pipeline import Queued, WindowQueue
from stream.servers import free_port
from stream.speech import SpeechTracker
from stream.spool import Spool
from stream.windows import SAMPLE_RATE, Windower
from stream_fixtures import stream_media  # noqa: F401 (pytest fixtures)


def windows_of(path, window_s=3.0, hop_s=1.0):
    source = parse_source(str(path))
    windower = Windower(source.stream_id, window_s, hop_s)
    out = []
    for item in decode(open_container(source, 5, 5), img_interval_s=0.5):
        out += windower.push(item)
    return out + windower.flush()


def test_av_windows_by_pts(stream_media):
    windows = windows_of(stream_media["av"])
    assert [w.seq for w in windows] == list(range(len(windows)))
    assert [w.start for w in windows[:3]] == [0.0, 1.0, 2.0]
    full = [w for w in windows if w.end - w.start == 3.0]
    assert len(full) == 6  # 8 s clip: windows starting at 0..5 are complete
    for w in full:
        assert abs(w.audio.size - 3 * SAMPLE_RATE) <= 1
        assert w.audio.dtype == np.float32
        assert len(w.frames) == 6  # one frame every 500 ms
        assert all(w.start <= t < w.end for t in w.frame_times)
        assert w.frames[0].shape == (360, 640, 3) and w.frames[0].dtype == np.uint8
    assert windows[-1].end == pytest.approx(8.0, abs=0.05)  # flushed tail


def test_audio_only_source_makes_windows(stream_media):
    windows = windows_of(stream_media["audio"])
    assert len(windows) >= 6
    assert all(w.has_audio and not w.has_video for w in windows)


def test_video_only_source_makes_windows(stream_media):
    windows = windows_of(stream_media["video"])
    assert len(windows) >= 6
    assert all(w.has_video and not w.has_audio for w in windows)


def test_negative_start_and_missing_pts():
    windower = Windower("s", 2.0, 1.0)
    tone = np.full(1600, 0.1, np.float32)  # 0.1 s
    out = []
    for i in range(40):  # 4 s of audio starting at -0.5 s; every other chunk without PTS
        t = -0.5 + i * 0.1 if i % 2 == 0 else None
        out += windower.push(AudioChunk(t, 0.0, tone))
        out += windower.push(VideoFrame(-0.5 + i * 0.1, 0.1, 0.0, np.zeros((2, 2, 3), np.uint8)))
    out += windower.flush()
    assert out[0].start == 0.0  # stream time starts at the first PTS seen
    assert out[0].audio.size == 2 * SAMPLE_RATE
    assert out[-1].end == pytest.approx(4.0, abs=0.01)


def test_joined_midway_starts_at_first_pts():
    windower = Windower("s", 1.0, 1.0)
    out = []
    for i in range(25):
        out += windower.push(AudioChunk(1000.0 + i * 0.1, 0.0, np.zeros(1600, np.float32)))
    assert [(w.start, w.end) for w in out] == [(0.0, 1.0), (1.0, 2.0)]


def test_new_segment_continues_stream_time():
    windower = Windower("s", 1.0, 1.0)
    out = []
    for i in range(10):
        out += windower.push(AudioChunk(i * 0.1, 0.0, np.zeros(1600, np.float32)))
    windower.new_segment(gap_s=2.0)  # reconnect: source time restarts at 0
    for i in range(10):
        out += windower.push(AudioChunk(i * 0.1, 0.0, np.zeros(1600, np.float32)))
    assert [(w.seq, w.start) for w in out] == [(0, 0.0), (3, 3.0)]


class CountingTranscriber:
    def __init__(self, inner=None):
        self.inner = inner
        self.calls = 0
        self.samples = 0

    def __call__(self, audio):
        self.calls += 1
        self.samples += audio.size
        return self.inner(audio) if self.inner else []


def test_incremental_asr_transcribes_each_sample_once_with_whisper(stream_media):
    from stream import asr

    model = asr.load_whisper("tiny.en", "int8")
    counting = CountingTranscriber(lambda audio: asr.transcribe(model, audio, vad=True))
    tracker = SpeechTracker(counting, step_s=3.0)
    windows = windows_of(stream_media["av"])
    annotated = [tracker.annotate(w, final=i == len(windows) - 1) for i, w in enumerate(windows)]
    total = windows[-1].end
    # overlapping windows would have sent 3 s per window; each sample went to the model once
    assert counting.calls == tracker.calls <= len(windows) / 2
    assert counting.samples == pytest.approx(total * SAMPLE_RATE, abs=2)
    text = " ".join(w.transcript for w in annotated).lower()
    assert "hello" in text and "listening" in text


def test_incremental_asr_short_steps_never_overlap():
    counting = CountingTranscriber()
    tracker = SpeechTracker(counting, step_s=1.0)
    windower = Windower("s", 3.0, 1.0)
    rng = np.random.default_rng(0)
    windows = []
    for i in range(100):  # 10 s
        windows += windower.push(AudioChunk(i * 0.1, 0.0, rng.normal(0, 0.1, 1600).astype(np.float32)))
    windows += windower.flush()
    for i, w in enumerate(windows):
        tracker.annotate(w, final=i == len(windows) - 1)
    assert counting.samples == 10 * SAMPLE_RATE  # not 3x: no audio transcribed twice
    assert counting.calls <= 11


def test_background_asr_never_blocks_the_source_thread():
    release = threading.Event()
    counting = CountingTranscriber()

    def blocked(audio):  # holds the first call until released
        release.wait(30)
        return counting(audio)

    tracker = SpeechTracker(blocked, step_s=1.0, background=True)
    windower = Windower("s", 3.0, 1.0)
    windows = []
    for i in range(60):  # 6 s
        windows += windower.push(AudioChunk(i * 0.1, 0.0, np.full(1600, 0.01, np.float32)))
    windows += windower.flush()
    for w in windows[:-1]:
        tracker.annotate(w)  # would hang here if the source thread waited for ASR
    assert counting.calls == 0 and tracker.calls == 1  # one call in flight, none finished
    release.set()
    tracker.annotate(windows[-1], final=True)  # the last window waits for everything
    assert counting.samples == 6 * SAMPLE_RATE  # each sample transcribed exactly once


def test_spool_keeps_order_across_restarts_and_counts_overflow(tmp_path, monkeypatch):
    monkeypatch.setattr(spool_module, "SEGMENT_EVENTS", 4)
    spool = Spool(tmp_path, max_events=10)
    for i in range(12):
        spool.append({"i": i})
    assert len(spool) == 10 and spool.overflow == 2
    got = []

    def deliver_until_6(record):
        if record["i"] == 6:
            raise ConnectionError("redis down")
        got.append(record["i"])

    with pytest.raises(ConnectionError):
        spool.drain(deliver_until_6)
    reopened = Spool(tmp_path, max_events=10)  # a new process finds the rest
    assert len(reopened) == 4
    reopened.append({"i": 100})
    reopened.drain(lambda r: got.append(r["i"]))
    assert got == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 100]
    assert len(reopened) == 0
    for line in (tmp_path / "cursor.json").read_text().splitlines():
        json.loads(line)  # plain JSON on disk


def test_queue_drops_oldest_and_ends_after_all_producers():
    queue = WindowQueue(maxsize=2, producers=2)
    dropped = [queue.put(Queued(n, 0.0)) for n in range(3)]
    assert dropped[:2] == [None, None] and dropped[2].window == 0
    assert [q.window for q in queue.get_batch(16, 0.01)] == [1, 2]
    assert queue.get_batch(16, 0.01) == []
    queue.producer_done()
    queue.producer_done()
    assert queue.get_batch(16, 0.01) is None


def test_null_identifier_reports_measured_rms(stream_media):
    windows = windows_of(stream_media["av"])[:2]
    results = NullIdentifier().identify(windows)
    assert [r.person for r in results] == ["unknown", "unknown"]
    rms = float(np.sqrt(np.mean(windows[0].audio ** 2)))
    assert results[0].evidence["audio"]["rms"] == pytest.approx(rms)
    assert results[0].confidence == 0.0


def test_metrics_endpoint_serves_counters():
    metrics = Metrics()
    metrics.windows.labels("cam").inc(3)
    port = free_port()
    metrics.serve(port)
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'mmid_windows_total{stream_id="cam"} 3.0' in body
    assert "mmid_latency_seconds_bucket" in body or "mmid_latency_seconds" in body


def test_window_audio_offsets_index_the_segment_samples():
    """Each window says where its audio starts among the segment's samples, through the
    windower's trimming; the stream's samples at that index are the window's."""
    windower = Windower("s", 3.0, 1.0)
    stream = np.arange(8 * SAMPLE_RATE, dtype=np.float32)
    out = []
    for i in range(80):  # 8 s in 0.1 s chunks
        out += windower.push(AudioChunk(i * 0.1, 0.0, stream[i * 1600:(i + 1) * 1600]))
    out += windower.flush()
    assert [w.audio_offset for w in out[:4]] == [0, SAMPLE_RATE, 2 * SAMPLE_RATE, 3 * SAMPLE_RATE]
    for w in out:
        np.testing.assert_array_equal(w.audio, stream[w.audio_offset:w.audio_offset + w.audio.size])
