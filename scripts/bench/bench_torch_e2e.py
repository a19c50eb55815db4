#!/usr/bin/python3
"""bench_torch_e2e.py - end-to-end training step time of PyTorch DDP models with three
kinds of BN, under one mpirun job (P ranks; DDP over gloo as examples/train_torch_ddp.py):
  plain:  torch.nn.BatchNorm2d (each rank normalizes with its own batch's statistics);
  self:   syncbn.torch.SyncBatchNorm on MPI.COMM_SELF: our kernels, each rank its own
          statistics (as plain), no synchronization: sync/self is what synchronizing costs;
  sync:   syncbn.torch.SyncBatchNorm (convert_sync_batchnorm);
  fused:  the same, then syncbn.torch.fuse_activations (BN -> [add ->] ReLU fused);
each in float32 and under torch.autocast("cpu", dtype=torch.bfloat16).

Models: "example" is the DDP example's residual net (--net res) on its batch (32
global, split over the ranks) of 1x28x28 random images; "resnet18" is torchvision's
ResNet-18 (10 classes) on --batch random 3x--image x--image images per rank.
A step: zero_grad, forward, cross-entropy, backward (DDP's gradient all-reduce),
SGD step; the inputs are fixed random tensors (no data loading).

Timing: the machine may be shared, so the variants of one (model, type) run
interleaved: --reps rounds, each timing k steps of every variant in turn (rotating
which goes first; k >= --steps, and enough steps for --window seconds); a round's
time is the slowest rank's (MPI MAX; the ranks start together after a barrier).
Per round the ratios are formed from the same round's times; the table gives their
medians (and the median plain step in ms). Rank 0 prints one line per (model, type):
"RESULT model type P plain_ms self/plain sync/plain fused/plain fused/sync sync/self (k=..)",
and a line "CPU ..." of the same ratios of CPU time (time.process_time, all threads,
summed over the ranks): the work, without the time spent waiting for a core or for
the other rank, which a machine shared with other jobs inflates.

Usage: mpirun -np P /usr/bin/python3 scripts/bench/bench_torch_e2e.py [--models example,resnet18]
       [--types f32,bf16] [--reps 7] [--steps 2] [--window 0.5] [--batch 8] [--image 64]
       [--threads 1]
Needs PYTHONPATH=src/python and SYNCBN_LIBRARY (or the built library in build/).
"""
import argparse
import copy
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from mpi4py import MPI
from torch.nn.parallel import DistributedDataParallel as DDP

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = HERE
while not os.path.isdir(os.path.join(ROOT, "examples")) and os.path.dirname(ROOT) != ROOT:
    ROOT = os.path.dirname(ROOT)  # the source tree, wherever under scripts/ this file sits
sys.path.insert(0, os.path.join(ROOT, "src", "python"))
sys.path.insert(0, os.path.join(ROOT, "examples"))
import syncbn.torch as st  # noqa: E402
from train_torch_ddp import make_model  # noqa: E402

VARIANTS = ("plain", "self", "sync", "fused")


def build(kind, comm):
    """{variant: model}, all three from the same initial parameters."""
    torch.manual_seed(1)
    if kind == "resnet18":
        import torchvision
        base = torchvision.models.resnet18(num_classes=10)
    else:
        base = make_model("res")
    own = st.convert_sync_batchnorm(copy.deepcopy(base), comm=MPI.COMM_SELF)
    sync = st.convert_sync_batchnorm(copy.deepcopy(base), comm=comm)
    fused = st.fuse_activations(st.convert_sync_batchnorm(copy.deepcopy(base), comm=comm))
    return {"plain": base, "self": own, "sync": sync, "fused": fused}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="example,resnet18")
    p.add_argument("--types", default="f32,bf16")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--steps", type=int, default=2, help="least steps per variant per round")
    p.add_argument("--window", type=float, default=0.5, help="least seconds per variant per round")
    p.add_argument("--batch", type=int, default=8, help="ResNet-18 images per rank")
    p.add_argument("--image", type=int, default=64, help="ResNet-18 image side")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()

    comm = MPI.COMM_WORLD
    P, rank = comm.Get_size(), comm.Get_rank()
    torch.set_num_threads(a.threads)
    st.init_process_group(comm)
    say = print if rank == 0 else (lambda *args, **kw: None)
    say(f"bench_torch_e2e: P={P}, {a.reps} rounds of >= {a.steps} steps and >= {a.window} s per variant, "
        f"{a.threads} thread(s) per rank, ResNet-18 on {a.batch} images of {a.image}x{a.image} per rank, "
        f"torch {torch.__version__}")

    for kind in a.models.split(","):
        g = torch.Generator().manual_seed(100 + rank)
        if kind == "resnet18":
            x = torch.randn(a.batch, 3, a.image, a.image, generator=g)
        else:
            if 32 % P:
                raise SystemExit("the example's global batch of 32 needs P dividing 32")
            x = torch.randn(32 // P, 1, 28, 28, generator=g)
        y = torch.randint(0, 10, (x.shape[0],), generator=g)
        for dtype in a.types.split(","):
            models = {v: DDP(m) for v, m in build(kind, comm).items()}
            opts = {v: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for v, m in models.items()}

            def step(v):
                opts[v].zero_grad()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                    out = models[v](x)
                F.cross_entropy(out.float(), y).backward()
                opts[v].step()

            for v in VARIANTS:  # warm-up: lazily created C layers, allocator, oneDNN primitives
                for _ in range(2):
                    step(v)
            # Steps per timing: at least --steps, and enough for --window seconds (one
            # scheduler hiccup on a shared machine then weighs less); the same on every rank.
            t0 = time.perf_counter()
            step("plain")
            t1 = comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)
            k = max(a.steps, min(50, math.ceil(a.window / t1)))
            times = {v: [] for v in VARIANTS}
            cpu = {v: [] for v in VARIANTS}
            for r in range(a.reps):
                order = VARIANTS[r % 4:] + VARIANTS[:r % 4]
                for v in order:
                    comm.Barrier()
                    t0, c0 = time.perf_counter(), time.process_time()
                    for _ in range(k):
                        step(v)
                    t, c = (time.perf_counter() - t0) / k, (time.process_time() - c0) / k
                    times[v].append(comm.allreduce(t, op=MPI.MAX))
                    cpu[v].append(comm.allreduce(c, op=MPI.SUM))
            for tag, tm in (("RESULT", times), ("CPU", cpu)):
                ratios = (statistics.median(n / d for n, d in zip(tm[num], tm[den]))
                          for num, den in (("self", "plain"), ("sync", "plain"), ("fused", "plain"),
                                           ("fused", "sync"), ("sync", "self")))
                say(f"{tag} {kind} {dtype} {P} {statistics.median(tm['plain']) * 1e3:.1f} "
                    + " ".join(f"{x:.3f}" for x in ratios) + f" (k={k})")


if __name__ == "__main__":
    main()
