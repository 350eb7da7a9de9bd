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
whatever the hop.

The sparse model's sites are chosen by attention guided by each window's
transcript, so its CNN output is a function of a frame and a guide. Its engine
folder splits the CNN where the guide enters:

    visual_low.onnx     faces (N, 3, S, S)          -> low (N, S/2*S/2, C0), keys (N, S/2*S/2, A)
    audio_low.onnx      audio (N, 1, n_mels, frames) -> the same on the (n_mels/2, frames/2) grid
    visual_sparse.onnx  low, keys, text_cls (N, Ht), text_present (N,) -> visual_feats (N, trans_dim)
    audio_sparse.onnx   the same for chunks          -> audio_feats (N, trans_dim)

(low: the low-level map channels last; keys: the first sparse stage's attention keys,
which depend on the map alone; then the fixed-budget sparse stages and the
projection, whose guide is the transcript's CLS, or the learned no-text query),
with text.onnx and head.onnx as above. A frame's low-level map and keys are
computed once; its sparse stages once per transcript it is seen with. The maps
stay views of the low-level graph's outputs (``BlockCache``), and when every item
of a sparse-stage call is new (the window's transcript was seen before, so only
its new frames need the stages) the sparse-stage graph takes those outputs as
they came: no copy of the maps on the way.
Overlapping windows mostly share their transcript with a neighbour, so most of a
window's frames and chunks come with a guide seen before.
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
# the sparse model: low-level maps per frame/chunk, then the sparse stages per (frame/chunk, guide)
SPARSE_SPLIT_GRAPHS = {"visual_low": "visual_low.onnx", "audio_low": "audio_low.onnx", "visual": "visual_sparse.onnx",
                       "audio": "audio_sparse.onnx", "text": "text.onnx", "head": "head.onnx"}
# low-level maps and keys kept per modality (paper sizes in float32, map and keys alike: 144 KB each per face,
# 256 KB each per audio chunk all-sparse, 72 and 128 KB with a dense first stage; the int8 graphs hand the
# map over in uint8, a quarter of that: engine/handover.py);
# overlapping windows of a stream reuse a map for about 3 s (~2.5 chunks and 2 frames per s); kept as
# views of the low-level graph's outputs (BlockCache), which can hold up to 4x the rows' own memory
LOW_MAP_ROWS = 128
LOW_OUTPUTS = ("low", "keys")  # the low-level graphs' outputs, inputs of the sparse-stage graphs
# 3: a text graph of its own, the head takes its CLS; 2: the text encoder inside the head;
# 1: CNN graphs without the projection to trans_dim
SPLIT_FORMAT = 3
# the sparse model's split graphs: 4: the low-level graphs give the map channels last and the
# first stage's attention keys; 3: the map (N, C0, h, w) alone
SPARSE_SPLIT_FORMAT = 4
# head.onnx inputs, in _Head.forward's order -> names of their dynamic axes (axis 0, then axis 1)
HEAD_AXES = {"visual_feats": ("batch", "frames"), "face_mask": ("batch", "frames"), "audio_feats": ("batch", "chunks"),
             "audio_mask": ("batch", "chunks"), "text_cls": ("batch",), "text_present": ("batch",)}
HEAD_INPUTS = tuple(HEAD_AXES)


def split_format(model_name: str) -> int:
    """The current format of a model's split graphs (``engine.json``'s ``split_format``)."""
    return SPARSE_SPLIT_FORMAT if model_name == "mme2e_sparse" else SPLIT_FORMAT


class _CNN(nn.Module):
    def __init__(self, model: nn.Module, modality: str):
        super().__init__()
        self.model, self.modality = model, modality

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.frame_embedding(self.modality, x)  # (N, trans_dim)


class _Low(nn.Module):
    def __init__(self, model: nn.Module, modality: str):
        super().__init__()
        self.model, self.modality = model, modality

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.low_maps(self.modality, x)  # (N, h*w, low_channels), (N, h*w, A)


class _Sparse(nn.Module):
    def __init__(self, model: nn.Module, modality: str):
        super().__init__()
        self.model, self.modality = model, modality

    def forward(self, low: torch.Tensor, keys: torch.Tensor, text_cls: torch.Tensor,
                text_present: torch.Tensor) -> torch.Tensor:
        return self.model.sparse_embedding(self.modality, low, keys, text_cls, text_present)  # (N, trans_dim)


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
    """Write the split graphs of a model (eval mode; a sparse model in fixed-budget mode)
    into ``folder``; -> SPLIT_GRAPHS (dense) or SPARSE_SPLIT_GRAPHS (sparse)."""
    folder = Path(folder)
    model = model.eval()
    d = model.dims
    sparse = d.name == "mme2e_sparse"
    if sparse and model.sparse_budget is None:
        raise ValueError("the sparse model's split graphs need a fixed sparse budget (set_sparse_budget)")
    graphs = SPARSE_SPLIT_GRAPHS if sparse else SPLIT_GRAPHS
    g = torch.Generator().manual_seed(0)
    n = torch.export.Dim("n", min=1, max=1 << 16)
    faces = torch.randn(3, 3, d.face_size, d.face_size, generator=g)
    audio = torch.randn(3, 1, d.n_mels, d.chunk_frames, generator=g)
    for modality, x, name in (("visual", faces, "faces"), ("audio", audio, "audio")):
        if not sparse:
            _export(_CNN(model, modality), (x,), {"x": {0: n}}, [name], [f"{modality}_feats"], folder / graphs[modality])
            continue
        _export(_Low(model, modality), (x,), {"x": {0: n}}, [name], list(LOW_OUTPUTS), folder / graphs[f"{modality}_low"])
        with torch.no_grad():
            low = model.low_maps(modality, x)  # (3, h*w, low_channels), (3, h*w, A)
        guide = (torch.randn(3, d.text_hidden, generator=g), torch.tensor([True, False, True]))
        _export(_Sparse(model, modality), (*low, *guide), {k: {0: n} for k in ("low", "keys", "text_cls", "text_present")},
                [*LOW_OUTPUTS, "text_cls", "text_present"], [f"{modality}_feats"], folder / graphs[modality])
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
    _export(_Head(model), example, shapes, list(HEAD_INPUTS), list(GRAPH_OUTPUT_NAMES), folder / graphs["head"])
    return dict(graphs)


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
            self._evicted(self.rows.popitem(last=False)[0])

    def _evicted(self, key: bytes) -> None:
        """Called with the key of each row the capacity pushed out."""

    def clear(self) -> None:
        self.rows.clear()


class BlockCache(FeatureCache):
    """A FeatureCache whose rows are views of the arrays one graph call returned (a block:
    ``put_block``), not copies of them: the sparse model's low-level maps and keys (36-256
    KB a row), which a copy per row costs ~0.1 ms each to make here.
    A block stays alive while any of its rows is cached; when evictions leave one with a
    quarter of its rows or fewer, those are copied out and the block is let go, so the
    memory held stays under four times that of the cached rows."""

    def __init__(self, capacity: int):
        super().__init__(capacity)
        self._block_of: dict[bytes, int] = {}  # key -> its block
        self._members: dict[int, tuple[int, set[bytes]]] = {}  # block -> (its rows, the keys still cached)
        self._blocks = 0  # blocks made so far (the next one's id)
        self._filling: int | None = None  # the block put_block is putting

    def put_block(self, keys: Sequence[bytes], rows: Sequence) -> None:
        """Distinct new ``keys`` and their rows, views of one call's outputs."""
        block, self._blocks = self._blocks, self._blocks + 1
        live: set[bytes] = set()
        self._members[block] = (len(keys), live)
        self._filling = block  # its puts may evict some of its own rows (a cache smaller than the call)
        try:
            for key, row in zip(keys, rows):
                self._block_of[key] = block
                live.add(key)
                self.put(key, row)
        finally:
            self._filling = None
        self._release(block)

    def _evicted(self, key: bytes) -> None:
        block = self._block_of.pop(key, None)
        if block is not None:
            self._members[block][1].discard(key)
            if block != self._filling:
                self._release(block)

    def _release(self, block: int) -> None:
        """Let ``block`` go if a quarter of its rows or fewer are still cached (copying those)."""
        size, live = self._members[block]
        if live and 4 * len(live) > size:
            return
        for k in live:
            self.rows[k] = _own(self.rows[k])
            del self._block_of[k]
        del self._members[block]

    def clear(self) -> None:
        super().clear()
        self._block_of.clear()
        self._members.clear()


def _own(row: np.ndarray | tuple) -> np.ndarray | tuple:
    """A copy of a row (an array, or a tuple of arrays for a graph with several outputs)."""
    return row.copy() if isinstance(row, np.ndarray) else tuple(r.copy() for r in row)


def _scopes(batch, n: int) -> list[str]:
    """The cache scope of each of a batch's n windows: its id (source), "" when it has none."""
    return list(batch.ids) if len(batch.ids) == n else [""] * n


def digest(item: np.ndarray, scope: str = "") -> bytes:
    """16-byte digest of one frame's or chunk's input tensor (its shape is fixed by the
    graph) within ``scope``: SHA-256, which the SHA extensions of current x86 and ARM
    cores run at 2-2.5x blake2b's speed (a 48x48 face 25 against 61 us here)."""
    h = hashlib.sha256(scope.encode() + b"\0")
    h.update(np.ascontiguousarray(item).data)
    return h.digest()[:16]


class CachedOnnxBackend:
    """The split graphs of an engine folder, with a FeatureCache per modality.

    Dense model: a frame's or chunk's row is keyed by its input alone. Sparse model:
    its low-level map by its input alone (a cache of LOW_MAP_ROWS maps), its row by
    its input and its window's guide (the transcript's tokens, "no text", or, with
    ``learned_guide``, one learned query for every window), so windows that share a
    frame and a transcript share the sparse stages' work too."""

    def __init__(self, folder: str | Path, graphs: dict[str, str], capacity: int, threads: int = 0, device: str = "cpu",
                 name: str = "onnx-cached", learned_guide: bool = False):
        from engine.backends.onnx_backend import OnnxBackend

        folder = Path(folder)
        self.sessions = {k: OnnxBackend(folder / graph, threads, device).session for k, graph in graphs.items()}
        self.sparse = "visual_low" in graphs
        self.learned_guide = learned_guide
        self.caches = {k: FeatureCache(capacity) for k in ("visual", "audio", "text")}
        if self.sparse:
            self.caches.update({f"{m}_low": BlockCache(min(capacity, LOW_MAP_ROWS)) for m in ("visual", "audio")})
        self.name, self.device, self.path = name, device, folder

    def _run_new(self, cache_name: str, keys: list[bytes | None], inputs, whole: list | None = None) -> list:
        """One row per key (None: no input, no row): cached rows, and one call of the graph
        ``cache_name`` on ``inputs(indices)`` for the first index of every key not seen yet.
        A row is the item's slice of the graph's output, or of each of its outputs (a tuple)
        for a graph with several. ``whole``: a list that gets the call's outputs when every
        key was new and distinct (they are then the keys' rows, in order, as they came)."""
        cache = self.caches[cache_name]
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
            outs = self.sessions[cache_name].run(None, feeds)  # each (N, ...): one call for every new item
            if whole is not None and len(todo) == len(keys):
                whole.extend(outs)
            new = [outs[0][n] if len(outs) == 1 else tuple(o[n] for o in outs) for n in range(len(todo))]  # views
            if isinstance(cache, BlockCache):
                cache.put_block(list(todo), new)
            else:  # rows of their own: the call's output arrays are not kept alive
                new = [_own(row) for row in new]
                for key, row in zip(todo, new):
                    cache.put(key, row)
            for row, places in zip(new, todo.values()):
                for i in places:
                    rows[i] = row
        return rows

    def _features(self, modality: str, items: np.ndarray, mask: np.ndarray, scopes: Sequence[str],
                  guide: tuple[np.ndarray, np.ndarray, list[bytes]] | None = None) -> np.ndarray:
        """items (B, F, ...) float32, mask (B, F), scopes (B,) -> (B, F, width): cached rows, the
        graphs run once on the real items not seen yet in their scope; zeros where the mask
        is False. ``guide`` (sparse model): the windows' text_cls (B, Ht), text_present (B,)
        and guide keys."""
        session = self.sessions[modality]
        B, F = mask.shape
        places = list(zip(*np.nonzero(mask)))
        keys = [digest(items[b, f], scopes[b]) for b, f in places]
        if not self.sparse:
            name = session.get_inputs()[0].name
            rows = self._run_new(modality, keys, lambda idx: {name: np.stack([items[places[i]] for i in idx])})
        else:
            text_cls, present, guide_keys = guide
            low_name = self.sessions[f"{modality}_low"].get_inputs()[0].name

            def inputs(idx: list[int]) -> dict[str, np.ndarray]:  # idx: places of the new (item, guide) pairs
                outs: list[np.ndarray] = []  # the low-level graph's outputs when it ran on all of them
                lows = self._run_new(f"{modality}_low", [keys[i] for i in idx],
                                     lambda sub: {low_name: np.stack([items[places[idx[j]]] for j in sub])},
                                     outs)
                windows = [places[i][0] for i in idx]
                # the maps as the low-level graph gave them (often: the window's transcript is its
                # neighbour's, so its new frames are all it needs), else the cached rows stacked
                maps = dict(zip(LOW_OUTPUTS, outs or [np.stack([low[k] for low in lows])
                                                      for k in range(len(LOW_OUTPUTS))]))
                return {**maps, "text_cls": text_cls[windows], "text_present": present[windows]}

            rows = self._run_new(modality, [k + guide_keys[b] for k, (b, _) in zip(keys, places)], inputs)
        out = np.zeros((B, F, session.get_outputs()[0].shape[1]), dtype=np.float32)
        for (b, f), row in zip(places, rows):
            out[b, f] = row
        return out

    @staticmethod
    def _transcripts(text: np.ndarray, mask: np.ndarray, scopes: Sequence[str]) -> tuple[list, list, np.ndarray]:
        """text (B, L), mask (B, L) -> each window's tokens without padding, its key (None
        without tokens) and text_present (B,)."""
        present = mask.any(axis=1)
        tokens = [text[b][mask[b]] for b in range(len(text))]
        return tokens, [digest(t, scopes[b]) if present[b] else None for b, t in enumerate(tokens)], present

    def _guide_keys(self, text_keys: list[bytes | None]) -> list[bytes]:
        """Key of each window's sparse guide: the learned query, "no text", or its transcript's."""
        if self.learned_guide:
            return [b"learned"] * len(text_keys)
        return [b"none" if k is None else k for k in text_keys]

    def text_rows(self, text: np.ndarray, mask: np.ndarray, scopes: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list]:
        """text (B, L) int64, mask (B, L) -> text_cls (B, Ht), text_present (B,), keys: the text
        graph run once per transcript not seen yet in its scope (keyed by its tokens
        without padding; the new ones padded to their own longest); zeros where a window
        has no tokens."""
        tokens, keys, present = self._transcripts(text, mask, scopes)

        def inputs(idx: list[int]) -> dict[str, np.ndarray]:
            L = max(len(tokens[i]) for i in idx)
            ids = np.zeros((len(idx), L), dtype=text.dtype)
            keep = np.zeros((len(idx), L), dtype=bool)
            for r, i in enumerate(idx):
                ids[r, : len(tokens[i])], keep[r, : len(tokens[i])] = tokens[i], True
            return {"text": ids, "text_mask": keep}

        rows = self._run_new("text", keys, inputs)
        width = self.sessions["text"].get_outputs()[0].shape[1]
        return np.stack([r if r is not None else np.zeros(width, np.float32) for r in rows]), present, keys

    def _audio_and_text(self, batch) -> dict[str, np.ndarray]:
        """The head's audio and text feeds of a batch (cached rows, new ones computed)."""
        x = numpy_inputs(batch, ("audio", "audio_mask", "text", "text_mask"))
        scopes = _scopes(batch, x["audio_mask"].shape[0])
        text_cls, text_present, keys = self.text_rows(x["text"], x["text_mask"], scopes)
        guide = (text_cls, text_present, self._guide_keys(keys)) if self.sparse else None
        return {"audio_feats": self._features("audio", x["audio"], x["audio_mask"], scopes, guide),
                "audio_mask": x["audio_mask"], "text_cls": text_cls, "text_present": text_present}

    def run(self, batch, prefetched: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Batch -> outputs; ``prefetched``: what ``prefetch`` returned for the same windows."""
        x = numpy_inputs(batch, ("faces", "face_mask", "text", "text_mask") if self.sparse else ("faces", "face_mask"))
        faces, face_mask = x["faces"], x["face_mask"]
        scopes = _scopes(batch, face_mask.shape[0])
        rest = prefetched if prefetched is not None else self._audio_and_text(batch)
        guide = None
        if self.sparse:
            keys = self._guide_keys(self._transcripts(x["text"], x["text_mask"], scopes)[1])
            guide = (rest["text_cls"], rest["text_present"], keys)
        feeds = {"visual_feats": self._features("visual", faces, face_mask, scopes, guide), "face_mask": face_mask, **rest}
        return outputs_dict(self.sessions["head"].run(list(GRAPH_OUTPUT_NAMES), feeds))

    def prefetch(self, batch) -> dict[str, np.ndarray]:
        """The batch's audio CNN and text encoder work now (its faces may be missing):
        -> the head's audio and text feeds, for ``run(batch, prefetched)`` on the same windows."""
        return self._audio_and_text(batch)

    def clear(self) -> None:
        """Forget every cached row (the hit and miss counts stay)."""
        for cache in self.caches.values():
            cache.clear()

    def stats(self) -> dict[str, dict[str, int]]:
        return {k: {"hits": c.hits, "misses": c.misses, "rows": len(c.rows)} for k, c in self.caches.items()}
