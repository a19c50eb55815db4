#!/usr/bin/python3
"""bench_torch.py - PyTorch CPU batch-normalization peer for scripts/bench/bench_compare.sh.

Times PyTorch's own CPU kernels (aten::native_batch_norm in training mode, then
aten::native_batch_norm_backward with all three gradients) on the same shapes as
syncbn-bench, contiguous (NCHW) or channels_last (NHWC), float32 or bfloat16. The
aten ops are called directly so that autograd bookkeeping and gradient accumulation
(an extra pass over x.grad) are not charged to PyTorch: this is the best case for
the peer.

Activations (--act), unfused as PyTorch runs them (it has no fused BN+ReLU on CPU),
in the form torchvision's ResNet uses (ReLU(inplace=True), `out += identity`):
  none      BN.
  relu      y = BN(x); relu_(y) in place. Backward: g = threshold_backward(dy, y, 0)
            (what autograd runs for an in-place ReLU, which saves its output), then
            BN backward of g.
  add-relu  y = BN(x); y.add_(z); relu_(y), all in place. Backward as relu; the add's
            gradient dz is g itself (autograd passes the same tensor on, no copy).
bfloat16 (--dtype bf16): x, z, dy and the outputs are torch.bfloat16; weight, bias
and running statistics stay float32 (PyTorch 1.13 accepts the mix, and it is both
the faster of the two on this CPU - 6.9 against 12.1 ms fwd+bwd at (32,64,56,56),
1 thread - and syncbn's own contract: float32 parameters and gradients).

Thread count: OMP_NUM_THREADS (passed to torch.set_num_threads).

Output, one line per (shape, layout, act, dtype), parsed by bench_compare.sh:
  RESULT impl=torch layout=nchw shape=32,64,56,56 fwd_ms=16.6 fwdbwd_ms=53.8 bwd_ms=37.2 act=none dtype=f32
A combination PyTorch refuses prints "UNSUPPORTED ..." instead.

Usage: /usr/bin/python3 bench_torch.py [--layout nchw|nhwc|both] [--shape N,C,H,W]... [--reps R]
                                       [--act none,relu,add-relu] [--dtype f32,bf16]
Needs Debian's python3-torch (1.13); run it with /usr/bin/python3, not a pyenv shim.
"""
import argparse
import os
import statistics
import time

import torch

SHAPES = [(32, 64, 56, 56), (32, 256, 14, 14), (256, 1024, 1, 1), (8, 32, 224, 224)]
ACTS = ("none", "relu", "add-relu")
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}


def run(shape, nhwc, act, dtype, reps):
    n, c, h, w = shape
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=gen) + 1.0).to(DTYPES[dtype])
    dy = torch.randn(shape, generator=gen).to(DTYPES[dtype])
    z = torch.randn(shape, generator=gen).to(DTYPES[dtype])
    if nhwc:
        x = x.contiguous(memory_format=torch.channels_last)
        dy = dy.contiguous(memory_format=torch.channels_last)
        z = z.contiguous(memory_format=torch.channels_last)
    weight = torch.ones(c)
    bias = torch.zeros(c)
    rmean = torch.zeros(c)
    rvar = torch.ones(c)
    eps, momentum = 1e-5, 0.1
    fwd = torch.ops.aten.native_batch_norm
    bwd = torch.ops.aten.native_batch_norm_backward
    relu_bwd = torch.ops.aten.threshold_backward

    def step():
        t0 = time.perf_counter()
        y, smean, sinvstd = fwd(x, weight, bias, rmean, rvar, True, momentum, eps)
        if act == "add-relu":
            y.add_(z)
        if act != "none":
            y.relu_()
        t1 = time.perf_counter()
        g = relu_bwd(dy, y, 0) if act != "none" else dy  # add-relu: dz is this same g
        bwd(g, x, weight, rmean, rvar, smean, sinvstd, True, eps, [True, True, True])
        t2 = time.perf_counter()
        return (t1 - t0) * 1e3, (t2 - t1) * 1e3, (t2 - t0) * 1e3

    lay = "nhwc" if nhwc else "nchw"
    with torch.no_grad():
        try:
            for _ in range(3):  # warm-up: allocator, page faults, thread pool
                step()
        except RuntimeError as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            print(f"UNSUPPORTED impl=torch layout={lay} shape={n},{c},{h},{w} act={act} dtype={dtype} "
                  f"what=\"{msg}\"", flush=True)
            return
        times = [step() for _ in range(reps)]
    tf = statistics.median(t[0] for t in times)
    tb = statistics.median(t[1] for t in times)
    tfb = statistics.median(t[2] for t in times)
    print(f"RESULT impl=torch layout={lay} shape={n},{c},{h},{w} "
          f"fwd_ms={tf:.4f} fwdbwd_ms={tfb:.4f} bwd_ms={tb:.4f} act={act} dtype={dtype}", flush=True)


def names(value, allowed):
    out = [v for v in value.split(",") if v]
    bad = [v for v in out if v not in allowed]
    if bad or not out:
        raise argparse.ArgumentTypeError(f"{value}: want a comma-separated list of {', '.join(allowed)}")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layout", default="both", choices=["nchw", "nhwc", "both"])
    ap.add_argument("--shape", action="append", default=None, help="N,C,H,W (repeatable)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--act", type=lambda v: names(v, ACTS), default=["none"])
    ap.add_argument("--dtype", type=lambda v: names(v, tuple(DTYPES)), default=["f32"])
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shape] if args.shape else SHAPES
    threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    for shape in shapes:
        if len(shape) != 4:
            raise SystemExit(f"bad --shape {shape}: want N,C,H,W")
        for nhwc in (False, True):
            if args.layout not in ("both", "nhwc" if nhwc else "nchw"):
                continue
            for dtype in args.dtype:
                for act in args.act:
                    run(shape, nhwc, act, dtype, max(1, args.reps))


if __name__ == "__main__":
    main()
