"""The identification step behind one small interface.

The pipeline hands batches of windows (from any number of sources) to an
``Identifier`` and publishes what it returns. The trained engine plugs in
by implementing this protocol (an adapter that turns Windows into the
engine's Batch with engine/features.py and engine/faces.py, calls
``Engine.identify`` and maps each Identification to a WindowResult), and by
being returned from ``load_identifier`` for its ``--engine`` value.

``--engine`` values understood today:
- ``null`` (default): ``NullIdentifier``, always "unknown", confidence 0,
  with measured audio RMS and frame count as evidence (transport tests);
- ``package.module:factory``: ``factory(cfg)`` returns an Identifier.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from engine.config import Config, ConfigError
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


def load_identifier(engine: str | None, cfg: Config) -> Identifier:
    """The Identifier named by ``--engine`` (see the module docstring)."""
    if engine in (None, "", "null"):
        return NullIdentifier()
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
        f"--engine {engine!r}: engine folders are not wired in yet; "
        "use 'null' or 'package.module:factory' returning a stream.identify.Identifier"
    )
