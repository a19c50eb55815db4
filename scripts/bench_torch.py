#!/usr/bin/python3
"""bench_torch.py - PyTorch CPU batch-normalization peer for scripts/bench_compare.sh.

Times PyTorch's own CPU kernels (aten::native_batch_norm in training mode, then
aten::native_batch_norm_backward with all three gradients) on the same shapes as
syncbn-bench, float32, contiguous (NCHW) or channels_last (NHWC). The aten ops are
called directly so that autograd bookkeeping and gradient accumulation (an extra
pass over x.grad) are not charged to PyTorch: this is the best case for the peer.

Thread count: OMP_NUM_THREADS (passed to torch.set_num_threads).

Output, one line per (shape, layout), parsed by bench_compare.sh:
  RESULT impl=torch layout=nchw shape=32,64,56,56 fwd_ms=16.6 fwdbwd_ms=53.8 bwd_ms=37.2

Usage: /usr/bin/python3 bench_torch.py [--layout nchw|nhwc|both] [--shape N,C,H,W]... [--reps R]
Needs Debian's python3-torch (1.13); run it with /usr/bin/python3, not a pyenv shim.
"""
import argparse
import os
import statistics
import time

import torch

SHAPES = [(32, 64, 56, 56), (32, 256, 14, 14), (256, 1024, 1, 1), (8, 32, 224, 224)]


def run(shape, nhwc, reps):
    n, c, h, w = shape
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen) + 1.0
    dy = torch.randn(shape, generator=gen)
    if nhwc:
        x = x.contiguous(memory_format=torch.channels_last)
        dy = dy.contiguous(memory_format=torch.channels_last)
    weight = torch.ones(c)
    bias = torch.zeros(c)
    rmean = torch.zeros(c)
    rvar = torch.ones(c)
    eps, momentum = 1e-5, 0.1
    fwd = torch.ops.aten.native_batch_norm
    bwd = torch.ops.aten.native_batch_norm_backward

    def step():
        t0 = time.perf_counter()
        y, smean, sinvstd = fwd(x, weight, bias, rmean, rvar, True, momentum, eps)
        t1 = time.perf_counter()
        bwd(dy, x, weight, rmean, rvar, smean, sinvstd, True, eps, [True, True, True])
        t2 = time.perf_counter()
        return (t1 - t0) * 1e3, (t2 - t1) * 1e3, (t2 - t0) * 1e3

    with torch.no_grad():
        for _ in range(3):  # warm-up: allocator, page faults, thread pool
            step()
        times = [step() for _ in range(reps)]
    tf = statistics.median(t[0] for t in times)
    tb = statistics.median(t[1] for t in times)
    tfb = statistics.median(t[2] for t in times)
    print(f"RESULT impl=torch layout={'nhwc' if nhwc else 'nchw'} shape={n},{c},{h},{w} "
          f"fwd_ms={tf:.4f} fwdbwd_ms={tfb:.4f} bwd_ms={tb:.4f}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layout", default="both", choices=["nchw", "nhwc", "both"])
    ap.add_argument("--shape", action="append", default=None, help="N,C,H,W (repeatable)")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shape] if args.shape else SHAPES
    threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    for shape in shapes:
        if len(shape) != 4:
            raise SystemExit(f"bad --shape {shape}: want N,C,H,W")
        if args.layout in ("nchw", "both"):
            run(shape, False, max(1, args.reps))
        if args.layout in ("nhwc", "both"):
            run(shape, True, max(1, args.reps))


if __name__ == "__main__":
    main()
