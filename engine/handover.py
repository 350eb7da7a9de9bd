"""uint8 hand-over between the sparse model's static int8 graphs.

Quantised, a low-level graph (``visual_low.int8.onnx``, ``audio_low.int8.onnx``) ends
its map output with a ``DequantizeLinear``: uint8 values on a grid (scale s, zero point
z) turned into float32 (its other output, the first sparse stage's attention keys, is
computed in fp32: ``engine.quantize.key_projection``). The sparse-stage graph then
gathers the kept sites' rows of the map in float32 and quantises them again, and the
cached backend keeps the float32 maps between windows (paper sizes: 144 KB a face and
256 KB an audio chunk all-sparse, 72 and 128 KB with a dense first stage).

``hand_over_uint8`` moves the dequantisation across the boundary: the low-level graph
returns the uint8 map itself, and the sparse-stage graph takes it with the
same (s, z), so each float value it sees is the one the low-level graph would have
returned. Where the stage graph only reshapes and gathers a map before quantising it
again (the map's rows for the first stage), those run on the uint8 values, and the
requantisation goes: the rows reach their consumers dequantised with (s, z), the exact
values, where they were requantised on a grid calibrated for the rows alone. Elsewhere
(an output that enters float32 work) a ``DequantizeLinear`` at the input gives the same
float32 tensor as before. The maps kept between windows are 4x smaller, and the
low-level graph skips its output dequantisation (BENCHMARKS.md, session 16).

Graphs that do not end their outputs in a ``DequantizeLinear`` (the float32 graphs, an
export from before) are left as they are; the cached backend passes whatever dtype a
low-level graph returns to the stage graph.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

HANDED_OVER = ("low",)  # the low-level graphs' uint8 outputs (the keys stay float32)
# ops that a uint8 map may pass through unchanged before its requantisation (they move values)
MOVES = ("Reshape", "Gather", "Transpose", "Squeeze", "Unsqueeze", "Flatten")


def hand_over_uint8(low_path: str | Path, stage_path: str | Path, names: Sequence[str]) -> dict[str, dict]:
    """Rewrite the int8 low-level graph ``low_path`` to return ``names`` (its outputs) as uint8,
    and the int8 stage graph ``stage_path`` to take them so (both files changed in place);
    -> {name: {"scale": s, "zero_point": z, "requantised": whether the stage graph's
    requantisation of it went}}, or {} where the low-level graph's outputs are not
    dequantised uint8 (nothing is changed then)."""
    import onnx
    from onnx import TensorProto, numpy_helper

    low, stage = onnx.load(str(low_path)), onnx.load(str(stage_path))
    grids = {}  # output name -> the low-level graph's DequantizeLinear that makes it (uint8 in, scale, zero point)
    inits = {i.name: i for i in low.graph.initializer}
    for name in names:
        node = _producer(low.graph, name)
        if node is None or node.op_type != "DequantizeLinear" or node.input[1] not in inits or len(node.input) < 3 \
                or node.input[2] not in inits or inits[node.input[2]].data_type != TensorProto.UINT8:
            return {}
        grids[name] = node
    if set(names) - {i.name for i in stage.graph.input}:
        return {}
    arrays = {name: [numpy_helper.to_array(inits[t]) for t in dq.input[1:3]] for name, dq in grids.items()}
    if any(scale.size != 1 for scale, _ in arrays.values()):  # per-tensor activations only (per-channel: weights)
        return {}
    out = {name: {"scale": float(scale.reshape(())), "zero_point": int(zero.reshape(()))}
           for name, (scale, zero) in arrays.items()}
    for graph in (low.graph, stage.graph):  # element types change: ONNX Runtime infers the shapes again
        del graph.value_info[:]
    for name, dq in grids.items():
        _return_uint8(low.graph, name, dq)
        s_name, z_name = f"{name}_handover_scale", f"{name}_handover_zero_point"
        scale, zero = arrays[name]
        stage.graph.initializer.extend([numpy_helper.from_array(scale, s_name), numpy_helper.from_array(zero, z_name)])
        for value in stage.graph.input:
            if value.name == name:
                value.type.tensor_type.elem_type = TensorProto.UINT8
        out[name]["requantised"] = _take_uint8(stage.graph, name, s_name, z_name)
    onnx.save(low, str(low_path))
    onnx.save(stage, str(stage_path))
    return out


def hand_over_split_int8(folder: str | Path, graphs: dict[str, str]) -> dict[str, dict]:
    """``hand_over_uint8`` for each modality's int8 low-level and sparse-stage graphs in
    ``folder`` (``graphs``: the split int8 graph files by key) -> what it did, by modality."""
    folder = Path(folder)
    return {m: hand_over_uint8(folder / graphs[f"{m}_low"], folder / graphs[m], HANDED_OVER) for m in ("visual", "audio")}


def _producer(graph, tensor: str):
    return next((n for n in graph.node if tensor in n.output), None)


def _consumers(graph, tensor: str) -> list:
    return [n for n in graph.node if tensor in n.input]


def _rename_input(node, old: str, new: str) -> None:
    for i, name in enumerate(node.input):
        if name == old:
            node.input[i] = new


def _return_uint8(graph, name: str, dq) -> None:
    """The graph output ``name`` becomes the uint8 input of its ``DequantizeLinear`` ``dq``; the
    float32 value stays inside the graph under another name for any other consumer of it."""
    from onnx import TensorProto

    inner = f"{name}_dequantized"
    for node in _consumers(graph, name):
        _rename_input(node, name, inner)
    dq.output[0] = inner
    grid = dq.input[0]
    for node in graph.node:  # the uint8 tensor takes the output's name
        _rename_input(node, grid, name)
        for i, o in enumerate(node.output):
            if o == grid:
                node.output[i] = name
    if not _consumers(graph, inner):
        graph.node.remove(dq)
    for value in graph.output:
        if value.name == name:
            value.type.tensor_type.elem_type = TensorProto.UINT8


def _take_uint8(graph, name: str, s_name: str, z_name: str) -> bool:
    """Make the graph's float32 input ``name`` (now uint8) usable: where it only passes through
    value-moving ops (``MOVES``, one consumer each) to a ``QuantizeLinear``, run those on the
    uint8 values and hand their result to the quantisation's consumers with (s, z) (-> True);
    else dequantise it at the input (-> False)."""
    from onnx import helper

    chain, tensor = [], name
    while True:
        users = _consumers(graph, tensor)
        if len(users) != 1 or tensor in {o.name for o in graph.output}:
            break
        node = users[0]
        if node.op_type == "QuantizeLinear" and node.input[0] == tensor and chain:
            targets = _consumers(graph, node.output[0])
            if targets and all(t.op_type == "DequantizeLinear" and t.input[0] == node.output[0] for t in targets) \
                    and node.output[0] not in {o.name for o in graph.output}:
                moved = f"{tensor}_uint8"
                for n in graph.node:  # the chain's last output is uint8 now: a name of its own
                    for i, o in enumerate(n.output):
                        if o == tensor:
                            n.output[i] = moved
                for t in targets:
                    t.input[0], t.input[1] = moved, s_name
                    if len(t.input) > 2:
                        t.input[2] = z_name
                    else:
                        t.input.append(z_name)
                graph.node.remove(node)
                used = {i for n in graph.node for i in n.input}
                for init in [i for i in graph.initializer if i.name in node.input[1:] and i.name not in used]:
                    graph.initializer.remove(init)
                return True
            break
        if node.op_type not in MOVES or node.input[0] != tensor:
            break
        chain.append(node)
        tensor = node.output[0]
    inner = f"{name}_dequantized"
    for node in _consumers(graph, name):
        _rename_input(node, name, inner)
    graph.node.insert(0, helper.make_node("DequantizeLinear", [name, s_name, z_name], [inner], name=f"{name}_handover"))
    return False
