"""Pickle-free checkpoints: ``model.safetensors`` + ``model.json`` + ``tokenizer.json``.

``model.json`` holds everything needed to rebuild the model and its inputs:
the architecture (``ModelDims``), the person map (label index -> name), the
feature parameters, and free-form metadata (preset, training command). The
loader rebuilds the model from the JSON and fills it from safetensors; nothing
is unpickled.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from engine.dims import ModelDims
from engine.features import FeatureParams

WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
TOKENIZER_FILE = "tokenizer.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class RunMeta:
    """What ``model.json`` records beside the weights."""

    dims: ModelDims
    persons: tuple[str, ...]
    features: FeatureParams
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "dims": json.loads(self.dims.to_json()),
            "persons": list(self.persons),
            "features": self.features.to_dict(),
            "extra": self.extra,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "RunMeta":
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"unsupported checkpoint format_version {data.get('format_version')!r}")
        return cls(
            dims=ModelDims.from_json(json.dumps(data["dims"])),
            persons=tuple(data["persons"]),
            features=FeatureParams.from_dict(data["features"]),
            extra=dict(data.get("extra", {})),
        )


def save_checkpoint(
    folder: str | Path,
    model: torch.nn.Module,
    meta: RunMeta,
    tokenizer_file: str | Path,
    weights_name: str = WEIGHTS_FILE,
) -> Path:
    """Write weights, metadata and tokenizer into ``folder`` (created if needed)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = folder / (weights_name + ".tmp")
    save_file(state, str(tmp))
    tmp.replace(folder / weights_name)
    (folder / META_FILE).write_text(json.dumps(meta.to_json(), indent=2))
    tok = Path(tokenizer_file)
    if tok.resolve() != (folder / TOKENIZER_FILE).resolve():
        shutil.copyfile(tok, folder / TOKENIZER_FILE)
    return folder


def load_meta(folder: str | Path) -> RunMeta:
    path = Path(folder) / META_FILE
    if not path.exists():
        raise FileNotFoundError(f"{folder} is not an mmid run: {META_FILE} is missing")
    return RunMeta.from_json(json.loads(path.read_text()))


def load_checkpoint(
    folder: str | Path, device: str | torch.device = "cpu", weights_name: str = WEIGHTS_FILE
) -> tuple[torch.nn.Module, RunMeta]:
    """Rebuild the model from ``model.json`` and load its safetensors weights (eval mode)."""
    from engine.model import build_model

    folder = Path(folder)
    meta = load_meta(folder)
    model = build_model(meta.dims)
    load_weights(model, folder / weights_name, device)
    return model.to(device).eval(), meta


def load_weights(model: torch.nn.Module, path: Path, device: str | torch.device = "cpu") -> None:
    """Load a safetensors file into ``model`` (strict), naming the file when it is missing."""
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing (the model's weights)")
    model.load_state_dict(load_file(str(path), device=str(device)), strict=True)
