"""`mmid evaluate`: accuracy, macro-F1, per-person and per-modality scores of a run,
with a confusion-matrix PNG and training-curve PNGs written into the run folder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from engine.checkpoint import load_checkpoint
from engine.config import Config
from engine.features import Tokenizer
from training.dataset import PreparedDataset, read_split
from training.metrics import accuracy, branch_accuracies, confusion, macro_f1, per_class_prf
from training.train import make_loader, pick_device, predict

MODALITIES = ("text", "audio", "visual")  # order of ModelOutput.modality_logits


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, type=Path, help="run folder written by mmid train")
    parser.add_argument("--data", required=True, type=Path, help="prepared dataset folder")
    parser.add_argument("--split", default="test", choices=["train", "valid", "test"])
    parser.add_argument("--protocol", choices=["dialog", "utterance"], help="default: the run's own split protocol")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")


def evaluate_run(run: Path, data: Path, split: str, cfg: Config, protocol: str | None = None,
                 device: str = "cpu") -> dict:
    dev = pick_device(device)
    model, meta = load_checkpoint(run, device=dev)
    protocol = protocol or meta.extra.get("split", "dialog")
    persons = list(meta.persons)
    tokenizer = Tokenizer(run / "tokenizer.json", max_tokens=meta.features.max_tokens)
    ids = read_split(data, protocol, split)
    ds = PreparedDataset(data, ids, tokenizer, meta.features, persons)
    pred = predict(model, make_loader(ds, cfg, shuffle=False, seed=0), dev)
    n = len(persons)
    cm = confusion(pred["label"], pred["pred"], n)
    precision, recall, f1, support = per_class_prf(cm)
    alone = branch_accuracies(pred["label"], pred["mod_logits"].argmax(2), pred["present"])
    per_modality = {name: {"accuracy": alone[name], "n_present": int(pred["present"][:, i].sum())}
                    for i, name in enumerate(MODALITIES)}
    summary = {
        "run": str(run),
        "model": meta.dims.name,
        "split": split,
        "protocol": protocol,
        "n": int(len(pred["label"])),
        "accuracy": accuracy(pred["label"], pred["pred"]),
        "macro_f1": macro_f1(pred["label"], pred["pred"], n),
        "per_modality": per_modality,
        "per_person": {
            persons[c]: {"precision": float(precision[c]), "recall": float(recall[c]), "f1": float(f1[c]),
                         "support": int(support[c])}
            for c in range(n)
        },
    }
    plot_confusion(cm, persons, run / f"confusion_{split}.png", title=f"{meta.dims.name} {protocol}/{split}")
    plot_curves(run)
    (run / f"eval_{split}.json").write_text(json.dumps(summary, indent=2))
    return summary


def plot_confusion(cm: np.ndarray, persons: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(persons), 0.8 + 0.6 * len(persons)))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(persons)), persons, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(persons)), persons, fontsize=8)
    for (r, c), v in np.ndenumerate(cm):
        if v:
            ax.text(c, r, str(v), ha="center", va="center", fontsize=7,
                    color="white" if v > cm.max() / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(run: Path) -> None:
    """training_curves.png: train loss and validation accuracy / macro-F1 per epoch."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(epochs, [r["train_loss"] for r in rows], marker="o")
    a.set_title("train loss")
    a.set_xlabel("epoch")
    b.plot(epochs, [r["valid_accuracy"] for r in rows], marker="o", label="valid accuracy")
    b.plot(epochs, [r["valid_macro_f1"] for r in rows], marker="s", label="valid macro-F1")
    b.set_ylim(0, 1.02)
    b.set_xlabel("epoch")
    b.legend()
    fig.tight_layout()
    fig.savefig(run / "training_curves.png", dpi=100)
    plt.close(fig)


def run(args: argparse.Namespace, cfg: Config) -> int:
    summary = evaluate_run(args.run, args.data, args.split, cfg, args.protocol, args.device)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{summary['model']} on {summary['protocol']}/{summary['split']} (n={summary['n']}): "
              f"accuracy {summary['accuracy']:.4f}, macro-F1 {summary['macro_f1']:.4f}")
        for name, m in summary["per_modality"].items():
            acc = "n/a" if m["accuracy"] is None else f"{m['accuracy']:.4f}"
            print(f"  {name:<7} alone: accuracy {acc} (present in {m['n_present']})")
        print(f"  plots: {args.run}/confusion_{args.split}.png, {args.run}/training_curves.png")
    return 0
