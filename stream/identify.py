"""The identification step behind one small interface.

The pipeline hands batches of windows (from any number of sources) to an
``Identifier`` and publishes what it returns. The trained engine plugs in
through ``stream.engine_identifier.EngineIdentifier`` (faces, audio and
transcript of each window through the shared feature code, one
``Engine.identify_raw`` batch per call).

``--engine`` values:
- ``null`` (default): ``NullIdentifier``, always "unknown", confidence 0,
  with measured audio RMS and frame count as evidence (transport tests);
- a folder: an engine folder (``mmid export``) or a run folder (``mmid
  train``), loaded with [engine] backend and threads into an EngineIdentifier;
- ``package.module:factory``: ``factory(cfg)`` returns an Identifier.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from engine.config import Config, ConfigError, replace
from stream.events import UNKNOWN, ModelInfo
from stream.windows import Window


@dataclass(frozen=True)
class WindowResult:
    """What an identifier says about one window (same order as its input)."""

    person: str  # best candidate, before the unknown threshold is applied
    confidence: float  # 0..1 score of ``person``
    top_k: tuple[tuple[str, float], ...] = ()  # best first
    evidence: dict[str, Any] = field(default_factory=dict)  # per modality: "text", "audio", "visual"
    face_box: tuple[float, float, float, float] | None = None  # x1, y1, x2, y2 in frame pixels


@runtime_checkable
class Identifier(Protocol):
    """``identify`` windows. One that finds faces may also have ``face_counts() -> dict[str, int]``
    (frames so far by how their face was found), which the pipeline exports as
    ``mmid_face_frames{how}``."""

    info: ModelInfo

    def identify(self, windows: list[Window]) -> list[WindowResult]:
        """One result per window, in order. Called from a single worker thread."""
        ...


class NullIdentifier:
    """Reports everyone as unknown; evidence is what was measured, not guessed."""

    info = ModelInfo(name="null", version="1", backend="numpy")

    def identify(self, windows: list[Window]) -> list[WindowResult]:
        return [self._one(w) for w in windows]

    @staticmethod
    def _one(window: Window) -> WindowResult:
        rms = float(np.sqrt(np.mean(np.square(window.audio)))) if window.has_audio else None
        evidence = {
            "audio": {"present": window.has_audio, "rms": rms},
            "visual": {"present": window.has_video, "frames": len(window.frames)},
            "text": {"present": bool(window.transcript), "chars": len(window.transcript)},
        }
        return WindowResult(person=UNKNOWN, confidence=0.0, top_k=(), evidence=evidence)


def sampling_config(cfg: Config, identifier: Identifier) -> Config:
    """``cfg`` with video sampled every ``identifier.img_interval_ms`` (the interval its model was
    trained on) when it declares one; the pipeline samples frames every [prepare] img_interval_ms."""
    interval = getattr(identifier, "img_interval_ms", None)
    if interval is None or interval == cfg.prepare.img_interval_ms:
        return cfg
    return replace(cfg, prepare={"img_interval_ms": int(interval)})


def load_identifier(engine: str | None, cfg: Config) -> Identifier:
    """The Identifier named by ``--engine`` (see the module docstring)."""
    if engine in (None, "", "null"):
        return NullIdentifier()
    if Path(engine).is_dir():
        from stream.engine_identifier import EngineIdentifier  # imported here: loads torch and the backends

        try:
            return EngineIdentifier.from_path(engine, cfg)
        except (FileNotFoundError, ValueError) as exc:
            raise ConfigError(f"--engine {engine}: {exc}") from None
    if ":" in engine:
        module_name, _, attr = engine.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"--engine {engine}: cannot load {attr} from {module_name}: {exc}") from None
        identifier = factory(cfg)
        if not isinstance(identifier, Identifier):
            raise ConfigError(f"--engine {engine}: {attr}(cfg) did not return an Identifier")
        return identifier
    raise ConfigError(
        f"--engine {engine!r}: not a folder; use 'null', an engine or run folder, "
        "or 'package.module:factory' returning a stream.identify.Identifier"
    )
