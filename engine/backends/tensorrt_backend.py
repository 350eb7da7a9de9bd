"""TensorRT backend: build a serialized engine from the exported ONNX graph and run it.

Written against TensorRT 10.x's Python API. TensorRT cannot be installed on our
machines (docs: /work/shared/ENVIRONMENT.md), so the build and the run are
UNTESTED here; tests/test_engine.py checks everything they consume instead
(the ONNX graph's op set and opset, input names/dtypes, dynamic axes, and the
profile ranges below) and skips the build-and-run test with that reason.

Buffers are torch CUDA tensors (no pycuda): inputs are copied to the GPU,
outputs are allocated per call with the shapes the context reports.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.backends import DYNAMIC_AXES, GRAPH_OUTPUT_NAMES, INPUT_NAMES, numpy_inputs, outputs_dict

PLAN_FILE = "model.plan"
WORKSPACE_BYTES = 4 << 30
MISSING = ("the tensorrt backend needs NVIDIA TensorRT 10.x (`pip install tensorrt` from NVIDIA's index) and a CUDA GPU; "
           "use backend='onnx' (CPU) or 'torch' instead")

# ONNX ops that TensorRT 10's ONNX parser imports (subset that matters for our graphs)
TENSORRT_OPS = frozenset("""
Abs Add And ArgMax ArgMin AveragePool BatchNormalization Cast Ceil Clip Concat Constant ConstantOfShape Conv
Cos CumSum Div Dropout Einsum Elu Equal Erf Exp Expand Flatten Floor Gather GatherElements GatherND Gelu Gemm
GlobalAveragePool GlobalMaxPool Greater GreaterOrEqual Identity If InstanceNormalization IsInf IsNaN
LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax MatMul Max MaxPool Mean Min Mod Mul Neg NonZero Not
OneHot Or Pad Pow Range Reciprocal ReduceL2 ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
Relu Reshape Resize Round ScatterElements ScatterND Shape Sigmoid Sign Sin Size Slice Softmax Split Sqrt Squeeze
Sub Sum Tanh Tile TopK Transpose Trilu Unsqueeze Where Xor
""".split())
TENSORRT_OPSET_RANGE = (9, 22)  # opsets the TensorRT 10 parser accepts


@dataclass(frozen=True)
class ProfileRanges:
    """(min, opt, max) of each dynamic axis; one optimisation profile covers them all."""

    batch: tuple[int, int, int] = (1, 8, 32)
    frames: tuple[int, int, int] = (1, 6, 64)
    chunks: tuple[int, int, int] = (1, 8, 64)
    tokens: tuple[int, int, int] = (1, 16, 100)

    @classmethod
    def for_features(cls, params, max_batch: int = 32) -> "ProfileRanges":
        clip = lambda opt, hi: (1, min(opt, hi), hi)  # noqa: E731
        return cls(batch=clip(8, max_batch), frames=clip(6, params.max_frames),
                   chunks=clip(8, params.max_chunks), tokens=clip(16, params.max_tokens))

    def input_shapes(self, dims) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """Graph input name -> (min shape, opt shape, max shape)."""
        tail = {"faces": (3, dims.face_size, dims.face_size), "audio": (1, dims.n_mels, dims.chunk_frames)}
        out = {}
        for name, (a0, a1) in DYNAMIC_AXES.items():
            r0, r1 = getattr(self, a0), getattr(self, a1)
            out[name] = tuple((r0[i], r1[i], *tail.get(name, ())) for i in range(3))
        return out


def require_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise RuntimeError(MISSING) from exc
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(MISSING + " (tensorrt imported, but torch sees no CUDA GPU)")
    return trt


def build_engine(onnx_path: str | Path, plan_path: str | Path, shapes: dict, fp16: bool = True) -> Path:
    """Parse the ONNX graph, add one optimisation profile (``ProfileRanges.input_shapes``),
    build and write the serialized engine."""
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if fp16 and builder.platform_has_fast_fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}")
    Path(plan_path).write_bytes(bytes(plan))
    return Path(plan_path)


class TensorRTBackend:
    def __init__(self, plan_path: str | Path):
        trt = require_tensorrt()
        import torch

        self._torch = torch
        self.name, self.device = "tensorrt", "cuda"
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {plan_path} (built by another TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()
        self._dtypes = {name: _torch_dtype(trt, self.engine.get_tensor_dtype(name))
                        for name in (*INPUT_NAMES, *GRAPH_OUTPUT_NAMES)}

    def run(self, batch) -> dict[str, np.ndarray]:
        torch = self._torch
        stream = torch.cuda.current_stream()
        keep = []  # buffers must outlive execute_async_v3
        for name, array in numpy_inputs(batch).items():
            t = torch.from_numpy(array).to("cuda", dtype=self._dtypes[name]).contiguous()
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
            keep.append(t)
        outputs = []
        for name in GRAPH_OUTPUT_NAMES:
            t = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self._dtypes[name], device="cuda")
            self.context.set_tensor_address(name, t.data_ptr())
            outputs.append(t)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        stream.synchronize()
        return outputs_dict(t.float().cpu().numpy() if t.is_floating_point() else t.cpu().numpy() for t in outputs)


def _torch_dtype(trt, dtype):
    import torch

    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
             trt.int64: torch.int64, trt.bool: torch.bool}
    return table[dtype]
