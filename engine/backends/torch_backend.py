"""PyTorch backend: the reference every other backend is tested against.

CPU or CUDA, eager or ``torch.compile``d (``compile=True``; dynamic shapes, so a
new batch size or frame count does not recompile each time).
"""

from __future__ import annotations

import numpy as np
import torch

from engine.backends import outputs_dict


class TorchBackend:
    def __init__(self, model: torch.nn.Module, device: str = "cpu", compile: bool = False, threads: int = 0):
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError("torch backend: device 'cuda' asked for, but torch sees no CUDA GPU")
        if threads > 0:
            torch.set_num_threads(threads)
        self.device = device
        self.name = "torch-compile" if compile else "torch"
        self.model = model.to(device).eval()
        self._forward = torch.compile(self.model, dynamic=True) if compile else self.model

    @torch.inference_mode()
    def run(self, batch) -> dict[str, np.ndarray]:
        inputs = [t.to(self.device, non_blocking=True) for t in batch.model_inputs()]
        out = self._forward(*inputs)
        return outputs_dict(t.float().cpu().numpy() if t.is_floating_point() else t.cpu().numpy() for t in out)
