"""Folder layout and text-file formats of the IEMOCAP release
(see shared/IEMOCAP_FORMAT.md), written for the synthetic corpus.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

RELEASE = "IEMOCAP_full_release"
# Folders a reader must ignore; created empty so that readers are tested against them.
IGNORED_DIALOG_DIRS = ("lab", "MOCAP_rotated")
IGNORED_SENTENCE_DIRS = ("ForcedAlignment", "MOCAP_head")
EMO_SUBDIRS = ("Attribute", "Categorical", "Self-evaluation")

EMOTIONS = ("neu", "ang", "hap", "exc", "sad", "fru", "fea", "sur", "dis", "oth", "xxx")
EMOTION_WEIGHTS = (0.25, 0.1, 0.08, 0.12, 0.1, 0.15, 0.03, 0.03, 0.02, 0.02, 0.1)
CATEGORY_NAMES = {
    "neu": "Neutral", "ang": "Anger", "hap": "Happiness", "exc": "Excited", "sad": "Sadness",
    "fru": "Frustration", "fea": "Fear", "sur": "Surprise", "dis": "Disgust", "oth": "Other",
}
EMO_HEADER = "% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]\n\n"


@dataclass(frozen=True)
class Utterance:
    """One timed turn of a rendered dialog (also the per-utterance truth)."""

    id: str  # "Ses01F_impro01_M003" or "Ses01F_impro01_MXX0"
    person: str
    start: float  # seconds in the dialog, 4 decimals
    end: float
    text: str
    emotion: str | None  # None for overlapped XX turns (no EmoEvaluation entry)

    @property
    def annotated(self) -> bool:
        return self.emotion is not None


def session_dir(root: Path, session: int) -> Path:
    return root / RELEASE / f"Session{session}"


def make_session_dirs(root: Path, session: int) -> None:
    base = session_dir(root, session)
    for sub in ("avi/DivX", "wav", "transcriptions", *(f"EmoEvaluation/{d}" for d in EMO_SUBDIRS)):
        (base / "dialog" / sub).mkdir(parents=True, exist_ok=True)
    for sub in IGNORED_DIALOG_DIRS:
        (base / "dialog" / sub).mkdir(parents=True, exist_ok=True)
    for sub in ("wav", *IGNORED_SENTENCE_DIRS):
        (base / "sentences" / sub).mkdir(parents=True, exist_ok=True)


def transcript_text(dialog: str, utterances: list[Utterance], rng: np.random.Generator) -> str:
    """transcriptions/<dialog>.txt: one `ID [SSS.SSSS-EEE.EEEE]: text` line a turn,
    plus a few lines whose first token is not an utterance id."""
    lines = [f"{u.id} [{u.start:08.4f}-{u.end:08.4f}]: {u.text}" for u in sorted(utterances, key=lambda u: u.start)]
    extras = ("M: [BREATHING]", f"{dialog} [NOTE]: recording restarted", "F: [GARBAGE]")
    for extra in extras[: 1 + int(rng.integers(0, 2))]:
        lines.insert(int(rng.integers(0, len(lines) + 1)), extra)
    return "\n".join(lines) + "\n"


def _vad(rng: np.random.Generator) -> list[float]:
    return [float(v) for v in rng.integers(2, 11, size=3) / 2.0]


def emo_text(utterances: list[Utterance], rng: np.random.Generator) -> str:
    """EmoEvaluation/<dialog>.txt: the `%` header, then one block per annotated turn."""
    blocks = []
    for u in sorted((u for u in utterances if u.annotated), key=lambda u: u.start):
        v, a, d = _vad(rng)
        lines = [f"[{u.start:.4f} - {u.end:.4f}]\t{u.id}\t{u.emotion}\t[{v:.4f}, {a:.4f}, {d:.4f}]"]
        for evaluator in ("C-E1", "C-E2", "C-E4")[: 2 + int(rng.integers(0, 2))]:
            code = u.emotion if u.emotion in CATEGORY_NAMES and rng.random() < 0.7 else "neu"
            lines.append(f"{evaluator}:\t{CATEGORY_NAMES[code]};\t()")
        for evaluator in ("A-E1", "A-E3"):
            val, act, dom = (int(x) for x in rng.integers(1, 6, size=3))
            lines.append(f"{evaluator}:\tval {val}; act {act}; dom  {dom};\t()")
        blocks.append("\n".join(lines) + "\n")
    return EMO_HEADER + "\n".join(blocks) + ("\n" if blocks else "")


def pick_emotion(rng: np.random.Generator) -> str:
    return str(rng.choice(EMOTIONS, p=np.array(EMOTION_WEIGHTS) / sum(EMOTION_WEIGHTS)))
