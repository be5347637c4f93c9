"""fastlstm.torch.LSTM on CUDA tensors (the cupy backend) against torch.nn.LSTM (cuDNN): parity,
torch's stream and allocator, compile and autocast. Marked ``gpu``; skips without a usable GPU
(CuPy) and a CUDA build of torch. Run on a GPU by bench/gpu_check.sh."""

from __future__ import annotations

import itertools

import pytest

import fastlstm
from lstm_testing import assert_close, assert_compiled_matches_eager

STATUS = fastlstm.available_backends()["cupy"]
torch = pytest.importorskip("torch", reason="PyTorch is not installed")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not STATUS.available, reason=f"no usable GPU: {STATUS.reason}"),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device"),
]
ft = pytest.importorskip("fastlstm.torch")
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence  # noqa: E402

TOL = {"float32": 2e-5, "float64": 1e-10}  # two float32 implementations: see test_gpu.TOL_VS_CUDNN


@pytest.fixture(autouse=True)
def ieee_cudnn():
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


def run(module, x, state, lengths, dy, dstate, batch_first):
    x = x.clone().requires_grad_(True)
    state = tuple(s.clone().requires_grad_(True) for s in state)
    module.zero_grad()
    if lengths is None:
        y, (h, c) = module(x, state)
    else:
        packed = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
        out, (h, c) = module(packed, state)
        y, _ = pad_packed_sequence(out, batch_first=batch_first, total_length=x.shape[1 if batch_first else 0])
    ((y * dy).sum() + (h * dstate[0]).sum() + (c * dstate[1]).sum()).backward()
    results = {"y": y, "h_n": h, "c_n": c, "dx": x.grad, "dh0": state[0].grad, "dc0": state[1].grad}
    results.update({n: p.grad for n, p in module.named_parameters()})
    assert all(v.is_cuda for v in results.values())
    return {k: v.detach().cpu().numpy() for k, v in results.items()}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("layers, bidirectional, batch_first, packed",
                         list(itertools.product((1, 2), (False, True), (False, True), (False, True))))
def test_matches_cudnn(layers, bidirectional, batch_first, packed, dtype):
    tt = getattr(torch, dtype)
    torch.manual_seed(0)
    reference = torch.nn.LSTM(6, 40, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first,
                              device="cuda", dtype=tt)
    module = ft.LSTM.from_torch(reference)
    assert ft.ops.resolve_backend("", torch.device("cuda")).name == "cupy"
    g = torch.Generator(device="cuda").manual_seed(1)
    d = layers * (2 if bidirectional else 1)
    shape = (5, 9, 6) if batch_first else (9, 5, 6)
    x = torch.randn(shape, generator=g, device="cuda", dtype=tt)
    state = tuple(torch.randn((d, 5, 40), generator=g, device="cuda", dtype=tt) for _ in range(2))
    dy = torch.randn(shape[:2] + (40 * (2 if bidirectional else 1),), generator=g, device="cuda", dtype=tt)
    dstate = tuple(torch.randn((d, 5, 40), generator=g, device="cuda", dtype=tt) for _ in range(2))
    lengths = torch.tensor([9, 3, 7, 1, 9]) if packed else None
    expected = run(reference, x, state, lengths, dy, dstate, batch_first)
    actual = run(module, x, state, lengths, dy, dstate, batch_first)
    for name in expected:
        assert_close(actual[name], expected[name], TOL[dtype], name)


def test_runs_on_torchs_current_stream_with_torchs_allocator():
    import cupy

    torch.manual_seed(0)
    reference = torch.nn.LSTM(16, 64, num_layers=2, device="cuda")
    module = ft.LSTM.from_torch(reference)
    x = torch.randn(20, 8, 16, device="cuda")
    expected, _ = reference(x)
    pool = cupy.get_default_memory_pool()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    before_cupy = pool.used_bytes()
    with torch.cuda.stream(side):
        before_torch = torch.cuda.memory_allocated()
        y, _ = module(x)  # keeps a record: its activations stay allocated
        held = torch.cuda.memory_allocated() - before_torch
        loss = y.square().sum()
    torch.cuda.current_stream().wait_stream(side)
    assert held > 20 * 8 * 64 * 4 * 4  # more than y: the record's buffers are torch's
    assert pool.used_bytes() == before_cupy  # nothing held in CuPy's own pool
    torch.testing.assert_close(y, expected, rtol=2e-5, atol=2e-6)
    loss.backward()
    del y, loss
    torch.cuda.synchronize()


def test_compile_fullgraph_on_cuda_equals_eager():
    torch.manual_seed(0)
    module = ft.LSTM(8, 32, num_layers=2, bidirectional=True, device="cuda")
    x = torch.randn(10, 4, 8, device="cuda")

    def loss(x):
        y, (h, c) = module(x)
        return y.square().sum() + h.sum()

    assert_compiled_matches_eager(loss, (x,), list(module.parameters()))


def test_cuda_autocast_runs_in_float32():
    module = ft.LSTM(8, 32, device="cuda")
    x = torch.randn(10, 4, 8, device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        lowered = torch.nn.Linear(8, 8, device="cuda")(x)
        assert lowered.dtype == torch.float16
        y, (h, c) = module(lowered)
    assert y.dtype == torch.float32 and y.is_cuda
    y.sum().backward()
    assert module.weight_hh_l0.grad.dtype == torch.float32


def test_training_step_matches_cudnn():
    torch.manual_seed(0)
    reference = torch.nn.LSTM(8, 32, num_layers=2, device="cuda", dtype=torch.float64)
    losses = []
    for lstm in (ft.LSTM.from_torch(reference), reference):
        torch.manual_seed(1)
        head = torch.nn.Linear(32, 5, device="cuda", dtype=torch.float64)
        optimizer = torch.optim.Adam(list(lstm.parameters()) + list(head.parameters()), lr=0.05)
        g = torch.Generator(device="cuda").manual_seed(2)
        curve = []
        for _ in range(10):
            x = torch.randn(12, 4, 8, generator=g, device="cuda", dtype=torch.float64)
            target = x.cumsum(0)[..., :5].argmax(-1)
            y, _ = lstm(x)
            loss = torch.nn.functional.cross_entropy(head(y).reshape(-1, 5), target.reshape(-1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            curve.append(loss.item())
        losses.append(curve)  # from_torch copied the weights: the reference starts untrained
    assert losses[0] == pytest.approx(losses[1], rel=1e-9)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("packed", [False, True])
def test_gru_matches_cudnn(packed, dtype):
    tt = getattr(torch, dtype)
    torch.manual_seed(0)
    reference = torch.nn.GRU(6, 40, num_layers=2, bidirectional=True, device="cuda", dtype=tt)
    module = ft.GRU.from_torch(reference)
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn((9, 5, 6), generator=g, device="cuda", dtype=tt)
    h0 = torch.randn((4, 5, 40), generator=g, device="cuda", dtype=tt)
    dy = torch.randn((9, 5, 80), generator=g, device="cuda", dtype=tt)
    dh = torch.randn((4, 5, 40), generator=g, device="cuda", dtype=tt)
    lengths = torch.tensor([9, 3, 7, 1, 9]) if packed else None
    results = []
    for layer in (reference, module):
        layer.zero_grad()
        xi, hi = x.clone().requires_grad_(True), h0.clone().requires_grad_(True)
        if lengths is None:
            y, h = layer(xi, hi)
        else:
            out, h = layer(pack_padded_sequence(xi, lengths, enforce_sorted=False), hi)
            y, _ = pad_packed_sequence(out, total_length=9)
        ((y * dy).sum() + (h * dh).sum()).backward()
        results.append([y, h, xi.grad, hi.grad] + [p.grad for p in layer.parameters()])
    for expected, actual in zip(*results):
        assert actual.is_cuda
        assert_close(actual.detach().cpu().numpy(), expected.detach().cpu().numpy(), TOL[dtype])
