"""The corpus plan: persons, dialogs and what is said in each, all drawn from
one seed in the main process, so that rendering in worker processes cannot
change the result.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.synth import text as T
from training.synth.face import FaceParams, choose_faces
from training.synth.voice import VoiceParams, choose_voices

N_SESSIONS = 5
GENDERS = ("F", "M")


@dataclass(frozen=True)
class SizeSpec:
    """How big a corpus is."""

    dialogs_per_session: int
    turns_per_dialog: int  # utterances with an EmoEvaluation entry, split evenly between the two actors
    overlaps_per_dialog: int  # extra transcript-only `..._MXX0` turns
    short_lines: bool  # keep lines near 1-1.8 s (tiny renders fast)


SIZES = {
    "tiny": SizeSpec(dialogs_per_session=3, turns_per_dialog=6, overlaps_per_dialog=1, short_lines=True),
    "small": SizeSpec(dialogs_per_session=6, turns_per_dialog=14, overlaps_per_dialog=1, short_lines=False),
    "full": SizeSpec(dialogs_per_session=12, turns_per_dialog=30, overlaps_per_dialog=2, short_lines=False),
}


@dataclass(frozen=True)
class Person:
    id: str  # "Ses01F"
    session: int
    gender: str
    voice: VoiceParams
    face: FaceParams
    habits: dict[str, list[str]]

    def to_json(self) -> dict:
        return {
            "session": self.session,
            "gender": self.gender,
            **self.voice.to_json(),
            "face": self.face.to_json(),
            **self.habits,
        }


@dataclass(frozen=True)
class Turn:
    """One line of a dialog: spoken by ``gender``; ``overlap`` turns get an `XX` id."""

    gender: str
    text: str
    overlap: bool = False


@dataclass(frozen=True)
class Dialog:
    name: str  # "Ses01F_impro01", "Ses01M_script01_2"
    session: int
    prefix: str  # gender of the marker-wearer, who sits on the LEFT
    kind: str  # "impro" or "script"
    turns: tuple[Turn, ...]
    seed: int  # seeds the rendering of this dialog (timing, motion, noise)

    @property
    def left(self) -> str:
        return f"Ses0{self.session}{self.prefix}"

    @property
    def right(self) -> str:
        return f"Ses0{self.session}{'M' if self.prefix == 'F' else 'F'}"


@dataclass(frozen=True)
class Plan:
    seed: int
    size: str
    persons: tuple[Person, ...]
    dialogs: tuple[Dialog, ...]


def _persons(rng: np.random.Generator) -> tuple[Person, ...]:
    genders = [g for _ in range(N_SESSIONS) for g in GENDERS]
    voices = choose_voices(rng, genders)
    faces = choose_faces(rng, genders)
    return tuple(
        Person(f"Ses0{i // 2 + 1}{g}", i // 2 + 1, g, voices[i], faces[i], T.person_habits(rng))
        for i, g in enumerate(genders)
    )


def _dialog_names(session: int, n: int) -> list[tuple[str, str, str, int]]:
    """(name, prefix, kind, number) of a session's dialogs; both prefixes in both kinds.

    Improvisations are numbered 01, 02a, (02b when n >= 6), 03, ...; scripts
    run 01_1, 01_2, 02_1, 02_2, ... so equal script names mean equal lines.
    """
    impro_names = ["01", "02a"] + (["02b"] if n >= 6 else []) + [f"{k:02d}" for k in range(3, n + 3)]
    out, impro, script = [], 0, 0
    for i in range(n):
        prefix = GENDERS[(i + i // 2 + session) % 2]
        if i % 2 == 0:
            label = impro_names[impro]
            out.append((f"Ses0{session}{prefix}_impro{label}", prefix, "impro", int(label[:2])))
            impro += 1
        else:
            script += 1
            k, j = (script - 1) // 2 + 1, (script - 1) % 2 + 1
            out.append((f"Ses0{session}{prefix}_script{k:02d}_{j}", prefix, "script", k * 10 + j))
    return out


def _speaker_order(rng: np.random.Generator, n: int, first: str) -> list[str]:
    """Genders of n turns, half each, mostly alternating."""
    other = "M" if first == "F" else "F"
    order = [first if i % 2 == 0 else other for i in range(n)]
    for _ in range(n // 4):
        i = int(rng.integers(0, n - 1))
        order[i], order[i + 1] = order[i + 1], order[i]
    return order


def _short(rng: np.random.Generator, make) -> str:
    """A line of at most 5 words (about 1-1.8 s)."""
    for _ in range(20):
        line = make()
        if len(T.spoken(line).split()) <= 5:
            return line
    return T.pick(rng, T.REPLIES)


def make_plan(seed: int, size: str) -> Plan:
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    spec = SIZES[size]
    rng = np.random.default_rng([seed, 0])
    persons = _persons(rng)
    habits = {p.id: p.habits for p in persons}
    scripts: dict[int, tuple[list[str], list[str]]] = {}
    dialogs = []
    for session in range(1, N_SESSIONS + 1):
        for index, (name, prefix, kind, number) in enumerate(_dialog_names(session, spec.dialogs_per_session)):
            drng = np.random.default_rng([seed, 1, session, index])
            if kind == "script":
                if number not in scripts:
                    srng = np.random.default_rng([seed, 2, number])
                    roles = _speaker_order(srng, spec.turns_per_dialog, "F")  # F = role A
                    lines = [
                        _short(srng, lambda: T.sentence(srng)) if spec.short_lines else T.sentence(srng)
                        for _ in roles
                    ]
                    scripts[number] = (roles, lines)
                roles, lines = scripts[number]
                other = "M" if prefix == "F" else "F"
                order = [prefix if r == "F" else other for r in roles]  # the marker-wearer reads role A
            else:
                order = _speaker_order(drng, spec.turns_per_dialog, prefix)
                topic = T.TOPICS[(number - 1) % len(T.TOPICS)]
                lines = []
                for g in order:
                    h = habits[f"Ses0{session}{g}"]
                    make = lambda: T.improvised_line(drng, topic, h)  # noqa: E731
                    lines.append(_short(drng, make) if spec.short_lines else make())
            turns = [Turn(g, T.with_marker(drng, line)) for g, line in zip(order, lines)]
            for _ in range(spec.overlaps_per_dialog):
                at = int(drng.integers(1, len(turns)))
                turns.insert(at, Turn("?", T.pick(drng, T.BACKCHANNELS), overlap=True))
            dialogs.append(Dialog(name, session, prefix, kind, tuple(turns), int(drng.integers(2**31))))
    return Plan(seed, size, persons, tuple(dialogs))
