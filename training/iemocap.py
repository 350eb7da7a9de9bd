"""Reading the IEMOCAP release: who speaks, when, what, and where on screen.

Layout and label rules: shared/IEMOCAP_FORMAT.md. The parsers are tolerant:
a line they do not understand is counted, never fatal.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

SESSIONS = tuple(f"Session{i}" for i in range(1, 6))
DIALOG_RE = re.compile(r"^Ses0[1-5][FM]_(impro\d\d[ab]?|script\d\d_\d[ab]?)$")
# An utterance id: dialog + "_" + gender letter + three digits (F000, M012).
UTT_RE = re.compile(r"^(?P<dialog>Ses(?P<session>0[1-5])(?P<wearer>[FM])_\S+)_(?P<gender>[FM])(?P<num>\d{3})$")
# Any turn id in a transcript, including unannotated ones such as Ses03M_impro03_MXX0.
TURN_RE = re.compile(r"^(?P<dialog>Ses0[1-5][FM]_\S+)_(?P<gender>[FM])(?P<num>\w+)$")
TRANSCRIPT_RE = re.compile(r"^(?P<id>\S+)\s+\[(?P<start>[\d.]+)-(?P<end>[\d.]+)\]:\s?(?P<text>.*)$")
EMO_RE = re.compile(r"^\[(?P<start>[\d.]+)\s*-\s*(?P<end>[\d.]+)\]\t(?P<id>\S+)\t(?P<emotion>\S+)")


@dataclass(frozen=True)
class Turn:
    """One transcript line."""

    id: str
    start: float
    end: float
    text: str


@dataclass(frozen=True)
class EmoEntry:
    """One EmoEvaluation block's first line."""

    id: str
    start: float
    end: float
    emotion: str


@dataclass
class Parsed:
    """What a parser read, plus the lines it could not read."""

    items: list = field(default_factory=list)
    unknown_lines: list[str] = field(default_factory=list)


def is_utterance_id(utt_id: str) -> bool:
    """True for real utterance ids (``..._F000``), False for ``..._MXX0`` turns."""
    return UTT_RE.match(utt_id) is not None


def session_of(utt_id: str) -> str:
    """``Ses01F_impro01_M000`` -> ``Ses01``."""
    m = TURN_RE.match(utt_id)
    if m is None:
        raise ValueError(f"not an IEMOCAP utterance id: {utt_id!r}")
    return utt_id[:5]


def person_of(utt_id: str) -> str:
    """The speaker: session + gender letter of the id's LAST token.

    ``Ses01F_impro01_M000`` -> ``Ses01M`` (never the dialog prefix ``Ses01F``).
    """
    m = TURN_RE.match(utt_id)
    if m is None:
        raise ValueError(f"not an IEMOCAP utterance id: {utt_id!r}")
    return utt_id[:5] + m.group("gender")


def speaker_side(utt_id: str) -> tuple[str, int]:
    """Where the speaker is: (half of the split-screen frame, wav channel).

    The reference rule: the actor whose gender equals the dialog prefix letter
    (the one wearing the motion-capture markers) is on the LEFT half and
    channel 0; the other actor is on the RIGHT half and channel 1.
    """
    m = TURN_RE.match(utt_id)
    if m is None:
        raise ValueError(f"not an IEMOCAP utterance id: {utt_id!r}")
    wearer = utt_id[5]
    return ("left", 0) if m.group("gender") == wearer else ("right", 1)


def dialog_of(utt_id: str) -> str:
    m = TURN_RE.match(utt_id)
    if m is None:
        raise ValueError(f"not an IEMOCAP utterance id: {utt_id!r}")
    return m.group("dialog")


def parse_transcription(path: Path) -> Parsed:
    """transcriptions/<dialog>.txt -> Turn per line; other lines are counted."""
    out = Parsed()
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if not line:
            continue
        m = TRANSCRIPT_RE.match(line)
        if m is None or TURN_RE.match(m.group("id")) is None:
            out.unknown_lines.append(line)
            continue
        out.items.append(Turn(m.group("id"), float(m.group("start")), float(m.group("end")), m.group("text").strip()))
    return out


def parse_emo_evaluation(path: Path) -> Parsed:
    """EmoEvaluation/<dialog>.txt -> EmoEntry per block; unreadable block heads are counted."""
    out = Parsed()
    block_start = True
    for raw in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = raw.rstrip("\n")
        if not line.strip():
            block_start = True
            continue
        if line.startswith("%"):
            continue
        if block_start:
            block_start = False
            m = EMO_RE.match(line)
            if m is not None and TURN_RE.match(m.group("id")) is not None:
                out.items.append(EmoEntry(m.group("id"), float(m.group("start")), float(m.group("end")), m.group("emotion")))
                continue
            out.unknown_lines.append(line.strip())
        # Evaluator lines (C-E2:, A-E3:, ...) inside a block are expected and ignored.
    return out


@dataclass(frozen=True)
class DialogFiles:
    """Where one dialog's files are (paths may not exist)."""

    name: str
    session: str  # "Session1"
    avi: Path
    wav: Path
    transcription: Path
    emo: Path


def find_dialogs(root: Path) -> tuple[list[DialogFiles], list[str]]:
    """Every dialog named by a transcription or EmoEvaluation file, sorted; plus
    names of files that look like neither (reported, not fatal)."""
    dialogs: list[DialogFiles] = []
    odd: list[str] = []
    for session in SESSIONS:
        base = root / session / "dialog"
        names: set[str] = set()
        for folder in (base / "transcriptions", base / "EmoEvaluation"):
            if not folder.is_dir():
                continue
            for p in folder.glob("*.txt"):
                if DIALOG_RE.match(p.stem) and p.stem.startswith(f"Ses0{session[-1]}"):
                    names.add(p.stem)
                elif not p.name.startswith("."):
                    odd.append(str(p.relative_to(root)))
        for name in sorted(names):
            dialogs.append(DialogFiles(
                name=name, session=session,
                avi=base / "avi" / "DivX" / f"{name}.avi",
                wav=base / "wav" / f"{name}.wav",
                transcription=base / "transcriptions" / f"{name}.txt",
                emo=base / "EmoEvaluation" / f"{name}.txt",
            ))
    return dialogs, odd
