#!/usr/bin/python3
"""train_torch.py - PyTorch peer of syncbn-train (same model, data, optimizer, batch).

Used by scripts/bench/bench_train.sh to compare throughput (images/s of training steps)
and accuracy at an equal number of threads. Single process (torch.set_num_threads);
plain BatchNorm2d, which in one process is what SyncBN computes.
What it does not do: multi-process training or bitwise comparison with the C code.

Usage: /usr/bin/python3 scripts/bench/train_torch.py [--threads N] [--epochs N] [--steps N]
       [--batch B] [--lr X] [--momentum X] [--seed N] [--data DIR] [--no-eval]
"""
import argparse
import gzip
import struct
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

MEAN, STD = 0.2860, 0.3530  # the same constants as examples/train_data.h


def load_idx(path, magic):
    with gzip.open(path, "rb") as f:
        data = f.read()
    if struct.unpack(">I", data[:4])[0] != magic:
        sys.exit(f"train_torch.py: {path}: bad IDX magic; reinstall dataset-fashion-mnist")
    ndims = magic & 0xFF
    dims = struct.unpack(">" + "I" * ndims, data[4:4 + 4 * ndims])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndims).reshape(dims)


def load(dir_, split):
    x = load_idx(f"{dir_}/{split}-images-idx3-ubyte.gz", 0x803)
    y = load_idx(f"{dir_}/{split}-labels-idx1-ubyte.gz", 0x801)
    x = (torch.from_numpy(x.astype(np.float32)) / 255.0 - MEAN) / STD
    return x.unsqueeze(1).contiguous(), torch.from_numpy(y.astype(np.int64))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32 * 7 * 7, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc(x.flatten(1))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--steps", type=int, default=0)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--no-eval", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    xtr, ytr = load(a.data, "train")
    xte, yte = load(a.data, "t10k")
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=a.momentum)
    n = xtr.shape[0]
    steps_per_epoch = (n + a.batch - 1) // a.batch
    total = steps_per_epoch * a.epochs
    if a.steps > 0:
        total = min(total, a.steps)
    g = torch.Generator().manual_seed(a.seed)
    t_train, images, step = 0.0, 0, 0
    while step < total:
        perm = torch.randperm(n, generator=g)
        model.train()
        for k in range(steps_per_epoch):
            if step >= total:
                break
            idx = perm[k * a.batch:(k + 1) * a.batch]
            xb, yb = xtr[idx], ytr[idx]
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            t_train += time.perf_counter() - t0
            images += len(idx)
            step += 1
            if step % 100 == 0:
                print(f"step {step}/{total} loss {loss.item():.6f} {images / t_train:.0f} images/s", flush=True)
        if not a.no_eval and (step % steps_per_epoch == 0 or step >= total):
            model.eval()
            with torch.no_grad():
                correct = sum((model(xte[i:i + 1000]).argmax(1) == yte[i:i + 1000]).sum().item()
                              for i in range(0, xte.shape[0], 1000))
            print(f"epoch {(step - 1) // steps_per_epoch + 1} test accuracy {correct / xte.shape[0]:.4f}", flush=True)
    print(f"throughput {images / t_train:.0f} images/s ({images} images in {t_train:.2f} s of training steps, "
          f"{a.threads} thread{'s' if a.threads != 1 else ''}, torch {torch.__version__})", flush=True)


if __name__ == "__main__":
    main()
