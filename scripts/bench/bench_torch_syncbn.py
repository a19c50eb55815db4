#!/usr/bin/python3
"""bench_torch_syncbn.py - syncbn.torch.SyncBatchNorm against torch.nn.BatchNorm2d, one rank.

Times a training forward plus backward (module call, then y.backward(dy), with
x.grad, weight.grad and bias.grad computed) of both modules in the same process,
alternating them rep by rep, at the same thread count: OMP_NUM_THREADS
(libsyncbn's OpenMP) is also passed to torch.set_num_threads. Reports medians and
the ratio SyncBatchNorm / BatchNorm2d (median of the per-run paired ratios) for (32,64,56,56) contiguous and
channels_last: float32 (targets: <= 0.5x and <= 1.0x); bfloat16 input with
float32 parameters, the torch.autocast case (target <= 0.6x in both layouts); and,
bfloat16 too, SyncBatchNorm(fuse_relu=True) against BatchNorm2d then torch.relu
(no target). Then, at (8,16,8,8), the wrapper's overhead per fwd+bwd: the module's
time minus the two C calls alone (made through ctypes on prepared pointers, which
is also reported).

Both sides allocate y and dx afresh each call (as autograd does), so both pay the
page faults of those buffers; the C calls alone reuse theirs.

Usage: OMP_NUM_THREADS=T mpirun -np 1 /usr/bin/python3 scripts/bench/bench_torch_syncbn.py [--reps R] [--runs K]
       [--dtype all|f32|bf16]
Uses src/python of this tree and build/src/libsyncbn.so (or $SYNCBN_LIBRARY).
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "src", "python"))
import syncbn.torch as st  # noqa: E402
from syncbn import _lib  # noqa: E402


def fwd_bwd(module, x, dy, relu=False):
    x.grad = None
    module.zero_grad(set_to_none=True)
    y = module(x)
    (torch.relu(y) if relu else y).backward(dy)


def c_only(layer, x, dy, dx, dw, db, S):
    """syncbn_forward_ex + syncbn_backward_ex on fixed buffers (x, dy, dx in the
    layer's layout and element type): the library's own time plus two bare ctypes
    calls."""
    L, h, n = _lib.lib(), layer.handle, x.shape[0]
    y = dx  # the forward's output is not used; reuse the buffer
    args_f = (h, x.data_ptr(), None, n, S, 1, y.data_ptr())
    args_b = (h, x.data_ptr(), dy.data_ptr(), n, S, dx.data_ptr(), None, dw.data_ptr(), db.data_ptr())

    def run():
        L.syncbn_forward_ex(*args_f)
        L.syncbn_backward_ex(*args_b)
    return run


def c_alone_ms(ours, x, dy, reps, runs):
    """The C calls alone for the layer the module used on x (its layout and dtype)."""
    C, S = x.shape[1], x[0, 0].numel()
    nhwc, xp, _ = st._layout_view(x.detach(), C)
    layer = ours._c_layers(st._C_DTYPE[x.dtype])[int(nhwc)]
    dyp = st._as_layout(dy, nhwc)
    dx, dw, db = torch.empty_like(xp), torch.empty(C), torch.empty(C)
    run = c_only(layer, xp, dyp, dx, dw, db, S)
    return 1e3 * statistics.median(median_time(run, reps) for _ in range(runs))


class _Nothing(torch.autograd.Function):
    """An autograd.Function that allocates its output and gradients and computes
    nothing: the floor of any Python-defined autograd layer."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight)


def median_time(fn, reps):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def compare(shape, channels_last, reps, runs, dtype=torch.float32, relu=False):
    """relu: ours fused (fuse_relu=True), BatchNorm2d followed by torch.relu."""
    C = shape[1]
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=gen) + 1).to(dtype)
    dy = torch.randn(shape, generator=gen).to(dtype)
    if channels_last:
        x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    ours, peer = st.SyncBatchNorm(C, fuse_relu=relu), torch.nn.BatchNorm2d(C)
    for _ in range(3):  # warm-up (and the collective layer creation)
        fwd_bwd(ours, x, dy)
        fwd_bwd(peer, x, dy, relu)
    t_ours, t_peer = [], []
    for _ in range(runs):  # alternate, so that machine noise hits both alike
        t_ours.append(median_time(lambda: fwd_bwd(ours, x, dy), reps))
        t_peer.append(median_time(lambda: fwd_bwd(peer, x, dy, relu), reps))
    ratios = sorted(a / b for a, b in zip(t_ours, t_peer))  # paired: both measured in the same run
    return ours, x, dy, statistics.median(t_ours), statistics.median(t_peer), ratios


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--dtype", choices=("all", "f32", "bf16"), default="all", help="which (32,64,56,56) rows")
    a = p.parse_args()
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    torch.set_num_threads(threads)
    print(f"threads {threads} (torch {torch.get_num_threads()}), median of {a.runs} runs x {a.reps} reps")
    big = (32, 64, 56, 56)
    f32, bf16 = torch.float32, torch.bfloat16
    rows = [(f32, False, False, 0.5), (f32, True, False, 1.0), (bf16, False, False, 0.6), (bf16, True, False, 0.6),
            (bf16, False, True, None), (bf16, True, True, None)]
    for dtype, cl, relu, target in rows:
        if a.dtype != "all" and (a.dtype == "bf16") != (dtype == bf16):
            continue
        ours, x, dy, t_ours, t_peer, ratios = compare(big, cl, a.reps, a.runs, dtype, relu)
        c_ms = c_alone_ms(ours, x, dy, a.reps, a.runs)
        layout = "channels_last" if cl else "contiguous"
        r = statistics.median(ratios)
        verdict = "" if target is None else f" target<={target} {'met' if r <= target else 'MISSED'}"
        print(f"RESULT shape={','.join(map(str, big))} dtype={str(dtype)[6:]} layout={layout} "
              f"{'fused_relu ' if relu else ''}syncbn_ms={t_ours * 1e3:.2f} torch_ms={t_peer * 1e3:.2f} c_calls_ms={c_ms:.2f} "
              f"ratio={r:.2f} (runs {ratios[0]:.2f}-{ratios[-1]:.2f}){verdict}")

    shape = (8, 16, 8, 8)
    ours, x, dy, t_ours, t_peer, _ = compare(shape, False, a.reps * 50, a.runs)
    t_c = c_alone_ms(ours, x, dy, a.reps * 50, a.runs) / 1e3

    def nothing():
        x.grad = None
        _Nothing.apply(x, ours.weight, ours.bias).backward(dy)
    t_0 = statistics.median(median_time(nothing, a.reps * 50) for _ in range(a.runs))
    print(f"RESULT shape=8,16,8,8 layout=contiguous syncbn_us={t_ours * 1e6:.1f} torch_us={t_peer * 1e6:.1f} "
          f"c_calls_us={t_c * 1e6:.1f} overhead_us={(t_ours - t_c) * 1e6:.1f} "
          f"(an empty autograd.Function: {t_0 * 1e6:.1f} us)")


if __name__ == "__main__":
    main()
