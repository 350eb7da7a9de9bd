"""`mmid train`: train MME2E or sparse MME2E on a prepared dataset."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from engine.config import Config, replace
from training.train import TrainJob, run_training


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, type=Path, help="prepared dataset folder (mmid prepare)")
    parser.add_argument("--model", choices=["mme2e", "mme2e_sparse"], help="architecture (default: model.name)")
    parser.add_argument("--preset", choices=["tiny", "default", "paper"], help="size preset (default: model.preset)")
    parser.add_argument("--split", choices=["dialog", "utterance"], help="split protocol (default: train.split)")
    parser.add_argument("--out", required=True, type=Path, help="run folder for checkpoints and metrics")
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"], help="default: train.device")
    parser.add_argument("--epochs", type=int, help="override train.epochs")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")


def run(args: argparse.Namespace, cfg: Config) -> int:
    if not (args.data / "manifest.jsonl").exists():
        print(f"mmid train: {args.data} is not a prepared dataset (no manifest.jsonl); run `mmid prepare` first")
        return 2
    if args.epochs is not None:
        cfg = replace(cfg, train={"epochs": args.epochs})
    job = TrainJob(
        data=args.data,
        out=args.out,
        model=args.model or cfg.model.name,
        preset=args.preset or cfg.model.preset,
        split=args.split or cfg.train.split,
        device=args.device or cfg.train.device,
        resume=args.resume,
    )
    summary = run_training(job, cfg)
    print(json.dumps(summary))
    return 0
