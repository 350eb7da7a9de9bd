"""Shared test fixtures.

``tiny_corpus`` (session scope): the synthetic IEMOCAP-layout corpus of size
``tiny`` with seed 0, generated once per test run. It returns the folder DIR
that holds ``DIR/IEMOCAP_full_release/`` (the release layout, see
shared/IEMOCAP_FORMAT.md) and ``DIR/persons.json`` (the generator's ground
truth: persons, dialogs, and every utterance's person, times and text; see
``training/synth/__init__.py``). Treat it as read-only: other tests share it.
It holds 10 persons (Ses01F ... Ses05M), 3 dialogs per session, 9 annotated
utterances per person, and takes about 25 s to make on 2 cores.
"""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_SEED = 0


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.synth import generate

    out = tmp_path_factory.mktemp("tiny_corpus")
    return generate(out, seed=TINY_SEED, size="tiny", workers=0, progress=False)
