"""Per-call time of two checkouts of fastlstm in ONE process, alternated: the base tree's
package is copied under another name (fastlstm_base) beside this tree's fastlstm, so that
both run with the same threads, caches and host drift. For changes of a few microseconds a
call (Python work, small kernels), which process-to-process spread hides on a busy host.

    git worktree add /tmp/base <commit> && ln -s ../kernels /tmp/base/fastlstm/kernels
    python bench/overhead_ab.py /tmp/base [--cell lstm|gru] [--mode inference|training]
        [--configs 1x1x64x128,100x1x64x128,200x16x32x64] [--rounds 11] [--rtol 1e-5]
        [--layers 4 --bidirectional]

Configs are TxBxIxH (float32, numba backend). Each round times both trees' calls back to
back (bench/rounds.py: the order rotates, each runner's time is at least 0.2 s of calls);
the ratio base / new is taken within each round (median and range). Results must
agree bit for bit between the trees, or it stops (a speed change is not a numerics change),
unless --rtol allows a change that reorders sums.
The copy's kernels compile on its first run (Numba caches them under the copy's folder).
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # "new" is this checkout, whatever is installed

import rounds  # noqa: E402

import fastlstm  # noqa: E402


def base_package(tree: Path):
    """The base tree's fastlstm imported as fastlstm_base (its kernels copied in, and the
    registry's absolute module names of the backends renamed; the rest imports relatively).
    The copy's folder is named by a digest of the sources, so an unchanged base keeps its
    compiled kernels from run to run."""
    kernels = (tree / "fastlstm" / "kernels").resolve()  # a link to ../kernels in a checkout
    sources = sorted({*(tree / "fastlstm").rglob("*.py"), *kernels.glob("*.py")})
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in sources)).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / f"fastlstm_overhead_ab_{digest}"
    if not folder.exists():  # made aside and renamed into place: an interrupted copy is never used
        staging = Path(tempfile.mkdtemp(prefix=folder.name + "_staging_"))
        target = staging / "fastlstm_base"
        shutil.copytree(tree / "fastlstm", target, symlinks=False, ignore=shutil.ignore_patterns("__pycache__"))
        registry = target / "registry.py"
        registry.write_text(registry.read_text().replace('"fastlstm.backends.', '"fastlstm_base.backends.'))
        try:
            staging.rename(folder)
        except OSError:  # another run put it there first
            shutil.rmtree(staging)
    sys.path.insert(0, str(folder))
    import fastlstm_base

    return fastlstm_base


def agree(base, new, rtol) -> bool:
    """Bit for bit, or (rtol > 0) within rtol of the largest magnitude in base."""
    if rtol == 0:
        return np.array_equal(base, new)
    return base.shape == new.shape and float(np.max(np.abs(base - new), initial=0)) <= rtol * float(
        np.max(np.abs(base), initial=0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", type=Path)
    parser.add_argument("--cell", choices=("lstm", "gru"), default="lstm")
    parser.add_argument("--mode", choices=("inference", "training"), default="inference")
    parser.add_argument("--configs", default="1x1x64x128,100x1x64x128,200x16x32x64")
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--bidirectional", action="store_true")
    parser.add_argument("--rtol", type=float, default=0.0,
                        help="for a change that reorders sums: the results may differ by this much (relative to "
                             "the largest magnitude of each array) instead of agreeing bit for bit")
    args = parser.parse_args()
    packages = {"base": base_package(args.base.resolve()), "new": fastlstm}
    training = args.mode == "training"
    for spec in args.configs.split(","):
        T, B, I, H = (int(v) for v in spec.split("x"))
        x = np.random.default_rng(0).standard_normal((T, B, I)).astype(np.float32)
        layers = {name: getattr(package, args.cell.upper())(
                      I, H, num_layers=args.layers, bidirectional=args.bidirectional, backend="numba", seed=0,
                  ).train(training) for name, package in packages.items()}

        def call(layer):
            y, _ = layer(x)
            if training:
                layer.backward(np.ones_like(y))
            return y

        results = {name: call(layer) for name, layer in layers.items()}
        pairs = [(results["base"], results["new"])]
        if training:
            pairs += [(layers["base"].grads[k], layers["new"].grads[k]) for k in layers["new"].grads]
        if not all(agree(base, new, args.rtol) for base, new in pairs):
            raise SystemExit(f"{spec}: the trees' results differ" + (f" by more than {args.rtol}" if args.rtol else ""))
        times = rounds.alternate({name: (lambda layer=layer: rounds.seconds_per_call(lambda: call(layer)) * 1e6)
                                  for name, layer in layers.items()}, args.rounds)
        ratios = [b / n for b, n in zip(times["base"], times["new"])]
        shape = f"T={T} B={B} I={I} H={H}" + (f" layers={args.layers}" if args.layers > 1 else "") + (
            " bidirectional" if args.bidirectional else "")
        print(f"{args.cell} {args.mode} {shape}: base {statistics.median(times['base']):.1f} us, "
              f"new {statistics.median(times['new']):.1f} us (medians of {args.rounds} rounds); base / new "
              f"{statistics.median(ratios):.3f} ({min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
