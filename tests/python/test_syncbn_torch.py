"""syncbn.torch.SyncBatchNorm against PyTorch's own BatchNorm in float64 on the
concatenated global batch (every rank builds the whole batch from one seed, runs
the reference, and compares its own slice).

Run: mpirun -np P python3 -m pytest tests/python (P = 1..4; CTest does this).
"""
import copy
import ctypes
import os
import pathlib
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from mpi4py import MPI

import syncbn
import syncbn.torch as st
from syncbn import _lib
from conftest import agree, close

C = 5
REF_BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
SPATIAL = {2: (), 3: (7,), 4: (3, 4), 5: (2, 3, 2)}


def counts_for(split, P):
    """Samples per rank: even, uneven, or with empty ranks (every other rank holds none)."""
    if split == "even":
        return [3] * P
    if split == "uneven":
        return [2 + 3 * r for r in range(P)]
    return [0 if r % 2 else 4 for r in range(P)]


def random_state(gen, affine, track):
    state = {}
    if affine:
        state["weight"] = torch.rand(C, generator=gen) + 0.5
        state["bias"] = torch.randn(C, generator=gen)
    if track:
        state["running_mean"] = torch.randn(C, generator=gen)
        state["running_var"] = torch.rand(C, generator=gen) + 0.5
        state["num_batches_tracked"] = torch.tensor(3)
    return state


def run_case(comm, dims, split, reduction, channels_last, momentum=0.1, affine=True, track=True, steps=2,
             module_comm=None):
    """Two training steps and one eval forward at P ranks against the float64 reference.
    Returns (failures, list of (y, dx) tensors of this rank) for bitwise comparisons."""
    P, r = comm.Get_size(), comm.Get_rank()
    counts = counts_for(split, P)
    lo, hi = sum(counts[:r]), sum(counts[:r + 1])
    gen = torch.Generator().manual_seed(1000 + dims)
    state = random_state(gen, affine, track)
    bn = st.SyncBatchNorm(C, momentum=momentum, affine=affine, track_running_stats=track, reduction=reduction,
                          comm=module_comm)
    ref = REF_BN[dims](C, momentum=momentum, affine=affine, track_running_stats=track).double()
    bn.load_state_dict(state)
    ref.load_state_dict(state)
    failures, outputs = [], []
    tag = f"{dims}d {split} {reduction} cl={channels_last} mom={momentum} affine={affine} track={track}"
    for step in range(steps + 1):
        training = step < steps
        bn.train(training)
        ref.train(training)
        shape = (sum(counts), C) + SPATIAL[dims]
        X = torch.randn(shape, generator=gen) * 2 + 3
        DY = torch.randn(shape, generator=gen)
        if channels_last:
            fmt = torch.channels_last if dims == 4 else torch.channels_last_3d
            X = X.contiguous(memory_format=fmt) if dims >= 4 else X.transpose(1, 2).contiguous().transpose(1, 2)
        x = X[lo:hi].detach().requires_grad_()  # a slice keeps the memory format, also when empty
        y = bn(x)
        (y * DY[lo:hi]).sum().backward()

        # Untracked eval normalizes with each rank's own batch (as PyTorch): its
        # reference is this rank's slice alone; otherwise the whole global batch.
        local = not training and not track
        part = slice(lo, hi) if local else slice(None)
        mine = slice(None) if local else slice(lo, hi)
        Xr = X[part].double().requires_grad_()
        yr = ref(Xr)
        (yr * DY[part].double()).sum().backward()
        what = f"{tag} step {step}"
        close(y, yr[mine], 2e-5, what + " y", failures)
        close(x.grad, Xr.grad[mine], 1e-4, what + " x.grad", failures)
        if channels_last and dims >= 3 and counts[r] > 0 and x.grad.stride(1) != 1:
            failures.append(what + " x.grad not channels_last")
        if affine and training:
            # Ours: the global sum / P on every rank; the reference is the global sum.
            close(bn.weight.grad * P, ref.weight.grad, 1e-4, what + " weight.grad*P", failures)
            close(bn.bias.grad * P, ref.bias.grad, 1e-4, what + " bias.grad*P", failures)
        elif affine:
            # Eval does not communicate: each rank has its own sum, as plain BN.
            for name in ("weight", "bias"):
                total = getattr(bn, name).grad.numpy()
                if not local:
                    total = comm.allreduce(total, op=MPI.SUM)
                close(torch.from_numpy(total), getattr(ref, name).grad, 1e-4, f"{what} sum of {name}.grad", failures)
        if affine:
            bn.weight.grad = bn.bias.grad = ref.weight.grad = ref.bias.grad = None
        if track:
            close(bn.running_mean, ref.running_mean, 2e-6, what + " running_mean", failures)
            close(bn.running_var, ref.running_var, 2e-6, what + " running_var", failures)
            if bn.num_batches_tracked.item() != ref.num_batches_tracked.item():
                failures.append(f"{what} num_batches_tracked {bn.num_batches_tracked.item()} "
                                f"!= {ref.num_batches_tracked.item()}")
        outputs.append((y.detach(), x.grad))
    return failures, outputs


@pytest.mark.parametrize("reduction", ["fast", "reproducible"])
def test_against_float64_reference(comm, reduction):
    failures = []
    for dims in (2, 3, 4, 5):
        for split in ("even", "uneven", "empty"):
            for cl in ((False, True) if dims >= 3 else (False,)):
                if split == "empty" and comm.Get_size() == 1:
                    continue  # one rank holding 4: the same as "even"
                failures += run_case(comm, dims, split, reduction, cl)[0]
    for cl in (False, True):
        failures += run_case(comm, 4, "uneven", reduction, cl, momentum=None, steps=3)[0]
        failures += run_case(comm, 4, "empty", reduction, cl, affine=False)[0]
        failures += run_case(comm, 4, "uneven", reduction, cl, track=False)[0]
        failures += run_case(comm, 4, "even", reduction, cl, affine=False, track=False, momentum=None)[0]
    agree(failures)


def test_reproducible_bitwise_across_rank_counts(comm):
    """P ranks (several splits) against one rank holding the whole batch (COMM_SELF,
    computed on every rank): y and x.grad bitwise equal; the module gradients and
    running statistics too."""
    failures = []
    P, r = comm.Get_size(), comm.Get_rank()
    for dims, cl in ((2, False), (3, True), (4, False), (4, True), (5, False)):
        for split in ("even", "uneven", "empty"):
            counts = counts_for(split, P)
            lo, hi = sum(counts[:r]), sum(counts[:r + 1])
            gen = torch.Generator().manual_seed(7)
            X = torch.randn((sum(counts), C) + SPATIAL[dims], generator=gen) * 3 + 1
            DY = torch.randn(X.shape, generator=gen)
            if cl:
                fmt = torch.channels_last if dims == 4 else None
                X = X.contiguous(memory_format=fmt) if fmt else X.transpose(1, 2).contiguous().transpose(1, 2)
            results = []
            for mcomm, sl in ((comm, slice(lo, hi)), (MPI.COMM_SELF, slice(None))):
                bn = st.SyncBatchNorm(C, reduction="reproducible", comm=mcomm)
                with torch.no_grad():
                    bn.weight.copy_(torch.linspace(0.5, 2, C))
                x = X[sl].detach().requires_grad_()
                y = bn(x)
                (y * DY[sl]).sum().backward()
                results.append((y.detach()[lo:hi] if sl.stop is None else y.detach(),
                                x.grad[lo:hi] if sl.stop is None else x.grad,
                                # ours: the global sum / P; one rank's sum / P rounds the same
                                bn.weight.grad if mcomm is comm else bn.weight.grad / P,
                                bn.bias.grad if mcomm is comm else bn.bias.grad / P,
                                bn.running_mean, bn.running_var))
            names = ("y", "x.grad", "weight.grad", "bias.grad", "running_mean", "running_var")
            for name, a, b in zip(names, *results):
                if not torch.equal(a, b):
                    failures.append(f"{dims}d cl={cl} {split} {name}: not bitwise equal to one rank")
    agree(failures)


def test_module_called_twice_before_backward(comm):
    """A module used twice in one graph: the first call's backward must use the first
    call's statistics (the layer redoes them)."""
    P, r = comm.Get_size(), comm.Get_rank()
    failures = []
    for cl in (False, True):
        gen = torch.Generator().manual_seed(3)
        X1, X2 = torch.randn(2 * P, C, 3, 3, generator=gen), torch.randn(2 * P, C, 3, 3, generator=gen) * 5 - 2
        if cl:
            X1, X2 = X1.contiguous(memory_format=torch.channels_last), X2.contiguous(memory_format=torch.channels_last)
        bn, ref = st.SyncBatchNorm(C), nn.BatchNorm2d(C).double()
        x1, x2 = X1[2 * r:2 * r + 2].requires_grad_(), X2[2 * r:2 * r + 2].requires_grad_()
        y = bn(x1) * bn(x2)
        y.sum().backward()
        X1r, X2r = X1.double().requires_grad_(), X2.double().requires_grad_()
        (ref(X1r) * ref(X2r)).sum().backward()
        close(x1.grad, X1r.grad[2 * r:2 * r + 2], 1e-4, f"cl={cl} x1.grad", failures)
        close(x2.grad, X2r.grad[2 * r:2 * r + 2], 1e-4, f"cl={cl} x2.grad", failures)
        close(bn.weight.grad * P, ref.weight.grad, 1e-4, f"cl={cl} weight.grad", failures)
        close(bn.running_var, ref.running_var, 2e-6, f"cl={cl} running_var", failures)
    agree(failures)


def test_layouts_without_copies(comm):
    """channels_last (4d), channels_last_3d (5d) and L-major (N, C, L) go to the NHWC
    layer and contiguous input to the NCHW one, both reading x in place."""
    failures = []
    cases = [(torch.randn(2, C, 3, 4).contiguous(memory_format=torch.channels_last), True),
             (torch.randn(2, C, 2, 3, 2).contiguous(memory_format=torch.channels_last_3d), True),
             (torch.randn(2, 7, C).transpose(1, 2), True),
             (torch.randn(2, C, 3, 4), False), (torch.randn(2, C), False), (torch.randn(2, C, 1, 1), False)]
    for x, nhwc in cases:
        bn = st.SyncBatchNorm(C)
        got, xp, _ = st._layout_view(x, C)
        if got != nhwc or xp.data_ptr() != x.data_ptr():
            failures.append(f"{tuple(x.shape)} strides {x.stride()}: nhwc {got}, copied {xp.data_ptr() != x.data_ptr()}")
        y = bn(x)
        used = [layer.generation for layer in bn._c_layers()]
        if used != ([0, 1] if nhwc else [1, 0]):
            failures.append(f"{tuple(x.shape)}: forwards per layer (NCHW, NHWC) {used}")
        if y.stride() != x.stride():
            failures.append(f"{tuple(x.shape)}: y strides {y.stride()} != x strides {x.stride()}")
    agree(failures)


def test_eval_never_communicates(comm):
    """Only rank 0 runs eval forwards; a collective inside would hang (CTest timeout)."""
    failures = []
    bn = st.SyncBatchNorm(C).eval()
    bnu = st.SyncBatchNorm(C, track_running_stats=False).eval()
    ref, refu = nn.BatchNorm2d(C).double().eval(), nn.BatchNorm2d(C, track_running_stats=False).double().eval()
    state = random_state(torch.Generator().manual_seed(5), True, True)
    bn.load_state_dict(state)
    ref.load_state_dict(state)
    if comm.Get_rank() == 0:
        x = torch.randn(3, C, 4, 4)
        close(bn(x), ref(x.double()), 2e-5, "eval y", failures)
        close(bnu(x), refu(x.double()), 2e-5, "eval untracked y", failures)
    agree(failures)


def test_state_dict_round_trip(comm):
    failures = []
    src = nn.BatchNorm2d(C)
    src.load_state_dict(random_state(torch.Generator().manual_seed(9), True, True))
    bn = st.SyncBatchNorm(C)
    bn.load_state_dict(src.state_dict())  # strict: same keys
    if list(bn.state_dict()) != list(src.state_dict()):
        failures.append(f"keys {list(bn.state_dict())} != {list(src.state_dict())}")
    bn(torch.randn(2, C, 3, 3) + comm.Get_rank())
    back = nn.BatchNorm2d(C)
    back.load_state_dict(bn.state_dict())
    for k, v in bn.state_dict().items():
        if not torch.equal(v, back.state_dict()[k]):
            failures.append(f"{k} changed in the round trip")
    if bn.num_batches_tracked.item() != 4:
        failures.append(f"num_batches_tracked {bn.num_batches_tracked.item()} != 3 + 1")
    agree(failures)


def test_deepcopy(comm):
    """A deep copy (e.g. an EMA model) has its own parameters and C layers and trains
    like the original."""
    failures = []
    r = comm.Get_rank()
    bn = st.SyncBatchNorm(C)
    x = torch.randn(3, C, 4, generator=torch.Generator().manual_seed(r))
    bn(x)
    twin = copy.deepcopy(bn)
    if twin.comm is not bn.comm or twin.weight is bn.weight or twin._layers:
        failures.append("deepcopy shares parameters or C layers, or copied the communicator")
    with torch.no_grad():
        twin.weight.mul_(2)
    y, y2 = bn(x), twin(x)
    if not torch.allclose(y2 - twin.bias[:, None], 2 * (y - bn.bias[:, None]), atol=1e-6):
        failures.append("the copy's weight is not its own")
    if not torch.equal(bn.running_mean, twin.running_mean) or bn.num_batches_tracked.item() != 2:
        failures.append("the copy's running statistics differ from the original's after the same batches")
    agree(failures)


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.SyncBatchNorm(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.blocks = nn.Sequential(Block(4), Block(4))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 6 * 6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def test_convert_sync_batchnorm(comm):
    P, r = comm.Get_size(), comm.Get_rank()
    failures = []
    torch.manual_seed(11)
    model = TinyResNet()
    model.blocks[1].bn1.weight.requires_grad_(False)
    model.blocks[0].bn2.momentum = None
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    ref = copy.deepcopy(model).double()
    for block in ref.blocks:  # torch.nn.SyncBatchNorm refuses CPU tensors: BatchNorm2d is its reference
        plain = nn.BatchNorm2d(4, momentum=block.bn2.momentum).double()
        plain.load_state_dict(block.bn2.state_dict())
        block.bn2 = plain
    originals = {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    params = {n: p for n, p in model.named_parameters()}
    conv = st.convert_sync_batchnorm(model, reduction="reproducible")
    for name, m in conv.named_modules():
        if name in originals:
            if type(m) is not st.SyncBatchNorm or m.reduction != "reproducible":
                failures.append(f"{name}: {type(m).__name__} not converted")
            elif m.weight is not originals[name].weight or m.running_mean is not originals[name].running_mean:
                failures.append(f"{name}: parameters or buffers not carried over")
            elif m.momentum != originals[name].momentum:
                failures.append(f"{name}: momentum not carried over")
    if [n for n, p in conv.named_parameters()] != list(params) or \
            any(p is not params[n] for n, p in conv.named_parameters()):
        failures.append("parameters of the converted model are not the original ones")
    if conv.blocks[1].bn1.weight.requires_grad:
        failures.append("requires_grad not carried over")
    evalm = st.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(2).eval()))
    if evalm[0].training:
        failures.append("eval state not carried over")

    # Training step at P ranks (uneven split) against the float64 model on the whole batch.
    counts = [2 + r2 for r2 in range(P)]
    lo, hi = sum(counts[:r]), sum(counts[:r + 1])
    gen = torch.Generator().manual_seed(12)
    X = torch.randn(sum(counts), 1, 6, 6, generator=gen)
    G = torch.randn(sum(counts), 3, generator=gen)
    (conv(X[lo:hi]) * G[lo:hi]).sum().backward()
    (ref(X.double()) * G.double()).sum().backward()
    for (name, p), (_, pr) in zip(conv.named_parameters(), ref.named_parameters()):
        if p.grad is None or pr.grad is None:
            if (p.grad is None) != (pr.grad is None):
                failures.append(f"{name}: grad presence differs")
            continue
        is_bn = any(name.startswith(n + ".") for n in originals)
        # BN gradients are the global sum / P on every rank; others are local sums.
        total = p.grad * P if is_bn else torch.from_numpy(comm.allreduce(p.grad.numpy(), op=MPI.SUM))
        close(total, pr.grad, 2e-4, name + ".grad", failures)
    for (name, b), (_, br) in zip(conv.named_buffers(), ref.named_buffers()):
        close(b, br, 1e-5, name, failures)
    agree(failures)


def test_errors_on_every_rank(comm):
    P, r = comm.Get_size(), comm.Get_rank()
    failures = []

    def expect(code, fn, what):
        try:
            fn()
            failures.append(f"{what}: no error")
        except syncbn.SyncBNError as e:
            if e.code != code:
                failures.append(f"{what}: {e.code} ({e}) instead of {code}")

    # A rank with another channel count: the collective create disagrees.
    if P > 1:
        bn = st.SyncBatchNorm(C + (r == P - 1))
        expect("EMISMATCH", lambda: bn(torch.randn(2, bn.num_features, 3)), "different C")
    # A rank passing input of another channel count (or dtype) to the same module.
    bn = st.SyncBatchNorm(C)
    expect("EINVAL", lambda: bn(torch.randn(2, C + (r == 0), 3)), "input with other C")
    expect("EINVAL", lambda: bn(torch.randn(2, C, 3, dtype=torch.float64 if r == P - 1 else torch.float32)),
           "float64 input")
    # The module still works afterwards.
    y = bn(torch.randn(2, C, 3))
    if not torch.isfinite(y).all():
        failures.append("module unusable after an argument error")
    # A global batch of one element per channel.
    bn1 = st.SyncBatchNorm(C)
    expect("EEMPTY", lambda: bn1(torch.randn(1 if r == 0 else 0, C)), "one element")
    if bn1.num_batches_tracked.item() != 0:
        failures.append("num_batches_tracked moved by a failed forward")
    agree(failures)


def test_codes_and_config_match_header(comm):
    header = (pathlib.Path(__file__).resolve().parents[2] / "include" / "syncbn.h").read_text()
    table = {int(v): n for n, v in re.findall(r"X\((\w+), (-?\d+),", header)}
    failures = [] if table == _lib.CODES else [f"header {table} != _lib.CODES {_lib.CODES}"]
    # The ctypes mirror of syncbn_config: the header's fields, in order, then _tail.
    body = re.search(r"typedef struct \{(.*?)\} syncbn_config;", header, re.S).group(1)
    fields = re.findall(r"^\s*(\w+)\s+(\w+);", body, re.M)
    ctype = {"int64_t": ctypes.c_int64, "double": ctypes.c_double, "int": ctypes.c_int,
             "syncbn_layout": ctypes.c_int, "syncbn_reduction": ctypes.c_int,
             "syncbn_dtype": ctypes.c_int, "syncbn_activation": ctypes.c_int}
    want = [(name, ctype.get(t)) for t, name in fields] + [("_tail", ctypes.c_char * 64)]
    got = [(name, t) for name, t in _lib.Config._fields_]
    if [n for n, _ in want] != [n for n, _ in got] or any(a is not b and a != b for (_, a), (_, b) in
                                                          zip(want[:-1], got[:-1])):
        failures.append(f"_lib.Config {got} does not mirror syncbn_config {fields}")
    L = _lib.lib()
    for code in table:
        if not L.syncbn_strerror(code):
            failures.append(f"no message for {code}")
    agree(failures)


def test_library_lookup_order(comm, tmp_path):
    failures = []
    real = os.environ.get("SYNCBN_LIBRARY") or str(_lib.source_tree_library())
    fake_tree = tmp_path / "build" / "src" / "libsyncbn.so"
    # 1. SYNCBN_LIBRARY wins over the tree.
    lib = _lib.find_library(env={"SYNCBN_LIBRARY": real}, tree_library=fake_tree, system_names=())
    if lib._name != real:
        failures.append(f"SYNCBN_LIBRARY not used: {lib._name}")
    # 2. Else the source tree's build.
    lib = _lib.find_library(env={}, tree_library=real, system_names=())
    if lib._name != real:
        failures.append(f"tree library not used: {lib._name}")
    # 3. Else the system path; none loading names all three.
    try:
        _lib.find_library(env={"SYNCBN_LIBRARY": str(tmp_path / "nope.so")}, tree_library=fake_tree,
                          system_names=("libsyncbn-not-installed.so.0",))
        failures.append("no error when nothing loads")
    except OSError as e:
        for part in ("SYNCBN_LIBRARY", str(fake_tree), "system library path"):
            if part not in str(e):
                failures.append(f"error does not name {part}: {e}")
    agree(failures)


def test_timeout_reaches_the_layers(comm):
    """timeout is validated, passed to both C layers (read back with syncbn_get_config),
    and carried by convert_sync_batchnorm; the timed path (MPI_Iallreduce with a
    deadline) gives the float64 reference's results. (Timeouts themselves are tested
    by the C suite test_timeout: a timed-out communicator cannot be used again.)"""
    failures = []
    for bad in (-1.0, float("inf"), float("nan")):
        try:
            st.SyncBatchNorm(C, timeout=bad)
            failures.append(f"timeout={bad} accepted")
        except ValueError:
            pass
    P, r = comm.Get_size(), comm.Get_rank()
    gen = torch.Generator().manual_seed(77)
    X = torch.randn((2 * P, C, 3, 3), generator=gen) * 2 + 1
    DY = torch.randn(X.shape, generator=gen)
    net = st.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(C)), timeout=7.5)
    bn = net[0]
    ref = nn.BatchNorm2d(C).double()
    x = X[2 * r:2 * r + 2].clone().requires_grad_()
    (bn(x) * DY[2 * r:2 * r + 2]).sum().backward()
    Xr = X.double().requires_grad_()
    (ref(Xr) * DY.double()).sum().backward()
    close(x.grad, Xr.grad[2 * r:2 * r + 2], 1e-4, "x.grad with timeout", failures)
    close(bn.weight.grad * P, ref.weight.grad, 1e-4, "weight.grad*P with timeout", failures)
    L = _lib.lib()
    for layer in bn._c_layers():
        cfg = _lib.Config()
        if L.syncbn_get_config(layer.handle, ctypes.byref(cfg)) != 0 or cfg.timeout != 7.5:
            failures.append(f"C layer timeout {cfg.timeout}, expected 7.5")
    agree(failures)


def test_gradients_are_float32_under_a_float64_default(comm):
    """weight.grad and bias.grad are written by the C library as float32, whatever
    torch's default dtype is."""
    failures = []
    P, r = comm.Get_size(), comm.Get_rank()
    gen = torch.Generator().manual_seed(78)
    X = torch.randn((2 * P, C, 4), generator=gen)
    bn = st.SyncBatchNorm(C)
    ref = nn.BatchNorm1d(C).double()
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        x = X[2 * r:2 * r + 2].clone().requires_grad_()
        bn(x).pow(2).sum().backward()
    finally:
        torch.set_default_dtype(old)
    Xr = X.double().requires_grad_()
    ref(Xr).pow(2).sum().backward()
    if bn.weight.grad is None or bn.weight.grad.dtype != torch.float32:
        failures.append(f"weight.grad {None if bn.weight.grad is None else bn.weight.grad.dtype}")
    else:
        close(bn.weight.grad * P, ref.weight.grad, 1e-4, "weight.grad*P under float64 default", failures)
        close(bn.bias.grad * P, ref.bias.grad, 1e-4, "bias.grad*P under float64 default", failures)
    agree(failures)
