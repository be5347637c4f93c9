"""Per-call records: vjp and its pullbacks, backward as the calling thread's last forward,
and several threads on one layer."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import fastlstm
from lstm_testing import ALL_CPU_BACKENDS, assert_close, snapshot, assert_unchanged


@pytest.fixture(params=ALL_CPU_BACKENDS)
def backend(request):
    return request.param


def problem(seed, num_steps=6, batch=3, input_size=4, hidden=5, layers=2):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num_steps, batch, input_size))
    dy = rng.standard_normal((num_steps, batch, 2 * hidden))
    dh = rng.standard_normal((2 * layers, batch, hidden))
    return x, dy, dh


def make_layer(backend, **kwargs):
    args = dict(num_layers=2, bidirectional=True, dtype="float64", seed=0, backend=backend) | kwargs
    return fastlstm.LSTM(4, 5, **args)


def grads_of_one_call(layer, x, dy, dh):
    """dx and parameter gradients of one forward + backward on a fresh copy of `layer`."""
    fresh = make_layer(layer._backend_choice, dropout=layer.dropout)
    fresh.load_state_dict(layer.state_dict())
    y, _ = fresh(x)
    dx, _ = fresh.backward(dy, (dh, None))
    return y, dx, {k: np.array(v) for k, v in fresh.grads.items()}


def test_vjp_matches_forward_and_backward(backend):
    layer = make_layer(backend)
    x, dy, dh = problem(0)
    y, (h_n, c_n), pullback = layer.vjp(x)
    y_ref, dx_ref, grads_ref = grads_of_one_call(layer, x, dy, dh)
    np.testing.assert_array_equal(y, y_ref)
    dx, (dh0, dc0) = pullback(dy, (dh, None))
    np.testing.assert_array_equal(dx, dx_ref)
    for name, grad in layer.grads.items():
        np.testing.assert_array_equal(grad, grads_ref[name], err_msg=name)


def test_several_pullbacks_alive_in_any_order(backend):
    layer = make_layer(backend)
    problems = [problem(seed) for seed in range(3)]
    calls = [layer.vjp(x) for x, _, _ in problems]
    expected = {name: 0 for name in layer.grads}
    for order in (2, 0, 1):
        x, dy, dh = problems[order]
        _, dx_ref, grads_ref = grads_of_one_call(layer, x, dy, dh)
        dx, _ = calls[order][2](dy, (dh, None))
        assert_close(dx, dx_ref, 1e-12, f"dx of call {order}")
        expected = {name: expected[name] + grads_ref[name] for name in expected}
    for name, grad in layer.grads.items():
        assert_close(grad, expected[name], 1e-12, name)


def test_a_pullback_runs_once_and_bad_input_changes_nothing(backend):
    layer = make_layer(backend)
    x, dy, dh = problem(0)
    _, _, pullback = layer.vjp(x)
    before = snapshot(layer)
    with pytest.raises(ValueError, match="dy: expected the shape"):
        pullback(dy[:, :1])
    assert_unchanged(layer, before)
    assert not pullback.used
    pullback(dy)
    assert pullback.used
    with pytest.raises(RuntimeError, match="already differentiated.*called once"):
        pullback(dy)


def test_vjp_leaves_this_threads_backward_alone(backend):
    layer = make_layer(backend)
    x, dy, dh = problem(0)
    x2, dy2, _ = problem(1)
    layer(x)
    _, _, pullback = layer.vjp(x2)
    dx, _ = layer.backward(dy)  # differentiates the plain forward, not the vjp
    _, dx_ref, _ = grads_of_one_call(layer, x, dy, np.zeros_like(dh))
    assert_close(dx, dx_ref, 1e-12, "dx")
    pullback(dy2)
    with pytest.raises(RuntimeError, match="no training forward"):
        layer.backward(dy)


def test_eval_vjp_is_differentiable_without_dropout(backend):
    layer = make_layer(backend, dropout=0.5).eval()
    x, dy, _ = problem(0)
    y1, _, pullback = layer.vjp(x)
    y2, _ = layer(x)
    np.testing.assert_array_equal(y1, y2)  # no dropout in eval
    with pytest.raises(RuntimeError, match="no training forward"):
        layer.backward(dy)  # eval forwards keep nothing...
    pullback(dy)  # ...but a vjp keeps its record in either mode
    assert any(np.any(g) for g in layer.grads.values())


def test_backward_belongs_to_the_thread_that_ran_the_forward(backend):
    layer = make_layer(backend)
    x, dy, dh = problem(0)
    layer(x)
    errors = []

    def other_thread():
        try:
            layer.backward(dy)
        except RuntimeError as exc:
            errors.append(exc)

    t = threading.Thread(target=other_thread)
    t.start()
    t.join()
    assert errors and "same thread" in str(errors[0])
    layer.backward(dy)  # still there for this thread


def test_two_threads_vjp_on_one_layer_at_once(backend):
    """Each thread gets its own results; grads ends as the exact sum of every pullback."""
    layer = make_layer(backend, dropout=0.0)
    problems = [problem(seed) for seed in range(2)]
    references = [grads_of_one_call(layer, *p) for p in problems]
    rounds = 6
    barrier = threading.Barrier(2)
    results = [[], []]
    failures = []

    def work(i):
        try:
            x, dy, dh = problems[i]
            for _ in range(rounds):
                barrier.wait()
                y, _, pullback = layer.vjp(x)
                dx, _ = pullback(dy, (dh, None))
                results[i].append((y, dx))
        except Exception as exc:  # noqa: BLE001 - reported below
            failures.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    for i, (y_ref, dx_ref, _) in enumerate(references):
        for y, dx in results[i]:
            np.testing.assert_array_equal(y, y_ref)
            np.testing.assert_array_equal(dx, dx_ref)
    for name, grad in layer.grads.items():
        total = rounds * (references[0][2][name] + references[1][2][name])
        assert_close(grad, total, 1e-12, name)


def test_grads_accumulate_exactly_under_contention(monkeypatch):
    """The accumulation itself under a lock: many threads adding into one layer."""
    layer = fastlstm.LSTM(2, 3, backend="numpy", dtype="float64", seed=0)
    x = np.random.default_rng(0).standard_normal((3, 2, 2))
    _, _, pullback = layer.vjp(x)
    pullback(np.ones((3, 2, 3)))
    one = {k: np.array(v) for k, v in layer.grads.items()}
    layer.zero_grad()
    pullbacks = [layer.vjp(x)[2] for _ in range(16)]
    threads = [threading.Thread(target=p, args=(np.ones((3, 2, 3)),)) for p in pullbacks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name, grad in layer.grads.items():
        assert_close(grad, 16 * one[name], 1e-12, name)


def test_failed_forward_gives_back_the_dropout_draws(backend, monkeypatch):
    layer = make_layer(backend, dropout=0.5)
    x, _, _ = problem(0)
    state = layer._dropout_rng.bit_generator.state

    def boom(*args, **kwargs):
        raise MemoryError("no room")

    monkeypatch.setattr(fastlstm.stack, "forward", boom)
    with pytest.raises(MemoryError):
        layer(x)
    assert layer._dropout_rng.bit_generator.state == state


def test_copies_and_pickles_keep_weights_grads_and_settings_not_pending_forwards(backend):
    import copy
    import pickle

    layer = make_layer(backend, dropout=0.3)
    x, dy, _ = problem(0)
    y, _ = layer(x)
    layer.backward(dy)
    layer(x)  # pending in this thread
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert clone.backend == layer.backend and repr(clone) == repr(layer)
        for name, value in layer.state_dict().items():
            np.testing.assert_array_equal(clone.state_dict()[name], value)
            np.testing.assert_array_equal(clone.grads[name], layer.grads[name])
            assert clone.params[name] is not layer.params[name]
        with pytest.raises(RuntimeError, match="no training forward"):
            clone.backward(dy)
        clone.eval()
        layer.eval()
        np.testing.assert_array_equal(clone(x)[0], layer(x)[0])
        layer.train()
        _, _, pullback = clone.vjp(x)
        pullback(dy)  # the clone has its own locks and records
