"""Training loop for MME2E and sparse MME2E.

Adam with a lower learning rate for the pretrained text encoder, cross-entropy
(or one-vs-rest BCE, as in the paper) on the fused logits plus auxiliary
per-modality losses, gradient clipping, modality dropout, early stopping on
validation macro-F1. Every epoch appends to ``RUN/metrics.jsonl`` and writes a
resumable ``RUN/last/`` checkpoint; the best epoch is kept in ``RUN/`` itself, with
its late-fusion weights refitted on the validation split (training/fusion_fit.py).
With ``train.ema_decay`` > 0 the weights validated and kept are a moving average
of the trained ones (training/weight_average.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as nnf
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm import tqdm

from engine.checkpoint import RunMeta, save_checkpoint
from engine.config import Config
from engine.dims import ModelDims, preset_dims
from engine.features import Batch, FeatureParams, Tokenizer, collate
from engine.model import build_model, late_fusion
from engine.wordpiece import train_wordpiece
from training.dataset import PreparedDataset, read_split
from training.fusion_fit import fit_fusion, refit_windows
from training.metrics import accuracy, branch_accuracies, macro_f1
from training.textprep import text_model_dir
from training.weight_average import WeightAverage

LAST = "last"  # sub-folder holding the resumable state of the latest epoch
# Learning rate of everything but the text encoder when train.lr is 0: the tiny CNNs
# learn fastest at 2e-3; the paper-size ones (11 convs, 4-layer post-LN transformers)
# do not learn at all at 2e-3 and need ~3e-4 with warm-up (BENCHMARKS.md, Training).
PRESET_LR = {"tiny": 2e-3, "default": 3e-4, "paper": 3e-4}
# Weight of the sparse attention-entropy penalty when train.sparse_entropy_weight < 0.
# Measured on the tiny corpus (BENCHMARKS.md, Training): the penalty trades accuracy
# for sparsity, and the tiny CNNs have too little to spare; the paper-size ones need
# it for the CDF rule at st 0.8 to keep about half of the feature-extraction FLOPs.
PRESET_ENTROPY = {"tiny": 0.0, "default": 0.5, "paper": 0.5}
# The audio stages' own weight when train.sparse_entropy_weight_audio < 0 and
# sparse_entropy_weight < 0: at 0.5 the paper-size audio branch collapses to 2-5% of
# its later stages' sites, turns confidently wrong (17-30% alone) and drags the fused
# validation accuracy down; at 0.2 it keeps 55% alone (BENCHMARKS.md, Training).
PRESET_ENTROPY_AUDIO = {"tiny": 0.0, "default": 0.2, "paper": 0.2}
# Weight-average decay when train.ema_decay < 0: the paper-size models' validation
# accuracy swings between epochs (the sparse one most), the tiny ones' does not.
PRESET_EMA = {"tiny": 0.0, "default": 0.99, "paper": 0.99}
# Entropy below which the sparse attention is no longer pushed, when
# train.sparse_entropy_target < 0. On two `small` corpora (H200 sweeps, BENCHMARKS.md,
# Training) an ever-growing push let validation accuracy drift down after a few epochs
# and one run end at 84%; with the hinge at 0.5 the sparse runs kept improving.
PRESET_ENTROPY_TARGET = {"tiny": 0.0, "default": 0.5, "paper": 0.5}
# Sparse guide dropout when train.guide_dropout < 0 (see config.toml).
PRESET_GUIDE_DROPOUT = {"tiny": 0.0, "default": 0.0, "paper": 0.0}
EMA_FILE = "ema.safetensors"  # the weight average's state in RUN/last/ (resume)


@dataclass(frozen=True)
class TrainJob:
    """One ``mmid train`` invocation, after CLI and config are merged."""

    data: Path
    out: Path
    model: str
    preset: str
    split: str
    device: str
    resume: bool = False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA device")
    return torch.device(name)


def _tokenizer_file(job: TrainJob, cfg: Config, text_dir: Path | None) -> Path:
    """The tokenizer the run will use: the pretrained model's, or one learned from train texts."""
    if text_dir is not None:
        return text_dir / "tokenizer.json"
    out = job.out / "tokenizer.json"
    if not out.exists():
        ids = set(read_split(job.data, job.split, "train"))
        texts = [r["text"] for r in PreparedDataset.read_manifest(job.data) if r["id"] in ids]
        train_wordpiece(texts, out, vocab_size=500 if job.preset == "tiny" else 8000)
    return out


def build_dims(job: TrainJob, cfg: Config, n_persons: int, learned_vocab: int) -> ModelDims:
    """Preset dims; ``learned_vocab`` > 0 when the tokenizer was learned from the data."""
    return preset_dims(job.preset, job.model, n_persons, cfg.model.text_model, text_vocab=learned_vocab,
                       sparse_threshold=cfg.model.sparse_threshold, sparse_guide=cfg.model.sparse_guide,
                       sparse_dense_stages=cfg.model.sparse_dense_stages)


def learning_rate_scale(cfg: Config, step: int, total_steps: int) -> float:
    """Factor on every group's ``base_lr`` at optimizer step ``step`` (0-based) of
    ``total_steps``: linear warm-up over ``warmup_steps``, then 1 (``lr_decay = "none"``)
    or a half cosine from 1 down to ``lr_min_ratio`` at the last step (``"cosine"``)."""
    warmup = cfg.train.warmup_steps
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if cfg.train.lr_decay == "none":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - 1 - warmup))
    low = cfg.train.lr_min_ratio
    return low + (1.0 - low) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_learning_rates(optimizer: torch.optim.Optimizer, cfg: Config, step: int, total_steps: int) -> None:
    """Every group's ``base_lr`` times ``learning_rate_scale``: a function of the global
    step alone, so a resumed run continues the same schedule."""
    scale = learning_rate_scale(cfg, step, total_steps)
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * scale


def base_learning_rate(cfg: Config, preset: str) -> float:
    """``train.lr``, or the preset's own when it is 0."""
    return cfg.train.lr if cfg.train.lr > 0 else PRESET_LR[preset]


def sparse_entropy_weights(cfg: Config, preset: str) -> dict[str, float]:
    """Per-modality weight of the sparse attention-entropy penalty: ``train.sparse_entropy_weight``
    (< 0: the preset's own), and for audio ``train.sparse_entropy_weight_audio`` when >= 0,
    else the preset's own audio weight (when the first is the preset's too) or the first."""
    own = cfg.train.sparse_entropy_weight < 0
    weight = PRESET_ENTROPY[preset] if own else cfg.train.sparse_entropy_weight
    audio = cfg.train.sparse_entropy_weight_audio
    if audio < 0:
        audio = PRESET_ENTROPY_AUDIO[preset] if own else weight
    return {"visual": weight, "audio": audio}


def hide_modalities(batch: Batch, p: float, gen: torch.Generator) -> Batch:
    """Modality dropout: with probability ``p`` per sample hide one of its present
    modalities (never the last one), by clearing that modality's mask row."""
    masks = [batch.text_mask, batch.audio_mask, batch.face_mask]
    present = torch.stack([m.any(dim=1) for m in masks], dim=1)  # (B, 3)
    b = present.shape[0]
    drop_sample = (torch.rand(b, generator=gen) < p) & (present.sum(dim=1) > 1)  # (B,)
    scores = torch.rand(b, 3, generator=gen).masked_fill(~present, -1.0)
    which = scores.argmax(dim=1)  # (B,) a present modality
    hide = torch.zeros(b, 3, dtype=torch.bool)
    hide[torch.arange(b), which] = True
    hide &= drop_sample[:, None]
    new = [m & ~hide[:, i : i + 1] for i, m in enumerate(masks)]
    return dataclasses.replace(batch, text_mask=new[0], audio_mask=new[1], face_mask=new[2])


def _per_sample_loss(logits: torch.Tensor, labels: torch.Tensor, kind: str) -> torch.Tensor:
    """(N, P) logits, (N,) labels -> (N,) losses; softmax/sigmoid in float32."""
    if kind == "bce":
        target = nnf.one_hot(labels, logits.shape[1]).float()
        return nnf.binary_cross_entropy_with_logits(logits.float(), target, reduction="none").sum(dim=1)
    return nnf.cross_entropy(logits.float(), labels, reduction="none")


def loss_fn(out, labels: torch.Tensor, cfg: Config) -> torch.Tensor:
    """Fused loss plus ``aux_loss_weight`` x the mean loss of the present modalities' heads."""
    fused = _per_sample_loss(out.logits, labels, cfg.train.loss).mean()
    if cfg.train.aux_loss_weight <= 0:
        return fused
    b, m, p = out.modality_logits.shape
    repeated = labels[:, None].expand(b, m).reshape(-1)  # (B*3,) matching the reshape below
    per = _per_sample_loss(out.modality_logits.reshape(b * m, p), repeated, cfg.train.loss).reshape(b, m)
    present = out.present.float()  # (B, 3)
    aux = (per * present).sum() / present.sum().clamp(min=1.0)
    return fused + cfg.train.aux_loss_weight * aux


def fitted_scores(pred: dict[str, np.ndarray], fusion: torch.Tensor, cfg: Config, n_persons: int) -> tuple[float, float]:
    """Validation macro-F1 and loss of the fused output after refitting the fusion weights on
    the same predictions, as the fit after training does (``train.fusion_fit``): the
    model as it would be served if this epoch were kept."""
    logits, present = torch.from_numpy(pred["mod_logits"]), torch.from_numpy(pred["present"])
    labels = torch.from_numpy(pred["label"]).long()
    weights, _ = refit_windows(logits, present, labels, fusion, cfg.train.fusion_fit_l2, cfg.train.fusion_fit == "valid")
    fused = late_fusion(weights, logits, present)  # (N, P) on the windows as they are
    loss = float(nnf.cross_entropy(fused, labels))
    return macro_f1(pred["label"], fused.argmax(1).numpy(), n_persons), loss


@torch.no_grad()
def predict(model: torch.nn.Module, loader: DataLoader, device: torch.device) -> dict[str, np.ndarray]:
    """Fused and per-modality predictions over a loader: labels (N,), fused top-1 (N,) and
    probabilities (N, P), per-modality logits (N, 3, P), presence (N, 3)."""
    model.eval()
    keep: dict[str, list[np.ndarray]] = {"label": [], "pred": [], "prob": [], "mod_logits": [], "present": []}
    for batch, labels in loader:
        out = model(*batch.to(device).model_inputs())
        keep["label"].append(labels.numpy())
        keep["prob"].append(torch.softmax(out.logits.float(), dim=1).cpu().numpy())
        keep["pred"].append(out.logits.argmax(dim=1).cpu().numpy())
        keep["mod_logits"].append(out.modality_logits.float().cpu().numpy())
        keep["present"].append(out.present.cpu().numpy())
    return {k: np.concatenate(v) for k, v in keep.items()}


class EpochMeans:
    """Means over an epoch's steps of per-key vectors, e.g. {"audio": one value per stage};
    a key counts only the steps that reported it."""

    def __init__(self) -> None:
        self.sums: dict[str, np.ndarray] = {}
        self.steps: dict[str, int] = {}

    def add(self, values: dict[str, Sequence[float]]) -> None:
        for key, v in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + np.asarray(v, dtype=np.float64)
            self.steps[key] = self.steps.get(key, 0) + 1

    def means(self, digits: int = 4) -> dict[str, list[float]]:
        return {key: [round(float(x), digits) for x in self.sums[key] / n] for key, n in self.steps.items()}


def make_loader(ds: PreparedDataset, cfg: Config, shuffle: bool, seed: int) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(
        ds,
        batch_size=cfg.train.batch_size,
        shuffle=shuffle,
        generator=gen,
        collate_fn=collate_labelled,
        num_workers=cfg.train.num_workers,
    )


def collate_labelled(items: list) -> tuple[Batch, torch.Tensor]:
    samples, labels = zip(*items)
    return collate(list(samples)), torch.tensor(labels, dtype=torch.long)


def _save_state(folder: Path, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Optimizer moments as safetensors, counters and RNG as JSON + safetensors (no pickle)."""
    tensors: dict[str, torch.Tensor] = {}
    for pid, st in optimizer.state_dict()["state"].items():
        for key, value in st.items():
            tensors[f"opt.{pid}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, str(folder / "optimizer.safetensors"))
    (folder / "state.json").write_text(json.dumps(state, indent=2))


def _load_state(folder: Path, optimizer: torch.optim.Optimizer, device: torch.device) -> dict:
    tensors = load_file(str(folder / "optimizer.safetensors"))
    sd = optimizer.state_dict()
    new_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            new_state.setdefault(int(pid), {})[name] = value.to(device) if name != "step" else value
    sd["state"] = new_state
    optimizer.load_state_dict(sd)
    torch.set_rng_state(tensors["rng.torch"])
    return json.loads((folder / "state.json").read_text())


def _shown(weights: tuple[float, ...]) -> str:
    return " / ".join(f"{v:.3f}" for v in weights)


def run_training(job: TrainJob, cfg: Config) -> dict:
    """Train, validate every epoch, keep the best checkpoint in ``job.out``; return a summary.

    With ``train.deterministic`` the run uses PyTorch's deterministic kernels (restored
    after): on the CPU the backward of the sparse convolutions' neighbour gather
    accumulates with parallel atomic adds otherwise, whose order differs from run to
    run, so that two runs with one seed drift apart after a few epochs."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS on CUDA
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return _run_training(job, cfg)
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def _run_training(job: TrainJob, cfg: Config) -> dict:
    seed_everything(cfg.train.seed)
    device = pick_device(job.device)
    job.out.mkdir(parents=True, exist_ok=True)
    persons = PreparedDataset.read_persons(job.data)
    text_dir = text_model_dir(job.preset, cfg.model.text_model)
    tok_file = _tokenizer_file(job, cfg, text_dir)
    tokenizer = Tokenizer(tok_file, max_tokens=cfg.features.max_tokens)
    params = FeatureParams.from_config(cfg)
    dims = build_dims(job, cfg, len(persons), tokenizer.vocab_size if text_dir is None else 0)

    last = job.out / LAST
    resuming = job.resume and (last / "state.json").exists()
    model = build_model(dims, text_weights_dir=None if resuming else text_dir).to(device)
    if hasattr(model, "guide_dropout"):
        model.guide_dropout = cfg.train.guide_dropout if cfg.train.guide_dropout >= 0 else PRESET_GUIDE_DROPOUT[job.preset]
        model.guide_shuffle = cfg.train.guide_shuffle
    lr = base_learning_rate(cfg, job.preset)
    entropy_weights = sparse_entropy_weights(cfg, job.preset)
    entropy_target = cfg.train.sparse_entropy_target if cfg.train.sparse_entropy_target >= 0 else PRESET_ENTROPY_TARGET[job.preset]
    text_params = [p for n, p in model.named_parameters() if n.startswith("text.")]
    other = [p for n, p in model.named_parameters() if not n.startswith("text.")]
    optimizer = torch.optim.Adam(
        [{"params": other, "lr": lr, "base_lr": lr}, {"params": text_params, "lr": cfg.train.text_lr, "base_lr": cfg.train.text_lr}],
        weight_decay=cfg.train.weight_decay,
    )
    state = {"epoch": 0, "best_f1": -1.0, "best_epoch": 0, "bad_epochs": 0}
    ema_decay = cfg.train.ema_decay if cfg.train.ema_decay >= 0 else PRESET_EMA[job.preset]
    if resuming:
        model.load_state_dict(load_file(str(last / "model.safetensors"), device=str(device)))
        state = _load_state(last, optimizer, device)
        print(f"[train] resuming after epoch {state['epoch']} (best macro-F1 {state['best_f1']:.4f})")
    elif job.resume:
        print("[train] --resume: no previous state in this run folder, starting fresh")
    average = WeightAverage(model, ema_decay) if ema_decay > 0 else None
    if average is not None and resuming and (last / EMA_FILE).exists():
        average.model.load_state_dict(load_file(str(last / EMA_FILE), device=str(device)))
    kept = model if average is None else average.model  # the weights validated and kept
    if not resuming and (job.out / "metrics.jsonl").exists():
        (job.out / "metrics.jsonl").unlink()

    train_ds = PreparedDataset(job.data, read_split(job.data, job.split, "train"), tokenizer, params, persons)
    valid_ds = PreparedDataset(job.data, read_split(job.data, job.split, "valid"), tokenizer, params, persons)
    meta = RunMeta(
        dims=dims,
        persons=tuple(persons),
        features=params,
        extra={"preset": job.preset, "split": job.split, "data": str(job.data), "seed": cfg.train.seed},
    )
    valid_loader = make_loader(valid_ds, cfg, shuffle=False, seed=0)
    drop_gen = torch.Generator().manual_seed(cfg.train.seed + 1)
    started = time.time()
    stopped_by = "epochs"
    for epoch in range(state["epoch"] + 1, cfg.train.epochs + 1):
        if state["bad_epochs"] >= cfg.train.patience:
            stopped_by = "patience"
            break
        if cfg.train.time_limit_s > 0 and time.time() - started >= cfg.train.time_limit_s:
            stopped_by = "time_limit"
            print(f"[train] time limit of {cfg.train.time_limit_s:g} s reached after epoch {epoch - 1}: stopping")
            break
        drop_gen.manual_seed(cfg.train.seed * 1000 + epoch)
        loader = make_loader(train_ds, cfg, shuffle=True, seed=cfg.train.seed * 1000 + epoch)
        model.train()
        total, count = 0.0, 0
        # the sparse model's attention over the epoch: penalty, kept fractions, entropies per stage
        entropy_sum, fractions, entropies = 0.0, EpochMeans(), EpochMeans()
        for step, (batch, labels) in enumerate(tqdm(loader, desc=f"epoch {epoch}", leave=False, unit="batch", disable=None)):
            set_learning_rates(optimizer, cfg, (epoch - 1) * len(loader) + step, cfg.train.epochs * len(loader))
            batch = hide_modalities(batch, cfg.train.modality_dropout, drop_gen).to(device)
            out = model(*batch.model_inputs())
            loss = loss_fn(out, labels.to(device), cfg)
            if hasattr(model, "stage_entropies"):
                entropies.add(model.stage_entropies())  # before attention_entropy clears them
                fractions.add({m: f.tolist() for m, f in model.last_active_fractions.items()})
            entropy = (model.attention_entropy(entropy_weights, entropy_target, cfg.train.sparse_entropy_floor)
                       if hasattr(model, "attention_entropy") else None)
            if entropy is not None and max(entropy_weights.values()) > 0:
                loss = loss + entropy
                entropy_sum += float(entropy.detach()) * len(labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.train.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad)
            optimizer.step()
            if average is not None:
                average.update((epoch - 1) * len(loader) + step)
            total += loss.item() * len(labels)
            count += len(labels)
        pred = predict(kept, valid_loader, device)
        f1 = macro_f1(pred["label"], pred["pred"], len(persons))
        valid_loss = float(-np.log(np.clip(pred["prob"][np.arange(len(pred["label"])), pred["label"]], 1e-12, None)).mean())
        fitted = None
        if cfg.train.select_on == "fitted" and cfg.train.fusion_fit != "none":
            fitted = fitted_scores(pred, kept.fusion.detach().float().cpu(), cfg, len(persons))
        row = {
            "epoch": epoch,
            "train_loss": total / max(count, 1),
            "valid_accuracy": accuracy(pred["label"], pred["pred"]),
            "valid_macro_f1": f1,
            "valid_loss": valid_loss,
            "valid_alone": {k: None if v is None else round(v, 4)
                            for k, v in branch_accuracies(pred["label"], pred["mod_logits"].argmax(2), pred["present"]).items()},
            "elapsed_s": round(time.time() - started, 2),
        }
        if fitted is not None:  # what selection reads: the fused output with the fusion refitted
            row["valid_macro_f1_fitted"], row["valid_loss_fitted"] = fitted
            f1, valid_loss = fitted
        if fractions.steps:  # sparse model: the entropy term, each stage's kept fraction and entropy
            row["train_entropy_penalty"] = entropy_sum / max(count, 1)
            row["active_fraction"] = fractions.means()
            row["attention_entropy"] = entropies.means()
        with open(job.out / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(
            f"[train] epoch {epoch}: loss {row['train_loss']:.4f} "
            f"valid acc {row['valid_accuracy']:.4f} macro-F1 {f1:.4f}"
        )
        # The kept checkpoint: macro-F1 first, validation loss breaks ties. Patience is reset
        # by a new kept checkpoint (early_stop = "f1_loss"), or only by a higher macro-F1
        # ("f1": a run whose F1 is at its ceiling stops even while its loss still falls).
        higher = f1 > state["best_f1"]
        better = higher or (f1 == state["best_f1"] and valid_loss < state.get("best_loss", np.inf))
        if better:
            state.update(best_f1=f1, best_loss=valid_loss, best_epoch=epoch)
            save_checkpoint(job.out, kept, meta, tok_file)
        reset = higher if cfg.train.early_stop == "f1" else better
        state["bad_epochs"] = 0 if reset else state["bad_epochs"] + 1
        state["epoch"] = epoch
        last.mkdir(exist_ok=True)
        save_checkpoint(last, model, meta, tok_file)
        if average is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in average.model.state_dict().items()}, str(last / EMA_FILE))
        _save_state(last, optimizer, state)
    fusion = None
    if cfg.train.fusion_fit != "none" and (job.out / "model.safetensors").exists():
        model.load_state_dict(load_file(str(job.out / "model.safetensors"), device=str(device)))
        fusion = fit_fusion(model, valid_loader, device, cfg.train.fusion_fit_l2, missing=cfg.train.fusion_fit == "valid")
        save_checkpoint(job.out, model, meta, tok_file)
        print(f"[train] fusion weights fitted on validation (text / audio / visual): {_shown(fusion.before)} -> "
              f"{_shown(fusion.after)}; valid accuracy {fusion.valid_accuracy_before:.4f} -> {fusion.valid_accuracy_after:.4f}"
              + ("" if fusion.applied else " (the refit was less accurate and was discarded)"))
    summary = {
        "best_epoch": state["best_epoch"],
        "best_valid_macro_f1": state["best_f1"],
        "epochs_run": state["epoch"],
        "stopped_by": stopped_by,
        "train_seconds": round(time.time() - started, 2),
        "device": str(device),
        "fusion_fit": fusion.as_dict() if fusion else None,
    }
    (job.out / "train_summary.json").write_text(json.dumps(summary, indent=2))
    return summary

