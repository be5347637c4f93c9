"""The ONNX Runtime rival of ``fastlstm bench``: its model computes what the fastlstm layer does."""

from __future__ import annotations

import numpy as np
import pytest

import fastlstm
from fastlstm import bench_onnx

pytestmark = pytest.mark.skipif(not bench_onnx.available(),
                                reason="onnx and onnxruntime not installed (pip install 'fastlstm[onnx]')")


@pytest.mark.parametrize("layers, bidirectional, bias", [(1, False, True), (3, True, True), (2, False, False)])
@pytest.mark.parametrize("cell", ["lstm", "gru", "gru-cho"])
def test_the_onnx_model_computes_the_layer(cell, layers, bidirectional, bias):
    make = {"lstm": fastlstm.LSTM, "gru": fastlstm.GRU,
            "gru-cho": lambda *a, **k: fastlstm.GRU(*a, reset_after=False, **k)}
    layer = make[cell](7, 5, num_layers=layers, bidirectional=bidirectional, bias=bias, backend="numpy",
                       seed=2).eval()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 3, 7)).astype(np.float32)
    state = tuple(rng.standard_normal((layers * layer.num_directions, 3, 5)).astype(np.float32)
                  for _ in layer._spec.cell.state_parts)
    y, state_n = layer(x, state if cell == "lstm" else state[0])
    session = bench_onnx.session(bench_onnx.build_model(layer, with_state=True))
    feeds = {"x": x}
    d = layer.num_directions
    for k in range(layers):
        for part, name in zip(state, "hc"):
            feeds[f"{name}0_{k}"] = np.ascontiguousarray(part[k * d : (k + 1) * d])
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    np.testing.assert_allclose(outputs["y"], y, atol=1e-6)
    finals = state_n if cell == "lstm" else (state_n,)
    for k in range(layers):
        for part, name in zip(finals, "hc"):
            np.testing.assert_allclose(outputs[f"{name}n_{k}"], part[k * d : (k + 1) * d], atol=1e-6)


def test_the_stream_call_runs_every_step():
    layer = fastlstm.LSTM(3, 4, backend="numpy").eval()
    call = bench_onnx.stream_call(layer, np.ones((5, 2, 3), np.float32))
    call()  # five runs, the state fed back: no error, nothing returned
    bench_onnx.sequence_call(layer, np.ones((5, 2, 3), np.float32))()
