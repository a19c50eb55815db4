"""Lifetime of the C layers behind syncbn.torch.SyncBatchNorm: a process that builds,
trains and drops modules (sweeps, evaluation loops) must not grow without bound, and
the destroys, which ranks make at different moments (the garbage collector does not
run in step), must never disturb the collective calls of the modules still in use.

Run: mpirun -np P python3 -m pytest tests/python (P = 1..4; CTest does this).
"""
import gc

import torch
from mpi4py import MPI

import syncbn.torch as st
from syncbn import _lib
from conftest import agree

# Every module costs four collective creates, a forward and a backward: at 3-4 ranks
# on a small (oversubscribed) machine about 10 ms each, so fewer modules there.
def modules_for(P):
    return 1000 if P <= 2 else 250


def rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def train_step(x, z):
    """A new fused module, one training step with z, then dropped."""
    bn = st.SyncBatchNorm(x.shape[1], fuse_relu=True)
    bn(x, z).sum().backward()
    x.grad = z.grad = None


def test_dropped_modules_are_freed(comm):
    """1,000 modules (250 at 3-4 ranks; C = 64, each with four C layers and a ReLU
    mask of this rank's x) built, trained one step and dropped: the C layers alive
    come back to the baseline and the resident memory stays bounded. Leaked (as
    before the layers were destroyed: checked by disabling the finalizer) they cost
    about 26-29 KiB per module, 25 MiB over the 900 modules after warm-up at P = 1;
    we allow 8 KiB per module of drift after warm-up."""
    failures = []
    P = comm.Get_size()
    MODULES = modules_for(P)
    gen = torch.Generator().manual_seed(comm.Get_rank())
    x = torch.randn(max(1, 8 // P), 64, 8, 8, generator=gen).requires_grad_()
    z = torch.randn(x.shape, generator=gen).requires_grad_()
    base = _lib.live_layers()
    for i in range(MODULES):
        train_step(x, z)
        if i == 99:
            gc.collect()
            warm = rss_kib()
    gc.collect()
    alive = _lib.live_layers()
    end = rss_kib()
    grown = end - warm
    worst = comm.allreduce(grown, op=MPI.MAX)
    if comm.Get_rank() == 0:
        print(f"\nlifetime: {MODULES} modules at P = {P}: VmRSS {warm} KiB after 100, {end} KiB after {MODULES} "
              f"(rank 0; largest growth over ranks {worst} KiB); C layers alive {alive}, before {base}")
    if alive > base + 1:  # + the anchor of COMM_WORLD if this test made the first layer
        failures.append(f"{alive - base} C layers alive after dropping the modules")
    if grown > 8 * (MODULES - 100):
        failures.append(f"VmRSS grew by {grown} KiB over {MODULES - 100} modules")
    agree(failures)


def test_close_frees_at_once(comm):
    """close() destroys a module's C layers at once; a later training forward creates
    them again (collectively) and trains as before."""
    failures = []
    gc.collect()
    base = _lib.live_layers()
    bn = st.SyncBatchNorm(4)
    x = torch.randn(2, 4, 3, 3) + comm.Get_rank()
    y1 = bn(x).detach()
    if _lib.live_layers() != base + 4 and _lib.live_layers() != base + 5:
        failures.append(f"{_lib.live_layers() - base} layers after the first forward, expected 4 (+ anchor)")
    with_layers = _lib.live_layers()
    bn.close()
    if _lib.live_layers() != with_layers - 4:
        failures.append(f"close() left {_lib.live_layers() - with_layers + 4} layers")
    bn.load_state_dict(st.SyncBatchNorm(4).state_dict())
    y2 = bn(x).detach()
    if not torch.equal(y1, y2):
        failures.append("a closed module does not train as before")
    agree(failures)


def test_drops_out_of_step_across_ranks(comm):
    """Rank 0 drops modules (in a reference cycle, freed by its own gc.collect())
    between collective calls where the other ranks do not: no rank hangs and the
    module still in use gives the same results as a module alone."""
    failures = []
    r = comm.Get_rank()
    keep = st.SyncBatchNorm(3, reduction="reproducible")
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(r))
    for step in range(4):
        doomed = [st.SyncBatchNorm(3) for _ in range(3)]
        for d in doomed:
            d(x)  # collective creates and forwards on every rank
            d.cycle = d  # only the cycle collector frees it
        del d
        del doomed
        if (r + step) % 2 == 0:
            gc.collect()  # this rank's finalizers queue the layers now; the others' later
        keep(x).sum().backward()
    alone = st.SyncBatchNorm(3, reduction="reproducible")
    for step in range(4):
        alone(x).sum().backward()
    for name in ("running_mean", "running_var"):
        if not torch.equal(getattr(keep, name), getattr(alone, name)):
            failures.append(f"{name} differs from the module trained alone")
    if not torch.equal(keep.weight.grad, alone.weight.grad):
        failures.append("weight.grad differs from the module trained alone")
    agree(failures)
