"""PyTorch backend: the reference every other backend is tested against.

CPU or CUDA; eager, ``torch.compile``d (``compile=True``; dynamic shapes, so a
new batch size or frame count does not recompile each time), or on CUDA replayed
from CUDA graphs (``cuda_graphs=True``: one graph per input shape, captured on
first sight of that shape and kept for the backend's lifetime, so it suits serving
with a few fixed shapes; launch overhead is most of a small batch's time).
``half=True`` on CUDA runs under fp16 autocast; ``run`` returns float32 arrays either way.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from engine.backends import outputs_dict


class TorchBackend:
    def __init__(self, model: torch.nn.Module, device: str = "cpu", compile: bool = False, threads: int = 0,
                 cuda_graphs: bool = False, half: bool = False):
        cuda = device.startswith("cuda")
        if cuda and not torch.cuda.is_available():
            raise RuntimeError("torch backend: device 'cuda' asked for, but torch sees no CUDA GPU")
        if (cuda_graphs or half) and not cuda:
            raise ValueError("torch backend: cuda_graphs and half need device 'cuda'")
        if cuda_graphs and getattr(model, "sparse_budget", ()) is None:
            raise ValueError("torch backend: CUDA graphs need static shapes; the sparse model's CDF rule is not "
                             "(export with a fixed sparse budget)")
        if threads > 0:
            torch.set_num_threads(threads)
        self.device = device
        self.half = half
        self.name = "torch" + ("-compile" if compile else "") + ("-graphs" if cuda_graphs else "") + ("-fp16" if half else "")
        self.model = model.to(device).eval()
        if cuda_graphs:
            self.model.gather_real_frames = False  # nonzero() syncs the host: not capturable
        self._forward = torch.compile(self.model, dynamic=True) if compile else self.model
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], tuple]] | None = {} if cuda_graphs else None

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.float16, cache_enabled=False) if self.half else contextlib.nullcontext()

    @torch.inference_mode()
    def forward(self, inputs: list[torch.Tensor]) -> tuple:
        """Device tensors in, model outputs (device tensors) out."""
        if self._graphs is None:
            with self._autocast():
                return tuple(self._forward(*inputs))
        key = tuple((tuple(t.shape), t.dtype) for t in inputs)
        if key not in self._graphs:
            self._graphs[key] = self._capture(inputs)
        graph, static_in, static_out = self._graphs[key]
        for dst, src in zip(static_in, inputs):
            dst.copy_(src, non_blocking=True)
        graph.replay()
        return static_out

    def _capture(self, inputs: list[torch.Tensor]):
        static_in = [t.clone() for t in inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), self._autocast():
            for _ in range(3):  # warm-up outside the graph (cuDNN/cuBLAS choose their kernels here)
                self._forward(*static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), self._autocast():
            static_out = tuple(self._forward(*static_in))
        return graph, static_in, static_out

    @torch.inference_mode()
    def run(self, batch) -> dict[str, np.ndarray]:
        inputs = [t.to(self.device, non_blocking=True) for t in batch.model_inputs()]
        out = self.forward(inputs)
        return outputs_dict(t.float().cpu().numpy() if t.is_floating_point() else t.cpu().numpy() for t in out)
