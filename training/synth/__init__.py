"""A synthetic corpus in the IEMOCAP release layout (shared/IEMOCAP_FORMAT.md).

IEMOCAP is licensed and never on our machines, so tests and benchmarks run on
a miniature corpus that has the release's folders, names and line formats,
and ten persons (Ses01F ... Ses05M) who can be told apart by voice
(an espeak-ng variant and pitch each), face (a real small face photograph
from scikit-image, in the person's colours) and, more weakly, words
(improvised lines carry each person's pet phrases; scripted lines are the
same in every session).

    generate(out, seed=0, size="tiny", workers=0)   # or: mmid synth --out DIR

writes ``out/IEMOCAP_full_release/`` and ``out/persons.json``.

Sizes (dialogs per session x utterances with an EmoEvaluation entry per
dialog, plus transcript-only overlapped turns; times on 2 cores):

    tiny    3 x 6  + 1 XX  ->  9 utterances per person,  ~13 s dialogs, ~25 s
    small   6 x 14 + 1 XX  -> 42 utterances per person,  ~35 s dialogs, ~2.5 min
    full   12 x 30 + 2 XX  -> 180 utterances per person, ~75 s dialogs, ~20 min

Every size gives each person at least three dialogs, so a dialog-disjoint
train/valid/test split can hold every person in every split.

Decisions a reader must know:

- Utterance ids with a number (``..._F003``) have an EmoEvaluation entry and
  a sentence wav. Overlapped turns (``..._MXX0``) are in the transcript only:
  no EmoEvaluation entry, no sentence wav; their speech is in the dialog wav
  and moves the speaker's mouth in the video.
- The dialog prefix's actor sits on the LEFT half of the video and is
  channel 0 of the dialog wav; each channel holds 0.1x of the other actor.
- Transcripts hold a few lines whose first token is not an utterance id,
  and text markers such as ``[LAUGHTER]``.
- ``persons.json`` (schema ``format`` 1): ``seed``, ``size``,
  ``persons[pid]`` = {session, gender, voice, pitch, rate, face{...},
  pet_phrases, favourite_words}, ``dialogs[name]`` = {session, kind, left,
  right, duration}, ``utterances[id]`` = {dialog, person, start, end, text,
  emotion (null for XX turns), sentence_wav}. It is ground truth for tests,
  never an input of the reader.
- Same seed, same files, byte for byte (encoder set bit-exact, one thread
  per encoder, every random draw seeded per dialog).
"""

from training.synth.corpus import generate

__all__ = ["generate"]
