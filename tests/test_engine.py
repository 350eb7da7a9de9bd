"""Inference engine: backend parity, export with dynamic shapes, the engine folder
served without ``training``, int8 top-1, and the TensorRT inputs.

Tiny preset, random weights (no training needed). The ONNX exports are made
once per module (each takes tens of seconds).
"""

from __future__ import annotations

import dataclasses

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from engine.backends import GRAPH_OUTPUT_NAMES, INPUT_NAMES, OUTPUT_NAMES
from engine.backends.tensorrt_backend import TENSORRT_OPS, TENSORRT_OPSET_RANGE, ProfileRanges
from engine.bench import make_tokenizer
from engine.checkpoint import RunMeta, save_checkpoint
from engine.dims import preset_dims
from engine.export import export_engine
from engine.features import Batch, FeatureParams
from engine.model import build_model
from engine.runtime import Engine, Identification

N_PERSONS = 4
BUDGET = (0.5, 0.5, 0.5)
AUDIO_BUDGET = (0.25, 0.75)  # the dense-first engine's audio CNN's own budget
TOL = 1e-4
REPO = Path(__file__).resolve().parent.parent
# (batch, frames, chunks, tokens): none of them is the export example (2, 3, 4, 5)
SHAPES = [(1, 1, 1, 1), (3, 6, 8, 14), (7, 2, 5, 30)]


def random_batch(dims, B: int, F: int, C: int, L: int, seed: int = 0, absent: bool = True) -> Batch:
    """Random valid inputs with ragged masks; sample 0 lacks text, sample 1 lacks faces (when B allows)."""
    g = torch.Generator().manual_seed(seed)
    lengths = lambda n: torch.randint(1, n + 1, (B,), generator=g)  # noqa: E731
    mask = lambda n: torch.arange(n)[None, :] < lengths(n)[:, None]  # noqa: E731
    face_mask, audio_mask, text_mask = mask(F), mask(C), mask(L)
    if absent and B > 1:
        text_mask[0] = False
        face_mask[1] = False
    return Batch(
        faces=torch.randn(B, F, 3, dims.face_size, dims.face_size, generator=g), face_mask=face_mask,
        audio=torch.randn(B, C, 1, dims.n_mels, dims.chunk_frames, generator=g), audio_mask=audio_mask,
        text=torch.randint(5, dims.text_vocab, (B, L), generator=g), text_mask=text_mask,
    )


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


DENSE_FIRST = "mme2e_sparse+dense1"  # the sparse model with its first stage dense (model.sparse_dense_stages = 1)


def _model(name: str, seed: int):
    torch.manual_seed(seed)
    dense_stages = 1 if name == DENSE_FIRST else 0
    model = build_model(preset_dims("tiny", name.split("+")[0], N_PERSONS, text_vocab=400,
                                    sparse_dense_stages=dense_stages)).eval()
    # non-trivial BatchNorm statistics and fusion weights, as after training
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    with torch.no_grad():
        model.fusion.copy_(torch.tensor([0.3, -0.2, 0.1]))
    return model


@pytest.fixture(scope="module")
def engines(tmp_path_factory, tokenizer_file) -> dict[str, tuple[torch.nn.Module, Path]]:
    out = {}
    for seed, name in enumerate(("mme2e", "mme2e_sparse", DENSE_FIRST)):
        model = _model(name, seed)
        folder = tmp_path_factory.mktemp(name.replace("+", "-"))
        dense_stages = model.dims.sparse_dense_stages  # DENSE_FIRST: the audio CNN with a budget of its own too
        export_engine(model, [f"p{i}" for i in range(N_PERSONS)], FeatureParams(), tokenizer_file, folder,
                      sparse_budget=BUDGET[dense_stages:], sparse_budget_audio=AUDIO_BUDGET if dense_stages else None,
                      int8=True)
        out[name] = (model, folder)  # the sparse model is left in the exported fixed-budget mode
    return out


def _reference(model, batch: Batch) -> dict[str, np.ndarray]:
    with torch.no_grad():
        return {k: v.numpy() for k, v in zip(OUTPUT_NAMES, model(*batch.model_inputs()))}


def _assert_close(got: dict, want: dict, tol: float = TOL) -> None:
    assert set(got) == set(OUTPUT_NAMES)
    np.testing.assert_array_equal(got["present"], want["present"])
    for key in ("logits", "modality_logits", "embedding"):
        assert got[key].shape == want[key].shape, key
        np.testing.assert_allclose(got[key], want[key], atol=tol, rtol=0, err_msg=key)


@pytest.mark.parametrize("name", ["mme2e", "mme2e_sparse", DENSE_FIRST])
@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_backend_matches_pytorch(engines, name, backend):
    model, folder = engines[name]
    engine = Engine.load(folder, backend=backend, threads=2, device="cpu")
    assert engine.backend_name == backend
    for i, shape in enumerate(SHAPES):  # batch sizes and lengths never seen at export
        batch = random_batch(model.dims, *shape, seed=i)
        _assert_close(engine.run(batch), _reference(model, batch))


@pytest.mark.parametrize("name", ["mme2e", "mme2e_sparse"])
def test_inputs_padded_to_bucket_sizes_give_the_same_answers(engines, name):
    """The CUDA-graphs backend pads batches to bucket sizes (so that a live stream's shapes
    need few captures): masked frames, chunks and tokens and copied rows change no
    window's answer. Checked on the CPU with the padding alone (``pad_shapes``)."""
    from engine.backends.torch_backend import TorchBackend, bucket_size, pad_to_buckets

    assert [bucket_size(n) for n in (1, 2, 3, 5, 7, 9, 13, 17, 100)] == [1, 2, 3, 6, 8, 12, 16, 24, 128]
    model, _ = engines[name]
    padded = TorchBackend(model, pad_shapes=True)
    for i, shape in enumerate([(5, 5, 7, 9), (1, 3, 7, 13), (3, 7, 5, 17)]):  # no size a bucket size in some dim
        batch = random_batch(model.dims, *shape, seed=20 + i)
        grown = pad_to_buckets(list(batch.model_inputs()))
        assert [tuple(t.shape[:2]) for t in grown[::2]] == [(bucket_size(shape[0]), bucket_size(n)) for n in shape[1:]]
        _assert_close(padded.run(batch), _reference(model, batch))


@pytest.mark.parametrize("name", ["mme2e", "mme2e_sparse", DENSE_FIRST])
def test_cached_backend_matches_pytorch(engines, name):
    """Engine with its CNN and text outputs cached: same outputs as the model, on first
    sight (misses) and on the second call with the same inputs (every real frame, chunk
    and transcript hits; sparse: every (frame, guide) pair)."""
    model, folder = engines[name]
    engine = Engine.load(folder, backend="onnx", threads=2, feature_cache=64)
    assert engine.backend_name == "onnx-cached"
    for i, shape in enumerate(SHAPES):
        batch = random_batch(model.dims, *shape, seed=i)
        want = _reference(model, batch)
        before = engine.backend.stats()
        _assert_close(engine.run(batch), want)
        _assert_close(engine.run(batch), want)
        after = engine.backend.stats()
        real = {"visual": int(batch.face_mask.sum()), "audio": int(batch.audio_mask.sum()),
                "text": int(batch.text_mask.any(1).sum())}
        for modality, n in real.items():
            assert after[modality]["hits"] - before[modality]["hits"] == n  # second call only
            assert after[modality]["rows"] <= 64
    batch = dataclasses.replace(random_batch(model.dims, 3, 4, 4, 6, absent=False), face_mask=torch.zeros(3, 4, dtype=torch.bool))
    _assert_close(engine.run(batch), _reference(model, batch))


def test_cached_backend_reuses_frames_of_overlapping_windows(engines):
    """Window 2 holds the last three frames and chunks of window 1 (at other positions and
    batch rows): exactly those hit, and the answer equals the model's."""
    model, folder = engines["mme2e"]
    engine = Engine.load(folder, backend="onnx", threads=2, feature_cache=64)
    first = random_batch(model.dims, 2, 5, 5, 6, seed=7, absent=False)
    first = dataclasses.replace(first, face_mask=torch.ones(2, 5, dtype=torch.bool), audio_mask=torch.ones(2, 5, dtype=torch.bool))
    engine.run(first)
    second = random_batch(model.dims, 2, 5, 5, 6, seed=8, absent=False)
    second = dataclasses.replace(second, face_mask=torch.ones(2, 5, dtype=torch.bool), audio_mask=torch.ones(2, 5, dtype=torch.bool))
    second.faces[1, :3] = first.faces[0, 2:]
    second.audio[1, :3] = first.audio[0, 2:]
    before = engine.backend.stats()
    _assert_close(engine.run(second), _reference(model, second))
    after = engine.backend.stats()
    assert all(after[m]["hits"] - before[m]["hits"] == 3 for m in ("visual", "audio"))
    assert all(after[m]["misses"] - before[m]["misses"] == 7 for m in ("visual", "audio"))


def test_cached_backend_computes_a_transcript_once(engines):
    """Windows with the same transcript (as neighbours in a stream, stream/speech.py) share
    the text encoder's output, whatever their batch row and padding; another transcript
    or a window without one does not hit."""
    model, folder = engines["mme2e"]
    engine = Engine.load(folder, backend="onnx", threads=2, feature_cache=64)
    first = random_batch(model.dims, 2, 3, 3, 4, seed=11, absent=False)
    first.text_mask[0] = torch.tensor([True, True, True, False])
    engine.run(first)
    second = random_batch(model.dims, 3, 3, 3, 7, seed=12, absent=False)
    second.text[2, :3], second.text_mask[2] = first.text[0, :3], torch.arange(7) < 3  # window 0's words, more padding
    second.text[0, :3], second.text_mask[0] = first.text[0, :3], torch.arange(7) < 3  # twice in one batch
    second.text_mask[1] = False  # no transcript
    before = engine.backend.stats()["text"]
    _assert_close(engine.run(second), _reference(model, second))
    after = engine.backend.stats()["text"]
    assert (after["hits"] - before["hits"], after["misses"] - before["misses"]) == (2, 0)
    second.text[2, 1] = (second.text[2, 1] + 1) % model.dims.text_vocab  # one word changed
    before = engine.backend.stats()["text"]
    _assert_close(engine.run(second), _reference(model, second))
    after = engine.backend.stats()["text"]
    assert (after["hits"] - before["hits"], after["misses"] - before["misses"]) == (1, 1)


def test_cached_backend_shares_nothing_between_sources(engines):
    """The same frames under another source name (a file replayed as a second stream)
    are computed again; under the first name they hit."""
    model, folder = engines["mme2e"]
    engine = Engine.load(folder, backend="onnx", threads=2, feature_cache=64)
    batch = random_batch(model.dims, 2, 3, 3, 4, seed=9, absent=False)
    real = int(batch.face_mask.sum())
    for ids, hits in ((("cam1", "cam1"), 0), (("cam2", "cam2"), 0), (("cam1", "cam1"), real)):
        before = engine.backend.stats()["visual"]["hits"]
        _assert_close(engine.run(dataclasses.replace(batch, ids=ids)), _reference(model, batch))
        assert engine.backend.stats()["visual"]["hits"] - before == hits, ids


def _full_windows(dims, B: int, n: int, L: int, seed: int) -> Batch:
    batch = random_batch(dims, B, n, n, L, seed=seed, absent=False)
    full = torch.ones(B, n, dtype=torch.bool)
    return dataclasses.replace(batch, face_mask=full, audio_mask=full, text_mask=torch.ones(B, L, dtype=torch.bool))


def test_sparse_cached_backend_reuses_frames_by_guide(engines):
    """Sparse engine: window 2 holds the last three frames and chunks of window 1. With
    window 1's transcript, their sparse rows hit; with another transcript only their
    low-level maps do (the sparse stages run again under the new guide); without text
    they run under the no-text query. Every answer equals the model's."""
    model, folder = engines["mme2e_sparse"]
    engine = Engine.load(folder, backend="onnx", threads=2, feature_cache=64)
    assert engine.backend_name == "onnx-cached"
    first = _full_windows(model.dims, 2, 5, 6, seed=7)

    def second_window(same_text: bool, text: bool = True) -> Batch:
        batch = _full_windows(model.dims, 2, 5, 6, seed=8)
        batch.faces[1, :3], batch.audio[1, :3] = first.faces[0, 2:], first.audio[0, 2:]
        if same_text:
            batch.text[1] = first.text[0]
        if not text:
            batch.text_mask[1] = False
        return batch

    for same_text, text, pair_hits, low_hits in ((True, True, 3, 0), (False, True, 0, 3), (False, False, 0, 3)):
        engine.backend.clear()
        engine.run(first)
        batch = second_window(same_text, text)
        before = engine.backend.stats()
        _assert_close(engine.run(batch), _reference(model, batch))
        after = engine.backend.stats()
        for m in ("visual", "audio"):
            assert after[m]["hits"] - before[m]["hits"] == pair_hits, (same_text, text, m)
            assert after[m]["misses"] - before[m]["misses"] == 10 - pair_hits, (same_text, text, m)
            assert after[f"{m}_low"]["hits"] - before[f"{m}_low"]["hits"] == low_hits, (same_text, text, m)


def test_block_cache_keeps_views_and_lets_mostly_evicted_blocks_go():
    """The low-level map cache holds views of a call's outputs (no copy); once evictions
    leave a block with a quarter of its rows or fewer, those rows become copies (the block
    is no longer held) with the same values, and LRU order is kept throughout."""
    from engine.backends.feature_cache import BlockCache

    cache = BlockCache(6)
    low, keys = np.arange(4 * 3, dtype=np.float32).reshape(4, 3), -np.arange(4 * 2, dtype=np.float32).reshape(4, 2)
    first = [b"a", b"b", b"c", b"d"]
    cache.put_block(first, [(low[i], keys[i]) for i in range(4)])
    assert all(np.shares_memory(cache.get(k)[0], low) and np.shares_memory(cache.get(k)[1], keys) for k in first)
    cache.get(b"b")  # most recently used of the block
    other = np.zeros((3, 3), np.float32)
    cache.put_block([b"x", b"y", b"z"], [(other[i], other[i]) for i in range(3)])  # 7 rows: evicts a
    assert np.shares_memory(cache.get(b"b")[0], low)  # 3 of 4 rows left: still views
    cache.put_block([b"u", b"v"], [(other[i], other[i]) for i in range(2)])  # evicts c, d: 1 of 4 left
    row = cache.get(b"b")
    assert not np.shares_memory(row[0], low) and not np.shares_memory(row[1], keys)
    np.testing.assert_array_equal(row[0], low[1])
    np.testing.assert_array_equal(row[1], keys[1])
    assert list(cache.rows) == [b"x", b"y", b"z", b"u", b"v", b"b"]
    cache.clear()
    assert not cache.rows and cache.get(b"b") is None


@pytest.fixture(scope="module")
def learned_guide_engine(tmp_path_factory, tokenizer_file) -> tuple[torch.nn.Module, Path]:
    """A sparse model with model.sparse_guide = "learned" (a non-zero learned query) and its
    engine folder."""
    torch.manual_seed(5)
    dims = dataclasses.replace(preset_dims("tiny", "mme2e_sparse", N_PERSONS, text_vocab=400), sparse_guide="learned")
    model = build_model(dims).eval()
    with torch.no_grad():
        model.null_guide.normal_()
    folder = tmp_path_factory.mktemp("learned")
    export_engine(model, [f"p{i}" for i in range(N_PERSONS)], FeatureParams(), tokenizer_file, folder,
                  sparse_budget=BUDGET)
    return model, folder


def test_sparse_cached_backend_learned_guide_ignores_the_transcript(learned_guide_engine):
    """model.sparse_guide = "learned": a frame's sparse row does not depend on its window's
    transcript, so it hits whatever the transcript, and answers equal the model's."""
    model, folder = learned_guide_engine
    dims = model.dims
    engine = Engine.load(folder, backend="onnx", threads=2, feature_cache=64)
    first = _full_windows(dims, 1, 4, 5, seed=1)
    _assert_close(engine.run(first), _reference(model, first))
    second = dataclasses.replace(first, text=(first.text + 1) % dims.text_vocab)  # same frames, another transcript
    before = engine.backend.stats()
    _assert_close(engine.run(second), _reference(model, second))
    after = engine.backend.stats()
    assert all(after[m]["hits"] - before[m]["hits"] == 4 for m in ("visual", "audio"))
    assert after["text"]["misses"] - before["text"]["misses"] == 1


def test_feature_cache_off_serves_the_whole_graph(engines):
    for name in ("mme2e", "mme2e_sparse"):
        _, folder = engines[name]
        assert Engine.load(folder, backend="onnx", threads=1, feature_cache=0).backend_name == "onnx"
        assert Engine.load(folder, backend="onnx", threads=1, feature_cache=64).backend_name == "onnx-cached"


def test_split_graphs_of_an_older_format_are_not_used(engines, tmp_path):
    """Split graphs of an older export (the projection outside the CNN graphs, the text
    encoder inside the head) do not fit the cached backend: such a folder serves with its
    whole graph."""
    _, folder = engines["mme2e"]
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    info = json.loads((old / "engine.json").read_text())
    for older in (None, 2):
        info["split_format"] = older
        (old / "engine.json").write_text(json.dumps(info))
        assert Engine.load(old, backend="onnx", threads=1, feature_cache=64).backend_name == "onnx"
    assert Engine.load(folder, backend="onnx", threads=1, feature_cache=64).backend_name == "onnx-cached"


def test_sparse_split_graphs_before_the_keys_are_not_used(engines, tmp_path):
    """A sparse engine folder whose low-level graphs give the map alone (split format 3, before
    the first stage's keys came with it) serves with its whole graph, and says so."""
    _, folder = engines["mme2e_sparse"]
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    info = json.loads((old / "engine.json").read_text())
    assert info["split_format"] == 4
    info["split_format"] = 3
    (old / "engine.json").write_text(json.dumps(info))
    assert Engine.load(old, backend="onnx", threads=1, feature_cache=64).backend_name == "onnx"
    assert Engine.load(folder, backend="onnx", threads=1, feature_cache=64).backend_name == "onnx-cached"


def test_damaged_engine_folder_is_a_clear_error(engines, tmp_path):
    """A missing tokenizer, a missing graph, a truncated graph and missing weights each
    raise an error that names the file, before anything is served."""
    _, folder = engines["mme2e_sparse"]

    def damaged(change) -> Path:
        copy = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        shutil.copytree(folder, copy)
        change(copy)
        return copy

    with pytest.raises(FileNotFoundError, match="tokenizer.json is missing"):
        Engine.load(damaged(lambda f: (f / "tokenizer.json").unlink()), backend="onnx", threads=1)
    with pytest.raises(FileNotFoundError, match="model.onnx is missing"):
        Engine.load(damaged(lambda f: (f / "model.onnx").unlink()), backend="onnx", threads=1, feature_cache=0)
    truncated = damaged(lambda f: (f / "visual_sparse.onnx").write_bytes((f / "visual_sparse.onnx").read_bytes()[:1000]))
    with pytest.raises(RuntimeError, match="visual_sparse.onnx: ONNX Runtime cannot load this graph"):
        Engine.load(truncated, backend="onnx", threads=1, feature_cache=64)
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        Engine.load(damaged(lambda f: (f / "model.safetensors").unlink()), backend="torch", threads=1, device="cpu")
    assert Engine.load(folder, backend="onnx", threads=1, feature_cache=64).backend_name == "onnx-cached"


def test_absent_modality_reported(engines):
    model, folder = engines["mme2e"]
    out = Engine.load(folder, backend="onnx").run(random_batch(model.dims, 3, 4, 4, 6))
    assert not out["present"][0, 0] and not out["present"][1, 2]
    assert np.all(out["modality_logits"][0, 0] == 0) and np.all(out["modality_logits"][1, 2] == 0)


@pytest.mark.parametrize("name", ["mme2e", "mme2e_sparse", DENSE_FIRST])
def test_batch_without_any_face_or_audio(engines, name):
    """No real frame in the whole batch: the exported CNNs run on an empty batch."""
    model, folder = engines[name]
    batch = random_batch(model.dims, 3, 4, 4, 6, absent=False)
    batch = dataclasses.replace(batch, face_mask=torch.zeros_like(batch.face_mask))
    out = Engine.load(folder, backend="onnx").run(batch)
    _assert_close(out, _reference(model, batch))
    assert not out["present"][:, 2].any() and out["present"][:, :2].all()
    batch = dataclasses.replace(batch, audio_mask=torch.zeros_like(batch.audio_mask))
    _assert_close(Engine.load(folder, backend="onnx").run(batch), _reference(model, batch))


@pytest.mark.parametrize("name", ["mme2e", "mme2e_sparse"])
def test_int8_served_only_when_top1_holds(engines, name):
    """fp32 ONNX keeps PyTorch's top-1; the int8 graph is served only if it kept the
    top-1 person on every check window of the export (random tiny weights have tiny
    margins, so here it often does not, and loading it must then refuse); the recorded
    agreement is what the int8 graph gives on those windows."""
    from engine.export import random_int8_inputs

    model, folder = engines[name]
    batch = random_batch(model.dims, 16, 6, 8, 14, seed=7)
    ref = _reference(model, batch)["logits"].argmax(1)
    np.testing.assert_array_equal(Engine.load(folder, "onnx").run(batch)["logits"].argmax(1), ref)
    info = json.loads((folder / "engine.json").read_text())
    forced = Engine.load(folder, "onnx", int8="force")
    assert forced.backend_name == "onnx-int8"
    assert info["int8_check"]["split"] == "random" and info["int8_check"]["whole"]["windows"] == 16
    check = random_int8_inputs(model).check[0]  # the export's check windows
    agree = np.mean(forced.run(check)["logits"].argmax(1) == _reference(model, check)["logits"].argmax(1))
    assert agree == pytest.approx(info["int8_check"]["whole"]["top1_agreement"])  # the recorded check is true
    if info["int8_check"]["whole"]["top1_agreement"] == 1.0:
        np.testing.assert_array_equal(Engine.load(folder, "onnx", int8=True).run(check)["logits"].argmax(1),
                                      _reference(model, check)["logits"].argmax(1))
    else:
        with pytest.raises(ValueError, match="top-1"):
            Engine.load(folder, "onnx", int8=True)


@pytest.mark.parametrize("name", ["mme2e", "mme2e_sparse", DENSE_FIRST])
def test_int8_cnn_graphs_serve_through_the_cache(engines, name):
    """Static int8 CNN graphs (sparse: low-level and sparse-stage graphs) + the fp32 text
    graph and head, behind the same feature cache; close to fp32 (they are quantised, not
    equal), served only when the top-1 check held."""
    model, folder = engines[name]
    info = json.loads((folder / "engine.json").read_text())
    assert set(info["split_int8_graphs"].values()) <= {p.name for p in folder.iterdir()}
    for key in ("visual", "audio", "visual_low", "audio_low") if name != "mme2e" else ("visual", "audio"):
        graph = onnx.load(str(folder / info["split_int8_graphs"][key]))
        assert any(n.op_type == "QuantizeLinear" for n in graph.graph.node), key  # really int8 convolutions
    # the text encoder in dynamic int8: every MatMul with a constant weight quantised, the
    # layer weights ALBERT shares (handed to each layer through a Transpose) included
    text = onnx.load(str(folder / info["split_int8_graphs"]["text"])).graph
    constants = {i.name for i in text.initializer}
    made_by = {o: n for n in text.node for o in n.output}
    weight_of = lambda n: made_by[n.input[1]].input[0] if n.input[1] in made_by else n.input[1]  # noqa: E731
    assert not [n.name for n in text.node if n.op_type == "MatMul" and weight_of(n) in constants]
    assert sum(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for n in text.node) >= 2 * model.dims.text_layers
    batch = random_batch(model.dims, 8, 6, 8, 14, seed=3)
    fp32 = _reference(model, batch)
    engine = Engine.load(folder, "onnx", int8="force", feature_cache=64)
    assert engine.backend_name == "onnx-cached-int8"
    logits = engine.run(batch)["logits"]
    assert np.abs(logits - fp32["logits"]).max() < 0.5 * np.abs(fp32["logits"]).max()
    assert engine.run(batch)["logits"].tolist() == logits.tolist()  # second call: every item from the cache
    if info["int8_check"]["cached"]["top1_agreement"] < 1.0:
        with pytest.raises(ValueError, match="top-1"):
            Engine.load(folder, "onnx", int8=True, feature_cache=64)


def test_sparse_int8_graphs_hand_over_uint8(engines, tmp_path):
    """The sparse model's int8 low-level graphs return their map as uint8 and their attention
    keys in float32 (computed in fp32 from that map), and the sparse-stage graphs take them so.
    The rewrite itself: the low-level outputs are exactly the former float32 ones once
    dequantised with the recorded grid, and the stage graph's answers match the former pair's
    (its rows reach their convolution dequantised from the map's own grid instead of
    requantised on a grid of their own)."""
    import onnxruntime as ort

    from engine.backends.feature_cache import LOW_OUTPUTS, SPARSE_SPLIT_GRAPHS
    from engine.handover import hand_over_uint8
    from engine.quantize import SPARSE_STAGE_INT8_OPS, attention_scores, quantize_static_int8

    model, folder = engines["mme2e_sparse"]
    info = json.loads((folder / "engine.json").read_text())
    assert set(info["int8_handover"]) == {"visual", "audio"}
    batch = random_batch(model.dims, 4, 6, 8, 14, seed=5)
    items = {"visual": batch.faces[batch.face_mask].numpy(), "audio": batch.audio[batch.audio_mask].numpy()}
    for modality in ("visual", "audio"):
        grid = info["int8_handover"][modality]["low"]
        assert grid["requantised"] and set(info["int8_handover"][modality]) == {"low"}  # the map's rows gathered as uint8
        low = ort.InferenceSession(str(folder / info["split_int8_graphs"][f"{modality}_low"]))
        stage = ort.InferenceSession(str(folder / info["split_int8_graphs"][modality]))
        assert [(o.name, o.type) for o in low.get_outputs()] == [("low", "tensor(uint8)"), ("keys", "tensor(float)")]
        assert {i.name: i.type for i in stage.get_inputs() if i.name in LOW_OUTPUTS} == {
            "low": "tensor(uint8)", "keys": "tensor(float)"}
        # the keys (which decide the kept sites) in fp32, from the very map the stage graph gets
        mapped, keys = low.run(None, {low.get_inputs()[0].name: items[modality]})
        proj = (model.audio_cnn if modality == "audio" else model.visual_cnn).stages[0].attention.channel_proj
        with torch.no_grad():
            want = proj(torch.from_numpy((mapped.astype(np.float32) - grid["zero_point"]) * np.float32(grid["scale"])))
        np.testing.assert_allclose(keys, want.numpy(), atol=1e-5, rtol=1e-5)

    # the rewrite on freshly quantised copies (both outputs quantised here), against the graphs as quantised
    rng = np.random.default_rng(0)
    for modality, x in items.items():
        low_src, stage_src = folder / SPARSE_SPLIT_GRAPHS[f"{modality}_low"], folder / SPARSE_SPLIT_GRAPHS[modality]
        fp32_low = ort.InferenceSession(str(low_src))
        maps = dict(zip(LOW_OUTPUTS, fp32_low.run(None, {fp32_low.get_inputs()[0].name: x})))
        guide = {"text_cls": rng.standard_normal((len(x), model.dims.text_hidden)).astype(np.float32),
                 "text_present": np.ones(len(x), bool)}
        before = {k: tmp_path / f"{modality}_{k}_before.onnx" for k in ("low", "stage")}
        quantize_static_int8(low_src, before["low"], x)
        quantize_static_int8(stage_src, before["stage"], [{**maps, **guide}], symbolic_shapes=False,
                             op_types=SPARSE_STAGE_INT8_OPS, exclude=attention_scores(stage_src))
        after = {k: tmp_path / f"{modality}_{k}_after.onnx" for k in ("low", "stage")}
        for k in before:
            shutil.copy(before[k], after[k])
        grids = hand_over_uint8(after["low"], after["stage"], LOW_OUTPUTS)
        assert set(grids) == set(LOW_OUTPUTS) and grids["low"]["requantised"] and not grids["keys"]["requantised"]
        run = {k: {g: ort.InferenceSession(str(p[g])) for g in p} for k, p in (("before", before), ("after", after))}
        old = run["before"]["low"].run(None, {run["before"]["low"].get_inputs()[0].name: x})
        new = run["after"]["low"].run(None, {run["after"]["low"].get_inputs()[0].name: x})
        for name, a, b in zip(LOW_OUTPUTS, old, new):
            assert b.dtype == np.uint8
            grid = grids[name]
            np.testing.assert_array_equal((b.astype(np.float32) - grid["zero_point"]) * np.float32(grid["scale"]), a)
        want = run["before"]["stage"].run(None, {**dict(zip(LOW_OUTPUTS, old)), **guide})[0]
        got = run["after"]["stage"].run(None, {**dict(zip(LOW_OUTPUTS, new)), **guide})[0]
        np.testing.assert_allclose(got, want, atol=0.05 * np.abs(want).max(), rtol=0)


def test_fold_weight_transposes_keeps_outputs_and_shares_the_fold():
    """Two MatMuls on Transposes of one initializer (ALBERT's shared layers as exported):
    folded into one transposed initializer, same output, and dynamic int8 then quantises both."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from engine.quantize import fold_weight_transposes, quantize_dynamic_int8

    w = np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32)
    nodes = [helper.make_node("Transpose", ["w"], [f"wt{i}"], perm=[1, 0]) for i in range(2)]
    nodes += [helper.make_node("MatMul", ["x", "wt0"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
              helper.make_node("MatMul", ["r", "wt1"], ["y0"]), helper.make_node("MatMul", ["y0", "wt0"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]  # noqa: E731
    before = run(model)
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    assert fold_weight_transposes(folded) == 2
    assert [n.op_type for n in folded.graph.node] == ["MatMul", "Relu", "MatMul", "MatMul"]
    assert len(folded.graph.initializer) == 2  # w (now unused) and its one transpose
    np.testing.assert_allclose(run(folded), before, rtol=1e-6, atol=1e-6)
    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(model, f"{tmp}/m.onnx")
        q = onnx.load(str(quantize_dynamic_int8(f"{tmp}/m.onnx", f"{tmp}/q.onnx")))
    assert not [n for n in q.graph.node if n.op_type == "MatMul"]  # all three quantised
    np.testing.assert_allclose(run(q), before, atol=0.1 * np.abs(before).max())


@pytest.mark.parametrize("name", ["mme2e_sparse", DENSE_FIRST])
def test_sparse_export_executes_fewer_flops(engines, name):
    model, folder = engines[name]
    info = json.loads((folder / "engine.json").read_text())
    assert info["sparse_budget"] == list(BUDGET[model.dims.sparse_dense_stages:])
    assert info["sparse_budget_audio"] == (list(AUDIO_BUDGET) if name == DENSE_FIRST else None)
    assert model.budget_of("audio") == (AUDIO_BUDGET if name == DENSE_FIRST else BUDGET)
    assert info["dims"]["sparse_dense_stages"] == model.dims.sparse_dense_stages
    flops = info["flops_per_window"]
    assert flops["gflops"] < 0.9 * flops["dense_gflops"]


def test_identify(engines):
    model, folder = engines["mme2e_sparse"]
    engine = Engine.load(folder)  # auto: onnx on a CPU-only machine
    assert engine.backend_name == ("onnx" if not torch.cuda.is_available() else engine.backend_name)
    batch = random_batch(model.dims, 3, 4, 5, 6)
    ids = engine.identify(batch)
    assert len(ids) == 3 and all(isinstance(i, Identification) for i in ids)
    ref = _reference(model, batch)
    for b, ident in enumerate(ids):
        assert ident.person == engine.persons[int(ref["logits"][b].argmax())]
        assert ident.probabilities.shape == (N_PERSONS,) and abs(ident.probabilities.sum() - 1) < 1e-5
        assert ident.confidence == pytest.approx(float(ident.probabilities.max()))
        assert ident.modality_probabilities.shape == (3, N_PERSONS)
        assert ident.embedding.shape == (model.dims.embedding_dim,)
    assert ids[0].present[0] is False and np.all(ids[0].modality_probabilities[0] == 0)


def test_identify_raw(engines):
    _, folder = engines["mme2e"]
    engine = Engine.load(folder, "onnx")
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 255, (5, 48, 48, 3), dtype=np.uint8)
    windows = [(crops, np.array([1, 1, 0, 1, 1], bool), rng.standard_normal(48000).astype(np.float32) * 0.1,
                "i told you already that i was not going"),
               (crops[:0], np.zeros(0, bool), np.zeros(0, np.float32), "")]  # nothing at all
    ids = engine.identify_raw(windows)
    assert ids[0].present == (True, True, True)
    assert ids[1].present == (False, False, False)
    np.testing.assert_allclose(ids[1].probabilities, 1 / N_PERSONS, atol=1e-6)


def test_identify_raw_names_a_window_it_cannot_take(engines):
    """Crops of another size or dtype, several audio channels, integer PCM and non-finite
    samples each raise a ValueError naming the window and the problem (before they could be
    reshaped or cast into a confident wrong answer); a (1, N) audio row is taken as mono."""
    _, folder = engines["mme2e"]
    engine = Engine.load(folder, "onnx")
    rng = np.random.default_rng(0)
    crops, found = rng.integers(0, 255, (4, 48, 48, 3), dtype=np.uint8), np.ones(4, bool)
    audio = rng.standard_normal(48000).astype(np.float32) * 0.1
    good = (crops, found, audio, "hello there")
    want = engine.identify_raw([good])[0]
    np.testing.assert_array_equal(engine.identify_raw([(crops, found, audio[None], "hello there")])[0].probabilities,
                                  want.probabilities)
    bad = {
        "face crops of shape \\(4, 64, 64, 3\\)": (np.zeros((4, 64, 64, 3), np.uint8), found, audio, "hi"),
        "face crops of dtype float32": (crops.astype(np.float32) / 255, found, audio, "hi"),
        "audio of shape \\(2, 48000\\)": (crops, found, np.stack([audio, audio]), "hi"),
        "audio of dtype int16": (crops, found, (audio * 32767).astype(np.int16), "hi"),
        "1 of its 48000 audio samples are not finite": (crops, found, np.where(np.arange(48000) == 7, np.nan, audio), "hi"),
    }
    for message, window in bad.items():
        with pytest.raises(ValueError, match="window 1: " + message):
            engine.identify_raw([good, window])
    with pytest.raises(ValueError, match="window 0: face crops of shape"):
        engine.identify_overlapped([(audio, "hi", 0)], lambda: [(np.zeros((4, 64, 64, 3), np.uint8), found)])


@pytest.mark.parametrize("cache", [0, 64])
def test_identify_overlapped_gives_identify_raw_answers(engines, cache):
    """Faces found in the helper thread while the audio and text features are computed
    (the cached backend's rows prefetched): the same answers as identify_raw, the
    prefetched rows are not computed again, and an error in the face thread reaches the caller."""
    _, folder = engines["mme2e"]
    engine = Engine.load(folder, "onnx", feature_cache=cache)
    rng = np.random.default_rng(1)
    crops = rng.integers(0, 255, (4, 6, 48, 48, 3), dtype=np.uint8)
    found = [np.array([1, 1, 0, 1, 1, 1], bool), np.zeros(6, bool), np.ones(6, bool), np.ones(6, bool)]
    audio = [rng.standard_normal(48000).astype(np.float32) * 0.1 for _ in range(4)]
    texts = ["i told you already", "", "we should call them", "i told you already"]
    def misses(run):  # -> answers, CNN/text rows computed per modality (the cache emptied first)
        if not cache:
            return run(), None
        engine.backend.clear()
        before = engine.backend.stats()
        answers = run()
        return answers, {m: engine.backend.stats()[m]["misses"] - before[m]["misses"] for m in before}

    want, computed = misses(lambda: engine.identify_raw(
        [(c, f, a, t, 16000 * k) for k, (c, f, a, t) in enumerate(zip(crops, found, audio, texts))], ["cam"] * 4))
    got, computed_overlapped = misses(lambda: engine.identify_overlapped(
        [(a, t, 16000 * k) for k, (a, t) in enumerate(zip(audio, texts))], lambda: list(zip(crops, found)), ["cam"] * 4))
    for a, b in zip(want, got):
        assert a.person == b.person and a.present == b.present
        np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-6)
        np.testing.assert_allclose(a.embedding, b.embedding, atol=1e-5)
    assert computed == computed_overlapped  # prefetched rows are not computed again in the forward
    if cache:
        assert computed["text"] == 2  # two distinct transcripts
        batch = engine.collate_raw([(c, f, a, t, 16000 * k) for k, (c, f, a, t) in enumerate(zip(crops, found, audio, texts))],
                                   ["cam"] * 4)
        engine.backend.clear()
        counts = []
        for call in (lambda: None, lambda: engine.backend.prefetch(batch), lambda: engine.backend.run(batch)):
            call()
            counts.append({m: v["misses"] for m, v in engine.backend.stats().items()})
        start, fetched, ran = counts
        assert fetched["audio"] > start["audio"] and fetched["text"] == start["text"] + 2
        assert fetched["visual"] == start["visual"]  # the prefetch needs no faces
        assert (ran["audio"], ran["text"]) == (fetched["audio"], fetched["text"]) and ran["visual"] > fetched["visual"]

    def broken():
        raise RuntimeError("camera frame unreadable")

    with pytest.raises(RuntimeError, match="camera frame unreadable"):
        engine.identify_overlapped([(audio[0], texts[0], 0)], broken)


def test_run_folder_serves_with_torch(tmp_path, tokenizer_file):
    model = _model("mme2e", 3)
    save_checkpoint(tmp_path, model, RunMeta(model.dims, tuple("abcd"), FeatureParams()), tokenizer_file)
    engine = Engine.load(tmp_path)
    assert engine.backend_name == "torch" and engine.persons == tuple("abcd")
    batch = random_batch(model.dims, 2, 3, 3, 4)
    _assert_close(engine.run(batch), _reference(model, batch), tol=1e-6)
    with pytest.raises(ValueError, match="export it first"):
        Engine.load(tmp_path, "onnx")


def test_engine_folder_serves_without_training(engines):
    _, folder = engines["mme2e_sparse"]
    code = f"""
import sys, numpy as np
from engine.runtime import Engine
engine = Engine.load({str(folder)!r}, backend="onnx", threads=1)
crops = np.zeros((2, 48, 48, 3), np.uint8)
ids = engine.identify_raw([(crops, np.ones(2, bool), np.zeros(16000, np.float32), "hello there")])
assert ids[0].person in engine.persons
bad = sorted(m for m in sys.modules if m == "training" or m.startswith("training."))
assert not bad, bad
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("ok")


def test_engine_folder_contents(engines):
    for name, (_, folder) in engines.items():
        files = {p.name for p in folder.iterdir()}
        assert {"engine.json", "model.onnx", "tokenizer.json", "model.safetensors", "model.int8.onnx"} <= files
        info = json.loads((folder / "engine.json").read_text())
        assert info["dims"]["name"] == name.split("+")[0] and info["persons"] == [f"p{i}" for i in range(N_PERSONS)]
        assert FeatureParams.from_dict(info["features"]) == FeatureParams()
        assert {"torch", "onnx", "onnxruntime", "tensorrt"} <= set(info["versions"])
        assert set(info["split_graphs"].values()) <= files
        low = {"visual_low.onnx", "audio_low.onnx"}
        assert low <= files if name != "mme2e" else not low & files


# ---------------------------------------------------------------- TensorRT


@pytest.mark.parametrize("name", ["mme2e", "mme2e_sparse"])
def test_tensorrt_consumes_a_valid_graph(engines, name):
    """Everything the TensorRT build reads: opset, ops, input names/dtypes, dynamic axes, profiles."""
    model, folder = engines[name]
    graph = onnx.load(str(folder / "model.onnx"))
    onnx.checker.check_model(graph)
    opset = next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))
    assert TENSORRT_OPSET_RANGE[0] <= opset <= TENSORRT_OPSET_RANGE[1]
    ops = {n.op_type for n in graph.graph.node}
    for fn in graph.functions:  # onnxscript may leave local functions
        ops |= {n.op_type for n in fn.node}
    assert ops - {f.name for f in graph.functions} <= TENSORRT_OPS, sorted(ops - TENSORRT_OPS)
    inputs = {i.name: i.type.tensor_type for i in graph.graph.input}
    assert list(inputs) == list(INPUT_NAMES)
    assert [o.name for o in graph.graph.output] == list(GRAPH_OUTPUT_NAMES)
    want_dtype = {"faces": onnx.TensorProto.FLOAT, "audio": onnx.TensorProto.FLOAT, "text": onnx.TensorProto.INT64}
    shapes = ProfileRanges.for_features(FeatureParams(), max_batch=32).input_shapes(model.dims)
    for name_, tt in inputs.items():
        assert tt.elem_type == want_dtype.get(name_, onnx.TensorProto.BOOL), name_
        dims = tt.shape.dim
        assert dims[0].dim_param and dims[1].dim_param, f"{name_}: batch and length axes must be dynamic"
        static = [d.dim_value for d in dims[2:]]
        lo, opt, hi = shapes[name_]
        assert all(d.dim_value == 0 for d in dims[:2])
        assert list(lo[2:]) == static == list(hi[2:])
        assert all(1 <= a <= b <= c for a, b, c in zip(lo, opt, hi))
    assert shapes["text"][2][1] <= model.dims.text_max_positions


def test_tensorrt_build_and_run(engines, tmp_path):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pytest.skip("TensorRT is not installed (cannot be installed on our machines, see ENVIRONMENT.md)")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")
    from engine.backends.tensorrt_backend import TensorRTBackend, build_engine

    model, folder = engines["mme2e"]
    shapes = ProfileRanges.for_features(FeatureParams(), max_batch=8).input_shapes(model.dims)
    plan = build_engine(folder / "model.onnx", tmp_path / "model.plan", shapes, fp16=False)
    backend = TensorRTBackend(plan)
    batch = random_batch(model.dims, 3, 6, 8, 14)
    _assert_close(backend.run(batch), _reference(model, batch), tol=1e-3)


def test_tensorrt_missing_is_a_clear_error(engines):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    with pytest.raises(RuntimeError, match="TensorRT"):
        Engine.load(engines["mme2e"][1], backend="tensorrt")


def test_bench_replaces_only_its_own_section_in_place():
    from engine.bench import replace_section

    doc = "# Benchmarks\n\n## Engine\n\nold rows\n\n## Engine against the targets\n\nnotes\n\n## Stream\n\ns\n"
    once = replace_section(doc, "## Engine", ["## Engine", "", "new rows"])
    assert once == doc.replace("old rows", "new rows")
    assert replace_section(once, "## Engine", ["## Engine", "", "new rows"]) == once  # idempotent, notes kept
    assert replace_section("# Benchmarks\n", "## Engine", ["## Engine"]).endswith("\n\n## Engine\n")


def test_bench_compares_each_row_with_the_original_workload_and_the_dense_engine():
    """``comparisons``: batch 1 on p50 latency, larger batches on windows/s; against the
    original workload's row of the same scope and batch, a sparse row against the dense row
    of its backend; rows without a counterpart are left out."""
    from engine.bench import comparisons

    def row(model, backend, scope, batch, p50, wps):
        return {"model": model, "backend": backend, "scope": scope, "batch": batch, "p50_ms": p50, "windows_per_s": wps}

    cached = "onnx-cached-int8"
    rows = [row("mme2e", cached, "window", 1, 30.0, 30.0), row("mme2e", cached, "window", 8, 200.0, 40.0),
            row("mme2e_sparse", cached, "window", 1, 40.0, 25.0), row("mme2e_sparse", cached, "window", 8, 180.0, 44.0),
            row("mme2e_sparse", "onnx", "model", 8, 500.0, 16.0),  # no dense row, no peer row: left out
            row("peer-mme2e", "torch-eager", "window", 1, 300.0, 3.3),
            row("peer-mme2e", "torch-eager", "window", 8, 2000.0, 4.0)]
    table = comparisons(rows)
    assert table[-4:] == ["| mme2e | onnx-cached-int8 | window | 1 | 10.0x |  |",
                          "| mme2e | onnx-cached-int8 | window | 8 | 10.0x |  |",
                          "| mme2e_sparse | onnx-cached-int8 | window | 1 | 7.5x | 0.75x |",
                          "| mme2e_sparse | onnx-cached-int8 | window | 8 | 11.0x | 1.10x |"]
    assert comparisons([rows[0]]) == []
    # two dense engines (e.g. --engine dense1 sparse1 dense2 sparse2): each sparse row is
    # compared with the dense row timed just before it; a sparse row timed first, with the first
    two = [row("mme2e_sparse", cached, "window", 1, 20.0, 50.0), row("mme2e", cached, "window", 1, 40.0, 25.0),
           row("mme2e_sparse", cached, "window", 1, 20.0, 50.0), row("mme2e", cached, "window", 1, 10.0, 100.0),
           row("mme2e_sparse", cached, "window", 1, 20.0, 50.0)]
    assert [line.split("|")[-2].strip() for line in comparisons(two)[4:] if "sparse" in line] == ["2.00x", "2.00x", "0.50x"]


def test_bench_stream_transcripts_follow_the_stream_rule():
    """The bench's windows get the transcript the stream would give them (the segments
    whose midpoint they hold), so neighbours share it as in a stream; no two segments
    are alike, so a long measurement cannot hit the text cache with an earlier one."""
    from engine.bench import HOP_S, WINDOW_S, Stream, speech_segments
    from stream.speech import text_between

    stream = Stream.make(FeatureParams(), None, pool_s=40.0)
    segments = speech_segments(200.0)
    assert len({s.text for s in segments}) == len(segments)
    assert all(a.end == b.start and 2.0 < a.end - a.start < 5.0 for a, b in zip(segments, segments[1:]))
    texts = [stream.window(w)[2] for w in range(150)]  # past the pool: segments are extended
    assert texts == [text_between(segments, w * HOP_S, w * HOP_S + WINDOW_S) for w in range(150)]
    same = sum(a == b for a, b in zip(texts, texts[1:]))
    assert 0.4 < same / (len(texts) - 1) < 0.8  # ~3.3 s segments, 1 s hop
    assert all(len(t.split()) >= 10 for t in texts if t)


def test_bench_measurements_share_no_cached_rows(engines):
    """Two measurements over the same stream windows: the second computes exactly as much
    as the first (nothing reused from it), and both reuse within themselves."""
    from engine.bench import Stream, bench_window

    _, folder = engines["mme2e"]
    engine = Engine.load(folder, backend="onnx", threads=2, feature_cache=4096)
    stream = Stream.make(engine.feature_params, None, pool_s=30.0)
    counts = []
    for _ in range(2):
        before = engine.backend.stats()
        bench_window(engine, stream, 2, 3)
        after = engine.backend.stats()
        counts.append({m: (after[m]["misses"] - before[m]["misses"], after[m]["hits"] - before[m]["hits"]) for m in after})
    assert counts[0] == counts[1]
    assert all(misses > 0 and hits > 0 for misses, hits in counts[0].values()), counts


def test_bench_windows_interleaves_engines(engines, monkeypatch):
    """`mmid bench` times the engines of a backend step by step in turn (order reversed every
    other round), each doing the work it does timed alone."""
    import engine.bench as bench

    opened = [Engine.load(engines[name][1], backend="onnx", threads=2, feature_cache=4096) for name in ("mme2e", "mme2e_sparse")]
    stream = bench.Stream.make(opened[0].feature_params, None, pool_s=30.0)
    alone = []
    for engine in opened:
        before = engine.backend.stats()
        bench.bench_window(engine, stream, 2, 3)
        after = engine.backend.stats()
        alone.append({m: after[m]["misses"] - before[m]["misses"] for m in after})
    calls = []
    made = bench.window_steps

    def recording(engine, *args, **kwargs):
        step = made(engine, *args, **kwargs)
        index = next(i for i, e in enumerate(opened) if e is engine)
        return lambda: (calls.append(index), step())[1]

    monkeypatch.setattr(bench, "window_steps", recording)
    befores = [e.backend.stats() for e in opened]
    rows = bench.bench_windows(opened, stream, 2, 3)
    together = [{m: e.backend.stats()[m]["misses"] - b[m]["misses"] for m in b} for e, b in zip(opened, befores)]
    assert calls == [0, 1, 0, 1, 1, 0, 0, 1]  # warm-up, then rounds in alternating order
    assert together == alone
    assert [set(r) for r in rows] == [{"p50_ms", "p95_ms", "windows_per_s", "peak_mib"}] * 2
    assert all(r["windows_per_s"] > 0 and r["peak_mib"] >= 0 for r in rows)


def test_bench_json_rows(engines, capsys):
    """`mmid bench --json`: the rows issue 5 names, for each backend and scope."""
    from engine.cli import main as mmid

    folders = [str(engines[name][1]) for name in ("mme2e", "mme2e_sparse")]
    assert mmid(["bench", "--engine", *folders, "--json", "--batches", "1,2", "--iters", "2", "--no-write",
                 "--backends", "onnx,onnx-cached"]) == 0
    captured = capsys.readouterr()
    lines = [line for line in captured.out.splitlines() if line.strip()]
    assert all(line.startswith("{") for line in lines)  # the comparison table goes to stderr with --json
    rows = [json.loads(line) for line in lines]
    assert "| mme2e_sparse | onnx-cached | window | 2 |  | " in captured.err  # sparse vs dense, no peer timed
    assert {(r["model"], r["backend"], r["scope"], r["batch"]) for r in rows} == {
        (m, "onnx", s, b) for m in ("mme2e", "mme2e_sparse") for s in ("model", "window") for b in (1, 2)
    } | {(m, "onnx-cached", "window", b) for m in ("mme2e", "mme2e_sparse") for b in (1, 2)}
    for r in rows:
        assert r["p50_ms"] > 0 and r["p95_ms"] >= r["p50_ms"] and r["windows_per_s"] > 0


def test_learned_guide_sparse_export_matches_pytorch(learned_guide_engine):
    """model.sparse_guide = "learned": the exported graph queries the stages with the
    learned query, whatever the transcript, as the PyTorch model does."""
    model, folder = learned_guide_engine
    engine = Engine.load(folder, backend="onnx", threads=2, device="cpu")
    assert engine.dims.sparse_guide == "learned"
    for i, shape in enumerate(SHAPES[:3]):
        batch = random_batch(model.dims, *shape, seed=i)
        _assert_close(engine.run(batch), _reference(model, batch))


def test_one_torch_thread_restores_the_count_and_is_per_thread():
    """Feature code runs on one torch thread; the caller's count comes back after, and a
    helper thread's setting does not change the caller's."""
    from concurrent.futures import ThreadPoolExecutor

    from engine.runtime import _one_torch_thread, one_torch_thread

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with one_torch_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with ThreadPoolExecutor(1, initializer=_one_torch_thread) as helper:
            assert helper.submit(torch.get_num_threads).result() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_cli_names_a_missing_engine_folder(tmp_path, capsys):
    """`mmid bench --engine` on a folder that is not there: one line naming it, exit status 1."""
    from engine.cli import main

    missing = tmp_path / "no-engine"
    assert main(["bench", "--engine", str(missing), "--batches", "1", "--no-write"]) == 1
    err = capsys.readouterr().err
    assert str(missing) in err and "Traceback" not in err


def test_export_names_what_a_run_folder_lacks(tmp_path, tokenizer_file, capsys):
    """`mmid export` on a run folder without its tokenizer or its weights: one line naming
    the file, before any graph is exported."""
    from engine.cli import main

    model = _model("mme2e", 3)
    save_checkpoint(tmp_path / "run", model, RunMeta(model.dims, tuple("abcd"), FeatureParams()), tokenizer_file)
    for lost in ("tokenizer.json", "model.safetensors"):
        run = tmp_path / f"without-{lost}"
        shutil.copytree(tmp_path / "run", run)
        (run / lost).unlink()
        assert main(["export", "--run", str(run), "--out", str(tmp_path / "engine")]) == 1
        assert f"{lost} is missing" in capsys.readouterr().err
        assert not (tmp_path / "engine").exists()


def test_bench_refuses_what_it_cannot_time(engines, tmp_path, capsys):
    """`mmid bench`: an unknown backend name and a --corpus without videos end the run with
    one line saying so, instead of timing nothing or other frames."""
    from engine.cli import main

    _, folder = engines["mme2e"]
    assert main(["bench", "--engine", str(folder), "--backends", "onnx,onnx-fast", "--no-write"]) == 2
    assert "unknown backend(s) onnx-fast" in capsys.readouterr().err
    assert main(["bench", "--engine", str(folder), "--backends", "onnx", "--batches", "1", "--iters", "1",
                 "--corpus", str(tmp_path), "--no-write"]) == 1
    assert "no .avi videos" in capsys.readouterr().err
