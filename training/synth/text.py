"""What the synthetic actors say.

Scripted dialogs read the same lines in every session (one script number and
part, one list of lines, as in IEMOCAP), so their text says nothing about who
speaks beyond the role. Improvised lines mix the dialog's topic words with the
speaker's own habits (pet phrases and favourite words), so text alone is weak
to moderate evidence of the person.
"""

from __future__ import annotations

import numpy as np

SUBJECTS = ("I", "we", "you", "they", "my brother", "the manager", "your friend", "nobody", "everyone")
VERBS = ("need", "want", "found", "lost", "remember", "forgot", "like", "hate", "saw", "bought")
OBJECTS = (
    "the tickets", "that letter", "the car", "a new job", "the keys", "your forms", "the money",
    "this place", "the house", "a good reason", "the answer", "some time",
)
ENDINGS = ("today", "yesterday", "again", "last night", "right now", "for a while", "at all", "already")
QUESTIONS = ("Are you sure", "Why not", "What happened", "Where were you", "Did you call", "Is it true")
REPLIES = ("Excuse me.", "I know.", "Not really.", "Of course.", "Fine.", "No way.", "Okay.", "Really?")

# Topic words of improvised dialogs, by improvisation number (cycled).
TOPICS = (
    ("line", "office", "forms", "wait", "number"),
    ("job", "boss", "money", "move", "city"),
    ("wedding", "ring", "party", "family", "dress"),
    ("accident", "hospital", "doctor", "news", "call"),
    ("trip", "beach", "flight", "hotel", "bags"),
    ("exam", "school", "grade", "teacher", "paper"),
    ("baby", "house", "kitchen", "dinner", "plans"),
    ("army", "letter", "friend", "home", "years"),
)

PET_PHRASES = (
    "you know", "honestly", "I mean", "like", "basically", "to be fair", "oh man", "seriously",
    "listen", "well", "I guess", "come on", "actually", "look", "right", "okay so",
)
FAVOURITE_WORDS = (
    "totally", "really", "pretty", "super", "kind of", "quite", "absolutely", "just",
    "definitely", "so", "literally", "truly",
)

BACKCHANNELS = ("Yeah.", "Mm-hmm.", "Right.", "Uh-huh.", "[LAUGHTER]", "Okay.")
MARKERS = ("[LAUGHTER]", "[BREATHING]", "[GARBAGE]")


def pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def sentence(rng: np.random.Generator, topic: tuple[str, ...] | None = None) -> str:
    """One short sentence of 3-7 words (about 1-2.5 s of speech)."""
    kind = rng.random()
    if kind < 0.15:
        return pick(rng, REPLIES)
    obj = f"the {pick(rng, topic)}" if topic and rng.random() < 0.7 else pick(rng, OBJECTS)
    if kind < 0.4:
        return f"{pick(rng, QUESTIONS)} about {obj}?"
    words = f"{pick(rng, SUBJECTS)} {pick(rng, VERBS)} {obj}"
    if rng.random() < 0.5:
        words += f" {pick(rng, ENDINGS)}"
    return words[0].upper() + words[1:] + "."


def script_lines(rng: np.random.Generator, n: int) -> list[str]:
    """The lines of one script part, in order (roles alternate A, B, A, ...)."""
    return [sentence(rng) for _ in range(n)]


def person_habits(rng: np.random.Generator) -> dict[str, list[str]]:
    """A person's pet phrases and favourite words."""
    pets = rng.choice(len(PET_PHRASES), size=2, replace=False)
    favs = rng.choice(len(FAVOURITE_WORDS), size=2, replace=False)
    return {
        "pet_phrases": [PET_PHRASES[int(i)] for i in pets],
        "favourite_words": [FAVOURITE_WORDS[int(i)] for i in favs],
    }


def improvised_line(rng: np.random.Generator, topic: tuple[str, ...], habits: dict[str, list[str]]) -> str:
    """A line in the speaker's own manner about the dialog's topic."""
    line = sentence(rng, topic)
    if rng.random() < 0.5:
        fav = pick(rng, tuple(habits["favourite_words"]))
        line = line.rstrip(".?") + f", {fav}" + line[-1]
    if rng.random() < 0.6:
        pet = pick(rng, tuple(habits["pet_phrases"]))
        rest = line if line.startswith("I ") else line[0].lower() + line[1:]
        line = pet[0].upper() + pet[1:] + ", " + rest
    return line


def with_marker(rng: np.random.Generator, line: str, probability: float = 0.1) -> str:
    """Sometimes append a non-speech marker such as [LAUGHTER]."""
    return f"{line} {pick(rng, MARKERS)}" if rng.random() < probability else line


def spoken(text: str) -> str:
    """The words a voice says: the transcript without bracketed markers."""
    words = [w for w in text.split() if not (w.startswith("[") and w.endswith("]"))]
    return " ".join(words) or "hm"
