"""Make the small engine that `mmid demo` uses, with the project's own commands.

    python -m training.demo_engine --out models/demo-tiny

runs, in a scratch folder: `mmid synth --size tiny --seed 0`, `mmid prepare
iemocap`, `mmid train --preset tiny --model mme2e`, `mmid export --backend
onnx`, then writes ``demo.json`` (corpus seed and size, the dialog-split test
dialogs the demo may stream, and the commands that made the engine).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from engine.config import Config, load_config

DEMO_SEED = 0
DEMO_SIZE = "tiny"


def _mmid(args: list[str]) -> None:
    from engine.cli import main

    print("[demo-engine] mmid " + " ".join(args), flush=True)
    if main(args) != 0:
        raise RuntimeError(f"mmid {args[0]} failed")


def make_demo_engine(scratch: Path, out: Path, cfg: Config | None = None, model: str = "mme2e") -> Path:
    scratch.mkdir(parents=True, exist_ok=True)
    corpus, data, run = scratch / "corpus", scratch / "data", scratch / f"run-{model}"
    commands = [
        ["synth", "--out", str(corpus), "--size", DEMO_SIZE, "--seed", str(DEMO_SEED)],
        ["prepare", "iemocap", "--src", str(corpus / "IEMOCAP_full_release"), "--out", str(data)],
        ["train", "--data", str(data), "--model", model, "--preset", "tiny", "--split", "dialog", "--out", str(run)],
        ["export", "--run", str(run), "--backend", "onnx", "--out", str(out)] + (
            ["--data", str(data)] if model == "mme2e_sparse" else []),
    ]
    if not (corpus / "persons.json").exists():
        _mmid(commands[0])
    if not (data / "manifest.jsonl").exists():
        _mmid(commands[1])
    if not (run / "model.safetensors").exists():
        _mmid(commands[2])
    if out.exists():
        shutil.rmtree(out)
    _mmid(commands[3])
    rows = [json.loads(x) for x in (data / "manifest.jsonl").read_text().splitlines() if x.strip()]
    test_ids = set((data / "splits" / "dialog" / "test.txt").read_text().split())
    test_dialogs = sorted({r["dialog"] for r in rows if r["id"] in test_ids})
    demo = {
        "seed": DEMO_SEED,
        "size": DEMO_SIZE,
        "model": model,
        "test_dialogs": test_dialogs,
        "commands": ["mmid " + " ".join(c) for c in commands],
    }
    (out / "demo.json").write_text(json.dumps(demo, indent=2))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("models/demo-tiny"))
    parser.add_argument("--scratch", type=Path, default=Path(".mmid-cache/demo-engine"))
    parser.add_argument("--model", default="mme2e", choices=["mme2e", "mme2e_sparse"])
    args = parser.parse_args(argv)
    make_demo_engine(args.scratch, args.out, load_config(), args.model)
    print(f"[demo-engine] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
