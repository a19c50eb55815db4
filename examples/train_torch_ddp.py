#!/usr/bin/python3
"""train_torch_ddp.py - PyTorch DistributedDataParallel on CPUs with syncbn's SyncBatchNorm.

A small CNN trained on Debian's Fashion-MNIST (dataset-fashion-mnist, read with
numpy; no torchvision). --net silu (default): two conv + BN + SiLU + average-pool
blocks, one linear layer. --net res: conv + BN + ReLU, one residual block (conv +
BN + ReLU, conv + BN, plus the block's input, ReLU; torchvision's BasicBlock),
average pools, one linear layer.
Its BatchNorm2d layers are replaced by syncbn.torch.SyncBatchNorm with
convert_sync_batchnorm; DDP's gradient traffic goes over gloo (loopback), the
batch statistics over MPI.

Every step takes the same global batch of --batch images (one permutation per
epoch, from --seed) whatever the number of ranks P; rank r trains on its r-th
slice. With SyncBatchNorm the loss curve is then the same at every P up to
rounding; with --bn plain (BatchNorm2d on each rank's slice alone) it is not.
Not bitwise: DDP's float all-reduce and PyTorch's kernels depend on the split.
The activation is smooth and the pooling an average on purpose: with ReLU and
max-pool, a rounding difference that moves a value across ReLU's kink or changes
a max-pool winner changes that element's gradient outright, and the curves of
different P part by about 1e-4 within a few steps (measured), for any BN.

--fused: syncbn.torch.fuse_activations rewrites the model (after
convert_sync_batchnorm, before DDP) so that each BN -> ReLU and BN -> add -> ReLU is
one SyncBatchNorm(fuse_relu=True) call; rank 0 prints what was fused. With --net res
that is 2 BN -> ReLU and 1 BN -> add -> ReLU; --net silu has nothing to fuse. The
loss curve equals the unfused run's at the same P up to rounding (the fused add
rounds BN(x) + z once instead of twice).
--bf16: forward under torch.autocast("cpu", dtype=torch.bfloat16) (convolutions
and the linear layer in bfloat16, BN given bfloat16; the loss in float32).

Prints on rank 0: "step <k> loss <global mean loss>" per step, and at the end the
test accuracy over the 10,000 test images.

Usage: mpirun -np P /usr/bin/python3 examples/train_torch_ddp.py [--steps N]
       [--batch B] [--lr X] [--bn sync|plain] [--reduction fast|reproducible]
       [--net silu|res] [--fused] [--bf16] [--seed N] [--data DIR] [--threads N]
Needs PYTHONPATH=src/python (or an installed syncbn) and the built library.
"""
import argparse
import gzip
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from mpi4py import MPI
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src", "python"))
import syncbn.torch as st  # noqa: E402

PIXEL_MEAN, PIXEL_STD = 0.2860, 0.3530  # as examples/train_data.h


def read_idx(path):
    """An IDX file (big-endian header: magic with the rank in its low byte, then the
    dimensions) as a uint8 array."""
    raw = gzip.open(path, "rb").read()
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4)
    if raw[2] != 0x08 or len(raw) != 4 + 4 * ndim + int(np.prod(dims)):
        raise SystemExit(f"{path}: not an IDX file of bytes; reinstall dataset-fashion-mnist")
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist(data_dir, split):
    images = read_idx(os.path.join(data_dir, f"{split}-images-idx3-ubyte.gz"))
    labels = read_idx(os.path.join(data_dir, f"{split}-labels-idx1-ubyte.gz"))
    x = (images.astype(np.float32) / 255 - PIXEL_MEAN) / PIXEL_STD
    return torch.from_numpy(x).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


class ResidualBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + x), written as torchvision's BasicBlock
    writes it (one nn.ReLU called twice, an in-place add)."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


def make_model(net="silu"):
    """silu: conv 3x3 (16) - BN - SiLU - avg-pool 2, conv 3x3 (32) - BN - SiLU - avg-pool 2, linear (10).
    res:  conv 3x3 (16) - BN - ReLU - avg-pool 2, residual block (16) - avg-pool 2, linear (10)."""
    if net == "res":
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True), nn.AvgPool2d(2),
            ResidualBlock(16), nn.AvgPool2d(2),
            nn.Flatten(), nn.Linear(16 * 7 * 7, 10))
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.SiLU(), nn.AvgPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.SiLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 10))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=32, help="global batch, split evenly over the ranks")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--bn", choices=("sync", "plain"), default="sync")
    p.add_argument("--reduction", choices=("fast", "reproducible"), default="fast")
    p.add_argument("--net", choices=("silu", "res"), default="silu")
    p.add_argument("--fused", action="store_true", help="fuse BN -> [add ->] ReLU (needs --bn sync)")
    p.add_argument("--bf16", action="store_true", help="forward under bfloat16 autocast")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--threads", type=int, default=1, help="PyTorch threads per rank")
    a = p.parse_args()

    comm = MPI.COMM_WORLD
    P, rank = comm.Get_size(), comm.Get_rank()
    if a.batch % P:
        raise SystemExit(f"--batch {a.batch} is not a multiple of {P} ranks")
    if a.fused and a.bn != "sync":
        raise SystemExit("--fused fuses syncbn's SyncBatchNorm: it needs --bn sync")
    torch.set_num_threads(a.threads)
    say = print if rank == 0 else (lambda *args, **kw: None)

    x_train, y_train = fashion_mnist(a.data, "train")
    x_test, y_test = fashion_mnist(a.data, "t10k")

    st.init_process_group(comm)
    torch.manual_seed(a.seed)
    model = make_model(a.net)
    if a.bn == "sync":
        model = st.convert_sync_batchnorm(model, comm=comm, reduction=a.reduction)
    if a.fused:
        model = st.fuse_activations(model)
    model = DDP(model)
    opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=0.9)
    say(f"train_torch_ddp: P={P} global batch {a.batch} ({a.batch // P} per rank), net {a.net}, bn={a.bn}"
        f"{' ' + a.reduction if a.bn == 'sync' else ''}{', fused' if a.fused else ''}"
        f"{', bf16 autocast' if a.bf16 else ''}, {a.steps} steps, lr {a.lr}")
    if a.fused:
        say(st.fusion_report(model.module))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.bf16)

    gen = torch.Generator().manual_seed(a.seed)
    order, pos, n = torch.randperm(len(x_train), generator=gen), 0, a.batch // P
    model.train()
    for step in range(a.steps):
        if pos + a.batch > len(order):
            order, pos = torch.randperm(len(x_train), generator=gen), 0
        mine = order[pos + rank * n:pos + (rank + 1) * n]
        pos += a.batch
        opt.zero_grad()
        with autocast:
            out = model(x_train[mine])
        loss = F.cross_entropy(out.float(), y_train[mine])  # mean over this rank's n
        loss.backward()  # DDP averages over ranks: the gradient of the global mean
        opt.step()
        say(f"step {step} loss {comm.allreduce(loss.item()) / P:.9g}")

    # Test accuracy: each rank takes a contiguous share; eval BN uses running statistics.
    model.eval()
    lo, hi = len(x_test) * rank // P, len(x_test) * (rank + 1) // P
    with torch.no_grad(), autocast:
        correct = sum(int((model.module(x_test[i:min(i + 500, hi)]).argmax(1) == y_test[i:min(i + 500, hi)]).sum())
                      for i in range(lo, hi, 500))
    say(f"test accuracy {comm.allreduce(correct) / len(x_test):.4f}")


if __name__ == "__main__":
    main()
