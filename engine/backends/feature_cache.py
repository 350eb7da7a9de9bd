"""Dense MME2E on ONNX Runtime with what overlapping windows share computed once.

Overlapping windows of a stream share most of their inputs: with 3 s windows every
1 s, each sampled face frame is in three windows, and a window's transcript (the
speech segments whose midpoint it holds, stream/speech.py) is most often its
neighbours' too. In the dense model a frame's CNN output and its projection to the
transformer width depend on that frame alone (``MME2E.frame_embedding``), and the
text encoder's CLS on the window's tokens alone (``MME2E.text_features``;
``MME2E.forward_from_features`` does the rest), so the engine folder holds the
model in four graphs as well as whole:

    visual_cnn.onnx  faces (N, 3, S, S)           -> visual_feats (N, trans_dim)
    audio_cnn.onnx   audio (N, 1, n_mels, frames) -> audio_feats (N, trans_dim)
    text.onnx        text (N, L), text_mask (N, L) -> text_cls (N, Ht)
    head.onnx        visual_feats (B, F, trans_dim), face_mask, audio_feats (B, C,
                     trans_dim), audio_mask, text_cls (B, Ht), text_present (B,)
                     -> the four outputs

and ``CachedOnnxBackend`` runs the CNN and text graphs only on frames, chunks and
transcripts it has not seen. Keys are digests of the input tensors themselves (a
transcript's tokens without their padding), so a hit is exact by construction:
the same input gives the same output, whichever window it comes from (up to the
rounding of a different padding). Keys are scoped by the batch's sample ids
(``Batch.ids``: the stream id of each window in ``mmid stream``), so a file
replayed as two sources shares nothing, as two real cameras never would. Audio
chunks hit when windows cut them on the stream's grid
(``engine.features.grid_mel_chunks``, given each window's ``audio_offset``),
whatever the hop. The sparse model cannot be split this way: its sites are chosen
by attention guided by each window's transcript.
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

SPLIT_GRAPHS = {"visual": "visual_cnn.onnx", "audio": "audio_cnn.onnx", "text": "text.onnx", "head": "head.onnx"}
# 3: a text graph of its own, the head takes its CLS; 2: the text encoder inside the head;
# 1: CNN graphs without the projection to trans_dim
SPLIT_FORMAT = 3
# head.onnx inputs, in _Head.forward's order -> names of their dynamic axes (axis 0, then axis 1)
HEAD_AXES = {"visual_feats": ("batch", "frames"), "face_mask": ("batch", "frames"), "audio_feats": ("batch", "chunks"),
             "audio_mask": ("batch", "chunks"), "text_cls": ("batch",), "text_present": ("batch",)}
HEAD_INPUTS = tuple(HEAD_AXES)


class _CNN(nn.Module):
    def __init__(self, model: nn.Module, modality: str):
        super().__init__()
        self.model, self.modality = model, modality

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.frame_embedding(self.modality, x)  # (N, trans_dim)


class _Text(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        return self.model.text_features(text, text_mask)  # (N, Ht)


class _Head(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, visual_feats, face_mask, audio_feats, audio_mask, text_cls, text_present):
        return tuple(self.model.forward_from_features(visual_feats, face_mask, audio_feats, audio_mask, text_cls,
                                                      text_present))


def _export(module: nn.Module, args: tuple, shapes: dict, inputs: list[str], outputs: list[str], path: Path) -> None:
    module = module.eval()
    with contextlib.redirect_stdout(sys.stderr), torch.no_grad():
        program = torch.onnx.export(module, args, dynamo=True, dynamic_shapes=shapes, input_names=inputs,
                                    output_names=outputs, optimize=True, verbose=False)
        program.save(str(path))


def export_split(model: nn.Module, folder: str | Path) -> dict[str, str]:
    """Write the four graphs of a dense model (eval mode) into ``folder``; -> SPLIT_GRAPHS."""
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
    axes = {
        "batch": torch.export.Dim("batch", min=1, max=4096), "frames": torch.export.Dim("frames", min=1, max=4096),
        "chunks": torch.export.Dim("chunks", min=1, max=4096), "tokens": torch.export.Dim("tokens", min=1, max=d.text_max_positions),
    }
    tokens = (torch.randint(1, min(d.text_vocab, 1000), (B, L), generator=g), torch.ones(B, L, dtype=torch.bool))
    text_shapes = {"text": {0: axes["batch"], 1: axes["tokens"]}, "text_mask": {0: axes["batch"], 1: axes["tokens"]}}
    _export(_Text(model), tokens, text_shapes, ["text", "text_mask"], ["text_cls"], folder / SPLIT_GRAPHS["text"])
    with torch.no_grad():
        text_cls = model.text_features(*tokens)
    example = (torch.randn(B, F, d.trans_dim, generator=g), torch.ones(B, F, dtype=torch.bool),
               torch.randn(B, C, d.trans_dim, generator=g), torch.ones(B, C, dtype=torch.bool),
               text_cls, torch.ones(B, dtype=torch.bool))
    shapes = {name: {i: axes[a] for i, a in enumerate(names)} for name, names in HEAD_AXES.items()}  # _Head.forward's parameters
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


def _scopes(batch, n: int) -> list[str]:
    """The cache scope of each of a batch's n windows: its id (source), "" when it has none."""
    return list(batch.ids) if len(batch.ids) == n else [""] * n


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
        self.sessions = {k: OnnxBackend(folder / graphs[k], threads, device).session for k in SPLIT_GRAPHS}
        self.caches = {k: FeatureCache(capacity) for k in ("visual", "audio", "text")}
        self.name, self.device, self.path = name, device, folder

    def _run_new(self, modality: str, keys: list[bytes | None], inputs) -> list[np.ndarray | None]:
        """One row per key (None: no input, no row): cached rows, and one graph call on
        ``inputs(indices)`` for the first index of every key not seen yet."""
        cache = self.caches[modality]
        rows: list[np.ndarray | None] = [None] * len(keys)
        todo: dict[bytes, list[int]] = {}
        for i, key in enumerate(keys):
            if key is None:
                continue
            row = cache.get(key)
            if row is None:
                todo.setdefault(key, []).append(i)
            else:
                rows[i] = row
        cache.misses += len(todo)
        cache.hits += sum(k is not None for k in keys) - len(todo)
        if todo:
            feeds = inputs([places[0] for places in todo.values()])
            out = self.sessions[modality].run(None, feeds)[0]  # (N, width): one call for every new item
            for (key, places), row in zip(todo.items(), out):
                row = row.copy()  # a row of its own: the call's output array is not kept alive
                cache.put(key, row)
                for i in places:
                    rows[i] = row
        return rows

    def _features(self, modality: str, items: np.ndarray, mask: np.ndarray, scopes: Sequence[str]) -> np.ndarray:
        """items (B, F, ...) float32, mask (B, F), scopes (B,) -> (B, F, width): cached rows, the
        CNN graph run once on the real items not seen yet in their scope; zeros where the
        mask is False."""
        session = self.sessions[modality]
        B, F = mask.shape
        places = list(zip(*np.nonzero(mask)))
        keys = [digest(items[b, f], scopes[b]) for b, f in places]
        name = session.get_inputs()[0].name
        rows = self._run_new(modality, keys, lambda idx: {name: np.stack([items[places[i]] for i in idx])})
        out = np.zeros((B, F, session.get_outputs()[0].shape[1]), dtype=np.float32)
        for (b, f), row in zip(places, rows):
            out[b, f] = row
        return out

    def _text(self, text: np.ndarray, mask: np.ndarray, scopes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """text (B, L) int64, mask (B, L) -> text_cls (B, Ht), text_present (B,): the text
        graph run once per transcript not seen yet in its scope (keyed by its tokens
        without padding; the new ones padded to their own longest); zeros where a window
        has no tokens."""
        present = mask.any(axis=1)
        tokens = [text[b][mask[b]] for b in range(len(text))]
        keys = [digest(t, scopes[b]) if present[b] else None for b, t in enumerate(tokens)]

        def inputs(idx: list[int]) -> dict[str, np.ndarray]:
            L = max(len(tokens[i]) for i in idx)
            ids = np.zeros((len(idx), L), dtype=text.dtype)
            keep = np.zeros((len(idx), L), dtype=bool)
            for r, i in enumerate(idx):
                ids[r, : len(tokens[i])], keep[r, : len(tokens[i])] = tokens[i], True
            return {"text": ids, "text_mask": keep}

        rows = self._run_new("text", keys, inputs)
        width = self.sessions["text"].get_outputs()[0].shape[1]
        return np.stack([r if r is not None else np.zeros(width, np.float32) for r in rows]), present

    def _audio_and_text(self, batch) -> dict[str, np.ndarray]:
        """The head's audio and text feeds of a batch (cached rows, new ones computed)."""
        x = numpy_inputs(batch, ("audio", "audio_mask", "text", "text_mask"))
        scopes = _scopes(batch, x["audio_mask"].shape[0])
        text_cls, text_present = self._text(x["text"], x["text_mask"], scopes)
        return {"audio_feats": self._features("audio", x["audio"], x["audio_mask"], scopes), "audio_mask": x["audio_mask"],
                "text_cls": text_cls, "text_present": text_present}

    def run(self, batch, prefetched: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Batch -> outputs; ``prefetched``: what ``prefetch`` returned for the same windows."""
        x = numpy_inputs(batch, ("faces", "face_mask"))
        faces, face_mask = x["faces"], x["face_mask"]
        feeds = {
            "visual_feats": self._features("visual", faces, face_mask, _scopes(batch, face_mask.shape[0])),
            "face_mask": face_mask, **(prefetched if prefetched is not None else self._audio_and_text(batch)),
        }
        return outputs_dict(self.sessions["head"].run(list(GRAPH_OUTPUT_NAMES), feeds))

    def prefetch(self, batch) -> dict[str, np.ndarray]:
        """The batch's audio CNN and text encoder work now (its faces may be missing):
        -> the head's audio and text feeds, for ``run(batch, prefetched)`` on the same windows."""
        return self._audio_and_text(batch)

    def clear(self) -> None:
        """Forget every cached row (the hit and miss counts stay)."""
        for cache in self.caches.values():
            cache.rows.clear()

    def stats(self) -> dict[str, dict[str, int]]:
        return {k: {"hits": c.hits, "misses": c.misses, "rows": len(c.rows)} for k, c in self.caches.items()}
