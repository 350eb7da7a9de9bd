"""Typed, frozen configuration read from ``config.toml``.

Each TOML section maps to one frozen dataclass. ``load_config`` reads the
defaults shipped at the repository root, merges an optional user file and
``section.key=value`` overrides, and checks every key and value once, here,
raising ``ConfigError`` with the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "config.toml"


class ConfigError(ValueError):
    """A configuration key or value that mmid cannot accept."""


@dataclass(frozen=True)
class SynthConfig:
    seed: int = 0
    size: Literal["tiny", "small", "full"] = "tiny"
    workers: int = 0


@dataclass(frozen=True)
class PrepareConfig:
    img_interval_ms: int = 500
    face_size: int = 48
    face_margin: int = 2
    half_crop: int = 224
    keep_fallback_frames: bool = False
    workers: int = 0
    valid_fraction: float = 0.15
    test_fraction: float = 0.15
    split_seed: int = 0
    min_duration_s: float = 0.2
    max_duration_s: float = 30.0


@dataclass(frozen=True)
class FeaturesConfig:
    sample_rate: int = 16000
    n_mels: int = 128
    n_fft: int = 400
    hop_length: int = 200
    chunk_frames: int = 32
    max_chunks: int = 64
    max_frames: int = 64
    max_tokens: int = 100
    face_mean: tuple[float, ...] = (159.0, 111.0, 102.0)
    face_std: tuple[float, ...] = (37.0, 33.0, 32.0)


@dataclass(frozen=True)
class ModelConfig:
    name: Literal["mme2e", "mme2e_sparse"] = "mme2e"
    preset: Literal["tiny", "default", "paper"] = "default"
    text_model: str = ""
    sparse_threshold: float = 0.8
    sparse_guide: Literal["text", "learned"] = "text"
    sparse_dense_stages: int = 1


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 40
    batch_size: int = 8
    lr: float = 0.0
    text_lr: float = 5e-5
    warmup_steps: int = 50
    lr_decay: Literal["none", "cosine"] = "none"
    lr_min_ratio: float = 0.05
    weight_decay: float = 1e-4
    clip_grad: float = 10.0
    loss: Literal["ce", "bce"] = "ce"
    aux_loss_weight: float = 0.5
    modality_dropout: float = 0.2
    sparse_entropy_weight: float = -1.0
    sparse_entropy_weight_audio: float = -1.0
    sparse_entropy_target: float = -1.0
    sparse_entropy_floor: float = 0.4
    guide_dropout: float = -1.0
    guide_shuffle: float = 0.0
    patience: int = 10
    time_limit_s: float = 0.0
    early_stop: Literal["f1_loss", "f1"] = "f1"
    ema_decay: float = -1.0
    fusion_fit: Literal["valid", "valid_full", "none"] = "valid"
    fusion_fit_l2: float = 0.01
    select_on: Literal["fused", "fitted"] = "fitted"
    split: Literal["dialog", "utterance"] = "dialog"
    seed: int = 0
    deterministic: bool = True
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    num_workers: int = 0


@dataclass(frozen=True)
class EngineConfig:
    backend: Literal["auto", "torch", "onnx", "tensorrt"] = "auto"
    threads: int = 0
    sparse_budget: float = 0.0
    fp16: bool = True
    feature_cache: int = 1024
    int8: bool = False
    cuda_graphs: bool = False


@dataclass(frozen=True)
class StreamConfig:
    window_s: float = 3.0
    hop_s: float = 1.0
    unknown_threshold: float = 0.5
    top_k: int = 3
    asr_model: str = "tiny.en"
    asr_compute_type: str = "int8"
    asr_step_s: float = 3.0
    asr_background: bool = True
    asr_wait_s: float = 0.0
    realtime: bool = True
    open_timeout_s: float = 10.0
    read_timeout_s: float = 5.0
    reconnect_initial_s: float = 0.5
    reconnect_max_s: float = 10.0
    reconnect_attempts: int = 0
    queue_windows: int = 32
    max_batch: int = 16
    face_redetect_s: float = 4.0
    face_track_steps: int = 2
    redis_url: str = "redis://127.0.0.1:6379/0"
    stream_maxlen: int = 100000
    spool_dir: str = ".mmid-spool"
    spool_max_events: int = 100000
    metrics_port: int = 0


@dataclass(frozen=True)
class Config:
    synth: SynthConfig = field(default_factory=SynthConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        return "a list of numbers"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[tp]


def _coerce(where: str, tp: Any, value: Any) -> Any:
    """Return ``value`` as type ``tp`` or raise ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin is tuple:
        if isinstance(value, (list, tuple)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        ):
            return tuple(float(v) for v in value)
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{where} = {value!r} is not allowed: expected {_describe(tp)}")


def _section_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _merge(base: dict[str, dict[str, Any]], extra: dict[str, Any], origin: str) -> None:
    sections = {f.name: f.type for f in dataclasses.fields(Config)}
    for name, values in extra.items():
        if name not in sections:
            raise ConfigError(
                f"unknown config section [{name}] in {origin}; known sections: {', '.join(sections)}"
            )
        if not isinstance(values, dict):
            raise ConfigError(f"[{name}] in {origin} must be a table of keys")
        hints = _section_types(typing.get_type_hints(Config)[name])
        for key, value in values.items():
            if key not in hints:
                raise ConfigError(
                    f"unknown config key {name}.{key} in {origin}; "
                    f"known keys of [{name}]: {', '.join(hints)}"
                )
            base.setdefault(name, {})[key] = _coerce(f"{name}.{key}", hints[key], value)


def parse_override(text: str) -> dict[str, Any]:
    """Turn ``section.key=value`` into ``{section: {key: value}}``.

    The value is read as a TOML value; a bare word that is not valid TOML is
    taken as a string, so ``--set model.name=mme2e_sparse`` works unquoted.
    """
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"--set expects section.key=value, got {text!r}")
    dotted, raw = text.split("=", 1)
    section, key = dotted.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return {section: {key: value}}


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read the shipped defaults, then ``path`` (if given), then ``overrides``."""
    merged: dict[str, dict[str, Any]] = {}
    sources: list[tuple[dict[str, Any], str]] = []
    if DEFAULT_CONFIG_PATH.exists():
        sources.append((tomllib.loads(DEFAULT_CONFIG_PATH.read_text()), str(DEFAULT_CONFIG_PATH)))
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist")
        try:
            sources.append((tomllib.loads(p.read_text()), str(p)))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {p} is not valid TOML: {exc}") from None
    for text in overrides:
        sources.append((parse_override(text), f"--set {text}"))
    for data, origin in sources:
        _merge(merged, data, origin)
    hints = typing.get_type_hints(Config)
    return Config(**{name: hints[name](**merged.get(name, {})) for name in hints})


def replace(cfg: Config, **sections: dict[str, Any]) -> Config:
    """Return ``cfg`` with some keys of some sections changed, checked like overrides."""
    merged = {name: dataclasses.asdict(getattr(cfg, name)) for name in typing.get_type_hints(Config)}
    _merge(merged, sections, "code")
    hints = typing.get_type_hints(Config)
    return Config(**{name: hints[name](**merged[name]) for name in hints})
