"""The ``fastlstm`` command: ``bench`` (the main job), ``info`` and ``train``.

Exit codes: 0 success, 1 a runtime problem (an unavailable backend, an unreadable
file, a missing optional package), 2 a usage error (argparse).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from . import bench, bench_onnx, registry, threads
from .layer import LAYERS
from ._arrays import module_available


class CommandError(Exception):
    """A problem to report in one line, exit code 1."""


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


# -- bench ----------------------------------------------------------------------------------
def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmark every available backend (and torch) on the design configurations",
                       description="Benchmark fastlstm's backends against each other and torch.nn.LSTM.")
    p.add_argument("--backends", type=_comma_list,
                   help="comma list of numpy,numba,cupy,torch,torch-cuda,torch-cuda-tf32,onnxruntime (default: all "
                        "available); torch-cuda is cuDNN in IEEE float32, torch-cuda-tf32 cuDNN with TF32 (torch's "
                        "default); onnxruntime (inference only) needs pip install 'fastlstm[onnx]'")
    p.add_argument("--configs", type=_comma_list,
                   help=f"comma list of {','.join(bench.CONFIGS)} (default) or {','.join(bench.EXTRA_CONFIGS)}")
    p.add_argument("--T", type=_positive, help="custom configuration: time steps")
    p.add_argument("--B", type=_positive, help="custom configuration: batch")
    p.add_argument("--I", type=_positive, help="custom configuration: input size")
    p.add_argument("--H", type=_positive, help="custom configuration: hidden size")
    p.add_argument("--layers", type=_positive, default=1, help="custom configuration: layers (default 1)")
    p.add_argument("--bidirectional", action="store_true", help="custom configuration: bidirectional")
    p.add_argument("--cell", type=_comma_list, default=["lstm"],
                   help="lstm (default), gru, or lstm,gru: the cells to benchmark on every configuration")
    p.add_argument("--modes", type=_comma_list, default=list(bench.MODES), help="forward,forward+backward (default both)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--repeats", type=_positive, help="measured rounds (default 5; 2 with --quick)")
    p.add_argument("--threads", type=_positive, help="CPU threads for every backend and torch (default: all cores)")
    p.add_argument("--quick", action="store_true", help="shorter sequences and fewer rounds (under 30 s)")
    p.add_argument("--torch", action="store_true",
                   help="time a whole PyTorch training step (LSTM + Linear + cross-entropy + Adam) with "
                        "fastlstm.torch.LSTM against torch.nn.LSTM, and the adapter's cost over the bare call "
                        "(needs torch; --configs or a custom configuration, --quick, --repeats, --threads, --json apply)")
    p.add_argument("--device", type=_comma_list, help="with --torch: cpu, cuda or cpu,cuda (default: every device torch sees)")
    p.add_argument("--json", metavar="PATH", help="write every measurement, the machine and versions as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG bar chart (needs matplotlib)")
    p.add_argument("--compare", nargs=2, metavar=("OLD.json", "NEW.json"), help="print speed-ups between two JSON runs and exit")
    p.set_defaults(func=_bench)


def _bench_configs(args, parser) -> list:
    cells = args.cell
    bad = [c for c in cells if c not in LAYERS]
    if bad or not cells:
        parser.error(f"--cell: expected lstm, gru or lstm,gru, got {','.join(cells)!r}")
    custom = [args.T, args.B, args.I, args.H]
    if any(v is not None for v in custom):
        if any(v is None for v in custom):
            parser.error("a custom configuration needs all of --T --B --I --H")
        if args.configs:
            parser.error("use either --configs or --T/--B/--I/--H, not both")
        configs = [bench.Config("custom", args.T, args.B, args.I, args.H, args.layers, args.bidirectional)]
    else:
        table = bench.QUICK_CONFIGS if args.quick else {**bench.CONFIGS, **bench.EXTRA_CONFIGS}
        names = args.configs or list(bench.QUICK_CONFIGS if args.quick else bench.CONFIGS)
        unknown = [n for n in names if n not in table]
        if unknown:
            parser.error(f"--configs: unknown {', '.join(unknown)}; expected some of {', '.join(table)}")
        configs = [table[n] for n in names]
    return [config.with_cell(cell) for config in configs for cell in cells]


def _bench_runners(requested) -> list[str]:
    known = list(registry.BACKEND_NAMES) + list(bench.TORCH_RUNNERS) + [bench_onnx.RUNNER]
    available = bench.available_runners()
    if not requested:
        return available
    for name in requested:
        if name not in known:
            raise argparse.ArgumentTypeError(f"--backends: unknown {name!r}; expected some of {', '.join(known)}")
        if name not in available:
            if name in registry.BACKEND_NAMES:
                status = registry.available_backends()[name]
                raise CommandError(f"backend {name!r} is not available: {status.reason}. To install: {status.install_hint}")
            raise CommandError(f"{name!r} is not available: " + (
                "onnx and onnxruntime are not installed (pip install 'fastlstm[onnx]')" if name == bench_onnx.RUNNER
                else "torch is not installed (pip install torch==2.13.0)" if name == "torch"
                else "torch sees no CUDA GPU"))
    return requested


@contextlib.contextmanager
def _thread_limits(count):
    """Hold every thread pool (fastlstm, BLAS, torch) to `count` threads for the run."""
    if count is None:
        yield
        return
    threads.set_num_threads(min(count, threads.available_cores()))
    stack = contextlib.ExitStack()
    if module_available("threadpoolctl"):
        import threadpoolctl

        stack.enter_context(threadpoolctl.threadpool_limits(count))
    if module_available("torch"):
        import torch

        previous = torch.get_num_threads()
        torch.set_num_threads(count)
        stack.callback(torch.set_num_threads, previous)
    with stack:
        try:
            yield
        finally:
            threads.set_num_threads(None)


def _bench(args, parser) -> int:
    if args.compare:
        old, new = (bench.load_json(path) for path in args.compare)
        print(bench.compare(old, new))
        return 0
    if args.plot and not module_available("matplotlib"):
        raise CommandError("--plot needs matplotlib: pip install 'fastlstm[plot]' (or pip install matplotlib)")
    if args.torch:
        return _bench_torch(args, parser)
    if args.device:
        parser.error("--device applies with --torch only")
    modes = args.modes
    for mode in modes:
        if mode not in bench.MODES:
            parser.error(f"--modes: unknown {mode!r}; expected some of {', '.join(bench.MODES)}")
    configs = _bench_configs(args, parser)
    try:
        runners = _bench_runners(args.backends)
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    repeats = args.repeats or (2 if args.quick else 5)
    _log(f"fastlstm bench: {', '.join(c.name for c in configs)} x {', '.join(modes)} on {', '.join(runners)}; "
         f"{repeats} rounds each after a warm-up (first Numba use compiles its kernels)")
    with _thread_limits(args.threads):
        report = bench.run_benchmarks(configs, runners, modes, args.dtype, repeats, progress=_log)
    print(bench.format_table(report))
    if args.json:
        bench.save_json(report, args.json)
        _log(f"wrote {args.json}")
    if args.plot:
        bench.plot(report, args.plot)
        _log(f"wrote {args.plot}")
    return 0


def _bench_torch(args, parser) -> int:
    if not module_available("torch"):
        raise CommandError("--torch needs PyTorch: pip install torch==2.13.0 (or 'fastlstm[torch]')")
    for flag in ("backends", "plot"):
        if getattr(args, flag):
            parser.error(f"--torch times fastlstm.torch against torch.nn.LSTM; --{flag} does not apply")
    from . import bench_torch

    configs = _bench_configs(args, parser)
    devices = args.device
    for device in devices or []:
        if device not in ("cpu", "cuda"):
            parser.error(f"--device: expected cpu, cuda or cpu,cuda, got {device!r}")
    if devices and "cuda" in devices:
        import torch

        if not torch.cuda.is_available():
            raise CommandError("--device cuda: torch sees no CUDA GPU")
    repeats = args.repeats or (3 if args.quick else 7)
    _log(f"fastlstm bench --torch: {', '.join(c.name for c in configs)}; {repeats} alternated rounds after "
         "2 warm-up steps per runner")
    with _thread_limits(args.threads):
        report = bench_torch.run(configs, repeats, progress=_log, devices=devices)
    print(bench_torch.format_table(report))
    if args.json:
        bench.save_json_data(report.to_json(), args.json)
        _log(f"wrote {args.json}")
    return 0


# -- info -----------------------------------------------------------------------------------
def _info_parser(sub) -> None:
    p = sub.add_parser("info", help="versions, backends, threads, BLAS and GPU")
    p.set_defaults(func=_info)


def _info(args, parser) -> int:
    versions = bench.library_versions()
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print("backends:")
    for name, status in registry.available_backends().items():
        print(f"  {name:6s} {'available' if status.available else 'unavailable'}: {status.reason}")
        if not status.available:
            print(f"         to install: {status.install_hint}")
    try:
        chosen = registry.get_backend()
    except Exception as exc:  # noqa: BLE001 - info reports, it does not fail
        chosen = f"none ({exc})"
    print(f"default backend: {chosen} (choice: {_safe(registry.current_choice)})")
    print(f"threads: fastlstm {threads.get_num_threads()} of {threads.available_cores()} cores")
    if "numba" in versions:
        try:
            import numba

            print(f"  numba: {numba.config.NUMBA_NUM_THREADS} threads, threading layer {numba.config.THREADING_LAYER}")
        except Exception as exc:  # noqa: BLE001
            print(f"  numba: broken ({exc})")
    if registry.available_backends()["numba"].available:
        from .backends import numba_backend, numba_compile_ahead

        print(f"numba cache: {numba_backend.cache_status()}")
        print(f"numba compile ahead: {numba_compile_ahead.describe()}")
    if module_available("threadpoolctl"):
        import threadpoolctl

        if "numba" in versions:
            with contextlib.suppress(Exception):
                import scipy.linalg.cython_blas  # noqa: F401 - load the BLAS Numba uses, to list it
        for lib in threadpoolctl.threadpool_info():
            print(f"  {lib['user_api']}: {lib.get('internal_api')} {lib.get('version')} "
                  f"({lib.get('architecture', '?')}), {lib['num_threads']} threads, {lib['filepath']}")
    else:
        print("  BLAS: install threadpoolctl to see BLAS libraries and threads")
    print(f"gpu: {_gpu_line()}")
    return 0


def _safe(fn):
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001
        return f"invalid ({exc})"


def _gpu_line() -> str:
    status = registry.available_backends()["cupy"]
    if not status.available:
        return f"none usable by CuPy ({status.reason})"
    import cupy

    free, total = cupy.cuda.runtime.memGetInfo()
    return f"{status.reason}, {total / 2**30:.1f} GiB ({free / 2**30:.1f} GiB free)"


# -- train ----------------------------------------------------------------------------------
def _train_parser(sub) -> None:
    from .demo import train

    train.add_arguments(sub.add_parser(
        "train", help="train a character-level language model on the bundled text",
        description="Train a character-level LSTM language model on a small public-domain text shipped with fastlstm.",
    ))


# -- main -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastlstm", description="Fast LSTMs on NumPy, Numba (CPU) and CuPy (GPU).")
    sub = parser.add_subparsers(dest="command", required=True)
    _bench_parser(sub)
    _info_parser(sub)
    _train_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args, parser)
    except BrokenPipeError:  # the reader stopped early (`fastlstm info | head -1`): nothing wrong here
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 0
    except (CommandError, registry.BackendUnavailableError, ValueError, OSError) as exc:
        print(f"fastlstm {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"fastlstm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
