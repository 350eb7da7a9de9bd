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


@pytest.fixture(scope="session")
def prepared_tiny(tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`mmid prepare iemocap` of ``tiny_corpus`` (default config, 2 workers): a
    prepared DATA folder (docs/ARCHITECTURE.md). Read-only for tests, except
    that test_prepare's resume test re-runs prepare on it (same output)."""
    from engine.cli import main as mmid

    data = tmp_path_factory.mktemp("prepared_tiny")
    src = tiny_corpus / "IEMOCAP_full_release"
    assert mmid(["prepare", "iemocap", "--src", str(src), "--out", str(data), "--workers", "2"]) == 0
    return data


@pytest.fixture(scope="session")
def tiny_runs(prepared_tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Both models trained once per test run with the ``tiny`` preset on
    ``prepared_tiny`` (dialog split, default training config): model name ->
    run folder (model.safetensors + model.json + tokenizer.json). Read-only."""
    from engine.cli import main as mmid

    runs = {}
    for name in ("mme2e", "mme2e_sparse"):
        out = tmp_path_factory.mktemp(f"run_{name}")
        args = ["train", "--data", str(prepared_tiny), "--model", name, "--preset", "tiny", "--out", str(out)]
        assert mmid(args) == 0
        runs[name] = out
    return runs
