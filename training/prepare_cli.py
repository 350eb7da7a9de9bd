"""``mmid prepare``: build a prepared DATA folder (docs/ARCHITECTURE.md).

    mmid prepare iemocap --src PATH/IEMOCAP_full_release --out DATA [--workers N]
    mmid prepare clips   --src DIR --out DATA [--workers N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.config import Config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", choices=["iemocap", "clips"],
                        help="iemocap: the IEMOCAP release; clips: DIR/<person>/ folders of recordings")
    parser.add_argument("--src", required=True, metavar="PATH", help="IEMOCAP_full_release folder, or the clips folder")
    parser.add_argument("--out", required=True, metavar="DATA", help="output folder (re-running resumes)")
    parser.add_argument("--workers", type=int, default=None,
                        help="worker processes, 0 = one per core (default: prepare.workers)")


def run(args: argparse.Namespace, cfg: Config) -> int:
    if args.workers is not None and args.workers < 0:
        print("mmid prepare: --workers must be >= 0", file=sys.stderr)
        return 2
    src, out = Path(args.src), Path(args.out)
    if not src.is_dir():
        print(f"mmid prepare: {src} is not a folder", file=sys.stderr)
        return 2
    try:
        if args.source == "iemocap":
            from training.prepare import prepare_iemocap

            report = prepare_iemocap(src, out, cfg, args.workers)
        else:
            from training.clips import prepare_clips

            report = prepare_clips(src, out, cfg, args.workers)
    except (FileNotFoundError, ValueError) as exc:
        print(f"mmid prepare: {exc}", file=sys.stderr)
        return 1
    print(
        f"mmid prepare: {report['utterances']} utterances of {report['persons']} persons in {out} "
        f"(skipped {sum(report['skipped'].values())}, repaired {sum(report['repaired'].values())}; "
        f"details in {out / 'report.json'})",
        file=sys.stderr,
    )
    for error in report["split_errors"]:
        print(f"mmid prepare: error: split {error}", file=sys.stderr)
    return 1 if report["split_errors"] else 0
