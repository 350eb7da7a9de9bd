"""Synthetic voices: espeak-ng, one voice variant (plus pitch and rate) per person.

espeak-ng 1.51 gives 12 distinguishable variants for US English
(``en-us+f1..f5`` and ``en-us+m1..m7``); females get the f-variants, males
five of the m-variants. A per-person pitch (``-p``) separates them further.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import wave
from dataclasses import dataclass

import numpy as np
from scipy.signal import resample_poly

SAMPLE_RATE = 16000  # Hz, every wav of the corpus
ESPEAK_RATE = 22050  # Hz, what espeak-ng writes
FEMALE_VARIANTS = ("f1", "f2", "f3", "f4", "f5")
MALE_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7")
TRIM_PAD_S = 0.05  # silence kept around the trimmed speech, seconds


@dataclass(frozen=True)
class VoiceParams:
    """How one person sounds; stored in persons.json."""

    voice: str  # espeak-ng voice, e.g. "en-us+f3"
    pitch: int  # espeak-ng -p, 0..99
    rate: int  # espeak-ng -s, words per minute

    def to_json(self) -> dict:
        return {"voice": self.voice, "pitch": self.pitch, "rate": self.rate}


def choose_voices(rng: np.random.Generator, genders: list[str]) -> list[VoiceParams]:
    """A distinct voice per person, in the order of ``genders`` ("F"/"M")."""
    n_f, n_m = genders.count("F"), genders.count("M")
    if n_f > len(FEMALE_VARIANTS) or n_m > len(MALE_VARIANTS):
        raise ValueError(f"at most {len(FEMALE_VARIANTS)} female and {len(MALE_VARIANTS)} male voices")
    female = list(rng.permutation(FEMALE_VARIANTS))
    male = list(rng.permutation(MALE_VARIANTS))
    pitches = list(rng.permutation(np.linspace(30, 70, len(genders)).round().astype(int)))
    voices = []
    for gender in genders:
        variant = female.pop() if gender == "F" else male.pop()
        voices.append(VoiceParams(f"en-us+{variant}", int(pitches.pop()), int(rng.integers(160, 186))))
    return voices


def require_espeak() -> str:
    path = shutil.which("espeak-ng")
    if path is None:
        raise RuntimeError("espeak-ng is not installed: `apt-get install espeak-ng` (scripts/setup.sh does it)")
    return path


def speak(text: str, voice: VoiceParams) -> np.ndarray:
    """``text`` said by ``voice``: float32 mono at SAMPLE_RATE, silence trimmed."""
    out = subprocess.run(
        [require_espeak(), "--stdout", "-v", voice.voice, "-p", str(voice.pitch), "-s", str(voice.rate), text],
        check=True,
        capture_output=True,
    ).stdout
    with wave.open(io.BytesIO(out)) as w:
        rate = w.getframerate()
        pcm = np.frombuffer(w.readframes(w.getnframes()), np.int16)
    x = pcm.astype(np.float32) / 32768.0
    x = resample_poly(x, SAMPLE_RATE, rate).astype(np.float32) if rate != SAMPLE_RATE else x
    loud = np.flatnonzero(np.abs(x) > 0.02)
    if loud.size:
        pad = int(TRIM_PAD_S * SAMPLE_RATE)
        x = x[max(loud[0] - pad, 0) : loud[-1] + pad]
    return x


def write_wav(path, samples: np.ndarray) -> None:
    """Write float samples in -1..1, shape (N,) or (N, channels), as PCM16."""
    pcm = np.clip(np.round(samples * 32767.0), -32768, 32767).astype("<i2")
    channels = 1 if pcm.ndim == 1 else pcm.shape[1]
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(pcm.tobytes())
