"""One JSON line per run folder: test accuracy, macro-F1, each branch alone, the
fitted fusion weights, epochs, training time, and feature-extraction FLOPs (also
relative to the first run named ``dense...`` trained on the same data); and
RUN/branch_logits.npz (``save_branch_logits``). Each run is
evaluated on the dataset it was trained on (recorded in its checkpoint), DATA when
none is recorded. Plots are skipped when matplotlib is missing (lent GPU machines
may lack it).

    [SUMMARY_JOBS=N] python3 benchmarks/sweep_summary.py DATA RUN [RUN ...]
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import numpy as np  # noqa: E402

from engine.checkpoint import load_checkpoint  # noqa: E402
from engine.config import load_config  # noqa: E402
from engine.features import Tokenizer  # noqa: E402
from training.dataset import PreparedDataset, read_split  # noqa: E402
from training.fusion_fit import collect_branch_logits  # noqa: E402
from training.train import make_loader, pick_device  # noqa: E402
from training import evaluate  # noqa: E402
from training.flops import count_flops  # noqa: E402


def save_branch_logits(run: Path, data: Path) -> Path:
    """RUN/branch_logits.npz: each branch's logits, presence and labels on the validation and
    test splits, and the fusion logits, so that fusion rules can be studied offline
    (a checkpoint is too big to bring back from a lent machine; these are a few KB)."""
    model, meta = load_checkpoint(run)
    device = pick_device("auto")
    model.to(device)
    tokenizer = Tokenizer(run / "tokenizer.json", max_tokens=meta.features.max_tokens)
    cfg = load_config(None)
    arrays = {"fusion": model.fusion.detach().float().cpu().numpy()}
    for split in ("valid", "test"):
        ds = PreparedDataset(data, read_split(data, "dialog", split), tokenizer, meta.features, list(meta.persons))
        logits, present, labels = collect_branch_logits(model, make_loader(ds, cfg, shuffle=False, seed=0), device)
        arrays.update({f"{split}_logits": logits.numpy(), f"{split}_present": present.numpy(),
                       f"{split}_labels": labels.numpy()})
    out = run / "branch_logits.npz"
    np.savez(out, **arrays)
    return out


def summarise(run: Path, data: Path) -> dict | None:
    """The JSON row of one run folder (None without a checkpoint)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        evaluate.plot_confusion = lambda *a, **k: None
        evaluate.plot_curves = lambda *a, **k: None
    if not (run / "model.safetensors").exists():
        return None
    run_data = Path(json.loads((run / "model.json").read_text()).get("extra", {}).get("data") or data)
    ev = evaluate.evaluate_run(run, run_data, "test", load_config(None), device="auto")
    fl = count_flops(run, run_data, "test")
    save_branch_logits(run, run_data)
    summary = json.loads((run / "train_summary.json").read_text()) if (run / "train_summary.json").exists() else {}
    return {
        "run": run.name, "data": run_data.name, "n": ev["n"], "accuracy": round(ev["accuracy"], 4), "macro_f1": round(ev["macro_f1"], 4),
        "alone": {k: None if v["accuracy"] is None else round(v["accuracy"], 4) for k, v in ev["per_modality"].items()},
        "fusion": (summary.get("fusion_fit") or {}).get("weights_after"),
        "epochs_run": summary.get("epochs_run"), "best_epoch": summary.get("best_epoch"),
        "stopped_by": summary.get("stopped_by"), "train_seconds": summary.get("train_seconds"),
        "feature_gflops": round(fl["feature_extraction_flops"] / 1e9, 3), "active_fraction": fl["active_fraction"],
    }


def main(data: Path, runs: list[Path], jobs: int) -> None:
    # Runs are evaluated in separate processes (spawned: CUDA does not survive a fork).
    with ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(summarise, runs, [data] * len(runs)))
    rows = {}
    for run, row in zip(runs, results):
        if row is None:
            print(json.dumps({"run": run.name, "error": "no checkpoint"}))
        else:
            rows[run.name] = row
    dense: dict[str, float] = {}
    for name, row in rows.items():
        if name.startswith("dense"):
            dense.setdefault(row["data"], row["feature_gflops"])
    for row in rows.values():
        if row["data"] in dense:
            row["feature_vs_dense"] = round(row["feature_gflops"] / dense[row["data"]], 3)
        print(json.dumps(row))


if __name__ == "__main__":
    jobs = int(os.environ.get("SUMMARY_JOBS", "1"))
    main(Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]], jobs)
