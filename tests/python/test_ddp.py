"""DDP over gloo in the mpirun job, with SyncBatchNorm's traffic over MPI: two SGD
steps of a small CNN at P ranks against the same model in one process, float64,
on the whole batch."""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import syncbn.torch as st
from conftest import agree


def make_model():
    torch.manual_seed(21)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def test_ddp_steps_match_single_process(comm):
    P, r = comm.Get_size(), comm.Get_rank()
    st.init_process_group(comm)
    ref = make_model().double()
    model = DDP(st.convert_sync_batchnorm(make_model()))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    n = 3  # per rank: DDP averages per-rank means, equal to the global mean for equal n
    gen = torch.Generator().manual_seed(22)
    failures = []
    for step in range(2):
        X = torch.randn(P * n, 1, 8, 8, generator=gen)
        T = torch.randint(0, 4, (P * n,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(X[r * n:(r + 1) * n]), T[r * n:(r + 1) * n]).backward()
        opt.step()
        opt_ref.zero_grad()
        F.cross_entropy(ref(X.double()), T).backward()
        opt_ref.step()
        for (name, p), pr in zip(model.module.named_parameters(), ref.parameters()):
            err = (p.detach().double() - pr.detach()).abs().max().item()
            if not err <= 1e-5:
                failures.append(f"step {step} {name}: max error {err:.3g}")
            same = comm.allgather(p.detach().numpy().tobytes())
            if len(set(same)) != 1:
                failures.append(f"step {step} {name}: differs between ranks")
        for (name, b), br in zip(model.module.named_buffers(), ref.buffers()):
            err = (b.double() - br).abs().max().item()
            if not err <= 1e-5:
                failures.append(f"step {step} buffer {name}: max error {err:.3g}")
    agree(failures)
