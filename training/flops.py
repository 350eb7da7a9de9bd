"""`mmid flops`: floating-point operations actually executed per window.

Counts with ``torch.utils.flop_counter.FlopCounterMode`` on the real forward
pass of each test utterance (batch 1, so padding adds nothing), attributing
operations to modules. For the sparse model the gather-based convolutions run
only on kept sites, so the counted matmuls are the work really done.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from engine.checkpoint import load_checkpoint
from engine.config import Config
from engine.features import Tokenizer, collate
from training.dataset import PreparedDataset, read_split

FEATURE_EXTRACTORS = ("visual_cnn", "audio_cnn")  # the CNN stacks of both models


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, type=Path, help="run folder written by mmid train")
    parser.add_argument("--data", required=True, type=Path, help="prepared dataset folder")
    parser.add_argument("--split", default="test", choices=["train", "valid", "test"])
    parser.add_argument("--protocol", choices=["dialog", "utterance"], help="default: the run's split protocol")
    parser.add_argument("--limit", type=int, default=0, help="count at most this many utterances (0 = all)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")


def _module_total(counts: dict[str, dict], suffix: str) -> int:
    """Sum of FLOPs recorded under the module whose qualified name ends with ``suffix``."""
    return sum(sum(ops.values()) for name, ops in counts.items() if name.split(".")[-1] == suffix
               and name.count(".") == 1)


def count_flops(run: Path, data: Path, split: str, protocol: str | None = None, limit: int = 0) -> dict:
    model, meta = load_checkpoint(run)
    tokenizer = Tokenizer(run / "tokenizer.json", max_tokens=meta.features.max_tokens)
    ids = read_split(data, protocol or meta.extra.get("split", "dialog"), split)
    if limit:
        ids = ids[:limit]
    ds = PreparedDataset(data, ids, tokenizer, meta.features, list(meta.persons))
    per_window: dict[str, list[float]] = {"feature_extraction": [], "total": []}
    per_module: dict[str, list[float]] = {name: [] for name in FEATURE_EXTRACTORS}
    fractions: list[list[float]] = []
    with torch.no_grad():
        for i in range(len(ds)):
            sample, _ = ds[i]
            batch = collate([sample])
            counter = FlopCounterMode(display=False)
            with counter:
                model(*batch.model_inputs())
            counts = counter.get_flop_counts()
            feats = {name: _module_total(counts, name) for name in FEATURE_EXTRACTORS}
            for name, v in feats.items():
                per_module[name].append(v)
            per_window["feature_extraction"].append(sum(feats.values()))
            per_window["total"].append(counter.get_total_flops())
            active = getattr(model, "last_active_fractions", None)
            if active:  # {"audio": (n_stages,), "visual": (n_stages,)} for real frames of this window
                fractions.append({k: [float(a) for a in v] for k, v in active.items()
                                  if (k == "audio" and batch.audio_mask.any()) or (k == "visual" and batch.face_mask.any())})
    mean = {k: float(np.mean(v)) if v else 0.0 for k, v in per_window.items()}
    return {
        "run": str(run),
        "model": meta.dims.name,
        "split": split,
        "n": len(ds),
        "feature_extraction_flops": mean["feature_extraction"],
        "total_flops": mean["total"],
        "per_module_flops": {k: float(np.mean(v)) if v else 0.0 for k, v in per_module.items()},
        "active_fraction": _mean_fractions(fractions),
    }


def _mean_fractions(rows: list[dict[str, list[float]]]) -> dict[str, list[float]]:
    """Average kept-site fraction per sparse stage, per modality, over the windows that had it."""
    out: dict[str, list[float]] = {}
    for key in ("audio", "visual"):
        vals = [r[key] for r in rows if key in r]
        if vals:
            out[key] = [float(x) for x in np.mean(vals, axis=0)]
    return out


def run(args: argparse.Namespace, cfg: Config) -> int:
    summary = count_flops(args.run, args.data, args.split, args.protocol, args.limit)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{summary['model']} over {summary['n']} {args.split} utterances, per window:")
        print(f"  feature extraction (visual + audio CNNs): {summary['feature_extraction_flops'] / 1e9:.3f} GFLOPs")
        print(f"  whole model: {summary['total_flops'] / 1e9:.3f} GFLOPs")
        for key, values in summary["active_fraction"].items():
            print(f"  {key} active fraction per sparse stage: " + ", ".join(f"{a:.3f}" for a in values))
    return 0
