"""PyTorch backend: the reference every other backend is tested against.

CPU or CUDA; eager, ``torch.compile``d (``compile=True``; dynamic shapes, so a
new batch size or frame count does not recompile each time), or on CUDA replayed
from CUDA graphs (``cuda_graphs=True``: one graph per input shape, captured on
first sight of that shape and kept for the backend's lifetime, so it suits serving
with a few fixed shapes; launch overhead is most of a small batch's time). So that
a live stream's ever-new shapes (transcript lengths, batch sizes, frame and chunk
counts) do not each cost a capture (~0.1 s) and a graph's memory, the graphs
backend pads every input to bucket sizes first (``bucket_size``: 1, 2, 3, 4, 6,
8, 12, 16, ... at most a third more): masked frames, chunks and tokens, and
copies of the last window for the batch, whose answers are dropped. Padding
changes no window's answer beyond rounding (tested on the CPU, ``pad_shapes``).
``half=True`` on CUDA runs under fp16 autocast; ``run`` returns float32 arrays either way.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from engine.backends import outputs_dict
from engine.features import TEXT_PAD_ID


def bucket_size(n: int) -> int:
    """The smallest of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (2^k and 3 x 2^k) that is >= n."""
    if n <= 2:
        return max(1, n)
    power = 1 << (n - 1).bit_length()  # the smallest power of two >= n
    return 3 * power // 4 if 3 * power // 4 >= n else power


def pad_to_buckets(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Model inputs (faces (B, F, 3, S, S), face_mask (B, F), audio (B, C, 1, M, T), audio_mask
    (B, C), text (B, L), text_mask (B, L)) padded to bucket sizes of B, F, C and L: extra
    frames, chunks and tokens masked out (zeros, the pad id), extra rows copies of the last
    window."""
    faces, face_mask, audio, audio_mask, text, text_mask = inputs

    def grow(t: torch.Tensor, dim: int, size: int, fill) -> torch.Tensor:
        if t.shape[dim] >= size:
            return t
        shape = list(t.shape)
        shape[dim] = size - t.shape[dim]
        return torch.cat([t, torch.full(shape, fill, dtype=t.dtype, device=t.device)], dim)

    f, c, n = bucket_size(faces.shape[1]), bucket_size(audio.shape[1]), bucket_size(text.shape[1])
    out = [grow(faces, 1, f, 0), grow(face_mask, 1, f, False), grow(audio, 1, c, 0), grow(audio_mask, 1, c, False),
           grow(text, 1, n, TEXT_PAD_ID), grow(text_mask, 1, n, False)]
    rows = bucket_size(faces.shape[0])
    if rows > faces.shape[0]:
        last = [t[-1:].expand(rows - faces.shape[0], *t.shape[1:]) for t in out]
        out = [torch.cat([t, extra]) for t, extra in zip(out, last)]
    return out


class TorchBackend:
    def __init__(self, model: torch.nn.Module, device: str = "cpu", compile: bool = False, threads: int = 0,
                 cuda_graphs: bool = False, half: bool = False, pad_shapes: bool | None = None):
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
        self.pad_shapes = cuda_graphs if pad_shapes is None else pad_shapes  # inputs padded to bucket sizes
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
        rows = inputs[0].shape[0]
        out = self.forward(pad_to_buckets(inputs) if self.pad_shapes else inputs)
        return outputs_dict((t.float() if t.is_floating_point() else t)[:rows].cpu().numpy() for t in out)
