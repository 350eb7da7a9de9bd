"""A prepared DATA folder (docs/ARCHITECTURE.md) as a torch Dataset.

Each item is read from disk (faces .npy without pickle, PCM16 wav, manifest
text) and turned into a ``Sample`` by ``engine.features.make_sample``, the
same call the stream makes, so training and serving see identical tensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from torch.utils.data import Dataset

from engine.features import FeatureParams, Sample, Tokenizer, make_sample, read_wav

PROTOCOLS = ("utterance", "dialog")
SPLIT_NAMES = ("train", "valid", "test")


def read_split(data: str | Path, protocol: str, split: str) -> list[str]:
    """Utterance ids of DATA/splits/<protocol>/<split>.txt."""
    if protocol not in PROTOCOLS or split not in SPLIT_NAMES:
        raise ValueError(f"split must be one of {PROTOCOLS} x {SPLIT_NAMES}, got {protocol}/{split}")
    path = Path(data) / "splits" / protocol / f"{split}.txt"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run `mmid prepare` first")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def load_raw(data: str | Path, row: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """One manifest row -> (crops uint8 (F,48,48,3), face_found bool (F,), audio float32, text)."""
    data = Path(data)
    crops = np.load(data / row["faces"], allow_pickle=False)
    found = np.asarray(row["frame_faces"], dtype=bool)
    audio = read_wav(data / row["audio"])
    return crops, found, audio, row["text"]


class PreparedDataset(Dataset):
    """Items are (Sample, person index) for the given utterance ids."""

    def __init__(
        self,
        data: str | Path,
        ids: Sequence[str],
        tokenizer: Tokenizer,
        params: FeatureParams | Any,
        persons: Sequence[str] | None = None,
    ):
        self.data = Path(data)
        self.tokenizer = tokenizer
        self.params = params
        self.persons = list(persons) if persons is not None else self.read_persons(self.data)
        index = {p: i for i, p in enumerate(self.persons)}
        rows = {r["id"]: r for r in self.read_manifest(self.data)}
        missing = [i for i in ids if i not in rows]
        if missing:
            raise KeyError(f"{len(missing)} split ids are not in {self.data}/manifest.jsonl, e.g. {missing[:3]}")
        self.rows = [rows[i] for i in ids]
        unknown = sorted({r["person"] for r in self.rows} - set(index))
        if unknown:
            raise KeyError(f"persons {unknown} are not in the person map {self.persons}")
        self.labels = [index[r["person"]] for r in self.rows]

    @staticmethod
    def read_manifest(data: str | Path) -> list[dict]:
        path = Path(data) / "manifest.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    @staticmethod
    def read_persons(data: str | Path) -> list[str]:
        return list(json.loads((Path(data) / "persons.json").read_text())["persons"])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[Sample, int]:
        row = self.rows[i]
        crops, found, audio, text = load_raw(self.data, row)
        return make_sample(crops, found, audio, text, self.tokenizer, self.params, id=row["id"]), self.labels[i]
