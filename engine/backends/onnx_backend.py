"""ONNX export of MME2E / sparse MME2E and the ONNX Runtime backend (the CPU default).

The graph is exported with ``torch.onnx.export(..., dynamo=True)`` and
``dynamic_shapes``: batch, frames, chunks and tokens are all dynamic, so one
graph serves any window. The sparse model must be in fixed-budget mode
(``set_sparse_budget``): top-k sites per frame keeps every shape static given
the input shape, and the gather-based convolutions run on the kept sites only.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import numpy as np
import torch

from engine.backends import DYNAMIC_AXES, GRAPH_OUTPUT_NAMES, INPUT_NAMES, numpy_inputs, outputs_dict

EXAMPLE_SIZES = {"batch": 2, "frames": 3, "chunks": 4, "tokens": 5}  # >= 2: size-1 examples get specialised
MAX_FRAMES_OR_CHUNKS = 4096  # upper bound of the dynamic frame/chunk axes
EXTERNAL_DATA_BYTES = 1 << 30  # weights above 1 GiB go to model.onnx.data (the protobuf limit is 2 GiB)


def example_inputs(model: torch.nn.Module, sizes: dict[str, int] = EXAMPLE_SIZES) -> tuple[torch.Tensor, ...]:
    """Random valid inputs of the model's dims, in forward order."""
    d = model.dims
    B, F, C, L = sizes["batch"], sizes["frames"], sizes["chunks"], sizes["tokens"]
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(B, F, 3, d.face_size, d.face_size, generator=g), torch.ones(B, F, dtype=torch.bool),
        torch.randn(B, C, 1, d.n_mels, d.chunk_frames, generator=g), torch.ones(B, C, dtype=torch.bool),
        torch.randint(1, min(d.text_vocab, 1000), (B, L), generator=g), torch.ones(B, L, dtype=torch.bool),
    )


def dynamic_shapes(model: torch.nn.Module) -> dict[str, dict[int, torch.export.Dim]]:
    dims = {
        "batch": torch.export.Dim("batch", min=1, max=4096),
        "frames": torch.export.Dim("frames", min=1, max=MAX_FRAMES_OR_CHUNKS),
        "chunks": torch.export.Dim("chunks", min=1, max=MAX_FRAMES_OR_CHUNKS),
        "tokens": torch.export.Dim("tokens", min=1, max=model.dims.text_max_positions),
    }
    return {name: {0: dims[a0], 1: dims[a1]} for name, (a0, a1) in DYNAMIC_AXES.items()}


def export_onnx(model: torch.nn.Module, path: str | Path) -> Path:
    """Export ``model`` (eval mode; sparse: fixed budget set) to ``path`` with dynamic shapes.
    The exporter's progress lines go to stderr so that stdout stays clean."""
    if getattr(model, "sparse_budget", "dense") is None:
        raise ValueError("sparse model: call set_sparse_budget(...) before export (the CDF rule has data-dependent shapes)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    n_bytes = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    gather = getattr(model, "gather_real_frames", False)
    model.gather_real_frames = False  # static shapes: every frame through the CNNs (an empty CNN batch cannot export)
    try:
        with contextlib.redirect_stdout(sys.stderr), torch.no_grad():
            program = torch.onnx.export(
                model, example_inputs(model), dynamo=True, dynamic_shapes=dynamic_shapes(model),
                input_names=list(INPUT_NAMES), output_names=list(GRAPH_OUTPUT_NAMES), optimize=True, verbose=False,
            )
            program.save(str(path), external_data=n_bytes > EXTERNAL_DATA_BYTES)
    finally:
        model.gather_real_frames = gather
    return path


class OnnxBackend:
    """ONNX Runtime on the CPU provider (CUDA provider when installed and asked for)."""

    def __init__(self, path: str | Path, threads: int = 0, device: str = "cpu", name: str = "onnx"):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ImportError("the onnx backend needs onnxruntime: pip install onnxruntime") from exc
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads if threads > 0 else (os.cpu_count() or 1)
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # no busy-waiting between calls: torch and ORT share the cores in one process
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise RuntimeError("onnx backend: device 'cuda' asked for, but onnxruntime has no CUDA provider")
            providers.insert(0, "CUDAExecutionProvider")
        if not Path(path).exists():
            raise FileNotFoundError(f"{path} is missing: the engine folder is incomplete (export it again with mmid export)")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # a truncated or foreign file: name it
            raise RuntimeError(f"{path}: ONNX Runtime cannot load this graph, the engine folder is damaged "
                               f"(export it again with mmid export): {exc}") from exc
        self.name = name
        self.device = device
        self.path = Path(path)

    def run(self, batch) -> dict[str, np.ndarray]:
        return outputs_dict(self.session.run(list(GRAPH_OUTPUT_NAMES), numpy_inputs(batch)))
