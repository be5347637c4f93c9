"""The gradients' tall products (numba_common._tall_product, float32 micro-kernel) of two
checkouts in ONE process, alternated, on one core: dW_ih, dW_hh and half of dx's rows at a
config's shapes (two blocks), GFLOP/s and new / base.

    git worktree add /tmp/base <commit> && ln -s ../kernels /tmp/base/fastlstm/kernels
    python bench/tall_products_ab.py /tmp/base [--config train-m|train-l|deep|small|...] [--rounds 7]

The base tree is imported as fastlstm_base (overhead_ab.base_package). The results must agree
bit for bit unless --allow-other-bits (a change of chunk sizes reorders the sums).
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import overhead_ab  # noqa: E402

from fastlstm.bench import CONFIGS  # noqa: E402
from fastlstm.kernels import numba_common as new_common  # noqa: E402


def products(common, d, x, h, w, d_rows):
    """name -> (call, flops, output) for one tree's kernels."""
    rows, block_cols = d.shape
    outs = {"dW_ih": np.zeros((block_cols, x.shape[1]), np.float32),
            "dW_hh": np.zeros((block_cols, h.shape[1]), np.float32),
            "dx (half)": np.zeros((d_rows.shape[0], w.shape[1]), np.float32)}
    calls = {"dW_ih": lambda: common._tall_product(d, True, x, outs["dW_ih"], False, True),
             "dW_hh": lambda: common._tall_product(d, True, h, outs["dW_hh"], False, True),
             "dx (half)": lambda: common._tall_product(d_rows, False, w, outs["dx (half)"], False, True)}
    flops = {"dW_ih": 2 * rows * block_cols * x.shape[1], "dW_hh": 2 * rows * block_cols * h.shape[1],
             "dx (half)": 2 * d_rows.shape[0] * d_rows.shape[1] * w.shape[1]}
    return {name: (calls[name], flops[name], outs[name]) for name in calls}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", type=Path)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="train-m",
                        help="its first layer's shapes (fastlstm bench's configurations)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--allow-other-bits", action="store_true")
    args = parser.parse_args()
    overhead_ab.base_package(args.base.resolve())
    base_common = importlib.import_module("fastlstm_base.kernels.numba_common")
    config = CONFIGS[args.config]
    T, B, I, H = config.T, config.B, config.I, config.H
    rows, units = T * B, H // 2
    rng = np.random.default_rng(0)
    d = rng.standard_normal((rows, 4 * units)).astype(np.float32)  # one block's gate gradients
    x = rng.standard_normal((rows, I)).astype(np.float32)
    h = rng.standard_normal((rows, H)).astype(np.float32)
    w = rng.standard_normal((4 * H, I)).astype(np.float32)
    d_rows = rng.standard_normal((rows // 2, 4 * H)).astype(np.float32)
    trees = {"base": products(base_common, d, x, h, w, d_rows), "new": products(new_common, d, x, h, w, d_rows)}
    for name in trees["new"]:
        for tree in trees.values():
            tree[name][0]()  # compiles
        if not args.allow_other_bits and not np.array_equal(trees["base"][name][2], trees["new"][name][2]):
            raise SystemExit(f"{name}: the trees' results differ")
    rates = {(tree, name): [] for tree in trees for name in trees[tree]}
    for r in range(args.rounds):
        for name in trees["new"]:
            for tree in (("base", "new") if r % 2 else ("new", "base")):
                call, flops, _ = trees[tree][name]
                start = time.perf_counter()
                for _ in range(3):
                    call()
                rates[tree, name].append(3 * flops / (time.perf_counter() - start) / 1e9)
    print(f"{args.config}: T={T} B={B} I={I} H={H}, one block of {units} units; GFLOP/s, "
          f"medians of {args.rounds} rounds")
    for name in trees["new"]:
        ratios = [n / b for n, b in zip(rates["new", name], rates["base", name])]
        print(f"  {name:10s} base {statistics.median(rates['base', name]):6.1f}  new "
              f"{statistics.median(rates['new', name]):6.1f}  new / base {statistics.median(ratios):.2f} "
              f"({min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
