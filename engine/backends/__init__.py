"""Inference backends: one interface, several implementations.

Every backend answers ``run(batch) -> dict`` with the same four numpy arrays,
named and shaped as ``engine.model.ModelOutput``:

    logits           float32 (B, P)     fused
    modality_logits  float32 (B, 3, P)  text, audio, visual; zero where absent
    present          bool    (B, 3)
    embedding        float32 (B, E)

Inputs are the padded ``engine.features.Batch`` (its ``model_inputs()`` order).
Graph inputs carry the same names in every exported graph (``INPUT_NAMES``);
the ONNX output that holds ``embedding`` is called ``fused_embedding`` because
the exporter already uses ``embedding`` for a node of the text encoder.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

INPUT_NAMES = ("faces", "face_mask", "audio", "audio_mask", "text", "text_mask")
OUTPUT_NAMES = ("logits", "modality_logits", "present", "embedding")
GRAPH_OUTPUT_NAMES = ("logits", "modality_logits", "present", "fused_embedding")
# input name -> (axis 0 name, axis 1 name): the dynamic axes of every exported graph
DYNAMIC_AXES = {
    "faces": ("batch", "frames"), "face_mask": ("batch", "frames"),
    "audio": ("batch", "chunks"), "audio_mask": ("batch", "chunks"),
    "text": ("batch", "tokens"), "text_mask": ("batch", "tokens"),
}
BACKENDS = ("torch", "onnx", "tensorrt")


class Backend(Protocol):
    name: str  # "torch", "onnx", "onnx-int8", "tensorrt"
    device: str  # "cpu" or "cuda"

    def run(self, batch) -> dict[str, np.ndarray]:
        """Batch -> {logits, modality_logits, present, embedding} as numpy arrays."""
        ...


def numpy_inputs(batch, names: Sequence[str] = INPUT_NAMES) -> dict[str, np.ndarray]:
    """The Batch's six tensors (or those of ``names``) as contiguous numpy arrays keyed by
    graph input name."""
    return {name: np.ascontiguousarray(t.detach().cpu().numpy())
            for name, t in zip(INPUT_NAMES, batch.model_inputs()) if name in names}


def outputs_dict(values) -> dict[str, np.ndarray]:
    """Four arrays in ModelOutput order -> the backend answer."""
    return dict(zip(OUTPUT_NAMES, values))
