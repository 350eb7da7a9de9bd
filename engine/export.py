"""`mmid export`: a trained run -> a self-contained engine folder.

    mmid export --run RUN --backend onnx|tensorrt --out ENGINE [--sparse-budget F ...] [--data DATA] [--int8]

The folder holds model.onnx (dynamic batch, frames, chunks, tokens), engine.json,
tokenizer.json and model.safetensors (for the torch backend); with --int8 also
model.int8.onnx (dynamic int8 MatMul/Gemm), with --backend tensorrt also model.plan
(built here only when TensorRT and a GPU are present). Serving it never imports
``training``.

The sparse model is exported in fixed-budget mode: per stage, a fixed fraction of
each frame's sites is kept (top-k of the text-guided attention), so shapes are
static and the gathered convolutions run on kept sites only. The budget comes
from --sparse-budget, else from the CDF rule's realised active fraction on
--data (calibration), else from [engine] sparse_budget, else DEFAULT_SPARSE_BUDGET.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from engine.dims import ModelDims
from engine.features import FeatureParams
from engine.runtime import ENGINE_FILE, ENGINE_FORMAT_VERSION

DEFAULT_SPARSE_BUDGET = 0.5  # fraction of sites kept per stage when nothing else says
REFERENCE_WINDOW = {"batch": 1, "frames": 6, "chunks": 8, "tokens": 14}  # a 3 s window, ~12 words
CALIBRATION_SAMPLES = 64


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, type=Path, help="run folder written by mmid train")
    parser.add_argument("--out", required=True, type=Path, help="engine folder to write")
    parser.add_argument("--backend", choices=["onnx", "tensorrt"], default="onnx")
    parser.add_argument("--sparse-budget", type=float, nargs="+", metavar="F",
                        help="sparse model: fraction of sites kept per stage (one value, or one per stage)")
    parser.add_argument("--data", type=Path, help="prepared dataset to calibrate the sparse budget on (valid split)")
    parser.add_argument("--int8", action="store_true", help="also write a dynamic-int8 graph (MatMul/Gemm)")
    parser.add_argument("--max-batch", type=int, default=32, help="TensorRT profile: largest batch")


def run(args: argparse.Namespace, cfg) -> int:
    from engine.checkpoint import load_checkpoint

    model, meta = load_checkpoint(args.run)
    budget = None
    if meta.dims.name == "mme2e_sparse":
        budget = resolve_budget(model, args.sparse_budget, args.data, args.run, cfg.engine.sparse_budget)
    out = export_engine(model, meta.persons, meta.features, args.run / "tokenizer.json", args.out,
                        backend=args.backend, sparse_budget=budget, int8=args.int8, max_batch=args.max_batch,
                        fp16=cfg.engine.fp16, source=str(args.run))
    info = json.loads((out / ENGINE_FILE).read_text())
    if args.backend == "tensorrt" and not info["plan"]:
        print(f"mmid export: wrote {out} (ONNX graph + TensorRT profile) but no TensorRT plan: "
              "TensorRT is absent here; run the export again where it is installed", file=sys.stderr)
        return 1
    print(json.dumps({"engine": str(out), "model": meta.dims.name, "sparse_budget": info["sparse_budget"],
                      "flops_per_window": info["flops_per_window"], "files": sorted(p.name for p in out.iterdir())}))
    return 0


def resolve_budget(model, given: Sequence[float] | None, data: Path | None, run: Path, cfg_budget: float) -> tuple[float, ...]:
    n = len(model.dims.stage_channels)
    if given:
        if len(given) not in (1, n):
            raise ValueError(f"--sparse-budget: give 1 or {n} fractions, got {len(given)}")
        return tuple(given) * (n if len(given) == 1 else 1)
    if data is not None:
        return calibrate_budget(model, data, run)
    if model.dims.sparse_budget:
        return tuple(model.dims.sparse_budget)
    return (cfg_budget or DEFAULT_SPARSE_BUDGET,) * n


def calibrate_budget(model, data: Path, run: Path, limit: int = CALIBRATION_SAMPLES) -> tuple[float, ...]:
    """The CDF rule's realised active fraction per stage on the valid split (max of audio and
    visual, averaged over utterances): the fixed budget that keeps as many sites as the paper's rule."""
    from engine.checkpoint import load_meta
    from engine.features import Tokenizer, collate
    from training.dataset import PreparedDataset, read_split  # export-time only: serving never gets here

    meta = load_meta(run)
    tokenizer = Tokenizer(run / "tokenizer.json", max_tokens=meta.features.max_tokens)
    ids = read_split(data, meta.extra.get("split", "dialog"), "valid")[:limit]
    ds = PreparedDataset(data, ids, tokenizer, meta.features, list(meta.persons))
    saved = model.sparse_budget
    model.set_sparse_budget(None)
    fractions = []
    with torch.no_grad():
        for i in range(len(ds)):
            sample, _ = ds[i]
            model(*collate([sample]).model_inputs())
            fractions.append(torch.stack([model.last_active_fractions[m] for m in ("audio", "visual")]).amax(0))
    model.set_sparse_budget(saved)
    if not fractions:
        raise ValueError(f"{data}: no valid-split utterances to calibrate the sparse budget on")
    mean = torch.stack(fractions).mean(0).clamp(0.01, 1.0)
    return tuple(round(float(f), 3) for f in mean)


def count_window_flops(model: torch.nn.Module, sizes: dict[str, int] = REFERENCE_WINDOW) -> int:
    """FLOPs (2 per multiply-add) executed by one forward on the reference window."""
    from engine.backends.onnx_backend import example_inputs

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(*example_inputs(model, sizes))
    return int(counter.get_total_flops())


def flops_report(model: torch.nn.Module) -> dict[str, float]:
    """GFLOPs per reference window of this model and of the dense model of the same dims."""
    from engine.model import build_model

    report = {"window": REFERENCE_WINDOW, "gflops": count_window_flops(model) / 1e9}
    if model.dims.name == "mme2e_sparse":
        dense = build_model(dataclasses.replace(model.dims, name="mme2e", sparse_budget=())).eval()
        report["dense_gflops"] = count_window_flops(dense) / 1e9
    return report


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    out = {"python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
           "onnxruntime": onnxruntime.__version__}
    try:
        import tensorrt

        out["tensorrt"] = tensorrt.__version__
    except ImportError:
        out["tensorrt"] = "absent"
    return out


def export_engine(model: torch.nn.Module, persons: Sequence[str], features: FeatureParams, tokenizer_file: Path,
                  out: Path, backend: str = "onnx", sparse_budget: Sequence[float] | None = None, int8: bool = False,
                  max_batch: int = 32, fp16: bool = True, source: str = "") -> Path:
    """Write an engine folder for ``model`` (eval mode; weights as given)."""
    from safetensors.torch import save_file

    from engine.backends.onnx_backend import export_onnx, quantize_int8

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = model.cpu().eval()
    dims: ModelDims = model.dims
    if dims.name == "mme2e_sparse":
        budget = tuple(sparse_budget or (DEFAULT_SPARSE_BUDGET,) * len(dims.stage_channels))
        model.set_sparse_budget(budget)
        dims = dataclasses.replace(dims, sparse_budget=budget)
    export_onnx(model, out / "model.onnx")
    split = None
    if dims.name == "mme2e":  # per-frame CNN graphs + head: CNN outputs reused across overlapping windows
        from engine.backends.feature_cache import export_split

        split = export_split(model, out)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    shutil.copyfile(tokenizer_file, out / "tokenizer.json")
    info = {
        "format_version": ENGINE_FORMAT_VERSION, "backend": backend, "graph": "model.onnx", "int8_graph": None,
        "plan": None, "split_graphs": split, "weights": "model.safetensors", "dims": json.loads(dims.to_json()), "persons": list(persons),
        "features": features.to_dict(), "sparse_budget": list(dims.sparse_budget) or None,
        "flops_per_window": flops_report(model), "versions": versions(), "source": source,
    }
    if int8:
        quantize_int8(out / "model.onnx", out / "model.int8.onnx")
        info["int8_graph"] = "model.int8.onnx"
        info["int8_top1_agreement_random"] = int8_agreement(out, model)
    if backend == "tensorrt":
        info.update(tensorrt_build(out, dims, features, max_batch, fp16))
    (out / ENGINE_FILE).write_text(json.dumps(info, indent=2))
    return out


def int8_agreement(out: Path, model: torch.nn.Module, n: int = 16) -> float:
    """Fraction of random windows whose top-1 person is the same in the int8 and fp32 graphs."""
    from engine.backends.onnx_backend import OnnxBackend, example_inputs
    from engine.features import Batch

    sizes = {"batch": n, "frames": 6, "chunks": 8, "tokens": 14}
    batch = Batch(*example_inputs(model, sizes))
    fp32 = OnnxBackend(out / "model.onnx").run(batch)["logits"].argmax(1)
    q = OnnxBackend(out / "model.int8.onnx").run(batch)["logits"].argmax(1)
    return float(np.mean(fp32 == q))


def tensorrt_build(out: Path, dims: ModelDims, features: FeatureParams, max_batch: int, fp16: bool) -> dict:
    """Profile ranges always go into engine.json; the plan is built where TensorRT is present."""
    from engine.backends.tensorrt_backend import PLAN_FILE, ProfileRanges, build_engine

    ranges = ProfileRanges.for_features(features, max_batch)
    shapes = ranges.input_shapes(dims)
    info = {"tensorrt_profile": {k: [list(s) for s in v] for k, v in shapes.items()}, "fp16": fp16}
    try:
        build_engine(out / "model.onnx", out / PLAN_FILE, shapes, fp16=fp16)
        info["plan"] = PLAN_FILE
    except RuntimeError as exc:
        print(f"mmid export: TensorRT plan not built: {exc}", file=sys.stderr)
    return info
