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
dialog, plus transcript-only overlapped turns). CPU time is the sum over
processes, measured on our 2-core machines; wall time is about half of it on
two free cores:

    tiny    3 x 6  + 1 XX   9 utterances per person,  8-14 s dialogs, ~19 s CPU, 37 MB
    small   6 x 14 + 1 XX  42 utterances per person, 24-40 s dialogs, ~80 s CPU, 210 MB
    full   12 x 30 + 2 XX 180 utterances per person, ~60-80 s dialogs, ~7 min CPU, ~1.5 GB (estimated)

Utterances last 0.4-2.1 s in tiny (lines of at most five words) and
0.4-4 s otherwise. Improvised dialogs are named impro01, impro02a, (impro02b
from six dialogs a session), impro03, ...; scripted ones script01_1,
script01_2, script02_1, ...

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
