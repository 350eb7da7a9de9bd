"""`mmid synth`: write a synthetic corpus in the IEMOCAP release layout."""

from __future__ import annotations

import argparse
import sys
import time

from engine.config import Config
from training.synth.corpus import TRUTH_FILE, generate
from training.synth.layout import RELEASE
from training.synth.plan import SIZES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, metavar="DIR", help=f"folder to hold {RELEASE}/ and {TRUTH_FILE}")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: synth.seed)")
    parser.add_argument("--size", choices=list(SIZES), default=None, help="corpus size (default: synth.size)")
    parser.add_argument(
        "--workers", type=int, default=None, help="worker processes, 0 = one per core (default: synth.workers)"
    )


def run(args: argparse.Namespace, cfg: Config) -> int:
    seed = cfg.synth.seed if args.seed is None else args.seed
    size = cfg.synth.size if args.size is None else args.size
    workers = cfg.synth.workers if args.workers is None else args.workers
    if workers < 0:
        print("mmid synth: --workers must be >= 0", file=sys.stderr)
        return 2
    started = time.perf_counter()
    out = generate(args.out, seed=seed, size=size, workers=workers, progress=sys.stderr.isatty())
    print(f"wrote {out / RELEASE} ({size}, seed {seed}) in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0
