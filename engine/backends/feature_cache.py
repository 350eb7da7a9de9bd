"""Dense MME2E on ONNX Runtime with its per-frame CNN outputs cached across windows.

Overlapping windows of a stream share most of their inputs: with 3 s windows every
1 s, each sampled face frame is in three windows. In the dense model a frame's CNN
output and its projection to the transformer width depend on that frame alone
(``MME2E.frame_embedding``, ``MME2E.forward_from_features``), so the engine folder
holds the model in three graphs as well as whole:

    visual_cnn.onnx  faces (N, 3, S, S)           -> visual_feats (N, trans_dim)
    audio_cnn.onnx   audio (N, 1, n_mels, frames) -> audio_feats (N, trans_dim)
    head.onnx        visual_feats (B, F, trans_dim), face_mask, audio_feats (B, C,
                     trans_dim), audio_mask, text, text_mask -> the four outputs

and ``CachedOnnxBackend`` runs the CNN graphs only on frames and chunks it has not
seen. Keys are digests of the input tensors themselves, so a hit is exact by
construction: the same input bytes give the same output, whichever window they come
from. Keys are scoped by the batch's sample ids (``Batch.ids``: the stream id of each
window in ``mmid stream``), so a file replayed as two sources shares nothing, as two
real cameras never would. Audio chunks hit when windows cut them on the stream's
grid (``engine.features.grid_mel_chunks``, given each window's ``audio_offset``),
whatever the hop. The sparse model cannot be split this way:
its sites are chosen by attention guided by each window's transcript.
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from engine.backends import GRAPH_OUTPUT_NAMES, numpy_inputs, outputs_dict

SPLIT_GRAPHS = {"visual": "visual_cnn.onnx", "audio": "audio_cnn.onnx", "head": "head.onnx"}
SPLIT_FORMAT = 2  # 2: the CNN graphs include the projection to trans_dim (1: flattened CNN maps)
# head.onnx inputs, in _Head.forward's order -> (axis 0, axis 1) names of their dynamic axes
HEAD_AXES = {"visual_feats": ("batch", "frames"), "face_mask": ("batch", "frames"), "audio_feats": ("batch", "chunks"),
             "audio_mask": ("batch", "chunks"), "text": ("batch", "tokens"), "text_mask": ("batch", "tokens")}
HEAD_INPUTS = tuple(HEAD_AXES)


class _CNN(nn.Module):
    def __init__(self, model: nn.Module, modality: str):
        super().__init__()
        self.model, self.modality = model, modality

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.frame_embedding(self.modality, x)  # (N, trans_dim)


class _Head(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, visual_feats, face_mask, audio_feats, audio_mask, text, text_mask):
        return tuple(self.model.forward_from_features(visual_feats, face_mask, audio_feats, audio_mask, text, text_mask))


def _export(module: nn.Module, args: tuple, shapes: dict, inputs: list[str], outputs: list[str], path: Path) -> None:
    module = module.eval()
    with contextlib.redirect_stdout(sys.stderr), torch.no_grad():
        program = torch.onnx.export(module, args, dynamo=True, dynamic_shapes=shapes, input_names=inputs,
                                    output_names=outputs, optimize=True, verbose=False)
        program.save(str(path))


def export_split(model: nn.Module, folder: str | Path) -> dict[str, str]:
    """Write the three graphs of a dense model (eval mode) into ``folder``; -> SPLIT_GRAPHS."""
    if model.dims.name != "mme2e":
        raise ValueError("only the dense model splits into per-frame CNNs and a head (sparse sites depend on the text)")
    folder = Path(folder)
    model = model.eval()
    d = model.dims
    g = torch.Generator().manual_seed(0)
    n = torch.export.Dim("n", min=1, max=1 << 16)
    faces = torch.randn(3, 3, d.face_size, d.face_size, generator=g)
    audio = torch.randn(3, 1, d.n_mels, d.chunk_frames, generator=g)
    _export(_CNN(model, "visual"), (faces,), {"x": {0: n}}, ["faces"], ["visual_feats"], folder / SPLIT_GRAPHS["visual"])
    _export(_CNN(model, "audio"), (audio,), {"x": {0: n}}, ["audio"], ["audio_feats"], folder / SPLIT_GRAPHS["audio"])
    B, F, C, L = 2, 3, 4, 5  # >= 2: size-1 examples get specialised
    example = (torch.randn(B, F, d.trans_dim, generator=g), torch.ones(B, F, dtype=torch.bool),
               torch.randn(B, C, d.trans_dim, generator=g), torch.ones(B, C, dtype=torch.bool),
               torch.randint(1, min(d.text_vocab, 1000), (B, L), generator=g), torch.ones(B, L, dtype=torch.bool))
    axes = {
        "batch": torch.export.Dim("batch", min=1, max=4096), "frames": torch.export.Dim("frames", min=1, max=4096),
        "chunks": torch.export.Dim("chunks", min=1, max=4096), "tokens": torch.export.Dim("tokens", min=1, max=d.text_max_positions),
    }
    shapes = {name: {0: axes[a0], 1: axes[a1]} for name, (a0, a1) in HEAD_AXES.items()}  # _Head.forward's parameters
    _export(_Head(model), example, shapes, list(HEAD_INPUTS), list(GRAPH_OUTPUT_NAMES), folder / SPLIT_GRAPHS["head"])
    return dict(SPLIT_GRAPHS)


class FeatureCache:
    """Least-recently-used map from an input digest to its CNN output row, at most
    ``capacity`` rows. ``hits`` counts items served without running the CNN (from
    the cache, or computed once for several windows of the same call), ``misses``
    the items the CNN ran on."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.rows: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: bytes) -> np.ndarray | None:
        row = self.rows.get(key)
        if row is not None:
            self.rows.move_to_end(key)
        return row

    def put(self, key: bytes, row: np.ndarray) -> None:
        self.rows[key] = row
        self.rows.move_to_end(key)
        while len(self.rows) > self.capacity:
            self.rows.popitem(last=False)


def digest(item: np.ndarray, scope: str = "") -> bytes:
    """16-byte digest of one frame's or chunk's input tensor (its shape is fixed by the
    graph) within ``scope``."""
    h = hashlib.blake2b(scope.encode() + b"\0", digest_size=16)
    h.update(np.ascontiguousarray(item).data)
    return h.digest()


class CachedOnnxBackend:
    """The split graphs of a dense engine folder, with a FeatureCache per modality."""

    def __init__(self, folder: str | Path, graphs: dict[str, str], capacity: int, threads: int = 0, device: str = "cpu",
                 name: str = "onnx-cached"):
        from engine.backends.onnx_backend import OnnxBackend

        folder = Path(folder)
        self.sessions = {k: OnnxBackend(folder / graphs[k], threads, device).session for k in ("visual", "audio", "head")}
        self.caches = {"visual": FeatureCache(capacity), "audio": FeatureCache(capacity)}
        self.name, self.device, self.path = name, device, folder

    def _features(self, modality: str, items: np.ndarray, mask: np.ndarray, scopes: Sequence[str]) -> np.ndarray:
        """items (B, F, ...) float32, mask (B, F), scopes (B,) -> (B, F, width): cached rows, the
        CNN graph run once on the real items not seen yet in their scope; zeros where the
        mask is False."""
        cache, session = self.caches[modality], self.sessions[modality]
        B, F = mask.shape
        width = session.get_outputs()[0].shape[1]
        out = np.zeros((B, F, width), dtype=np.float32)
        todo: dict[bytes, list[tuple[int, int]]] = {}
        for b, f in zip(*np.nonzero(mask)):
            key = digest(items[b, f], scopes[b])
            row = cache.get(key)
            if row is None:
                todo.setdefault(key, []).append((b, f))
            else:
                out[b, f] = row
        cache.misses += len(todo)
        cache.hits += int(mask.sum()) - len(todo)
        if todo:
            first = [places[0] for places in todo.values()]
            x = np.stack([items[b, f] for b, f in first])  # (N, ...) one CNN call for every new item
            rows = session.run(None, {session.get_inputs()[0].name: x})[0]  # (N, width)
            for (key, places), row in zip(todo.items(), rows):
                cache.put(key, row.copy())  # a row of its own: the call's output array is not kept alive
                for b, f in places:
                    out[b, f] = row
        return out

    def run(self, batch) -> dict[str, np.ndarray]:
        x = numpy_inputs(batch)
        B = x["face_mask"].shape[0]
        scopes = list(batch.ids) if len(batch.ids) == B else [""] * B
        feeds = {
            "visual_feats": self._features("visual", x["faces"], x["face_mask"], scopes), "face_mask": x["face_mask"],
            "audio_feats": self._features("audio", x["audio"], x["audio_mask"], scopes), "audio_mask": x["audio_mask"],
            "text": x["text"], "text_mask": x["text_mask"],
        }
        return outputs_dict(self.sessions["head"].run(list(GRAPH_OUTPUT_NAMES), feeds))

    def stats(self) -> dict[str, dict[str, int]]:
        return {k: {"hits": c.hits, "misses": c.misses, "rows": len(c.rows)} for k, c in self.caches.items()}
