"""`mmid bench`: latency, throughput and peak memory of engines, per backend, dense and sparse.

    mmid bench --preset paper [--json]        random-weight dense + sparse engines of a preset
    mmid bench --engine ENGINE [ENGINE ...]   exported engine folders

Two scopes, on identical inputs for every backend:
- ``model``: the backend's forward on a collated Batch (features precomputed).
- ``window``: a simulated stream (3 s windows, 1 s hop, one frame every
  img_interval_ms at 224x224): faces (engine/face_track.py, as the stream finds
  them: O-Net follows the previous frame's face, the full MTCNN cascade runs on
  the first frame, after a lost track and every ``[stream] face_redetect_s``),
  log-mel chunks, tokenisation, collate and the forward. What overlapping windows
  share is not recomputed: each sampled frame's face is found and cropped once and
  its crop is cached (with 500 ms frames, 2 of a window's 6 frames are new); the
  new frames of a batch of windows go to the tracker in one call, in a helper
  thread while the audio and text features are computed (as the stream does,
  ``Engine.identify_overlapped``). Speech is a
  run of back-to-back segments (a sentence's words at 4 words/s, ~3.3 s each,
  no two alike) and each window's transcript is the segments whose midpoint it
  holds, the stream's rule (stream/speech.py ``text_between``), so neighbouring
  windows mostly share it. Tokens are made per window, log-mel grid chunks once
  per source (the engine's chunk cache); the model runs on the whole window, except with ``onnx-cached`` (the dense model's CNN
  outputs per frame and chunk, the sparse model's low-level maps per frame and chunk and
  its sparse stages' outputs per frame or chunk and transcript, and the text CLS per
  transcript reused). Every
  measurement runs under a source name of its own, so nothing computed for one
  row is reused by the next, and the simulated stream is long enough that its
  frames and audio never repeat within a measurement.

Batch 1 gives per-window latency p50/p95; batches 8 and 32 give throughput. Rows run
backend by backend; the engines of a backend (dense and sparse) are opened together, their
window steps of one batch size interleaved (one step of each in turn, ``bench_windows``) and
their model rows run back to back, so that a change of the host's speed falls on both alike.
Peak memory: RSS high-water mark minus RSS before (CPU; Linux clear_refs), or
torch.cuda.max_memory_allocated (CUDA); in the window scope measured per step and summed over
each engine's own steps (``bench_windows``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from engine.face_track import REDETECT_S, STEPS, FaceTracker

DEFAULT_CACHE = Path(".mmid-cache/bench")
BENCH_PERSONS = 10
WINDOW_S, HOP_S = 3.0, 1.0
FRAME_SIZE = 224  # pixels: the speaker's centre crop that MTCNN searches
BATCHES = (1, 8, 32)
DEFAULT_RUN_FRACTION = 0.5  # sparse random runs, per sparse stage: the budget the paper-preset export calibrates to
WORDS_PER_S = 4.0  # speaking rate of the bench's speech segments
TRANSCRIPTS = (  # ~12 words: what a 3 s window of speech holds
    "i told you already that i was not going to the party tonight",
    "well maybe we should just call them and ask what they think about it",
    "you never listen to me when i am talking about something that matters",
    "the plane leaves at seven so we have to be at the airport early",
    "i am so happy for you this is the best news i have heard",
    "do you really think that is going to work out the way you planned",
)


# ---------------------------------------------------------------- random engines


def make_tokenizer(path: Path) -> Path:
    """A small lower-cased WordPiece tokenizer.json ([PAD]=0 ... [MASK]=4) for random engines."""
    from engine.wordpiece import train_wordpiece

    return train_wordpiece(list(TRANSCRIPTS), path, vocab_size=400)


def random_engine(preset: str, name: str, out: Path, n_persons: int = BENCH_PERSONS, int8: bool = True,
                  sparse_budget: tuple[float, ...] | None = None, seed: int = 0, corpus: Path | None = None,
                  sparse_guide: str = "text", sparse_dense_stages: int | None = None,
                  sparse_budget_audio: tuple[float, ...] | None = None) -> Path:
    """Export a random-weight model of ``preset`` to ``out`` (reused when already there). Its
    int8 graphs are calibrated on the bench stream's windows. ``sparse_guide``,
    ``sparse_dense_stages``: the sparse model's ``ModelDims`` fields (None: the preset's)."""
    from engine.backends.feature_cache import split_format
    from engine.dims import preset_dims
    from engine.handover import HANDED_OVER
    from engine.export import export_engine
    from engine.features import FeatureParams
    from engine.model import build_model

    if (out / "engine.json").exists():
        info = json.loads((out / "engine.json").read_text())
        # engines from before the split graphs (sparse: before its split), dense ones without int8 CNNs,
        # sparse ones from before the uint8 hand-over of the map alone (keys in fp32) or with
        # another number of dense stages: rebuild
        if info.get("split_format") == split_format(name) and (not int8 or (
                info.get("split_int8_graphs") if name == "mme2e"
                else set(info.get("int8_handover", {}).get("audio", {})) == set(HANDED_OVER))) and (
                name == "mme2e" or info["dims"].get("sparse_dense_stages", 0) == (sparse_dense_stages or 0)):
            return out
    torch.manual_seed(seed)
    dims = sparse_fields(preset_dims(preset, name, n_persons), sparse_guide, sparse_dense_stages)
    model = build_model(dims).eval()
    tokenizer = make_tokenizer(out / "source" / "tokenizer.json")
    persons = [f"person{i}" for i in range(n_persons)]
    data = stream_int8_inputs(model, tokenizer, corpus) if int8 else None
    return export_engine(model, persons, FeatureParams(), tokenizer, out, sparse_budget=sparse_budget,
                         sparse_budget_audio=sparse_budget_audio, int8=int8,
                         source=f"random weights, preset {preset}", int8_data=data)


def stream_int8_inputs(model, tokenizer: Path, corpus: Path | None, windows: int = 16):
    """int8 calibration on the bench stream's first windows (faces, log-mel, tokens as the
    window scope makes them); the top-1 check on random windows (random weights have no test split)."""
    import dataclasses

    from engine.export import random_int8_inputs
    from engine.features import FeatureParams, Tokenizer, collate, make_sample

    params = FeatureParams()
    stream = Stream.make(params, corpus)
    faces = FaceCache(stream, params)
    tok = Tokenizer(tokenizer, max_tokens=params.max_tokens)
    samples = []
    for w in range(windows):
        frames, audio, text, _ = stream.window(w)
        crops, found = faces.get(frames)
        samples.append(make_sample(crops, found, audio, text, tok, params))
    return dataclasses.replace(random_int8_inputs(model), calibration=[collate(samples)], split="random (calibrated on "
                               "the bench stream)")


def random_run(preset: str, name: str, out: Path, n_persons: int = BENCH_PERSONS,
               sparse_budget: tuple[float, ...] | None = None, seed: int = 0, sparse_guide: str = "text",
               sparse_dense_stages: int | None = None, sparse_budget_audio: tuple[float, ...] | None = None) -> Path:
    """A random-weight run folder of ``preset`` (weights + model.json + tokenizer): what the
    torch backends load, without the ONNX export (reused when already there)."""
    import dataclasses

    from engine.checkpoint import RunMeta, save_checkpoint
    from engine.dims import preset_dims
    from engine.features import FeatureParams
    from engine.model import build_model

    if (out / "model.json").exists():
        return out
    dims = sparse_fields(preset_dims(preset, name, n_persons), sparse_guide, sparse_dense_stages)
    if name == "mme2e_sparse":
        dims = dataclasses.replace(dims, sparse_budget=tuple(sparse_budget or (DEFAULT_RUN_FRACTION,) * dims.n_sparse_stages),
                                   sparse_budget_audio=tuple(sparse_budget_audio or ()))
    torch.manual_seed(seed)
    model = build_model(dims).eval()
    tokenizer = make_tokenizer(out / "source" / "tokenizer.json")
    meta = RunMeta(dims=dims, persons=tuple(f"person{i}" for i in range(n_persons)), features=FeatureParams(),
                   extra={"source": f"random weights, preset {preset}"})
    save_checkpoint(out, model, meta, tokenizer)
    return out


def sparse_fields(dims, sparse_guide: str, sparse_dense_stages: int | None):
    """``dims`` with the sparse model's guide and dense-stage count set (dense dims unchanged)."""
    import dataclasses

    if dims.name != "mme2e_sparse":
        return dims
    dense = dims.sparse_dense_stages if sparse_dense_stages is None else sparse_dense_stages
    return dataclasses.replace(dims, sparse_guide=sparse_guide, sparse_dense_stages=dense)


# ---------------------------------------------------------------- inputs


def stream_frames(n: int, corpus: Path | None = None, every_s: float = 0.1) -> list[np.ndarray]:
    """n RGB uint8 (224, 224, 3) frames with a real-looking face: from synthetic corpus
    videos when given (the left speaker's centre crop, one frame every ``every_s`` seconds,
    video after video), else scikit-image's astronaut photo, jittered."""
    if corpus is not None:
        videos = sorted(Path(corpus).rglob("*.avi"))
        if not videos:
            raise FileNotFoundError(f"--corpus {corpus}: no .avi videos under it (a corpus made by mmid synth, or "
                                    "IEMOCAP's release, holds them)")
        return _video_frames(videos, n, every_s)
    from skimage.data import astronaut

    photo = astronaut()  # (512, 512, 3), face near (90:260, 160:320)
    rng = np.random.default_rng(0)
    frames = []
    for _ in range(n):
        y, x = rng.integers(0, 40, size=2)
        frames.append(np.ascontiguousarray(photo[y: y + FRAME_SIZE, 120 + x: 120 + x + FRAME_SIZE]))
    return frames


def _video_frames(paths: list[Path], n: int, every_s: float) -> list[np.ndarray]:
    import av

    frames: list[np.ndarray] = []
    for path in paths:
        next_t = 0.0
        with av.open(str(path)) as container:
            for k, frame in enumerate(container.decode(video=0)):
                t = frame.time if frame.time is not None else k / 30.0
                if t + 1e-6 < next_t:
                    continue
                next_t = t + every_s
                img = frame.to_ndarray(format="rgb24")
                h, w = img.shape[:2]
                half = img[:, : w // 2]  # left speaker's half, as prepare does
                top, left = max(0, (h - FRAME_SIZE) // 2), max(0, (w // 2 - FRAME_SIZE) // 2)
                frames.append(np.ascontiguousarray(half[top: top + FRAME_SIZE, left: left + FRAME_SIZE]))
                if len(frames) >= n:
                    return frames
    print(f"[bench] the corpus videos hold {len(frames)} frames {every_s} s apart, fewer than the {n} asked for: "
          "frames repeat, and repeated frames hit the feature cache", file=sys.stderr)
    return [frames[i % len(frames)] for i in range(n)]


@dataclass(frozen=True)
class Segment:
    start: float  # seconds of stream time
    end: float
    text: str


def speech_segments(until_s: float) -> list[Segment]:
    """Back-to-back speech segments covering [0, until_s): segment k has the words of
    TRANSCRIPTS[k % 6] (in their order for k < 6, then in an order drawn with seed k, so
    that no two segments of a long run are alike), spoken at WORDS_PER_S."""
    out, t, k = [], 0.0, 0
    while t < until_s:
        words = TRANSCRIPTS[k % len(TRANSCRIPTS)].split()
        if k >= len(TRANSCRIPTS):
            words = [words[i] for i in np.random.default_rng(k).permutation(len(words))]
        out.append(Segment(t, t + len(words) / WORDS_PER_S, " ".join(words)))
        t, k = out[-1].end, k + 1
    return out


@dataclass
class Stream:
    """A simulated source of ``pool_s`` seconds: a frame every frame_s seconds, 16 kHz
    audio, speech segments. Frames and audio repeat after ``len(frames)`` frames /
    ``len(audio)`` samples (pools: size them to the windows a measurement takes,
    ``seconds_for``); frame indices keep growing, so every sampled frame is a new
    detection."""

    frames: list[np.ndarray]
    audio: np.ndarray
    frame_s: float
    sample_rate: int
    segments: list[Segment]

    @classmethod
    def make(cls, params, corpus: Path | None = None, pool_s: float = 60.0) -> "Stream":
        frame_s = params.img_interval_ms / 1000.0
        rng = np.random.default_rng(1)
        t = np.arange(int(pool_s * params.sample_rate)) / params.sample_rate
        audio = (0.1 * np.sin(2 * np.pi * 140 * t * (1 + 0.1 * np.sin(3 * t))) + 0.02 * rng.standard_normal(t.shape))
        return cls(stream_frames(int(pool_s / frame_s), corpus, frame_s), audio.astype(np.float32), frame_s,
                   params.sample_rate, speech_segments(pool_s + WINDOW_S))

    @staticmethod
    def seconds_for(windows: int) -> float:
        """Stream seconds that ``windows`` consecutive windows span."""
        return (windows - 1) * HOP_S + WINDOW_S

    def frame(self, i: int) -> np.ndarray:
        return self.frames[i % len(self.frames)]

    def window(self, w: int) -> tuple[range, np.ndarray, str, int]:
        """Frame indices, audio, transcript and stream index of the first audio sample of window w."""
        from stream.speech import text_between

        first = int(round(w * HOP_S / self.frame_s))
        frames = range(first, first + int(round(WINDOW_S / self.frame_s)))
        a = int(w * HOP_S * self.sample_rate)
        audio = self.audio.take(np.arange(a, a + int(WINDOW_S * self.sample_rate)), mode="wrap")
        start = w * HOP_S
        if start + WINDOW_S > self.segments[-1].end:
            self.segments = speech_segments(start + 2 * WINDOW_S)
        return frames, audio, text_between(self.segments, start, start + WINDOW_S), a


class FaceCache:
    """Crops of sampled frames, each processed once (the sharing across overlapping windows),
    by a ``FaceTracker`` as in the stream: O-Net follows the previous frame's face, the full
    cascade runs on the first frame, after a lost track and every ``redetect_s`` seconds
    (0: on every frame)."""

    def __init__(self, stream: Stream, params, device: str = "cpu", redetect_s: float = REDETECT_S, steps: int = STEPS):
        self.stream, self.params, self.crops = stream, params, {}
        self.tracker = FaceTracker(params.face_size, params.face_margin, device, redetect_s=redetect_s, steps=steps)

    def detect(self, indices) -> None:
        """Process every frame of ``indices`` not seen yet, in one tracker call."""
        new = sorted({i for i in indices if i not in self.crops})
        if new:
            crops, found, _ = self.tracker.crop([("bench", i * self.stream.frame_s, self.stream.frame(i)) for i in new])
            self.crops.update({i: (c, f) for i, c, f in zip(new, crops, found)})

    def get(self, indices: range) -> tuple[np.ndarray, np.ndarray]:
        self.detect(indices)
        for i in [i for i in self.crops if i < indices.start]:
            del self.crops[i]  # frames no later window uses
        return np.stack([self.crops[i][0] for i in indices]), np.array([self.crops[i][1] for i in indices])


# ---------------------------------------------------------------- timing


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


class PeakMemory:
    """RSS high-water mark delta (CPU) or torch.cuda.max_memory_allocated (CUDA), in MiB."""

    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            except OSError:
                pass
            self.base = _rss_kib("VmRSS:") * 1024
        return self

    def __exit__(self, *exc):
        peak = torch.cuda.max_memory_allocated() if self.device == "cuda" else _rss_kib("VmHWM:") * 1024
        end = torch.cuda.memory_allocated() if self.device == "cuda" else _rss_kib("VmRSS:") * 1024
        self.mib = max(0.0, (peak - self.base) / 2**20)
        self.kept_mib = (end - self.base) / 2**20  # what the block left allocated (negative: it freed some)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_calls(fn, n: int, device: str, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return times


def summarise(times: list[float], batch: int) -> dict:
    ms = np.array(times) * 1000.0
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p95_ms": round(float(np.percentile(ms, 95)), 2),
            "windows_per_s": round(batch * len(ms) / float(ms.sum() / 1000.0), 2)}


_MEASUREMENTS = itertools.count()


def measurement_source() -> str:
    """A source name of its own for one measurement: an engine's feature cache reuses
    nothing computed for an earlier row."""
    return f"bench-{next(_MEASUREMENTS)}"


def bench_model(engine, stream: Stream, batch: int, iters: int, redetect_s: float = REDETECT_S, steps: int = STEPS) -> dict:
    """Backend forward only, on collated windows (features computed once, outside the timing)."""
    cache = FaceCache(stream, engine.feature_params, engine.backend.device, redetect_s, steps)
    windows = []
    for w in range(batch):
        frames, audio, text, offset = stream.window(w)
        crops, found = cache.get(frames)
        windows.append((crops, found, audio, text, offset))
    b = engine.collate_raw(windows, [measurement_source()] * batch)
    with PeakMemory(engine.backend.device) as mem:
        times = time_calls(lambda: engine.backend.run(b), iters, engine.backend.device)
    return {**summarise(times, batch), "peak_mib": round(mem.mib, 1)}


def window_steps(engine, stream: Stream, batch: int, redetect_s: float = REDETECT_S, steps: int = STEPS,
                 source: str | None = None):
    """-> a function that identifies the next ``batch`` windows of ``stream`` in stream order,
    as the stream does (``Engine.identify_overlapped``): new frames' faces (tracked or
    detected, cached) in a helper thread while log-mels, tokens (and the cached backend's
    audio and text rows) are computed, then the forward and the answers. ``source``: the
    windows' source name (default: one of its own, ``measurement_source``); ``redetect_s``, ``steps``:
    the face tracker's (``[stream] face_redetect_s``, ``face_track_steps``)."""
    cache = FaceCache(stream, engine.feature_params, engine.backend.device, redetect_s, steps)
    cache.get(stream.window(0)[0])  # steady state: the first window's earlier frames are already seen
    state = {"w": 0}
    source = source or measurement_source()

    def step() -> None:
        spans = [stream.window(state["w"] + k) for k in range(batch)]
        state["w"] += batch

        def find_faces():  # in the engine's helper thread, as in the stream
            cache.detect(i for frames, *_ in spans for i in frames)  # the batch's new frames in one call
            return [cache.get(frames) for frames, *_ in spans]

        engine.identify_overlapped([(audio, text, offset) for _, audio, text, offset in spans], find_faces,
                                   [source] * batch)

    return step


def bench_windows(engines: Sequence, stream: Stream, batch: int, iters: int, redetect_s: float = REDETECT_S,
                  steps: int = STEPS) -> list[dict]:
    """Whole windows of several engines timed together: one step of each in turn, the order
    reversed every other round, so that a change of the host's speed (it moves within minutes
    on our CPU machines) falls on all of them alike. Each engine has its own stream source,
    face tracker and cache (``window_steps``). ``peak_mib``: per engine, the memory its own steps left allocated before a step (its
    feature cache growing) plus the most that step held above its start, at the largest."""
    step_fns = [window_steps(engine, stream, batch, redetect_s, steps) for engine in engines]
    for fn in step_fns:
        fn()  # warm-up
    times: list[list[float]] = [[] for _ in engines]
    kept, peak = [0.0] * len(engines), [0.0] * len(engines)
    for round_ in range(iters):
        for i in (range(len(engines)) if round_ % 2 == 0 else reversed(range(len(engines)))):
            device = engines[i].backend.device
            with PeakMemory(device) as mem:
                start = time.perf_counter()
                step_fns[i]()
                _sync(device)
                times[i].append(time.perf_counter() - start)
            peak[i] = max(peak[i], kept[i] + mem.mib)
            kept[i] += mem.kept_mib
    return [{**summarise(t, batch), "peak_mib": round(p, 1)} for t, p in zip(times, peak)]


def bench_window(engine, stream: Stream, batch: int, iters: int, redetect_s: float = REDETECT_S, steps: int = STEPS) -> dict:
    """Whole windows of one engine in stream order: ``bench_windows`` of it alone."""
    return bench_windows([engine], stream, batch, iters, redetect_s, steps)[0]


# ---------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", type=Path, nargs="+", help="engine folders to benchmark")
    parser.add_argument("--preset", choices=["tiny", "default", "paper"], help="build random-weight engines of this preset")
    parser.add_argument("--json", action="store_true", help="print one JSON object per result line")
    parser.add_argument("--backends", default="", help="comma list among " + ", ".join(
        f"{b.name} ({b.help})" if b.help else b.name for b in BENCH_BACKENDS) + " (default: all available)")
    parser.add_argument("--scopes", default="model,window", help="comma list among model,window")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (the targets are for 2)")
    parser.add_argument("--iters", type=int, default=0, help="timed calls per row (0: 40 at batch 1, 5 at 8 and more)")
    parser.add_argument("--sparse-budget", type=float, nargs="+", help="sparse export budget for --preset engines")
    parser.add_argument("--sparse-budget-audio", type=float, nargs="+",
                        help="the audio CNN's own sparse export budget for --preset engines")
    parser.add_argument("--sparse-guide", choices=["text", "learned"], default="text",
                        help="what queries the sparse stages of --preset engines (model.sparse_guide)")
    parser.add_argument("--sparse-dense-stages", type=int, default=None,
                        help="first stages of --preset sparse engines that run dense (default: "
                             "model.sparse_dense_stages)")
    parser.add_argument("--corpus", type=Path, help="synthetic corpus folder for real face frames (mmid synth)")
    parser.add_argument("--peer", action="store_true", help="also time benchmarks/peer.py (the original MME2E workload)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")


@dataclass(frozen=True)
class BenchBackend:
    """One name ``mmid bench --backends`` takes: how ``Engine.load`` opens it, and what an
    engine folder (its engine.json) and the machine need for it."""

    name: str
    help: str  # for --backends
    backend: str  # Engine.load's backend
    needs: str = ""  # engine.json key the folder must have ("": none, a run folder will do)
    cuda: bool = False  # needs a CUDA device
    device: str | None = None
    options: tuple[tuple[str, object], ...] = ()  # further Engine.load keywords
    cached: bool = False  # takes the engine's feature cache (config [engine] feature_cache)


BENCH_BACKENDS = (
    BenchBackend("torch", "", "torch", device="cpu"),
    BenchBackend("torch-cuda", "", "torch", cuda=True, device="cuda"),
    BenchBackend("torch-cuda-graphs", "CUDA graphs + fp16", "torch", cuda=True, device="cuda",
                 options=(("cuda_graphs", True), ("half", True))),
    BenchBackend("onnx", "", "onnx", needs="graph"),
    BenchBackend("onnx-cached", "CNN outputs reused across windows", "onnx", needs="split_graphs", cached=True),
    # int8 "force": timed even where the int8 check's top-1 did not hold
    BenchBackend("onnx-int8", "", "onnx", needs="int8_graph", options=(("int8", "force"),)),
    BenchBackend("onnx-cached-int8", "static int8 CNN graphs, cached", "onnx", needs="split_int8_graphs",
                 options=(("int8", "force"),), cached=True),
    BenchBackend("tensorrt", "", "tensorrt", needs="plan", cuda=True),
)
BY_NAME = {b.name: b for b in BENCH_BACKENDS}
KNOWN_BACKENDS = tuple(BY_NAME)
TORCH_BACKENDS = tuple(b.name for b in BENCH_BACKENDS if b.backend == "torch")


def available_backends(info: dict) -> list[str]:
    """Backends an engine (or run) folder can be timed with on this machine, in BENCH_BACKENDS order."""
    cuda = torch.cuda.is_available()
    return [b.name for b in BENCH_BACKENDS if (not b.needs or info.get(b.needs)) and (cuda or not b.cuda)]


def open_engine(path: Path, backend: str, threads: int, feature_cache: int = 0):
    """The engine at ``path`` opened as the bench backend ``backend`` (a BENCH_BACKENDS name)."""
    from engine.runtime import Engine

    b = BY_NAME[backend]
    return Engine.load(path, b.backend, threads, device=b.device, feature_cache=feature_cache if b.cached else 0,
                       **dict(b.options))


def run(args: argparse.Namespace, cfg) -> int:
    torch.set_num_threads(args.threads)
    engines = list(args.engine or [])
    wanted = [b for b in args.backends.split(",") if b]
    unknown = [b for b in wanted if b not in KNOWN_BACKENDS]
    if unknown:
        print(f"mmid bench: unknown backend(s) {', '.join(unknown)}; choose among {', '.join(KNOWN_BACKENDS)}",
              file=sys.stderr)
        return 2
    if not engines:
        preset = args.preset or "tiny"
        budget = tuple(args.sparse_budget) if args.sparse_budget else None
        torch_only = bool(wanted) and all(b in TORCH_BACKENDS for b in wanted)  # no ONNX export needed
        dense_stages = cfg.model.sparse_dense_stages if args.sparse_dense_stages is None else args.sparse_dense_stages
        for name in ("mme2e", "mme2e_sparse"):
            tag = "" if budget is None or name == "mme2e" else "-" + "-".join(map(str, budget))
            if args.sparse_budget_audio and name == "mme2e_sparse":
                tag += "-audio-" + "-".join(map(str, args.sparse_budget_audio))
            tag += "-learned" if args.sparse_guide == "learned" and name == "mme2e_sparse" else ""
            if dense_stages and name == "mme2e_sparse":
                tag += f"-dense{dense_stages}"
            if torch_only:
                engines.append(random_run(preset, name, args.cache_dir / f"{preset}-{name}{tag}-run", sparse_budget=budget,
                                          sparse_guide=args.sparse_guide, sparse_dense_stages=dense_stages,
                                          sparse_budget_audio=tuple(args.sparse_budget_audio or ()) or None))
            else:
                engines.append(random_engine(preset, name, args.cache_dir / f"{preset}-{name}{tag}", sparse_budget=budget,
                                             corpus=args.corpus, sparse_guide=args.sparse_guide,
                                             sparse_dense_stages=dense_stages,
                                             sparse_budget_audio=tuple(args.sparse_budget_audio or ()) or None))
    batches = [int(b) for b in args.batches.split(",")]
    scopes = args.scopes.split(",")
    rows = []
    stream = None
    iterations = {b: args.iters or max(5, 40 // b) for b in batches}  # b8: 5 steps (3 gave medians 30% apart)
    pool_s = Stream.seconds_for(max((iterations[b] + 1) * b + 1 for b in batches)) + 1.0  # nothing repeats in a row
    infos = {path: _folder_info(Path(path)) for path in engines}
    takes = {}  # engine -> the backends it is timed with
    for path, info in infos.items():
        available = available_backends(info)
        takes[path] = [b for b in available if not wanted or b in wanted]
        if not takes[path]:
            print(f"[bench] {path}: none of {', '.join(wanted)} is available for it here (available: "
                  f"{', '.join(available)})", file=sys.stderr)
    for backend in [b.name for b in BENCH_BACKENDS if any(b.name in t for t in takes.values())]:
        # the engines of a backend open together, their window steps interleaved and their model rows
        # back to back: the host's speed moves within minutes, so dense and sparse are timed alike
        opened = [(path, open_engine(Path(path), backend, args.threads, cfg.engine.feature_cache))
                  for path in engines if backend in takes[path]]
        stream = stream or Stream.make(opened[0][1].feature_params, args.corpus, pool_s)
        for scope in scopes:
            if scope == "model" and BY_NAME[backend].cached:
                continue  # repeated calls on one batch would all hit the cache: window scope only
            for batch in batches:
                tracker = (cfg.stream.face_redetect_s, cfg.stream.face_track_steps)
                if scope == "window":  # the engines' window steps interleaved
                    measured = bench_windows([e for _, e in opened], stream, batch, iterations[batch], *tracker)
                else:
                    measured = [bench_model(e, stream, batch, iterations[batch], *tracker) for _, e in opened]
                for (path, engine), figures in zip(opened, measured):
                    info = infos[path]
                    row = {"model": info["dims"]["name"], "backend": engine.backend_name, "device": engine.backend.device,
                           "scope": scope, "batch": batch, **figures,
                           "gflops_per_window": round(info["flops_per_window"]["gflops"], 2) if "flops_per_window" in info else None,
                           "sparse_budget": info.get("sparse_budget"), "sparse_budget_audio": info.get("sparse_budget_audio"),
                           "sparse_dense_stages": info.get("dims", {}).get("sparse_dense_stages", 0),
                           "threads": args.threads, "engine": str(path)}
                    rows.append(row)
                    _emit(row, args.json)
        del opened
    if args.peer:
        for row in peer_rows(stream or Stream.make(_params(), args.corpus, pool_s), args.threads, batches):
            rows.append(row)
            _emit(row, args.json)
    table = comparisons(rows)
    if table:  # after the rows; with --json on stderr, so that stdout stays one JSON object per line
        print("\n".join(table), file=sys.stderr if args.json else sys.stdout, flush=True)
    if not args.no_write:
        write_markdown(rows, Path("BENCHMARKS.md"), table)
    return 0


PEER = "peer-mme2e"  # benchmarks/peer.py's rows


def _speed(row: dict) -> float:
    """What a row is compared on: batch 1 per-window latency (as 1 / p50), larger batches throughput."""
    return 1000.0 / row["p50_ms"] if row["batch"] == 1 else row["windows_per_s"]


def comparisons(rows: list[dict]) -> list[str]:
    """Markdown lines comparing the rows of one run: each engine row against the original
    workload's row of the same scope and batch (when --peer timed it), and each sparse row
    against the dense row of the same backend, scope and batch (with several dense engines,
    the last one timed before it, else the first after it): how many times faster, on
    latency (p50) at batch 1 and on windows/s at larger batches. [] when nothing compares."""
    peer = {(r["scope"], r["batch"]): r for r in rows if r["model"] == PEER}
    dense: dict[tuple, dict] = {}
    for r in reversed(rows):  # the first dense row of each key, for a sparse row timed before any
        if r["model"] == "mme2e":
            dense[(r["backend"], r["scope"], r["batch"])] = r
    out = []
    for r in rows:
        if r["model"] == PEER:
            continue
        key = (r["backend"], r["scope"], r["batch"])
        if r["model"] == "mme2e":
            dense[key] = r  # the latest dense row so far
        p, d = peer.get((r["scope"], r["batch"])), dense.get(key)
        vs_peer = f"{_speed(r) / _speed(p):.1f}x" if p else ""
        vs_dense = f"{_speed(r) / _speed(d):.2f}x" if d is not None and r["model"] != "mme2e" else ""
        if vs_peer or vs_dense:
            out.append(f"| {r['model']} | {r['backend']} | {r['scope']} | {r['batch']} | {vs_peer} | {vs_dense} |")
    if not out:
        return []
    return ["In this run, how many times faster (batch 1: p50 latency; larger batches: windows/s) each engine "
            "is than the original workload at the same scope and batch, and a sparse engine than the dense one on "
            "the same backend (below 1: slower):", "",
            "| model | backend | scope | batch | vs original workload | sparse vs dense |", "|---|---|---|---|---|---|",
            *out]


def _folder_info(path: Path) -> dict:
    """engine.json of an engine folder; for a run folder, its dims and no graphs."""
    if (path / "engine.json").exists():
        return json.loads((path / "engine.json").read_text())
    from engine.checkpoint import load_meta

    dims = load_meta(path).dims
    return {"dims": json.loads(dims.to_json()), "sparse_budget": list(dims.sparse_budget) or None,
            "sparse_budget_audio": list(dims.sparse_budget_audio) or None, "run": True}


def _params():
    from engine.features import FeatureParams

    return FeatureParams()


def peer_rows(stream: Stream, threads: int, batches: list[int]) -> list[dict]:
    """Time the original workload (benchmarks/peer.py) on the same frames, loaded by path."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "peer.py"
    spec = importlib.util.spec_from_file_location("mmid_peer", path)
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)
    return peer.bench(stream.frames, stream.audio, list(TRANSCRIPTS), threads=threads, batches=batches)


def _emit(row: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(row), flush=True)
    else:
        print(f"{row['model']:>13} {row['backend']:>12} {row['scope']:>6} b={row['batch']:<3} p50 {row['p50_ms']:>8.1f} ms"
              f"  p95 {row['p95_ms']:>8.1f} ms  {row['windows_per_s']:>8.1f} windows/s  peak {row.get('peak_mib', 0):>7.1f} MiB",
              flush=True)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    try:
        load = "load average %.1f" % __import__("os").getloadavg()[0]
    except OSError:
        load = ""
    return f"{cpu}, {__import__('os').cpu_count()} cores, {gpu}, {load}"


def budget_cell(row: dict) -> str:
    """A row's sparse budget for the table: its dense stages, then the fractions per sparse
    stage (visual / audio when the audio CNN has its own)."""
    if not row.get("sparse_budget"):
        return ""
    dense = f"{row.get('sparse_dense_stages') or 0} dense; "
    audio = row.get("sparse_budget_audio")
    return dense + (f"{row['sparse_budget']} / {audio}" if audio else str(row["sparse_budget"]))


def write_markdown(rows: list[dict], path: Path, table: list[str] = ()) -> None:
    """Replace the '## Engine' section of BENCHMARKS.md (other sections are kept); ``table``:
    ``comparisons(rows)``, written under the rows."""
    from engine.export import versions

    v = versions()
    lines = ["## Engine", "",
             f"`mmid bench` on {time.strftime('%Y-%m-%d %H:%M')}: {machine()}; "
             + ", ".join(f"{k} {val}" for k, val in v.items()) + ".", "",
             "Window scope = 3 s windows every 1 s of one stream (corpus video frames 500 ms apart when --corpus is "
             "given), identified as the stream does (Engine.identify_overlapped): faces on each sampled frame once, as "
             "the stream finds them (O-Net follows the previous frame's face, and every [stream] face_redetect_s also "
             "searches for faces as large; the batched MTCNN cascade on the first frame and after a lost track), "
             "crops cached across windows (2 new of 6 "
             "frames per window; a batch's new frames in one call, in a helper thread while the audio and text "
             "features are computed), log-mel chunks on the stream's 0.4 s grid (6-7 per window, each computed once) + "
             "tokenisation per window, forward per window. Transcripts: back-to-back speech segments (~13 words, ~3.3 s, no two alike), "
             "each window holding those whose midpoint it holds (the stream's rule), so neighbours mostly share "
             "one. onnx-cached: the dense model's per-frame and per-chunk CNN outputs (projected), the sparse model's "
             "low-level maps per frame and chunk and its sparse stages' outputs per frame or chunk and transcript, and "
             "the per-transcript text CLS computed once and reused by the later windows that hold them (GFLOPs/window stays the whole "
             "window's count); onnx-cached-int8: the same with static int8 CNN graphs and the text encoder in dynamic "
             "int8; onnx-int8: the whole graph "
             "with dynamic int8 MatMul/Gemm. Every row starts with an empty cache (a source name of its own); the "
             "window steps of a backend's engines are interleaved (one step of each in turn), so that the host's "
             "speed falls on dense and sparse alike. Model scope = forward only.", "",
             "| model | backend | device | scope | batch | p50 ms | p95 ms | windows/s | peak MiB | GFLOPs/window | "
             "sparse budget (dense stages; visual / audio) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['backend']} | {r.get('device', 'cpu')} | {r['scope']} | {r['batch']} | "
                     f"{r['p50_ms']} | {r['p95_ms']} | {r['windows_per_s']} | {r.get('peak_mib', '')} | "
                     f"{r.get('gflops_per_window', '')} | {budget_cell(r)} |")
    if table:
        lines += ["", *table]
    path.write_text(replace_section(path.read_text() if path.exists() else "# Benchmarks\n", "## Engine", lines))


def replace_section(text: str, heading: str, lines: list[str]) -> str:
    """Replace the section whose heading line is exactly ``heading`` (up to the next
    '## ' heading) by ``lines``, in place; append it when there is none."""
    body = "\n".join(lines) + "\n"
    doc = text.split("\n")
    if heading not in doc:
        return text.rstrip() + "\n\n" + body
    start = doc.index(heading)
    end = next((i for i in range(start + 1, len(doc)) if doc[i].startswith("## ")), len(doc))
    rest = "\n".join(doc[end:])
    return "\n".join(doc[:start]) + "\n" + body + ("\n" + rest if rest else "")
