"""Model inputs, computed the same way for training and for serving.

Training (``training/dataset.py``) and the live stream both turn face crops,
16 kHz audio and a transcript into tensors through ``make_sample`` and batch
them with ``collate``; nothing else computes model inputs. The numbers that
shape the inputs travel with every checkpoint as a ``FeatureParams``, so a
served model sees exactly what it was trained on.

Shapes (one sample):
    faces  float32 (F, 3, 48, 48)   RGB, (pixel - face_mean) / face_std
    audio  float32 (C, 1, 128, 32)  log-mel chunks, last chunk zero-padded
    text   int64   (L,)             [CLS] ... [SEP], never padded
F, C or L may be 0: that modality is absent for the sample.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import torch

LOG_EPS = 1e-6  # added to mel power before the log: log(1e-6) = -13.8 is "silence"
TEXT_PAD_ID = 0  # id written into padded text positions (masked out anyway)
MARKER_RE = re.compile(r"\[[^\]]*\]|<[^>]*>")  # [LAUGHTER], [BREATHING], [GARBAGE], <noise>


@dataclass(frozen=True)
class FeatureParams:
    """Every number that shapes a model input; stored in checkpoints."""

    sample_rate: int = 16000
    n_mels: int = 128
    n_fft: int = 400
    hop_length: int = 200
    chunk_frames: int = 32
    max_chunks: int = 64
    max_frames: int = 64
    max_tokens: int = 100
    face_mean: tuple[float, ...] = (159.0, 111.0, 102.0)
    face_std: tuple[float, ...] = (37.0, 33.0, 32.0)
    face_size: int = 48
    face_margin: int = 2
    img_interval_ms: int = 500
    keep_fallback_frames: bool = False

    @classmethod
    def from_config(cls, cfg: Any) -> "FeatureParams":
        """Build from a ``Config`` (its [features] and [prepare] sections)."""
        p = cfg.prepare
        return cls(
            **dataclasses.asdict(cfg.features),  # every [features] key is a feature parameter
            face_size=p.face_size, face_margin=p.face_margin, img_interval_ms=p.img_interval_ms,
            keep_fallback_frames=p.keep_fallback_frames,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FeatureParams":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown feature parameters {sorted(unknown)}; known: {sorted(known)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**values)


def as_params(cfg: Any) -> FeatureParams:
    """Accept a ``FeatureParams`` or a whole ``Config``."""
    return cfg if isinstance(cfg, FeatureParams) else FeatureParams.from_config(cfg)


# ---------------------------------------------------------------- faces


def face_tensor(crops: np.ndarray, params: Any = None) -> torch.Tensor:
    """uint8 (F, S, S, 3) RGB crops -> float32 (F, 3, S, S) normalised by mean/std."""
    p = as_params(params) if params is not None else FeatureParams()
    crops = np.asarray(crops)
    if crops.ndim != 4 or crops.shape[-1] != 3:
        raise ValueError(f"face crops must be (F, H, W, 3) uint8, got shape {crops.shape}")
    x = torch.from_numpy(np.ascontiguousarray(crops)).to(torch.float32).permute(0, 3, 1, 2)  # (F, 3, S, S)
    mean = torch.tensor(p.face_mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(p.face_std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def select_frames(n: int, found: np.ndarray, params: FeatureParams) -> np.ndarray:
    """Indices of the frames used as visual input: found faces (plus fallbacks
    when keep_fallback_frames), at most max_frames, evenly spread, in order."""
    found = np.asarray(found, dtype=bool).reshape(-1)
    if found.shape[0] != n:
        raise ValueError(f"face_found has {found.shape[0]} entries for {n} crops")
    keep = np.arange(n) if params.keep_fallback_frames else np.flatnonzero(found)
    if len(keep) > params.max_frames:
        keep = keep[np.linspace(0, len(keep) - 1, params.max_frames).round().astype(np.int64)]
    return keep


# ---------------------------------------------------------------- audio


@functools.lru_cache(maxsize=8)
def _mel_transform(sample_rate: int, n_fft: int, hop_length: int, n_mels: int, device: str = "cpu",
                   center: bool = True):
    import warnings

    import torchaudio

    with warnings.catch_warnings():
        # 128 mels over 201 FFT bins (the paper's setting) leaves a few bands empty:
        # they read log(1e-6) always. Expected, so torchaudio's warning is silenced.
        warnings.filterwarnings("ignore", message="At least one mel filterbank has all zero values")
        return torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate, n_fft=n_fft, win_length=n_fft, hop_length=hop_length, n_mels=n_mels,
            center=center,
        ).to(device)


def log_mel(audio: np.ndarray | torch.Tensor, params: Any = None, device: str = "cpu") -> torch.Tensor:
    """float32 16 kHz mono (N,) or a batch of equal-length clips (B, N) ->
    log(mel power + 1e-6), float32 (n_mels, T) or (B, n_mels, T), on ``device``.

    torchaudio MelSpectrogram (power 2, centred frames, Hann window of n_fft
    samples, hop hop_length), so T = 1 + N // hop_length. Audio shorter than
    n_fft samples gives T = 0 (no audio).
    """
    p = as_params(params) if params is not None else FeatureParams()
    x = torch.as_tensor(np.asarray(audio, dtype=np.float32))
    x = x.reshape(-1) if x.ndim < 2 else x
    if x.shape[-1] < p.n_fft:
        return torch.zeros(*x.shape[:-1], p.n_mels, 0)
    with torch.no_grad():
        mel = _mel_transform(p.sample_rate, p.n_fft, p.hop_length, p.n_mels, str(device))(x.to(device))
    return torch.log(mel + LOG_EPS)


def _chunk(mel: torch.Tensor, p: FeatureParams) -> torch.Tensor:
    """(B, n_mels, T) -> (B, C, 1, n_mels, chunk_frames): consecutive chunks, the last
    zero-padded, at most max_chunks."""
    b, n_mels, t = mel.shape
    c = min(-(-t // p.chunk_frames), p.max_chunks)
    mel = mel[:, :, : c * p.chunk_frames]
    mel = torch.nn.functional.pad(mel, (0, c * p.chunk_frames - mel.shape[2]))  # (B, n_mels, C*cf)
    return mel.reshape(b, n_mels, c, p.chunk_frames).permute(0, 2, 1, 3).unsqueeze(2).contiguous()


def mel_chunks(audio: np.ndarray | torch.Tensor, params: Any = None) -> torch.Tensor:
    """float32 16 kHz mono -> (C, 1, n_mels, chunk_frames) log-mel chunks.

    Consecutive chunks of chunk_frames frames; the last one is zero-padded;
    at most max_chunks (the rest of a longer audio is dropped). C = 0 for
    audio shorter than n_fft samples.
    """
    p = as_params(params) if params is not None else FeatureParams()
    return _chunk(log_mel(audio, p)[None], p)[0]


class ChunkCache(Protocol):
    """Where ``grid_mel_chunks`` may keep chunks between windows (an LRU map): key (scope and
    grid position) -> (the samples the chunk was computed from, the chunk)."""

    def get(self, key: bytes) -> Any: ...

    def put(self, key: bytes, value: Any) -> None: ...


def grid_mel_chunks(audio: np.ndarray, offset: int, params: Any = None, cache: ChunkCache | None = None,
                    scope: str = "") -> torch.Tensor:
    """Log-mel chunks of a stream window on the stream's chunk grid -> (C, 1, n_mels, chunk_frames).

    ``audio`` float32 mono holds stream samples ``offset`` .. ``offset + len(audio)``
    (indices since the stream began). Chunks start at multiples of chunk_frames *
    hop_length samples (0.4 s), so overlapping windows whose starts differ by any
    amount cut the same chunks where they overlap. Each chunk is computed from its
    own samples plus n_fft // 2 on each side (a chunk is kept only when the window
    holds that context): its frames equal those of one centred spectrogram over the
    whole stream, as training's utterance spectrograms are, and a chunk comes out
    bit-identical in every window that holds it (what the engine's feature cache
    keys on). A 3 s window holds 6 or 7 chunks, at most max_chunks. With a ``cache``, a
    chunk seen before at the same stream position within ``scope`` (the engine passes the
    window's source) is taken from it instead of being computed again when its samples
    are bit-for-bit those it was computed from (a restarted source brings other samples
    to old positions): the same bits, as the chunk is a function of those samples alone."""
    return grid_mel_chunks_batch([(audio, offset, scope)], params, cache)[0]


def _same_samples(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-for-bit equality of two float32 sample arrays (so -0.0 differs from 0.0)."""
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), np.ascontiguousarray(b).view(np.uint32))


def grid_mel_chunks_batch(windows: Sequence[tuple[np.ndarray, int, str]], params: Any = None,
                          cache: ChunkCache | None = None) -> list[torch.Tensor]:
    """``[grid_mel_chunks(audio, offset, params, cache, scope) for audio, offset, scope in
    windows]``, with the chunks not found in the cache computed in one transform call (a
    chunk shared by several of the windows once). The spectrogram of a batch of equal-length
    pieces gives each the bits it gets alone (tests/test_features.py), so a chunk is the
    same whichever windows it was computed with."""
    p = as_params(params) if params is not None else FeatureParams()
    grid, ctx = p.chunk_frames * p.hop_length, p.n_fft // 2
    per_window: list[list[bytes]] = []
    samples: dict[bytes, np.ndarray] = {}  # key -> the samples of a chunk to compute, in order of first use
    chunks: dict[bytes, torch.Tensor] = {}
    seen: dict[bytes, np.ndarray] = {}  # key -> the samples its chunk is (or will be) computed from
    private: set[bytes] = set()  # keys of chunks that go in no cache
    for n, (audio, offset, scope) in enumerate(windows):
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        first = -(-(offset + ctx) // grid) * grid  # first grid start with ctx samples of the window before it
        keys = []
        for start in list(range(first, offset + audio.shape[0] - ctx - grid + 1, grid))[: p.max_chunks]:
            piece = audio[start - ctx - offset: start + grid + ctx - offset]  # (grid + 2 ctx,)
            # with a cache: the scope and the stream position, the samples compared in full on a
            # hit (a memcmp, cheaper than a digest and exact); without, the window and the start
            key = f"{scope}\0{start}".encode() if cache is not None else f"{n}:{start}".encode()
            if key in seen:
                if not _same_samples(seen[key], piece):  # the position again with other samples (a restart)
                    key = f"{n}:{start}".encode()  # in this batch: a chunk of its own, not cached
                    private.add(key)
                    seen[key], samples[key] = piece, piece
            else:
                found = cache.get(key) if cache is not None else None
                if found is not None and _same_samples(found[0], piece):
                    seen[key], chunks[key] = found
                else:
                    seen[key], samples[key] = piece, piece
            keys.append(key)
        per_window.append(keys)
    if samples:
        transform = _mel_transform(p.sample_rate, p.n_fft, p.hop_length, p.n_mels, "cpu", center=False)
        with torch.no_grad():
            new = torch.log(transform(torch.from_numpy(np.stack(list(samples.values()))))[:, :, : p.chunk_frames]
                            + LOG_EPS)  # (K, n_mels, chunk_frames)
        for key, chunk in zip(samples, new):
            chunks[key] = chunk = chunk.clone()  # its own storage: a cached chunk keeps no batch alive
            if cache is not None and key not in private:
                cache.put(key, (samples[key].copy(), chunk))  # the samples, to check a later hit against
    return [torch.stack([chunks[k] for k in keys])[:, None] if keys else torch.zeros(0, 1, p.n_mels, p.chunk_frames)
            for keys in per_window]  # each (C, 1, n_mels, chunk_frames)


def mel_chunks_batch(audios: Sequence[np.ndarray], params: Any = None, device: str = "cpu") -> list[torch.Tensor]:
    """``[mel_chunks(a) for a in audios]`` (on the CPU), clips of equal length in one
    transform call on ``device`` (a stream's windows all have the same length)."""
    p = as_params(params) if params is not None else FeatureParams()
    out: list[torch.Tensor | None] = [None] * len(audios)
    by_length: dict[int, list[int]] = {}
    for i, a in enumerate(audios):
        by_length.setdefault(int(np.asarray(a).reshape(-1).shape[0]), []).append(i)
    for idx in by_length.values():
        clips = np.stack([np.asarray(audios[i], dtype=np.float32).reshape(-1) for i in idx])  # (G, N)
        chunks = _chunk(log_mel(clips, p, device), p).cpu()  # (G, C, 1, n_mels, cf)
        for k, i in enumerate(idx):
            out[i] = chunks[k]
    return out  # type: ignore[return-value]


def decode_audio(path: str | Path, sample_rate: int = 16000) -> np.ndarray:
    """Decode any audio (or the audio of a video) with PyAV -> float32 (channels, N)
    at ``sample_rate``, channels kept. Raises av.error.FFmpegError on bad media."""
    import av

    with av.open(str(path)) as container:
        if not container.streams.audio:
            raise ValueError(f"{path} has no audio stream")
        stream = container.streams.audio[0]
        layout = "mono" if stream.codec_context.channels == 1 else "stereo"
        resampler = av.AudioResampler(format="fltp", layout=layout, rate=sample_rate)
        pieces = []
        for frame in container.decode(stream):
            pieces.extend(f.to_ndarray() for f in resampler.resample(frame))
        pieces.extend(f.to_ndarray() for f in resampler.resample(None))
    n_channels = 1 if layout == "mono" else 2
    if not pieces:
        return np.zeros((n_channels, 0), dtype=np.float32)
    return np.concatenate(pieces, axis=1).astype(np.float32)


def read_wav(path: str | Path) -> np.ndarray:
    """Read a PCM16 mono wav written by ``write_wav`` -> float32 (N,) in [-1, 1]."""
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2 or w.getnchannels() != 1:
            raise ValueError(f"{path}: expected PCM16 mono")
        data = w.readframes(w.getnframes())
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


def write_wav(path: str | Path, audio: np.ndarray, sample_rate: int = 16000) -> None:
    """Write float32 mono audio as PCM16 mono wav."""
    pcm = (np.clip(np.asarray(audio, dtype=np.float32), -1.0, 32767 / 32768) * 32768.0).round()
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.astype("<i2").tobytes())


# ---------------------------------------------------------------- text


def clean_text(text: str) -> str:
    """Drop IEMOCAP/ASR markers ([LAUGHTER], [BREATHING], [GARBAGE], [BLANK_AUDIO],
    <noise>) and collapse spaces. Applied inside ``Tokenizer.encode``, so
    training and serving strip markers the same way."""
    return " ".join(MARKER_RE.sub(" ", text).split())


class Tokenizer:
    """A ``tokenizers`` tokenizer.json giving [CLS] ... [SEP] int64 ids.

    Special tokens are added here, not by the file's post-processor, so any
    WordPiece/ALBERT tokenizer.json with [CLS] and [SEP] gives the same layout.
    """

    def __init__(self, path: str | Path, max_tokens: int = 100):
        try:
            from tokenizers import Tokenizer as _HFTokenizer
        except ImportError as exc:  # pragma: no cover - listed in requirements
            raise ImportError("mmid needs the `tokenizers` package: pip install tokenizers") from exc
        self.path = Path(path)
        if self.path.is_dir():
            self.path = self.path / "tokenizer.json"
        if not self.path.exists():  # the library's own error names no file
            raise FileNotFoundError(f"{self.path} is missing (mmid train and mmid export write one into their folder)")
        self._tok = _HFTokenizer.from_file(str(self.path))
        self._tok.no_padding()
        self._tok.no_truncation()
        self.cls_id = self._special("[CLS]", "<s>")
        self.sep_id = self._special("[SEP]", "</s>")
        if max_tokens < 3:
            raise ValueError(f"max_tokens must be at least 3, got {max_tokens}")
        self.max_tokens = max_tokens

    def _special(self, *names: str) -> int:
        for name in names:
            idx = self._tok.token_to_id(name)
            if idx is not None:
                return idx
        raise ValueError(f"{self.path} has none of the tokens {names}")

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> torch.Tensor:
        """Text -> int64 (L,) ids [CLS] ... [SEP], L <= max_tokens; empty text -> (0,)."""
        body = clean_text(text)
        if not body:
            return torch.zeros(0, dtype=torch.int64)
        ids = self._tok.encode(body, add_special_tokens=False).ids[: self.max_tokens - 2]
        return torch.tensor([self.cls_id, *ids, self.sep_id], dtype=torch.int64)


# ---------------------------------------------------------------- samples and batches


@dataclass(frozen=True)
class Sample:
    """The tensors of one utterance or stream window (shapes in the module doc)."""

    faces: torch.Tensor  # float32 (F, 3, S, S)
    audio: torch.Tensor  # float32 (C, 1, n_mels, chunk_frames)
    text: torch.Tensor  # int64 (L,)
    id: str = ""


@dataclass(frozen=True)
class Batch:
    """Padded tensors of B samples; a mask is True where a position is real.

    Padded dims are at least 1, so a modality absent from the whole batch is
    one all-False slot rather than a zero-size tensor.
    """

    faces: torch.Tensor  # float32 (B, F, 3, S, S)
    face_mask: torch.Tensor  # bool (B, F)
    audio: torch.Tensor  # float32 (B, C, 1, n_mels, chunk_frames)
    audio_mask: torch.Tensor  # bool (B, C)
    text: torch.Tensor  # int64 (B, L), TEXT_PAD_ID where padded
    text_mask: torch.Tensor  # bool (B, L)
    ids: tuple[str, ...] = ()

    def model_inputs(self) -> tuple[torch.Tensor, ...]:
        """(faces, face_mask, audio, audio_mask, text, text_mask): the model's forward order."""
        return (self.faces, self.face_mask, self.audio, self.audio_mask, self.text, self.text_mask)

    def to(self, device: str | torch.device) -> "Batch":
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **moved)


def make_sample(
    crops: np.ndarray,
    face_found: Sequence[bool] | np.ndarray,
    audio: np.ndarray,
    text: str,
    tokenizer: Tokenizer,
    cfg: Any,
    id: str = "",
    audio_chunks: torch.Tensor | None = None,
) -> Sample:
    """Raw inputs of one utterance/window -> Sample. The serving entry point.

    crops: uint8 (F, S, S, 3) RGB from ``engine.faces.crop_faces``; face_found:
    bool (F,); audio: float32 mono at sample_rate; text: raw transcript.
    audio_chunks: ``mel_chunks(audio)`` when already computed (``mel_chunks_batch``).
    """
    p = as_params(cfg)
    return Sample(
        faces=face_input(crops, face_found, p),
        audio=mel_chunks(audio, p) if audio_chunks is None else audio_chunks,
        text=tokenizer.encode(text),
        id=id,
    )


def _pad(tensors: list[torch.Tensor], fill: float | int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack tensors of shape (n_i, *rest) into (B, max(1, max n_i), *rest) + mask (B, N)."""
    n = max(1, max(t.shape[0] for t in tensors))
    rest = tensors[0].shape[1:]
    out = torch.full((len(tensors), n, *rest), fill, dtype=tensors[0].dtype)
    mask = torch.zeros(len(tensors), n, dtype=torch.bool)
    for i, t in enumerate(tensors):
        out[i, : t.shape[0]] = t
        mask[i, : t.shape[0]] = True
    return out, mask


def face_input(crops: np.ndarray, face_found: Sequence[bool] | np.ndarray, params: FeatureParams) -> torch.Tensor:
    """One window's crops uint8 (F, S, S, 3) and face_found (F,) -> its visual input
    float32 (F', 3, S, S): the frames ``select_frames`` keeps, normalised."""
    crops = np.asarray(crops, dtype=np.uint8).reshape(-1, params.face_size, params.face_size, 3)
    return face_tensor(crops[select_frames(len(crops), np.asarray(face_found, dtype=bool), params)], params)


def face_batch(crops: Sequence[np.ndarray], found: Sequence[np.ndarray], cfg: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Per window crops uint8 (F_i, S, S, 3) and face_found (F_i,) -> the Batch's faces
    (B, F, 3, S, S) and face_mask (B, F), exactly as ``make_sample`` + ``collate`` make them."""
    p = as_params(cfg)
    return _pad([face_input(c, f, p) for c, f in zip(crops, found)], 0.0)


def collate(samples: Sequence[Sample]) -> Batch:
    """Pad a list of Samples to the batch maximum of each modality."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    faces, face_mask = _pad([s.faces for s in samples], 0.0)
    audio, audio_mask = _pad([s.audio for s in samples], 0.0)
    text, text_mask = _pad([s.text for s in samples], TEXT_PAD_ID)
    return Batch(
        faces=faces, face_mask=face_mask, audio=audio, audio_mask=audio_mask,
        text=text, text_mask=text_mask, ids=tuple(s.id for s in samples),
    )
