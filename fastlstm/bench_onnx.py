"""ONNX Runtime as a rival in ``fastlstm bench``: its LSTM and GRU operators (the CPU
inference code many deployments use), on a model built with ``onnx.helper`` from a fastlstm
layer's weights, so that it computes what the layer computes.

Needs ``onnx`` and ``onnxruntime`` (``pip install 'fastlstm[onnx]'``); inference only. Its
thread pool is held to fastlstm's thread count, and does not spin while it waits (it would
take a core from whatever runs next: the bench times runners one after another).
"""

from __future__ import annotations

import numpy as np

from . import threads
from ._arrays import module_available

RUNNER = "onnxruntime"
OPSET = 17
# ONNX orders the gate blocks i, o, f, c (LSTM) and z, r, h (GRU); torch i, f, g, o and r, z, n.
_TORCH_BLOCKS = {"lstm": (0, 3, 1, 2), "gru": (1, 0, 2)}


def available() -> bool:
    return module_available("onnx") and module_available("onnxruntime")


def _onnx_blocks(array: np.ndarray, cell: str) -> np.ndarray:
    """Rows (or entries) of a torch-ordered weight or bias in ONNX's gate order."""
    blocks = np.split(array, len(_TORCH_BLOCKS[cell]))
    return np.concatenate([blocks[k] for k in _TORCH_BLOCKS[cell]])


def build_model(layer, with_state: bool):
    """An ONNX model of `layer` (a fastlstm LSTM or GRU, not batch_first): input ``x`` (T, B, I)
    -> output ``y`` (T, B, D*H); with `with_state`, also inputs ``h0_{l}`` (and ``c0_{l}``) and
    outputs ``hn_{l}`` (and ``cn_{l}``), each (D, B, H), per layer l."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    cell = layer._spec.cell.name
    params = layer.state_dict()
    directions = layer.num_directions
    hidden = layer.hidden_size
    dtype = TensorProto.FLOAT if layer.dtype == np.float32 else TensorProto.DOUBLE
    nodes, initializers = [], []
    inputs = [helper.make_tensor_value_info("x", dtype, ["T", "B", layer.input_size])]
    outputs = []
    layer_input = "x"
    for k in range(layer.num_layers):
        weights = {"W": [], "R": [], "B": []}
        for d in range(directions):
            names = layer._spec.names(k, d)
            weights["W"].append(_onnx_blocks(params[names[0]], cell))
            weights["R"].append(_onnx_blocks(params[names[1]], cell))
            if layer.bias:
                weights["B"].append(np.concatenate([_onnx_blocks(params[names[2]], cell),
                                                    _onnx_blocks(params[names[3]], cell)]))
            else:
                weights["B"].append(np.zeros(2 * layer._spec.cell.gates * hidden, layer.dtype))
        for role, values in weights.items():
            initializers.append(numpy_helper.from_array(np.stack(values), f"{role}_{k}"))
        state_in = [f"h0_{k}", f"c0_{k}"][: len(layer._spec.cell.state_parts)] if with_state else []
        state_out = [f"hn_{k}", f"cn_{k}"][: len(layer._spec.cell.state_parts)] if with_state else []
        for name in state_in:
            inputs.append(helper.make_tensor_value_info(name, dtype, [directions, "B", hidden]))
        for name in state_out:
            outputs.append(helper.make_tensor_value_info(name, dtype, [directions, "B", hidden]))
        # inputs: X, W, R, B, sequence_lens (none), initial_h, initial_c
        node_inputs = [layer_input, f"W_{k}", f"R_{k}", f"B_{k}", ""] + state_in
        attributes = {"hidden_size": hidden, "direction": "bidirectional" if directions == 2 else "forward"}
        if cell == "gru":
            attributes["linear_before_reset"] = int(layer.reset_after)
        nodes.append(helper.make_node(cell.upper(), node_inputs, [f"y4_{k}"] + state_out, **attributes))
        # Y is (T, D, B, H): to (T, B, D*H), the next layer's input
        nodes.append(helper.make_node("Transpose", [f"y4_{k}"], [f"yt_{k}"], perm=[0, 2, 1, 3]))
        initializers.append(numpy_helper.from_array(np.array([0, 0, directions * hidden], np.int64), f"shape_{k}"))
        layer_input = "y" if k == layer.num_layers - 1 else f"y_{k}"
        nodes.append(helper.make_node("Reshape", [f"yt_{k}", f"shape_{k}"], [layer_input]))
    outputs.insert(0, helper.make_tensor_value_info("y", dtype, ["T", "B", directions * hidden]))
    graph = helper.make_graph(nodes, f"fastlstm_{cell}", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model)
    return model


def session(model):
    """An inference session on the CPU, on fastlstm's thread count, its threads not spinning."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads.get_num_threads()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def sequence_call(layer, x: np.ndarray):
    """A no-argument callable: the whole sequence x (T, B, I) through ONNX Runtime."""
    run = session(build_model(layer, with_state=False)).run
    feeds = {"x": x}
    return lambda: run(["y"], feeds)


def stream_call(layer, x: np.ndarray):
    """A no-argument callable: x (T, B, I) one step per ``run``, the state fed back each time."""
    sess = session(build_model(layer, with_state=True))
    parts = len(layer._spec.cell.state_parts)
    state_names = [f"{p}0_{k}" for k in range(layer.num_layers) for p in "hc"[:parts]]
    out_names = ["y"] + [f"{p}n_{k}" for k in range(layer.num_layers) for p in "hc"[:parts]]
    zeros = np.zeros((layer.num_directions, x.shape[1], layer.hidden_size), layer.dtype)
    steps = [x[t : t + 1] for t in range(x.shape[0])]

    def call():
        state = [zeros] * len(state_names)
        for x_t in steps:
            results = sess.run(out_names, {"x": x_t, **dict(zip(state_names, state))})
            state = results[1:]
    return call
