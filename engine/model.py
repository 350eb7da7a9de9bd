"""MME2E and sparse MME2E (Dai et al., NAACL 2021) for person identification.

Imports only torch. Inputs are the padded batch of engine/features.py; see
docs/ARCHITECTURE.md for the contract:

    faces (B, F, 3, 48, 48)     face_mask  (B, F) bool
    audio (B, C, 1, 128, 32)    audio_mask (B, C) bool
    text  (B, L) int64          text_mask  (B, L) bool

A modality is present for a sample when its mask has any True. Absent
modalities (and padded frames) are zeroed at the input, their logits are
zero and they get no weight in the late fusion, so whatever values they hold
cannot change the prediction. CNNs run over the real frames only (gathered
from the B*F grid and scattered back), so padding costs no convolution and
never enters the BatchNorm statistics.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Sequence

import torch
from torch import Tensor, nn

from engine.dims import N_MODALITIES, ModelDims
from engine.sparse import SparseStage
from engine.text import TextEncoder, TransformerLayer

MODALITIES = ("text", "audio", "visual")  # order of modality_logits and present


class ModelOutput(NamedTuple):
    logits: Tensor  # (B, P) fused
    modality_logits: Tensor  # (B, 3, P) text, audio, visual; zero where absent
    present: Tensor  # (B, 3) bool
    embedding: Tensor  # (B, E) [text CLS, audio CLS, visual CLS], zero where absent


def conv_bn_relu(cin: int, cout: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


def low_level_cnn(dims: ModelDims, in_channels: int) -> nn.Sequential:
    """Stem conv + 2x2 max-pool, then low_convs 3x3 convs: dense in both models."""
    layers = [conv_bn_relu(in_channels, dims.stem_channels, dims.stem_kernel), nn.MaxPool2d(2)]
    layers += [conv_bn_relu(dims.stem_channels, dims.stem_channels, 3) for _ in range(dims.low_convs)]
    return nn.Sequential(*layers)


def dense_stages(dims: ModelDims, count: int | None = None) -> nn.Sequential:
    """The first ``count`` stages (all when None) as dense layers: convs_per_stage 3x3
    conv + BN + ReLU, then a 2x2 max-pool, per stage."""
    layers: list[nn.Module] = []
    cin = dims.stem_channels
    for cout in dims.stage_channels[:count]:
        layers += [conv_bn_relu(cin if i == 0 else cout, cout, 3) for i in range(dims.convs_per_stage)]
        layers.append(nn.MaxPool2d(2))
        cin = cout
    return nn.Sequential(*layers)


class SequenceEncoder(nn.Module):
    """Projection of per-frame CNN features, then a transformer over the frames of an
    utterance with a learned CLS token; returns the CLS output (no positions, as in
    the reference code)."""

    def __init__(self, dims: ModelDims, flat_size: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(flat_size, dims.proj_hidden), nn.ReLU(), nn.Linear(dims.proj_hidden, dims.trans_dim))
        self.cls = nn.Parameter(torch.randn(dims.trans_dim) * 0.02)
        self.layers = nn.ModuleList(
            TransformerLayer(dims.trans_dim, dims.trans_heads, dims.trans_ff, dims.dropout, "relu", 1e-5)
            for _ in range(dims.trans_layers)
        )

    def forward(self, feats: Tensor, mask: Tensor) -> Tensor:
        """feats (B, F, flat), mask (B, F) bool -> (B, trans_dim)."""
        return self.attend(self.proj(feats), mask)

    def attend(self, x: Tensor, mask: Tensor) -> Tensor:
        """Projected frames x (B, F, D), mask (B, F) bool -> CLS output (B, D)."""
        B = x.shape[0]
        x = torch.cat([self.cls.expand(B, 1, -1).type(x.dtype), x], dim=1)  # (B, 1+F, D)
        keep = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)  # (B, 1+F): CLS always attendable
        for layer in self.layers:
            x = layer(x, keep)
        return x[:, 0]


class _MME2EBase(nn.Module):
    def __init__(self, dims: ModelDims):
        super().__init__()
        self.dims = dims
        self.text = TextEncoder(dims)
        self.audio_seq = SequenceEncoder(dims, dims.flat_size("audio"))
        self.visual_seq = SequenceEncoder(dims, dims.flat_size("visual"))
        self.text_out = nn.Linear(dims.text_hidden, dims.n_persons)
        self.audio_out = nn.Linear(dims.trans_dim, dims.n_persons)
        self.visual_out = nn.Linear(dims.trans_dim, dims.n_persons)
        self.fusion = nn.Parameter(torch.zeros(N_MODALITIES))  # softmax over present modalities
        # True: CNNs see real frames only (data-dependent shapes: training, eager torch).
        # False: every padded frame too (static shapes: ONNX export, CUDA graphs); the
        # same outputs in eval mode.
        self.gather_real_frames = True

    def frame_features(self, modality: str, x: Tensor, mask: Tensor, guide: Tensor) -> Tensor:
        """x (N, Cin, H, W), mask (N,), guide (N, text_hidden) -> (N, flat)."""
        raise NotImplementedError

    def encode(self, modality: str, x: Tensor, mask: Tensor, text_cls: Tensor) -> Tensor:
        """x (B, F, Cin, H, W), mask (B, F) -> (B, trans_dim)."""
        x, mask = _at_least_one_frame(x, mask)
        return self._sequence(modality, self.cnn_features(modality, x, mask, text_cls), mask)

    def cnn_features(self, modality: str, x: Tensor, mask: Tensor, text_cls: Tensor) -> Tensor:
        """x (B, F, Cin, H, W) with F >= 1, mask (B, F) -> flattened CNN maps (B, F, flat)."""
        B, F = mask.shape
        x = torch.where(mask[:, :, None, None, None], x, torch.zeros_like(x))  # padding/absent -> zeros
        flat_mask = mask.reshape(B * F)
        frames = x.reshape(B * F, *x.shape[2:])  # (B*F, Cin, H, W)
        guide = text_cls[:, None, :].expand(B, F, -1).reshape(B * F, -1)  # (B*F, G)
        if not self.gather_real_frames:  # static shapes (export, CUDA graphs): every frame through the CNN
            return self.frame_features(modality, frames, flat_mask, guide).reshape(B, F, -1)
        # The CNN runs on the N real frames only; padded and absent frames get zero
        # features (the transformer masks them out). N may be 0: an empty CNN batch.
        real = flat_mask.nonzero().reshape(-1)  # (N,) indices of real frames
        frames = frames.index_select(0, real)  # (N, Cin, H, W)
        if self.training and real.numel() == 0:  # BatchNorm cannot train on an empty batch
            feats = x.new_zeros(B * F, self.dims.flat_size(modality))
        else:
            feats = self.frame_features(modality, frames, flat_mask.index_select(0, real), guide.index_select(0, real))
            feats = feats.new_zeros(B * F, feats.shape[1]).index_copy(0, real, feats)  # (B*F, flat)
        return feats.reshape(B, F, -1)

    def _sequence(self, modality: str, feats: Tensor, mask: Tensor) -> Tensor:
        """feats (B, F, flat), mask (B, F) -> CLS (B, trans_dim)."""
        seq = self.audio_seq if modality == "audio" else self.visual_seq
        return seq(feats, mask)

    def text_guide(self, text_cls: Tensor, text_present: Tensor) -> Tensor:
        return text_cls

    def forward(self, faces: Tensor, face_mask: Tensor, audio: Tensor, audio_mask: Tensor,
                text: Tensor, text_mask: Tensor) -> ModelOutput:
        d = self.dims
        assert faces.shape[2:] == (3, d.face_size, d.face_size), f"faces: expected (B, F, 3, {d.face_size}, {d.face_size}), got {tuple(faces.shape)}"
        assert audio.shape[2:] == (1, d.n_mels, d.chunk_frames), f"audio: expected (B, C, 1, {d.n_mels}, {d.chunk_frames}), got {tuple(audio.shape)}"
        text, text_mask = _at_least_one_token(text, text_mask)
        present = torch.stack([text_mask.any(1), audio_mask.any(1), face_mask.any(1)], dim=1)  # (B, 3)
        text_cls = self.text(text, text_mask)  # (B, Ht)
        guide = self.text_guide(text_cls, present[:, 0])  # (B, Ht)
        audio_cls = self.encode("audio", audio, audio_mask, guide)  # (B, D)
        visual_cls = self.encode("visual", faces, face_mask, guide)  # (B, D)
        return self._heads(text_cls, audio_cls, visual_cls, present)

    def text_features(self, text: Tensor, text_mask: Tensor) -> Tensor:
        """Token ids (B, L), mask (B, L) -> the text encoder's CLS (B, Ht): a function of a
        window's tokens alone, so windows with the same transcript may share it."""
        text, text_mask = _at_least_one_token(text, text_mask)
        return self.text(text, text_mask)

    def forward_from_features(self, visual_emb: Tensor, face_mask: Tensor, audio_emb: Tensor, audio_mask: Tensor,
                              text_cls: Tensor, text_present: Tensor) -> ModelOutput:
        """``forward`` after the work that depends on one frame, chunk or transcript alone:
        each frame's and chunk's ``frame_embedding`` (sparse model: ``sparse_embedding``) and
        each window's ``text_features``.

        visual_emb (B, F, trans_dim), audio_emb (B, C, trans_dim), any values where the
        mask is False; text_cls (B, Ht), any values where text_present (B,) is False. In
        the dense model these depend on their own input alone, in the sparse model on
        their own input and their window's guide, so callers may compute them once and
        reuse them in every window that holds the same frame, chunk or transcript
        (engine/backends/feature_cache.py)."""
        visual_emb, face_mask = _at_least_one_frame(visual_emb, face_mask)
        audio_emb, audio_mask = _at_least_one_frame(audio_emb, audio_mask)
        present = torch.stack([text_present, audio_mask.any(1), face_mask.any(1)], dim=1)  # (B, 3)
        audio_cls = self.audio_seq.attend(audio_emb, audio_mask)  # (B, D)
        visual_cls = self.visual_seq.attend(visual_emb, face_mask)  # (B, D)
        return self._heads(text_cls, audio_cls, visual_cls, present)

    def _heads(self, text_cls: Tensor, audio_cls: Tensor, visual_cls: Tensor, present: Tensor) -> ModelOutput:
        """CLS vectors (B, Ht), (B, D), (B, D), present (B, 3) -> per-modality logits,
        late fusion and the fused embedding."""
        per_modality = torch.stack([self.text_out(text_cls), self.audio_out(audio_cls), self.visual_out(visual_cls)], dim=1)
        per_modality = torch.where(present[:, :, None], per_modality, torch.zeros_like(per_modality))  # (B, 3, P)
        logits = late_fusion(self.fusion, per_modality, present)  # (B, P)
        parts = [text_cls, audio_cls, visual_cls]
        embedding = torch.cat([torch.where(present[:, i, None], p, torch.zeros_like(p)) for i, p in enumerate(parts)], dim=1)
        return ModelOutput(logits, per_modality, present, embedding)


class MME2E(_MME2EBase):
    """Dense MME2E: VGG-style CNNs per frame, transformers over frames, text CLS,
    per-modality heads and learned weighted late fusion."""

    def __init__(self, dims: ModelDims):
        super().__init__(dims)
        self.visual_cnn = nn.Sequential(low_level_cnn(dims, 3), dense_stages(dims))
        self.audio_cnn = nn.Sequential(low_level_cnn(dims, 1), dense_stages(dims))

    def frame_features(self, modality: str, x: Tensor, mask: Tensor, guide: Tensor) -> Tensor:
        cnn = self.audio_cnn if modality == "audio" else self.visual_cnn
        return cnn(x).flatten(1)  # (N, flat)

    def frame_embedding(self, modality: str, x: Tensor) -> Tensor:
        """One modality's frames or chunks x (N, Cin, H, W) -> their projected CNN outputs
        (N, trans_dim): everything the dense model computes from a frame alone."""
        seq = self.audio_seq if modality == "audio" else self.visual_seq
        return seq.proj(self.frame_features(modality, x, None, None))


class SparseCNN(nn.Module):
    """Dense low-level CNN (with the first ``sparse_dense_stages`` stages, dense), then one
    text-guided SparseStage per remaining entry of stage_channels."""

    def __init__(self, dims: ModelDims, in_channels: int):
        super().__init__()
        self.low = nn.Sequential(*low_level_cnn(dims, in_channels), *dense_stages(dims, dims.sparse_dense_stages))
        self.stages = nn.ModuleList(
            SparseStage(cin, cout, dims.convs_per_stage, dims.text_hidden) for cin, cout in dims.sparse_stage_channels()
        )

    def forward(self, x: Tensor, mask: Tensor, guide: Tensor, threshold: float,
                budget: Sequence[float] | None) -> tuple[Tensor, Tensor]:
        """x (N, Cin, H, W), mask (N,) real frames, guide (N, G) ->
        (features (N, flat), kept sites per frame and sparse stage (N, n_sparse_stages))."""
        return self.sparse(self.low(x), mask, guide, threshold, budget)

    def sparse(self, x: Tensor, mask: Tensor, guide: Tensor, threshold: float,
               budget: Sequence[float] | None) -> tuple[Tensor, Tensor]:
        """The sparse stages alone: the low-level map x (N, low_channels, h, w), mask (N,), guide
        (N, G) -> (features (N, flat), kept sites per frame and sparse stage (N, n_sparse_stages))."""
        if fixed_budget_eval(self, budget):
            return self.sparse_budget_eval(channels_last(x), x.shape[2], x.shape[3], mask, guide, budget)
        active = mask[:, None, None].expand(-1, x.shape[2], x.shape[3])  # (N, h, w)
        kept = []
        for i, stage in enumerate(self.stages):
            x, active, count = stage(x, active, guide, threshold, None if budget is None else budget[i])
            kept.append(count)
        return x.flatten(1), torch.stack(kept, dim=1)

    def low_maps(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Frames x (N, Cin, H, W) -> what the sparse stages need of them that no guide changes:
        the low-level maps channels last (N, h*w, low_channels) and the first sparse stage's
        attention keys (N, h*w, A), both functions of the frame alone."""
        rows = channels_last(self.low(x))
        return rows, self.stages[0].attention.channel_proj(rows)

    def sparse_budget_eval(self, x: Tensor, h: int, w: int, mask: Tensor, guide: Tensor, budget: Sequence[float],
                           all_real: bool = False, keys: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``sparse`` in evaluation with a fixed budget, through ``SparseStage.forward_budget``
        (the same values): x the low-level maps channels last (N, h*w, low_channels), mask (N,) real frames,
        guide (N, G); ``all_real``: every frame is real (the first stage needs no candidate
        mask); ``keys``: the first stage's attention keys (``low_maps``) when the caller has them."""
        active = None if all_real else mask[:, None].expand(-1, h * w)  # (N, h*w)
        kept = []
        for i, (stage, fraction) in enumerate(zip(self.stages, budget)):
            x, active, count = stage.forward_budget(x, active, guide, h, w, fraction, keys if i == 0 else None)
            h, w = h // 2, w // 2
            kept.append(count)
        return x.transpose(1, 2).flatten(1), torch.stack(kept, dim=1)  # (N, C*h*w) as an NCHW map's flatten


def channels_last(x: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, H*W, C)."""
    return x.flatten(2).transpose(1, 2)


def fixed_budget_eval(module: nn.Module, budget: Sequence[float] | None) -> bool:
    """Whether the sparse stages run ``SparseStage.forward_budget``: a fixed budget, evaluation
    mode and no autograd (training's formulation gives the attention its gradient)."""
    return budget is not None and not module.training and not torch.is_grad_enabled()


class MME2ESparse(_MME2EBase):
    """Sparse MME2E: after the dense low-level layers, sites of each stage are chosen by
    text-guided cross-modal attention (CDF rule, or a fixed budget for export) and the
    stage's convolutions run on those sites only.

    ``last_active_fractions`` holds, after each eager forward, {"audio", "visual"} ->
    (n_stages,) tensor: kept sites / positions of each stage's input grid, averaged
    over real frames, for the modalities whose CNN ran in that forward (a training
    batch without any face has no "visual" entry, not the previous batch's). ``set_sparse_budget`` switches between CDF and fixed budget.
    """

    def __init__(self, dims: ModelDims):
        super().__init__(dims)
        self.visual_cnn = SparseCNN(dims, 3)
        self.audio_cnn = SparseCNN(dims, 1)
        self.null_guide = nn.Parameter(torch.zeros(dims.text_hidden))  # query when the text is absent
        self.sparse_budget: tuple[float, ...] | None = tuple(dims.sparse_budget) or None
        self.sparse_budget_audio: tuple[float, ...] | None = tuple(dims.sparse_budget_audio) or None  # None: sparse_budget
        self.last_active_fractions: dict[str, Tensor] = {}
        # Training only (set by training; eval neither drops nor shuffles): probability
        # per sample that its sparse attention is guided by null_guide instead of its
        # transcript, and that it is guided by its batch neighbour's guide.
        self.guide_dropout = 0.0
        self.guide_shuffle = 0.0

    def forward(self, faces: Tensor, face_mask: Tensor, audio: Tensor, audio_mask: Tensor,
                text: Tensor, text_mask: Tensor) -> ModelOutput:
        self.last_active_fractions = {}  # filled by this forward's sparse CNNs
        return super().forward(faces, face_mask, audio, audio_mask, text, text_mask)

    def set_sparse_budget(self, budget: Sequence[float] | None, audio: Sequence[float] | None = None) -> None:
        """None: CDF rule (the paper). A fraction per sparse stage: fixed top-k sites per frame,
        for both CNNs, or for the visual one when ``audio`` gives the audio CNN's own."""
        checked = []
        for b in (budget, audio):
            if b is not None:
                b = tuple(float(x) for x in b)
                if len(b) != self.dims.n_sparse_stages or not all(0 < x <= 1 for x in b):
                    raise ValueError(f"sparse budget {b}: expected {self.dims.n_sparse_stages} fractions in (0, 1]")
            checked.append(b)
        if budget is None and audio is not None:
            raise ValueError("an audio sparse budget needs the visual one")
        self.sparse_budget, self.sparse_budget_audio = checked

    def budget_of(self, modality: str) -> tuple[float, ...] | None:
        """The fixed budget of one modality's CNN (None: the CDF rule)."""
        return self.sparse_budget_audio if modality == "audio" and self.sparse_budget_audio else self.sparse_budget

    def stage_entropies(self) -> dict[str, list[float]]:
        """Normalised attention entropy of each sparse stage in the last training forward,
        per modality that ran (for logging; read before ``attention_entropy`` clears it)."""
        out = {}
        for name, cnn in (("audio", self.audio_cnn), ("visual", self.visual_cnn)):
            if all(stage.last_entropy is not None for stage in cnn.stages):
                out[name] = [float(stage.last_entropy.detach()) for stage in cnn.stages]
        return out

    def attention_entropy(self, weights: dict[str, float] | None = None, target: float = 0.0,
                          floor: float = 0.0) -> Tensor | None:
        """Mean normalised attention entropy of the sparse stages that ran in the last
        training forward, for the training loss to penalise: each stage's entropy above
        ``target`` (a hinge; 0 = the entropy itself) plus its shortfall below ``floor``
        (0 = none: attention may sharpen onto a single site), the mean over each
        modality's stages, times ``weights[modality]`` (default 1), averaged over the
        modalities that ran (None if none did). Reading clears it, so a stage skipped in
        the next step (a batch without any face) is not counted again with a graph that
        backward has already freed."""
        per_modality = []
        for name, cnn in (("audio", self.audio_cnn), ("visual", self.visual_cnn)):
            values = [(stage.last_entropy - target).clamp(min=0.0) + (floor - stage.last_entropy).clamp(min=0.0)
                      for stage in cnn.stages if stage.last_entropy is not None]
            for stage in cnn.stages:
                stage.last_entropy = None
            if values:
                per_modality.append(torch.stack(values).mean() * (1.0 if weights is None else weights[name]))
        return torch.stack(per_modality).mean() if per_modality else None

    def sparse_grids(self, modality: str) -> list[tuple[int, int, int, int]]:
        """(H, W, Cin, Cout) of each sparse stage's input grid (for FLOPs counting)."""
        grids = self.dims.grids(modality)[self.dims.sparse_dense_stages:-1]
        return [(h, w, cin, cout) for (h, w), (cin, cout) in zip(grids, self.dims.sparse_stage_channels())]

    def text_guide(self, text_cls: Tensor, text_present: Tensor) -> Tensor:
        """text_cls (B, Ht), text_present (B,) -> guide (B, Ht): the transcript's CLS, or
        null_guide without text or with ``dims.sparse_guide == "learned"`` (and, in
        training, for a random guide_dropout share; then a random guide_shuffle share
        takes the guide of the next sample in the batch)."""
        null = self.null_guide.type(text_cls.dtype)
        if self.dims.sparse_guide == "learned":
            return null.expand_as(text_cls)
        use_text = text_present
        if self.training and self.guide_dropout > 0:
            use_text = use_text & (torch.rand(use_text.shape, device=use_text.device) >= self.guide_dropout)
        guide = torch.where(use_text[:, None], text_cls, null)
        if self.training and self.guide_shuffle > 0:
            swap = torch.rand(use_text.shape, device=guide.device) < self.guide_shuffle  # (B,)
            guide = torch.where(swap[:, None], guide.roll(1, 0), guide)
        return guide

    def low_maps(self, modality: str, x: Tensor) -> tuple[Tensor, Tensor]:
        """One modality's frames or chunks x (N, Cin, H, W) -> the part of the sparse CNN's work
        that does not see the text (``SparseCNN.low_maps``: low-level maps channels last
        (N, h*w, low_channels) and the first sparse stage's attention keys (N, h*w, A)), so
        a frame's may be reused with any guide."""
        return (self.audio_cnn if modality == "audio" else self.visual_cnn).low_maps(x)

    def sparse_embedding(self, modality: str, low: Tensor, keys: Tensor, text_cls: Tensor,
                         text_present: Tensor) -> Tensor:
        """``low_maps`` of N real frames or chunks (low (N, h*w, low_channels), keys (N, h*w, A)),
        and the text CLS (N, Ht) and text presence (N,) of the window each belongs to ->
        projected CNN outputs (N, trans_dim): what the sparse model computes from a frame and
        its window's guide (``text_guide``), for ``forward_from_features``. Evaluation with a
        fixed budget (what the split export serves); otherwise the keys are computed again."""
        cnn = self.audio_cnn if modality == "audio" else self.visual_cnn
        seq = self.audio_seq if modality == "audio" else self.visual_seq
        h, w = self.dims.grids(modality)[self.dims.sparse_dense_stages]
        real = torch.ones_like(text_present, dtype=torch.bool)  # (N,) every row is a real frame
        guide = self.text_guide(text_cls, text_present)
        budget = self.budget_of(modality)
        if fixed_budget_eval(self, budget):
            feats, _ = cnn.sparse_budget_eval(low, h, w, real, guide, budget, all_real=True, keys=keys)
        else:
            nchw = low.transpose(1, 2).reshape(low.shape[0], low.shape[2], h, w)  # (N, low_channels, h, w)
            feats, _ = cnn.sparse(nchw, real, guide, self.dims.sparse_threshold, budget)
        return seq.proj(feats)  # (N, trans_dim)

    def frame_features(self, modality: str, x: Tensor, mask: Tensor, guide: Tensor) -> Tensor:
        cnn = self.audio_cnn if modality == "audio" else self.visual_cnn
        feats, kept = cnn(x, mask, guide, self.dims.sparse_threshold, self.budget_of(modality))
        if not (torch.compiler.is_compiling() or (feats.is_cuda and torch.cuda.is_current_stream_capturing())):
            positions = torch.tensor([h * w for h, w, _, _ in self.sparse_grids(modality)], device=kept.device)
            frames = mask.float().sum().clamp(min=1.0)
            self.last_active_fractions[modality] = ((kept / positions) * mask[:, None]).sum(0).detach() / frames
        return feats


def late_fusion(fusion: Tensor, per_modality: Tensor, present: Tensor) -> Tensor:
    """fusion (3,) logits, per_modality (B, 3, P), present (B, 3) -> fused logits (B, P):
    the per-modality logits weighted by a softmax of ``fusion`` over the present modalities
    (all three when none is present, whose logits are then zeros)."""
    weights = fusion.float().expand(present.shape[0], -1)  # (B, 3)
    weights = torch.where(present.any(1, keepdim=True), weights.masked_fill(~present, float("-inf")), weights)
    return (weights.softmax(dim=-1)[:, :, None].type(per_modality.dtype) * per_modality).sum(1)


def build_model(dims: ModelDims, text_weights_dir: str | Path | None = None) -> MME2E | MME2ESparse:
    """The model named by ``dims``, with pretrained text weights when a folder is given."""
    model = MME2ESparse(dims) if dims.name == "mme2e_sparse" else MME2E(dims)
    if text_weights_dir is not None:
        from engine.text_weights import load_text_weights

        load_text_weights(model.text, text_weights_dir, dims)
    return model


def _at_least_one_frame(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """An empty frame axis (F == 0) becomes one padded frame."""
    if x.shape[1] == 0:
        x = x.new_zeros(x.shape[0], 1, *x.shape[2:])
        mask = mask.new_zeros(mask.shape[0], 1)
    return x, mask


def _at_least_one_token(text: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    if text.shape[1] == 0:
        text = text.new_zeros(text.shape[0], 1)
        mask = mask.new_zeros(mask.shape[0], 1)
    return text, mask
