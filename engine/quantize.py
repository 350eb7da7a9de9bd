"""int8 graphs of an engine folder (`mmid export --int8`), and the check that they may serve.

Two kinds, by what runs fastest on the CPU (measured, BENCHMARKS.md):
- ``model.int8.onnx``, and the text encoder's ``text.int8.onnx`` for the cached
  backend: dynamic int8 MatMul/Gemm weights (activations quantised at run time).
  ALBERT shares one set of layer weights across its layers, and the exporter hands
  each use a ``Transpose`` of the shared initializer; the quantizer only takes a
  MatMul whose weight is an initializer itself, so those transposes are folded into
  initializers first (``fold_weight_transposes``: without it, one MatMul of the
  text encoder's 85 was quantised);
- dense model, ``visual_cnn.int8.onnx`` and ``audio_cnn.int8.onnx``: the per-frame
  CNN graphs with static int8 convolutions (QDQ format: per-channel int8 weights,
  uint8 activations whose ranges come from calibration inputs), served with
  ``head.onnx`` in fp32 by the cached backend; sparse model, the same for its
  low-level graphs and its sparse-stage graphs (their gathered convolutions and
  pooling; the attention's elementwise work stays fp32), which the export then
  makes exchange the maps as uint8 (``engine.handover``). Static int8 halves the
  CNNs' time here.

Calibration inputs are real model inputs: with ``--data``, face frames and audio
chunks of training-split utterances; without, those of the bench's stream (what
random-weight engines are timed on).

An int8 variant serves only if it names the same top person as the fp32 graphs
on every check window: with ``--data`` the test split (issue 5's rule), without,
random windows. ``engine.json`` records the check (``int8_check``).
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from engine.backends import numpy_inputs
from engine.backends.feature_cache import LOW_OUTPUTS, SPARSE_SPLIT_GRAPHS, SPLIT_GRAPHS
from engine.backends.onnx_backend import EXTERNAL_DATA_BYTES

CNN_GRAPHS = ("visual", "audio", "visual_low", "audio_low")  # the split graphs that go int8
# the CNN and text graphs in int8 beside the fp32 head: visual_cnn.int8.onnx, audio_cnn.int8.onnx, text.int8.onnx, head.onnx
INT8_GRAPHS = CNN_GRAPHS + ("text",)  # text: dynamic int8 (no calibration)
SPLIT_INT8_GRAPHS = {k: v.replace(".onnx", ".int8.onnx") if k in INT8_GRAPHS else v for k, v in SPLIT_GRAPHS.items()}
# sparse: the low-level and sparse-stage graphs in int8 (visual_low.int8.onnx, ..., visual_sparse.int8.onnx, ...)
SPARSE_SPLIT_INT8_GRAPHS = {k: v.replace(".onnx", ".int8.onnx") if k in INT8_GRAPHS else v
                            for k, v in SPARSE_SPLIT_GRAPHS.items()}
# The sparse-stage graphs' ops that go int8: the gathered convolutions (Gather, Concat of the
# zero row, Gemm, Relu), the pooling's gather and max, the projections. The attention's
# elementwise work (keys + query, tanh, the score) stays fp32: quantised, its Q/DQ pairs on
# (N, h*w, A) tensors cost more than the int8 arithmetic saves (BENCHMARKS.md, session 11).
SPARSE_STAGE_INT8_OPS = ("Gemm", "MatMul", "Gather", "Concat", "Relu", "Reshape", "ReduceMax", "Transpose", "Flatten")
CALIBRATION_ITEMS = 256  # frames / chunks per CNN at most
CALIBRATION_BATCH = 32


def fold_weight_transposes(model) -> int:
    """Replace every ``Transpose`` of an initializer in ``model`` (an onnx ModelProto, changed
    in place) by the transposed initializer (one per initializer and permutation, shared by
    its uses); -> how many Transpose nodes went."""
    from onnx import numpy_helper

    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    made: dict[tuple[str, tuple[int, ...]], str] = {}
    renamed: dict[str, str] = {}
    kept = []
    for node in graph.node:
        if node.op_type != "Transpose" or node.input[0] not in initializers:
            kept.append(node)
            continue
        array = numpy_helper.to_array(initializers[node.input[0]])
        perm = next((tuple(a.ints) for a in node.attribute if a.name == "perm"), tuple(reversed(range(array.ndim))))
        key = (node.input[0], perm)
        if key not in made:
            made[key] = f"{node.input[0]}__transposed_{'_'.join(map(str, perm))}"
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array.transpose(perm)), made[key]))
        renamed[node.output[0]] = made[key]
    if renamed.keys() & {o.name for o in graph.output}:
        raise ValueError("fold_weight_transposes: a transposed initializer is a graph output")
    del graph.node[:]
    graph.node.extend(kept)
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = renamed.get(name, name)
    return len(renamed)


def key_projection(path: str | Path, keys: str = "keys", source: str = "low") -> list[str]:
    """Names of the nodes of a sparse low-level ONNX graph between its map output ``source``
    and its attention-keys output ``keys`` (the first sparse stage's channel projection), which
    the int8 low-level graphs keep in fp32: the keys decide which sites the stage keeps, and
    at a budget of a few percent of the sites their quantisation moved trained models' answers."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    made_by = {o: n for n in graph.node for o in n.output}
    names, todo = [], [keys]
    while todo:
        node = made_by.get(todo.pop())
        if node is None or node.name in names:
            continue
        names.append(node.name)
        todo += [i for i in node.input if i != source and i in made_by]
    return names


def attention_scores(path: str | Path) -> list[str]:
    """Names of the nodes of an ONNX graph that take a Tanh's output: the sparse stages'
    attention scores (v . tanh(...)), kept fp32."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    tanh = {o for node in graph.node if node.op_type == "Tanh" for o in node.output}
    return [node.name for node in graph.node if tanh.intersection(node.input)]


def quantize_dynamic_int8(src: str | Path, dst: str | Path) -> Path:
    """Dynamic int8 quantisation of the MatMul/Gemm weights (activations quantised at run
    time), after ``fold_weight_transposes`` so that shared, transposed weights count too.
    Weights per output channel: on the trained default preset's MiniLM the text CLS kept a
    cosine of 0.977-0.989 to fp32 over the bench transcripts (0.900-0.934 per tensor), at
    the same speed."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(src))
    fold_weight_transposes(model)
    large = model.ByteSize() > EXTERNAL_DATA_BYTES  # as export_onnx: weights beside the graph
    with tempfile.TemporaryDirectory() as tmp:
        folded = Path(tmp) / "folded.onnx"
        onnx.save(model, str(folded), save_as_external_data=large)
        quantize_dynamic(str(folded), str(dst), op_types_to_quantize=["MatMul", "Gemm"], weight_type=QuantType.QInt8,
                         per_channel=True, use_external_data_format=large)
    return Path(dst)


def quantize_static_int8(src: str | Path, dst: str | Path, items: np.ndarray | list[dict[str, np.ndarray]],
                         symbolic_shapes: bool = True, op_types: Sequence[str] | None = None,
                         exclude: Sequence[str] = ()) -> Path:
    """Static QDQ int8 of a CNN graph: per-channel int8 weights, uint8 activations calibrated
    (min/max) on ``items``: for a one-input graph its inputs (N, ...) float32, else a list
    of feed dicts. ``symbolic_shapes`` False: ONNX shape inference only (ONNX Runtime's
    symbolic inference fails on the sparse stages' data-dependent shapes)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    import onnx

    if isinstance(items, np.ndarray):
        name = onnx.load(str(src), load_external_data=False).graph.input[0].name
        items = [{name: np.ascontiguousarray(items[i: i + CALIBRATION_BATCH], dtype=np.float32)}
                 for i in range(0, len(items), CALIBRATION_BATCH)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter(items)

        def get_next(self) -> dict | None:
            return next(self.feeds, None)

    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
        pre = Path(tmp) / "pre.onnx"
        # shape inference + graph clean-up, as the quantizer expects
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=not symbolic_shapes)
        quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=list(op_types) if op_types else None, nodes_to_exclude=list(exclude))
    return Path(dst)


def write_split_int8(folder: str | Path, faces: np.ndarray, audio: np.ndarray) -> dict[str, str]:
    """Static int8 CNN graphs beside a dense engine folder's split graphs, calibrated on face
    frames (N, 3, S, S) and audio chunks (M, 1, n_mels, frames), and the dynamic int8 text
    graph; -> SPLIT_INT8_GRAPHS."""
    folder = Path(folder)
    if not len(faces) or not len(audio):
        raise ValueError("int8 calibration needs at least one face frame and one audio chunk")
    for modality, items in (("visual", faces), ("audio", audio)):
        quantize_static_int8(folder / SPLIT_GRAPHS[modality], folder / SPLIT_INT8_GRAPHS[modality],
                             items[:CALIBRATION_ITEMS])
    quantize_dynamic_int8(folder / SPLIT_GRAPHS["text"], folder / SPLIT_INT8_GRAPHS["text"])
    return dict(SPLIT_INT8_GRAPHS)


def write_sparse_split_int8(folder: str | Path, batches: Sequence) -> dict[str, str]:
    """Static int8 low-level and sparse-stage graphs beside a sparse engine folder's split
    graphs, calibrated on the inputs they get from calibration Batches: the frames and
    chunks for the low-level graphs, and for the sparse stages their fp32 low-level maps
    and keys with the text CLS of their window; and the dynamic int8 text graph;
    -> SPARSE_SPLIT_INT8_GRAPHS."""
    from engine.backends.feature_cache import CachedOnnxBackend

    folder = Path(folder)
    fp32 = CachedOnnxBackend(folder, SPARSE_SPLIT_GRAPHS, capacity=1)
    feeds: dict[str, list[dict[str, np.ndarray]]] = {k: [] for k in ("visual", "audio", "visual_low", "audio_low")}
    enough = max(1, CALIBRATION_ITEMS // CALIBRATION_BATCH)  # calibration calls per graph
    for batch in batches:
        x = numpy_inputs(batch)
        text_cls, present, _ = fp32.text_rows(x["text"], x["text_mask"], [""] * len(x["text"]))
        for modality, items, mask in (("visual", x["faces"], x["face_mask"]), ("audio", x["audio"], x["audio_mask"])):
            b, f = np.nonzero(mask)
            for i in range(0, len(b), CALIBRATION_BATCH):
                if len(feeds[modality]) >= enough:
                    break
                rows = slice(i, i + CALIBRATION_BATCH)
                session = fp32.sessions[f"{modality}_low"]
                inputs = {session.get_inputs()[0].name: np.ascontiguousarray(items[b[rows], f[rows]])}
                feeds[f"{modality}_low"].append(inputs)
                low = dict(zip(LOW_OUTPUTS, session.run(None, inputs)))  # the low-level map and keys
                feeds[modality].append({**low, "text_cls": text_cls[b[rows]], "text_present": present[b[rows]]})
    for key, items in feeds.items():
        if not items:
            raise ValueError("int8 calibration needs at least one face frame and one audio chunk")
        src = folder / SPARSE_SPLIT_GRAPHS[key]
        if key.endswith("_low"):
            quantize_static_int8(src, folder / SPARSE_SPLIT_INT8_GRAPHS[key], items, exclude=key_projection(src))
        else:
            quantize_static_int8(src, folder / SPARSE_SPLIT_INT8_GRAPHS[key], items, symbolic_shapes=False,
                                 op_types=SPARSE_STAGE_INT8_OPS, exclude=attention_scores(src))
    quantize_dynamic_int8(folder / SPARSE_SPLIT_GRAPHS["text"], folder / SPARSE_SPLIT_INT8_GRAPHS["text"])
    return dict(SPARSE_SPLIT_INT8_GRAPHS)


def calibration_items(batches: Iterable) -> tuple[np.ndarray, np.ndarray]:
    """The real face frames (N, 3, S, S) and audio chunks (M, 1, n_mels, frames) of Batches,
    spread over them: every k-th item so that at most CALIBRATION_ITEMS of each are kept."""
    faces, audio = [], []
    for b in batches:
        faces.append(b.faces[b.face_mask].numpy())
        audio.append(b.audio[b.audio_mask].numpy())
    f, a = np.concatenate(faces), np.concatenate(audio)
    return f[:: max(1, len(f) // CALIBRATION_ITEMS)], a[:: max(1, len(a) // CALIBRATION_ITEMS)]


def fused_logits(backend, batches: Iterable) -> np.ndarray:
    """A backend's fused logits (N, persons) over Batches, in order."""
    return np.concatenate([backend.run(b)["logits"] for b in batches])


def compare(reference: np.ndarray, other: np.ndarray, labels: Sequence[int] | None = None) -> dict[str, float]:
    """Two backends' fused logits on the same windows: fraction with the same top person, the
    largest absolute difference of their fused probabilities, and with labels both accuracies."""
    out = {"windows": len(reference), "top1_agreement": float(np.mean(reference.argmax(1) == other.argmax(1))),
           "max_prob_diff": round(float(np.abs(_softmax(reference) - _softmax(other)).max()), 5)}
    if labels is not None:
        y = np.asarray(labels)
        out["accuracy_fp32"] = round(float(np.mean(reference.argmax(1) == y)), 4)
        out["accuracy_int8"] = round(float(np.mean(other.argmax(1) == y)), 4)
    return out


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)
