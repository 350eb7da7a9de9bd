"""The inference engine: load a run or engine folder, identify who speaks in windows.

    engine = Engine.load("ENGINE")               # backend="auto": tensorrt > torch-cuda > onnx > torch
    ids = engine.identify(batch)                 # batch: engine.features.Batch
    ids = engine.identify_raw([(crops, found, audio, text), ...])
    ids = engine.identify_overlapped([(audio, text, offset), ...], find_faces)   # faces found meanwhile

An engine folder (``mmid export``) holds ``engine.json`` (dims, person map,
feature parameters, backend, sparse budget, FLOPs, versions), ``tokenizer.json``,
``model.onnx`` (+ ``model.int8.onnx``, + ``model.plan`` for TensorRT) and
``model.safetensors`` (for the torch backend). A run folder (``mmid train``)
serves through the torch backend. Nothing here imports ``training``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from engine.backends import BACKENDS, Backend
from engine.backends.feature_cache import FeatureCache
from engine.dims import ModelDims
from engine.features import (Batch, FeatureParams, Tokenizer, collate, face_batch, grid_mel_chunks_batch, make_sample,
                             mel_chunks_batch)

log = logging.getLogger("mmid.engine")

ENGINE_FILE = "engine.json"
ENGINE_FORMAT_VERSION = 1
MODALITIES = ("text", "audio", "visual")
MEL_CHUNK_CACHE = 512  # grid log-mel chunks kept (16 KB each, with their 27 KB of samples): ~3 min of one stream's audio


@dataclass(frozen=True)
class Identification:
    """The answer for one window."""

    person: str  # most probable person
    index: int  # its label index
    confidence: float  # its fused probability
    probabilities: np.ndarray  # float32 (P,) fused softmax over persons
    modality_probabilities: np.ndarray  # float32 (3, P) text, audio, visual; zeros where absent
    present: tuple[bool, bool, bool]  # text, audio, visual
    embedding: np.ndarray  # float32 (E,) fused [text, audio, visual] embedding

    def top(self, persons: Sequence[str], k: int = 3) -> list[tuple[str, float]]:
        order = np.argsort(-self.probabilities)[:k]
        return [(persons[i], float(self.probabilities[i])) for i in order]


def softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def identifications(out: dict[str, np.ndarray], persons: Sequence[str]) -> list[Identification]:
    """Backend outputs -> one Identification per row."""
    probs = softmax(out["logits"].astype(np.float32))
    modal = softmax(out["modality_logits"].astype(np.float32)) * out["present"][:, :, None]
    result = []
    for b in range(probs.shape[0]):
        i = int(probs[b].argmax())
        result.append(Identification(
            person=persons[i], index=i, confidence=float(probs[b, i]), probabilities=probs[b],
            modality_probabilities=modal[b].astype(np.float32), present=tuple(bool(v) for v in out["present"][b]),
            embedding=out["embedding"][b].astype(np.float32),
        ))
    return result


class Engine:
    """A loaded model behind one backend, with its person map, features and tokenizer.
    One caller at a time: its caches (CNN and text rows, log-mel chunks) are not locked."""

    def __init__(self, backend: Backend, dims: ModelDims, persons: Sequence[str], feature_params: FeatureParams,
                 tokenizer: Tokenizer, info: dict[str, Any] | None = None):
        self.backend = backend
        self.dims = dims
        self.persons = tuple(persons)
        self.feature_params = feature_params
        self.tokenizer = tokenizer
        self.info = dict(info or {})
        self._helper: ThreadPoolExecutor | None = None  # identify_overlapped's face thread, made on first use
        self._chunks = FeatureCache(MEL_CHUNK_CACHE)  # grid log-mel chunks, shared by overlapping windows

    @property
    def backend_name(self) -> str:
        return self.backend.name

    @classmethod
    def load(cls, path: str | Path, backend: str = "auto", threads: int = 0, *, int8: bool | str = False,
             device: str | None = None, compile: bool = False, cuda_graphs: bool = False,
             half: bool = False, feature_cache: int = 0) -> "Engine":
        """Load an engine folder (``mmid export``) or a run folder (torch backend).
        ``compile``, ``cuda_graphs`` and ``half`` (fp16 autocast) apply to the torch backend.
        ``feature_cache`` > 0: the ONNX backend of an engine with split graphs keeps that many CNN
        outputs per modality and reuses them for frames/chunks seen before
        (engine/backends/feature_cache.py; exact, so the outputs do not change)."""
        path = Path(path)
        if backend not in ("auto", *BACKENDS):
            raise ValueError(f"backend={backend!r}: expected 'auto' or one of {BACKENDS}")
        if (path / ENGINE_FILE).exists():
            info = json.loads((path / ENGINE_FILE).read_text())
            if info.get("format_version") != ENGINE_FORMAT_VERSION:
                raise ValueError(f"{path}: unsupported engine format_version {info.get('format_version')!r}")
            dims = ModelDims.from_json(json.dumps(info["dims"]))
            persons, params = info["persons"], FeatureParams.from_dict(info["features"])
        elif (path / "model.json").exists():
            from engine.checkpoint import load_meta

            meta = load_meta(path)
            info, dims, persons, params = {"backend": "torch", "run": True}, meta.dims, meta.persons, meta.features
        else:
            raise FileNotFoundError(f"{path} is neither an engine folder ({ENGINE_FILE}) nor a run folder (model.json)")
        tokenizer = Tokenizer(path / "tokenizer.json", max_tokens=params.max_tokens)  # before the slower backend
        choice = _choose_backend(path, info, backend, device)
        impl = _open_backend(choice, path, info, dims, threads, int8, device, compile, cuda_graphs, half, feature_cache)
        log.info("engine %s: backend %s on %s (asked: %s)", path, impl.name, impl.device, backend)
        return cls(impl, dims, persons, params, tokenizer, info)

    def run(self, batch: Batch) -> dict[str, np.ndarray]:
        """Raw backend outputs (logits, modality_logits, present, embedding)."""
        return self.backend.run(batch)

    def identify(self, batch: Batch) -> list[Identification]:
        return identifications(self.backend.run(batch), self.persons)

    def identify_raw(self, windows: Sequence[tuple], sources: Sequence[str] | None = None) -> list[Identification]:
        """[(crops uint8 (F,S,S,3), face_found (F,), audio float32 16 kHz, transcript[, audio_offset]), ...]
        -> answers. ``audio_offset``: the stream index of the window's first audio sample;
        given (>= 0), the audio is cut on the stream's chunk grid (``grid_mel_chunks``), so
        overlapping windows share chunks and the feature cache reuses their CNN outputs.
        ``sources``: a name per window (e.g. its stream id); the feature cache reuses CNN
        outputs only between windows of the same source (a file replayed as two sources
        shares nothing)."""
        return self.identify(self.collate_raw(windows, sources))

    def identify_overlapped(self, windows: Sequence[tuple], find_faces: Callable[[], Sequence[tuple]],
                            sources: Sequence[str] | None = None) -> list[Identification]:
        """``identify_raw`` for windows given without their faces, [(audio, transcript[,
        audio_offset]), ...], with ``find_faces()`` -> [(crops, face_found), ...] (one per
        window, as ``identify_raw`` takes them) running in a helper thread meanwhile,
        while the calling thread computes the log-mels and tokens and, where the backend
        can (``prefetch``: the cached ONNX backend), the audio CNN and text encoder rows,
        which the forward then takes as they are; face search and tracking are mostly
        small operations that leave the second core idle. Same answers as
        ``identify_raw`` (tested)."""
        if self._helper is None:
            # torch's thread count is per thread: the face thread's small tensor operations on one
            # (on two they doubled its CPU time for no gain, measured), beside the model's threads
            self._helper = ThreadPoolExecutor(1, thread_name_prefix="faces", initializer=_one_torch_thread)
        pending = self._helper.submit(find_faces)
        try:
            size = self.feature_params.face_size
            blank = (np.zeros((0, size, size, 3), np.uint8), np.zeros(0, bool))
            batch = self.collate_raw([(*blank, *w) for w in windows], sources)
            prefetch = getattr(self.backend, "prefetch", None)
            prefetched = prefetch(batch) if prefetch is not None else None
        finally:
            faces = pending.result()  # the face thread's error, if any, is raised here
        if len(faces) != len(windows):
            raise ValueError(f"find_faces gave {len(faces)} windows' faces for {len(windows)} windows")
        crops = [check_crops(i, f[0], self.feature_params.face_size) for i, f in enumerate(faces)]
        with self.host_threads():
            tensors, mask = face_batch(crops, [f[1] for f in faces], self.feature_params)
        batch = dataclasses.replace(batch, faces=tensors, face_mask=mask)
        out = self.backend.run(batch) if prefetched is None else self.backend.run(batch, prefetched)
        return identifications(out, self.persons)

    def collate_raw(self, windows: Sequence[tuple], sources: Sequence[str] | None = None) -> Batch:
        """Raw windows (as ``identify_raw``) -> one Batch (``ids`` = ``sources``); the log-mels
        of the windows without an offset in one call on the backend's device. Torch runs on
        one CPU thread meanwhile: these operations are too small to share, and a second
        thread doubled their CPU time (measured) while the face thread needs the core. With
        the model on a GPU the CPU has nothing else to do: torch keeps its thread count."""
        with self.host_threads():
            return self._collate_raw(windows, sources)

    def host_threads(self):
        """The context the engine's host-side preparation runs in: one torch thread where
        the model computes on the CPU (``one_torch_thread``), torch's count where it does not."""
        return one_torch_thread() if self.backend.device == "cpu" else contextlib.nullcontext()

    def _collate_raw(self, windows: Sequence[tuple], sources: Sequence[str] | None = None) -> Batch:
        size = self.feature_params.face_size
        windows = [(check_crops(i, w[0], size), w[1], check_audio(i, w[2]), *w[3:]) for i, w in enumerate(windows)]
        offsets = [w[4] if len(w) > 4 and w[4] is not None and w[4] >= 0 else None for w in windows]
        plain = [i for i, o in enumerate(offsets) if o is None]
        chunks: list[Any] = [None] * len(windows)
        for i, c in zip(plain, mel_chunks_batch([windows[i][2] for i in plain], self.feature_params, self.backend.device)):
            chunks[i] = c
        names = list(sources) if sources is not None else [""] * len(windows)
        on_grid = [i for i, o in enumerate(offsets) if o is not None]
        grids = grid_mel_chunks_batch([(windows[i][2], offsets[i], names[i]) for i in on_grid], self.feature_params,
                                      self._chunks)
        for i, c in zip(on_grid, grids):
            chunks[i] = c
        samples = [make_sample(w[0], w[1], w[2], w[3], self.tokenizer, self.feature_params, id=name, audio_chunks=c)
                   for w, c, name in zip(windows, chunks, names)]
        return collate(samples)


def check_crops(i: int, crops: Any, size: int) -> np.ndarray:
    """Window ``i``'s face crops as the engine takes them, uint8 RGB (F, size, size, 3), or a
    ValueError saying what they are instead (a float image in 0..1 would read as black, a
    crop of another size would be reshaped into nonsense)."""
    crops = np.asarray(crops)
    if crops.ndim != 4 or crops.shape[1:] != (size, size, 3):
        raise ValueError(f"window {i}: face crops of shape {crops.shape}; this engine takes (F, {size}, {size}, 3) "
                         f"uint8 RGB (its features.face_size is {size})")
    if crops.dtype != np.uint8:
        raise ValueError(f"window {i}: face crops of dtype {crops.dtype}; this engine takes uint8 RGB 0..255")
    return crops


def check_audio(i: int, audio: Any) -> np.ndarray:
    """Window ``i``'s audio as the engine takes it, float mono samples (N,) (a (1, N) array is
    taken as its row), or a ValueError naming what is wrong: several channels, integer PCM
    (which would be read unscaled), or samples that are not finite."""
    audio = np.asarray(audio)
    if audio.ndim == 2 and audio.shape[0] == 1:
        audio = audio[0]
    if audio.ndim != 1:
        raise ValueError(f"window {i}: audio of shape {audio.shape}; the engine takes mono samples (N,) at 16 kHz "
                         "(mix channels down first, e.g. audio.mean(axis=0))")
    if audio.dtype.kind != "f":
        raise ValueError(f"window {i}: audio of dtype {audio.dtype}; the engine takes float samples in -1..1 "
                         "(int16 PCM: divide by 32768)")
    bad = int(audio.size - np.count_nonzero(np.isfinite(audio)))
    if bad:
        raise ValueError(f"window {i}: {bad} of its {audio.size} audio samples are not finite (NaN or inf)")
    return audio


def _one_torch_thread() -> None:
    import torch

    torch.set_num_threads(1)


@contextlib.contextmanager
def one_torch_thread():
    """Torch's CPU operations on one thread in this thread until the block ends (the count
    is per thread; the previous one comes back)."""
    import torch

    before = torch.get_num_threads()
    if before != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before != 1:
            torch.set_num_threads(before)


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


def _tensorrt_usable(path: Path, info: dict) -> bool:
    if not info.get("plan") or not (path / info["plan"]).exists() or not _cuda_available():
        return False
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


def _choose_backend(path: Path, info: dict, backend: str, device: str | None) -> str:
    if backend != "auto":
        return backend
    if info.get("run"):
        return "torch"
    if _tensorrt_usable(path, info):
        return "tensorrt"
    if device == "cuda" or (device is None and _cuda_available()):
        return "torch"  # no TensorRT: the CUDA torch backend beats ORT's CPU provider
    return "onnx"


def _open_backend(choice: str, path: Path, info: dict, dims: ModelDims, threads: int, int8: bool | str,
                  device: str | None, compile: bool, cuda_graphs: bool = False, half: bool = False,
                  feature_cache: int = 0) -> Backend:
    if choice == "onnx":
        from engine.backends.onnx_backend import OnnxBackend

        if info.get("run"):
            raise ValueError(f"{path} is a run folder: export it first (mmid export --run {path} --out ENGINE)")
        if feature_cache > 0 and _split_graphs_usable(path, info) and (not int8 or info.get("split_int8_graphs")):
            from engine.backends.feature_cache import CachedOnnxBackend

            if not int8:
                return CachedOnnxBackend(path, info["split_graphs"], feature_cache, threads=threads,
                                         learned_guide=dims.sparse_guide == "learned")
            _require_int8_top1(path, info, "cached", int8)
            return CachedOnnxBackend(path, info["split_int8_graphs"], feature_cache, threads=threads,
                                     name="onnx-cached-int8", learned_guide=dims.sparse_guide == "learned")
        graph = info.get("int8_graph") if int8 else info["graph"]
        if not graph:
            raise ValueError(f"{path} has no int8 graph: export with --int8")
        if int8:
            _require_int8_top1(path, info, "whole", int8)
        return OnnxBackend(path / graph, threads=threads, device="cpu", name="onnx-int8" if int8 else "onnx")
    if choice == "tensorrt":
        from engine.backends.tensorrt_backend import TensorRTBackend, require_tensorrt

        require_tensorrt()
        if not info.get("plan") or not (path / info["plan"]).exists():
            raise ValueError(f"{path} has no TensorRT plan: export with --backend tensorrt on a machine with TensorRT")
        return TensorRTBackend(path / info["plan"])
    return _torch_backend(path, info, dims, threads, device or ("cuda" if _cuda_available() else "cpu"), compile,
                          cuda_graphs, half)


def _split_graphs_usable(path: Path, info: dict) -> bool:
    """Split graphs in the current format (older exports: CNN graphs before the projection, the text encoder in the head)."""
    from engine.backends.feature_cache import split_format

    if not info.get("split_graphs"):
        return False
    if info.get("split_format", 1) != split_format(info.get("dims", {}).get("name", "mme2e")):
        log.warning("%s: split graphs of an older export; the feature cache is off until it is exported again", path)
        return False
    return True


def _require_int8_top1(path: Path, info: dict, variant: str, int8: bool | str) -> None:
    """Refuse an int8 variant that changed the top-1 person on a check window of the export
    (``int8="force"`` loads it anyway, e.g. for timing)."""
    check = info.get("int8_check", {})
    agreement = check.get(variant, {}).get("top1_agreement", info.get("int8_top1_agreement_random", 1.0))
    if int8 != "force" and agreement < 1.0:
        raise ValueError(f"{path}: the int8 graphs ({variant}) changed the top-1 person on {1 - agreement:.1%} of the "
                         f"export's check windows ({check.get('split', 'random')}), so they are not served "
                         "(int8='force' loads them anyway, e.g. for timing)")


def _torch_backend(path: Path, info: dict, dims: ModelDims, threads: int, device: str, compile: bool,
                   cuda_graphs: bool = False, half: bool = False) -> Backend:
    from engine.backends.torch_backend import TorchBackend
    from engine.checkpoint import load_weights
    from engine.model import build_model

    model = build_model(dims)
    load_weights(model, path / info.get("weights", "model.safetensors"))
    if info.get("sparse_budget") and hasattr(model, "set_sparse_budget"):  # serve exactly what was exported
        model.set_sparse_budget(info["sparse_budget"], info.get("sparse_budget_audio"))
    return TorchBackend(model, device=device, compile=compile, threads=threads, cuda_graphs=cuda_graphs, half=half)
