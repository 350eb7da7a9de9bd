"""`mmid export`: a trained run -> a self-contained engine folder.

    mmid export --run RUN --backend onnx|tensorrt --out ENGINE [--sparse-budget F ...] [--data DATA] [--int8]

The folder holds model.onnx (dynamic batch, frames, chunks, tokens), engine.json,
tokenizer.json and model.safetensors (for the torch backend); the model also split
for the cached backend: a dense model as visual_cnn.onnx, audio_cnn.onnx, text.onnx
and head.onnx, a sparse one as visual_low.onnx, audio_low.onnx, visual_sparse.onnx,
audio_sparse.onnx, text.onnx and head.onnx (engine/backends/feature_cache.py). With --int8
also model.int8.onnx (dynamic int8 MatMul/Gemm) and, dense, the CNN graphs in
static int8 (engine/quantize.py: calibrated on --data's train split, checked for
the same top-1 person on its test split, else random windows). With --backend
tensorrt also model.plan (built here only when TensorRT and a GPU are present).
Serving it never imports ``training``.

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

import torch
from torch.utils.flop_counter import FlopCounterMode

from engine.dims import ModelDims
from engine.features import FeatureParams, Tokenizer
from engine.runtime import ENGINE_FILE, ENGINE_FORMAT_VERSION

DEFAULT_SPARSE_BUDGET = 0.5  # fraction of sites kept per stage when nothing else says
REFERENCE_WINDOW = {"batch": 1, "frames": 6, "chunks": 8, "tokens": 14}  # a 3 s window, ~12 words
CALIBRATION_SAMPLES = 64


@dataclasses.dataclass(frozen=True)
class Int8Data:
    """Inputs of the int8 export: Batches to calibrate static int8 on, Batches whose top-1
    person the int8 graphs must keep (``split`` names where they come from), their labels."""

    calibration: list
    check: list
    split: str
    labels: list[int] | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, type=Path, help="run folder written by mmid train")
    parser.add_argument("--out", required=True, type=Path, help="engine folder to write")
    parser.add_argument("--backend", choices=["onnx", "tensorrt"], default="onnx")
    parser.add_argument("--sparse-budget", type=float, nargs="+", metavar="F",
                        help="sparse model: fraction of sites kept per sparse stage (one value, or one per stage), "
                             "both CNNs unless --sparse-budget-audio")
    parser.add_argument("--sparse-budget-audio", type=float, nargs="+", metavar="F",
                        help="sparse model: the audio CNN's own fractions (with --sparse-budget)")
    parser.add_argument("--data", type=Path, help="prepared dataset: the sparse budget is calibrated on its valid split; "
                        "with --int8 the int8 CNNs on its train split, their top-1 checked on its test split")
    parser.add_argument("--int8", action="store_true", help="also write int8 graphs (whole model: dynamic int8 "
                        "MatMul/Gemm; dense CNN graphs: static int8)")
    parser.add_argument("--max-batch", type=int, default=32, help="TensorRT profile: largest batch")


def run(args: argparse.Namespace, cfg) -> int:
    from engine.checkpoint import load_checkpoint

    model, meta = load_checkpoint(args.run)
    budget = audio = None
    if meta.dims.name == "mme2e_sparse":
        budget, audio = resolve_budget(model, args.sparse_budget, args.data, args.run, cfg.engine.sparse_budget,
                                       args.sparse_budget_audio)
    int8_data = data_int8_inputs(args.run, args.data) if args.int8 and args.data is not None else None
    out = export_engine(model, meta.persons, meta.features, args.run / "tokenizer.json", args.out,
                        backend=args.backend, sparse_budget=budget, sparse_budget_audio=audio, int8=args.int8,
                        max_batch=args.max_batch,
                        fp16=cfg.engine.fp16, source=str(args.run), int8_data=int8_data)
    info = json.loads((out / ENGINE_FILE).read_text())
    if args.backend == "tensorrt" and not info["plan"]:
        print(f"mmid export: wrote {out} (ONNX graph + TensorRT profile) but no TensorRT plan: "
              "TensorRT is absent here; run the export again where it is installed", file=sys.stderr)
        return 1
    print(json.dumps({"engine": str(out), "model": meta.dims.name, "sparse_budget": info["sparse_budget"],
                      "sparse_budget_audio": info.get("sparse_budget_audio"),
                      "flops_per_window": info["flops_per_window"], "files": sorted(p.name for p in out.iterdir())}))
    return 0


def resolve_budget(model, given: Sequence[float] | None, data: Path | None, run: Path, cfg_budget: float,
                   given_audio: Sequence[float] | None = None) -> tuple[tuple[float, ...], tuple[float, ...] | None]:
    """The sparse export's fixed budget: (visual CNN's, or both CNNs', fractions per sparse stage;
    the audio CNN's own or None), from --sparse-budget[-audio], else calibrated on --data, else
    the run's dims, else [engine] sparse_budget."""
    n = model.dims.n_sparse_stages

    def fractions(values: Sequence[float], flag: str) -> tuple[float, ...]:
        if len(values) not in (1, n):
            raise ValueError(f"{flag}: give 1 or {n} fractions, got {len(values)}")
        return tuple(values) * (n if len(values) == 1 else 1)

    if given:
        return fractions(given, "--sparse-budget"), fractions(given_audio, "--sparse-budget-audio") if given_audio else None
    if given_audio:
        raise ValueError("--sparse-budget-audio needs --sparse-budget (the visual CNN's fractions)")
    if data is not None:
        return calibrate_budget(model, data, run)
    if model.dims.sparse_budget:
        return tuple(model.dims.sparse_budget), tuple(model.dims.sparse_budget_audio) or None
    return (cfg_budget or DEFAULT_SPARSE_BUDGET,) * n, None


def calibrate_budget(model, data: Path, run: Path, limit: int = CALIBRATION_SAMPLES
                     ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The CDF rule's realised active fraction per sparse stage on the valid split, per modality
    (averaged over the utterances that have it): the fixed budgets (visual, audio) that keep as
    many sites as the paper's rule. Per modality, because a trained model's two CNNs can keep
    very different shares (dense-first models: 4-5% of the visual sites, 9-17% of the audio
    ones), and a CNN given more sites than it learned to use loses accuracy (BENCHMARKS.md)."""
    from engine.checkpoint import load_meta
    from engine.features import collate
    from training.dataset import PreparedDataset, read_split  # export-time only: serving never gets here

    meta = load_meta(run)
    tokenizer = Tokenizer(run / "tokenizer.json", max_tokens=meta.features.max_tokens)
    ids = read_split(data, meta.extra.get("split", "dialog"), "valid")[:limit]
    ds = PreparedDataset(data, ids, tokenizer, meta.features, list(meta.persons))
    saved = model.sparse_budget, model.sparse_budget_audio
    model.set_sparse_budget(None)
    fractions: dict[str, list[torch.Tensor]] = {"visual": [], "audio": []}
    with torch.no_grad():
        for i in range(len(ds)):
            sample, _ = ds[i]
            model(*collate([sample]).model_inputs())
            for modality, kept in model.last_active_fractions.items():  # the modalities this utterance has
                fractions[modality].append(kept)
    model.set_sparse_budget(*saved)
    if not fractions["visual"] and not fractions["audio"]:
        raise ValueError(f"{data}: no valid-split utterances to calibrate the sparse budget on")
    mean = {m: tuple(round(float(f), 3) for f in torch.stack(v).mean(0).clamp(0.01, 1.0)) for m, v in fractions.items() if v}
    return mean.get("visual", mean.get("audio")), mean.get("audio", mean.get("visual"))


def data_batches(run: Path, data: Path, split: str, limit: int, batch: int = 8) -> tuple[list, list[int]]:
    """Collated Batches of up to ``limit`` utterances of a prepared split, and their person indices."""
    from engine.checkpoint import load_meta
    from engine.features import collate
    from training.dataset import PreparedDataset, read_split  # export-time only: serving never gets here

    meta = load_meta(run)
    tokenizer = Tokenizer(run / "tokenizer.json", max_tokens=meta.features.max_tokens)
    ids = read_split(data, meta.extra.get("split", "dialog"), split)[:limit]
    ds = PreparedDataset(data, ids, tokenizer, meta.features, list(meta.persons))
    items = [ds[i] for i in range(len(ds))]
    batches = [collate([s for s, _ in items[i: i + batch]]) for i in range(0, len(items), batch)]
    return batches, [y for _, y in items]


def data_int8_inputs(run: Path, data: Path) -> Int8Data:
    """Calibration (train split) and check (whole test split) inputs of a prepared dataset."""
    calibration, _ = data_batches(run, data, "train", CALIBRATION_SAMPLES)
    check, labels = data_batches(run, data, "test", 1 << 30)
    return Int8Data(calibration, check, "test", labels)


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
        dense = build_model(dataclasses.replace(model.dims, name="mme2e", sparse_budget=(), sparse_budget_audio=())).eval()
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
                  max_batch: int = 32, fp16: bool = True, source: str = "", int8_data: Int8Data | None = None,
                  sparse_budget_audio: Sequence[float] | None = None) -> Path:
    """Write an engine folder for ``model`` (eval mode; weights as given). Sparse model:
    ``sparse_budget`` the fixed fractions per sparse stage (both CNNs, or the visual one when
    ``sparse_budget_audio`` gives the audio one's). ``int8_data``: what the int8 graphs are
    calibrated and checked on (default: random windows)."""
    from safetensors.torch import save_file

    from engine.backends.onnx_backend import export_onnx

    Tokenizer(tokenizer_file)  # a missing or unreadable tokenizer is refused before minutes of export
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = model.cpu().eval()
    dims: ModelDims = model.dims
    if dims.name == "mme2e_sparse":
        budget = tuple(sparse_budget or (DEFAULT_SPARSE_BUDGET,) * dims.n_sparse_stages)
        audio = tuple(sparse_budget_audio) if sparse_budget_audio and tuple(sparse_budget_audio) != budget else None
        model.set_sparse_budget(budget, audio)
        dims = dataclasses.replace(dims, sparse_budget=budget, sparse_budget_audio=audio or ())
    export_onnx(model, out / "model.onnx")
    # per-frame CNN graphs (sparse: low-level maps, then the sparse stages per guide) + text + head:
    # what overlapping windows share is computed once (engine/backends/feature_cache.py)
    from engine.backends.feature_cache import export_split, split_format

    split = export_split(model, out)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    shutil.copyfile(tokenizer_file, out / "tokenizer.json")
    info = {
        "format_version": ENGINE_FORMAT_VERSION, "backend": backend, "graph": "model.onnx", "int8_graph": None,
        "plan": None, "split_graphs": split, "split_format": split_format(dims.name) if split else None, "weights": "model.safetensors", "dims": json.loads(dims.to_json()), "persons": list(persons),
        "features": features.to_dict(), "sparse_budget": list(dims.sparse_budget) or None,
        "sparse_budget_audio": list(dims.sparse_budget_audio) or None,
        "flops_per_window": flops_report(model), "versions": versions(), "source": source,
    }
    if int8:
        info.update(export_int8(out, model, split, int8_data or random_int8_inputs(model)))
    if backend == "tensorrt":
        info.update(tensorrt_build(out, dims, features, max_batch, fp16))
    (out / ENGINE_FILE).write_text(json.dumps(info, indent=2))
    return out


def random_int8_inputs(model: torch.nn.Module, n: int = 16, seed: int = 0) -> Int8Data:
    """Random windows to calibrate and check int8 on when no data is given."""
    from engine.backends.onnx_backend import example_inputs
    from engine.features import Batch

    sizes = {"batch": n, "frames": 6, "chunks": 8, "tokens": 14}
    torch.manual_seed(seed)
    return Int8Data([Batch(*example_inputs(model, sizes))], [Batch(*example_inputs(model, sizes))], "random")


def export_int8(out: Path, model: torch.nn.Module, split: dict | None, data: Int8Data) -> dict:
    """Write the int8 graphs and compare them with the fp32 graph on ``data.check``."""
    from engine.backends.feature_cache import CachedOnnxBackend
    from engine.backends.onnx_backend import OnnxBackend
    from engine.handover import hand_over_split_int8
    from engine.quantize import (calibration_items, compare, fused_logits, quantize_dynamic_int8, write_sparse_split_int8,
                                 write_split_int8)

    quantize_dynamic_int8(out / "model.onnx", out / "model.int8.onnx")
    fp32 = fused_logits(OnnxBackend(out / "model.onnx"), data.check)
    whole = fused_logits(OnnxBackend(out / "model.int8.onnx"), data.check)
    check = {"split": data.split, "whole": compare(fp32, whole, data.labels)}
    info = {"int8_graph": "model.int8.onnx", "int8_check": check}
    if split:
        if model.dims.name == "mme2e":
            info["split_int8_graphs"] = write_split_int8(out, *calibration_items(data.calibration))
        else:
            info["split_int8_graphs"] = write_sparse_split_int8(out, data.calibration)
            info["int8_handover"] = hand_over_split_int8(out, info["split_int8_graphs"])
        cached = CachedOnnxBackend(out, info["split_int8_graphs"], capacity=1,  # capacity 1: no reuse across windows
                                   learned_guide=model.dims.sparse_guide == "learned")
        check["cached"] = compare(fp32, fused_logits(cached, data.check), data.labels)
    return info


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
