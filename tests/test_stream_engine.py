"""The trained engine in the stream, all real parts: a tiny model trained by the suite
(``tiny_runs``), clips cut from the synthetic corpus, a GStreamer RTSP server, Redis,
MTCNN and (in the CLI test) faster-whisper tiny.en.

The speaker is a person of the TEST split of prepared_tiny's dialog split, and the
clip holds only that person's test-split utterances: the model never saw them.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import redis
import torch

from engine.runtime import Engine
from stream.clips import conversation_clip, single_speaker_clip
from stream.engine_identifier import EngineIdentifier, FaceCache
from stream.events import EVENTS_STREAM, events_channel, parse_event
from stream.identify import load_identifier, sampling_config
from stream.ingest import parse_source
from stream.servers import SYSTEM_PYTHON, RtspServer
from stream.windows import Window
from stream_helpers import make_pipeline, read_stream, stream_cfg
from stream_fixtures import redis_server  # noqa: F401 (pytest fixture)

REPO = Path(__file__).resolve().parent.parent
MODALITIES = ("text", "audio", "visual")


def split_dialogs(prepared: Path, split: str) -> set[str]:
    """Dialogs of a split of the dialog protocol (split files list utterance ids)."""
    ids = (prepared / "splits" / "dialog" / f"{split}.txt").read_text().split()
    return {i.rsplit("_", 1)[0] for i in ids}


@pytest.fixture(scope="module")
def speaker(tiny_corpus, prepared_tiny, tmp_path_factory) -> dict:
    """The test-split person with the most test-split speech, and clips of only them."""
    truth = json.loads((tiny_corpus / "persons.json").read_text())
    dialogs = split_dialogs(prepared_tiny, "test")
    speech = collections.Counter()
    for utt_id, u in truth["utterances"].items():
        if u["dialog"] in dialogs and u["emotion"] is not None:
            speech[u["person"]] += u["end"] - u["start"]
    person = max(sorted(speech), key=speech.__getitem__)
    d = tmp_path_factory.mktemp("engine_clips")
    clip = d / f"{person}.mp4"
    timeline = single_speaker_clip(tiny_corpus, person, clip, dialogs=dialogs)
    audio_only = d / f"{person}_audio.m4a"
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-i", str(clip), "-vn", "-c:a", "copy",
                    str(audio_only)], check=True)
    return {"person": person, "clip": clip, "audio_only": audio_only, "timeline": timeline, "dialogs": dialogs}


@pytest.fixture(scope="module")
def identifier(tiny_runs):
    cfg = stream_cfg(Path("."))
    return EngineIdentifier(Engine.load(tiny_runs["mme2e"], backend="torch", threads=2), cfg)


def majority(events: list[dict]) -> str:
    return collections.Counter(e["person"] for e in events).most_common(1)[0][0]


def check_identity_events(events: list[dict], stream_id: str, visual: bool) -> None:
    assert [e["seq"] for e in events] == list(range(len(events)))
    for e in events:
        assert parse_event(json.dumps(e))["kind"] == "identity" and e["stream_id"] == stream_id
        assert e["model"]["name"] == "mme2e" and e["model"]["backend"] == "torch" and e["model"]["version"]
        assert 0.0 <= e["confidence"] <= 1.0 and len(e["top_k"]) == 3
        assert set(e["evidence"]) == set(MODALITIES)
        assert e["evidence"]["visual"]["present"] is visual
        assert (e["face_box"] is not None) is visual
    assert any(e["evidence"]["audio"]["present"] for e in events)


def test_clip_shows_only_the_speaker(speaker):
    import av

    timeline = speaker["timeline"]
    assert {p for _, _, p in timeline} == {speaker["person"]}
    assert all(a[1] == b[0] for a, b in zip(timeline, timeline[1:]))  # contiguous
    with av.open(str(speaker["clip"])) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        assert (v.codec_context.width, v.codec_context.height) == (360, 480) and v.codec_context.name == "h264"
        assert a.codec_context.name == "aac"
        assert abs(float(c.duration / 1e6) - timeline[-1][1]) < 0.1


def test_conversation_clip_timeline_follows_the_dialog(tiny_corpus, tmp_path):
    truth = json.loads((tiny_corpus / "persons.json").read_text())
    dialog = sorted(truth["dialogs"])[0]
    timeline = conversation_clip(tiny_corpus, dialog, tmp_path / "talk.mp4")
    utts = sorted((u for u in truth["utterances"].values() if u["dialog"] == dialog and u["emotion"] is not None),
                  key=lambda u: u["start"])
    assert [p for _, _, p in timeline] == [u["person"] for u in utts]
    assert len({p for _, _, p in timeline}) == 2
    assert [round(e - s, 4) for s, e, _ in timeline] == [round(u["end"] - u["start"], 4) for u in utts]


@pytest.mark.skipif(not Path(SYSTEM_PYTHON).exists(), reason="no system python with GStreamer bindings")
def test_rtsp_single_speaker_events_on_both_paths_name_the_speaker(tmp_path, speaker, identifier, redis_server):
    client = redis.Redis.from_url(redis_server.url)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(events_channel("cam"))
    pubsub.get_message(timeout=1)
    cfg = sampling_config(stream_cfg(tmp_path, reconnect_attempts=1), identifier)
    detected_before = identifier.faces.detected
    with RtspServer(speaker["clip"]) as server:
        pipeline = make_pipeline([parse_source(server.url, "cam")], cfg, redis_server.url, identifier)
        pipeline.run(duration_s=speaker["timeline"][-1][1] + 4.0)  # the clip plays once, in real time
    stored = read_stream(redis_server.url)
    live = []
    while (message := pubsub.get_message(timeout=0.5)) is not None:
        live.append(json.loads(message["data"]))
    assert len(stored) >= 3 and live == stored
    check_identity_events(stored, "cam", visual=True)
    assert majority(stored) == speaker["person"], [e["person"] for e in stored]
    frames = identifier.faces.detected - detected_before
    n_frames = {round(t, 3) for e in stored for t in np.arange(e["start"], e["end"], 0.5)}
    assert frames <= len(n_frames) + 2  # overlapping windows share their frames' detections


def test_file_source_through_the_cli_names_the_speaker(tmp_path, speaker, tiny_runs, redis_server):
    """`mmid stream --engine RUN` with real tiny.en transcripts."""
    cmd = [sys.executable, "-m", "engine.cli", "--set", "stream.realtime=false", "--set", "engine.threads=2",
           "--set", f'stream.spool_dir="{tmp_path / "spool"}"', "stream", "--source", str(speaker["clip"]),
           "--stream-id", "file", "--engine", str(tiny_runs["mme2e"]), "--redis", redis_server.url]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
    events = read_stream(redis_server.url, EVENTS_STREAM)
    assert json.loads(done.stdout.strip().splitlines()[-1])["events"]["file"] == len(events) >= 3
    check_identity_events(events, "file", visual=True)
    assert majority(events) == speaker["person"], [e["person"] for e in events]
    assert any(e["transcript"] and e["evidence"]["text"]["present"] for e in events)


def test_face_frames_are_counted_by_how_they_were_found(tmp_path, speaker, identifier, redis_server):
    """``mmid_face_frames{how}``: the face tracker's frames of this pipeline, by kind."""
    cfg = sampling_config(stream_cfg(tmp_path), identifier)
    before = dataclasses.replace(identifier.tracker.stats)
    pipeline = make_pipeline([parse_source(str(speaker["clip"]), "cam")], cfg, redis_server.url, identifier)
    pipeline.run()
    stats = identifier.tracker.stats
    counted = {how: pipeline.metrics.registry.get_sample_value("mmid_face_frames_total", {"how": how}) or 0.0
               for how in ("full", "tracked", "refreshed", "lost")}
    assert counted == {how: float(getattr(stats, how) - getattr(before, how)) for how in counted}
    assert counted["full"] >= 1 and counted["tracked"] >= 1  # the clip's first frame detected, later ones followed


def test_audio_only_source_yields_identities_with_visual_absent(tmp_path, speaker, identifier, redis_server):
    cfg = sampling_config(stream_cfg(tmp_path), identifier)
    make_pipeline([parse_source(str(speaker["audio_only"]), "mic")], cfg, redis_server.url, identifier).run()
    events = read_stream(redis_server.url)
    assert len(events) >= 3
    check_identity_events(events, "mic", visual=False)
    assert all(e["evidence"]["audio"]["present"] and e["evidence"]["visual"]["probability"] is None for e in events)
    assert all((e["person"] == "unknown") == (e["confidence"] < cfg.stream.unknown_threshold) for e in events)


def test_load_identifier_takes_a_run_folder_and_sets_frame_sampling(tiny_runs, tmp_path):
    cfg = stream_cfg(tmp_path)
    ident = load_identifier(str(tiny_runs["mme2e"]), cfg)
    assert isinstance(ident, EngineIdentifier) and ident.info.backend == "torch"
    other = sampling_config(stream_cfg(tmp_path, window_s=3.0), ident)
    assert other.prepare.img_interval_ms == ident.engine.feature_params.img_interval_ms


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU host's answer to [engine] cuda_graphs")
def test_cuda_graphs_setting_reaches_the_engine(tiny_runs, tmp_path):
    """``[engine] cuda_graphs`` is handed to the engine: the torch backend on a CPU refuses it
    with a clear error; the ONNX backend that "auto" picks on a CPU host is not affected.
    (On a GPU the graphs backend is checked against the CPU in tests/test_cuda.py.)"""
    from engine.config import replace
    from stream.demo import SHIPPED_ENGINE

    cfg = replace(stream_cfg(tmp_path), engine={"backend": "torch", "cuda_graphs": True})
    with pytest.raises(ValueError, match="need device 'cuda'"):
        load_identifier(str(tiny_runs["mme2e"]), cfg)
    served = load_identifier(str(SHIPPED_ENGINE), replace(stream_cfg(tmp_path), engine={"cuda_graphs": True}))
    assert served.info.backend.startswith("onnx")


def _window(seq: int, times: list[float], frame: np.ndarray, stream_id: str = "s") -> Window:
    return Window(stream_id, seq, times[0], times[0] + 3.0, 0.0, 0.0, tuple(frame for _ in times), tuple(times),
                  np.zeros(16000, np.float32))


def test_overlapping_windows_detect_each_frame_once_and_the_cache_is_bounded(identifier):
    from skimage.data import astronaut

    frame = np.ascontiguousarray(astronaut()[:300, 100:400])
    ident = EngineIdentifier(identifier.engine, stream_cfg(Path("."), face_track_steps=1), cache_frames=8)
    assert ident.tracker.steps == 1  # [stream] face_track_steps
    windows = [_window(k, [k + 0.5 * i for i in range(6)], frame) for k in range(4)]  # 3 s every 1 s
    results = ident.identify(windows[:2]) + ident.identify(windows[2:])
    distinct = {t for w in windows for t in w.frame_times}
    assert ident.faces.detected == len(distinct) == 12 and len(ident.faces) == 8
    assert all(r.face_box is not None and r.evidence["visual"]["present"] for r in results)
    dense = _window(9, [20 + 0.1 * i for i in range(30)], frame)  # frames every 100 ms: thinned to 500 ms
    assert ident.sampled(dense) == list(range(0, 30, 5))


def test_sampling_keeps_the_decoders_frames_at_any_frame_rate(identifier):
    """The decoder keeps the first frame at or after each 0.5 s slot (stream/ingest.py): at 25
    fps those are 0.48 or 0.52 s apart, and all of a window's six are the model's frames, the
    same in every window that holds them. Denser frames are thinned on a fixed 0.5 s grid."""
    frame = np.zeros((64, 64, 3), np.uint8)
    slots = [round(k * 0.5 + (0.02 if k % 2 else 0.0), 2) for k in range(12)]  # 0.0, 0.52, 1.0, 1.52, ...
    windows = [_window(k, [t for t in slots if k <= t < k + 3.0], frame) for k in range(3)]
    assert [identifier.sampled(w) for w in windows] == [list(range(6))] * 3
    kept = [[w.frame_times[i] for i in identifier.sampled(w)] for w in windows]
    assert kept[1][:4] == kept[0][2:] and kept[2][:4] == kept[1][2:]  # shared frames kept in every window
    dense = _window(0, [round(0.04 * i, 2) for i in range(75)], frame)  # 25 fps: 0.0, 0.04, ...
    kept = [dense.frame_times[i] for i in identifier.sampled(dense)]
    assert kept == [0.0, 0.52, 1.0, 1.52, 2.0, 2.52]  # the first frame of each 0.5 s slot


def test_face_cache_evicts_least_recently_used():
    cache = FaceCache(2)
    frame = np.zeros((64, 64, 3), np.uint8)
    entry = (np.zeros((48, 48, 3), np.uint8), False, np.full(4, np.nan, np.float32))
    cache.put(("a", 0.0), frame, entry)
    cache.put(("a", 0.5), frame, entry)
    assert cache.get(("a", 0.0), frame) is not None  # now the most recent
    cache.put(("a", 1.0), frame, entry)
    assert cache.get(("a", 0.5), frame) is None and cache.get(("a", 0.0), frame) is not None and len(cache) == 2
    assert cache.get(("a", 0.0), frame + 1) is None  # same key, another frame (a stream id reused)


class Recording:
    """An identifier that keeps the windows it is given and answers as the one it wraps."""

    def __init__(self, inner: EngineIdentifier):
        self.inner, self.windows = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def identify(self, windows: list[Window]):
        self.windows.extend(windows)
        return self.inner.identify(windows)


def test_sparse_engine_serves_the_stream_as_its_pytorch_model(tmp_path, speaker, tiny_runs, redis_server):
    """The trained sparse model exported (fixed budget, split graphs) and served in the stream
    by the cached ONNX backend with real tiny.en transcripts (low-level maps per frame and
    chunk, sparse stages per frame or chunk and transcript, reused across overlapping
    windows): its events name the speaker, and each window gets the answer that the same
    engine folder's PyTorch model gives for it."""
    from engine.cli import main as mmid
    from stream.speech import load_transcriber

    folder = tmp_path / "engine"
    assert mmid(["export", "--run", str(tiny_runs["mme2e_sparse"]), "--backend", "onnx", "--out", str(folder)]) == 0
    cfg = stream_cfg(tmp_path, asr_model="tiny.en", asr_background=False)
    served = Recording(EngineIdentifier(Engine.load(folder, "onnx", threads=2, feature_cache=256), cfg))
    cfg = sampling_config(cfg, served)
    pipeline = make_pipeline([parse_source(str(speaker["clip"]), "file")], cfg, redis_server.url, served,
                             load_transcriber("tiny.en", "int8"))
    pipeline.run()
    events = read_stream(redis_server.url)
    assert len(events) == len(served.windows) >= 3
    assert {e["model"]["name"] for e in events} == {"mme2e_sparse"}
    assert majority(events) == speaker["person"], [e["person"] for e in events]
    assert len({e["transcript"] for e in events if e["transcript"]}) >= 2  # the stages ran under several guides
    assert served.engine.backend.stats()["visual"]["hits"] > 0  # overlapping windows reused sparse rows
    reference = EngineIdentifier(Engine.load(folder, "torch", threads=2), cfg).identify(served.windows)
    for event, want in zip(events, reference):
        assert event["person"] == want.person
        assert event["confidence"] == pytest.approx(want.confidence, abs=1e-4)
        for modality in MODALITIES:
            assert event["evidence"][modality]["present"] == want.evidence[modality]["present"]
