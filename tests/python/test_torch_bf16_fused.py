"""syncbn.torch.SyncBatchNorm with bfloat16 tensors and with the fused addition and
ReLU (forward(input, z), fuse_relu=True), against references written out in float64
on the global batch (every rank builds the whole batch from one seed, computes the
reference and compares its own slice):

  y = relu((x - mean) / sqrt(var + eps) * weight + bias + z)      (relu, z optional)

with the gradients of that formula from float64 autograd. bfloat16 results must be
within one bfloat16 ulp of the correctly rounded reference (the library computes in
double and rounds once); float32 results and the float32 module state within float
tolerances.

Run: mpirun -np P python3 -m pytest tests/python (P = 1..4; CTest does this).
"""
import pytest
import torch
import torch.nn as nn
from mpi4py import MPI

import syncbn
import syncbn.torch as st
from conftest import agree, close

C = 3
BF16 = torch.bfloat16


def counts_for(split, P):
    """Samples per rank: even, uneven, or every other rank empty."""
    if split == "even":
        return [2] * P
    if split == "uneven":
        return [1 + 2 * r for r in range(P)]
    return [0 if r % 2 else 3 for r in range(P)]


def reference(X, Z, DY, w, b, relu, eps=1e-5):
    """float64 forward and gradients of the written-out formula on the global batch.
    Returns y, dx, dz, dweight, dbias, batch mean, unbiased batch variance."""
    X = X.double().requires_grad_()
    Z = None if Z is None else Z.double().requires_grad_()
    w = w.double().requires_grad_()
    b = b.double().requires_grad_()
    dims = [0] + list(range(2, X.dim()))
    shape = [1, -1] + [1] * (X.dim() - 2)
    mean = X.mean(dims)
    var = ((X - mean.view(shape)) ** 2).mean(dims)
    y = (X - mean.view(shape)) / torch.sqrt(var.view(shape) + eps) * w.view(shape) + b.view(shape)
    if Z is not None:
        y = y + Z
    if relu:
        y = torch.relu(y)
    (y * DY.double()).sum().backward()
    N = X.numel() // X.shape[1]
    return (y.detach(), X.grad, None if Z is None else Z.grad, w.grad, b.grad, mean.detach(),
            var.detach() * N / (N - 1))


def bf16_ulp(v):
    """One bfloat16 ulp at each value of v (8 significant bits)."""
    _, e = torch.frexp(v.double())
    return torch.ldexp(torch.ones_like(v, dtype=torch.float64), e - 8).clamp(min=2.0 ** -133)


def within_ulp(got, ref, what, failures):
    """got (bfloat16) within one bfloat16 ulp of ref (float64) correctly rounded."""
    if got.dtype != BF16:
        failures.append(f"{what}: dtype {got.dtype}, expected bfloat16")
        return
    if got.shape != ref.shape:
        failures.append(f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}")
        return
    rounded = ref.to(BF16).double()
    err = (got.double() - rounded).abs()
    bad = ~(err <= bf16_ulp(rounded))
    if bad.any():
        i = bad.nonzero()[0].tolist()
        failures.append(f"{what}: {int(bad.sum())} elements beyond 1 ulp, e.g. at {i}: {got[tuple(i)].item()} "
                        f"vs {ref[tuple(i)].item()}")


def global_batch(seed, n, shape, channels_last, dtype):
    gen = torch.Generator().manual_seed(seed)
    full = (n, C) + shape
    X = (torch.randn(full, generator=gen) * 2 + 1).to(dtype)
    Z = torch.randn(full, generator=gen).to(dtype)
    DY = torch.randn(full, generator=gen).to(dtype)
    if channels_last:
        X, Z, DY = (t.contiguous(memory_format=torch.channels_last) for t in (X, Z, DY))
    return X, Z, DY


def module_state(seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    return {"weight": (torch.rand(C, generator=gen) + 0.5).to(dtype), "bias": torch.randn(C, generator=gen).to(dtype),
            "running_mean": torch.randn(C, generator=gen).to(dtype),
            "running_var": (torch.rand(C, generator=gen) + 0.5).to(dtype), "num_batches_tracked": torch.tensor(2)}


# (name, input dtype, module dtype, run under autocast)
CASES = [("f32", torch.float32, torch.float32, False), ("bf16 input", BF16, torch.float32, False),
         ("autocast", BF16, torch.float32, True), ("bf16 module", BF16, BF16, False)]


def one_step(comm, case, split, cl, relu, use_z, reduction="fast"):
    """One training step at P ranks against the float64 reference; returns failures."""
    name, xdt, mdt, autocast = case
    P, r = comm.Get_size(), comm.Get_rank()
    counts = counts_for(split, P)
    lo, hi = sum(counts[:r]), sum(counts[:r + 1])
    X, Z, DY = global_batch(31, sum(counts), (3, 4), cl, xdt)
    state = module_state(32, mdt)
    bn = st.SyncBatchNorm(C, fuse_relu=relu, reduction=reduction).to(mdt)
    bn.load_state_dict(state)
    plain = nn.BatchNorm2d(C).to(mdt)  # the dtypes BatchNorm2d gives in this case
    x = X[lo:hi].detach().requires_grad_()
    z = Z[lo:hi].detach().requires_grad_() if use_z else None
    xp = X[lo:hi].detach().requires_grad_()
    with torch.autocast("cpu", dtype=BF16, enabled=autocast):
        y = bn(x, z)
        yp = plain(xp)
    (y * DY[lo:hi]).sum().backward()
    (yp * DY[lo:hi]).sum().backward()
    tag = f"{name} {split} cl={cl} relu={relu} z={use_z} {reduction}"
    failures = []
    for what, got, want in (("y", y, yp), ("x.grad", x.grad, xp.grad), ("weight.grad", bn.weight.grad, plain.weight.grad),
                            ("running_mean", bn.running_mean, plain.running_mean)):
        if got.dtype != want.dtype:
            failures.append(f"{tag} {what}: dtype {got.dtype}, BatchNorm2d gives {want.dtype}")
    if cl and counts[r] > 0 and (y.stride(1) != 1 or x.grad.stride(1) != 1):
        failures.append(f"{tag}: y or x.grad not channels_last")

    ry, rdx, rdz, rdw, rdb, rmean, rvar = reference(X, Z if use_z else None, DY, state["weight"], state["bias"], relu)
    mine = slice(lo, hi)
    if xdt == BF16:
        within_ulp(y.detach(), ry[mine], tag + " y", failures)
        within_ulp(x.grad, rdx[mine], tag + " x.grad", failures)
        if use_z:
            within_ulp(z.grad, rdz[mine], tag + " z.grad", failures)
    else:
        close(y, ry[mine], 2e-5, tag + " y", failures)
        close(x.grad, rdx[mine], 1e-4, tag + " x.grad", failures)
        if use_z:
            close(z.grad, rdz[mine], 1e-6, tag + " z.grad", failures)
    # Module state: float tolerances (float32), or one bfloat16 rounding more.
    tol = 1e-4 if mdt == torch.float32 else 2 ** -7
    close(bn.weight.grad.float() * P, rdw, tol, tag + " weight.grad*P", failures)
    close(bn.bias.grad.float() * P, rdb, tol, tag + " bias.grad*P", failures)
    m = 0.1
    rtol = 2e-6 if mdt == torch.float32 else 2 ** -8
    close(bn.running_mean, (1 - m) * state["running_mean"].double() + m * rmean, rtol, tag + " running_mean",
          failures)
    close(bn.running_var, (1 - m) * state["running_var"].double() + m * rvar, rtol, tag + " running_var", failures)
    if bn.num_batches_tracked.item() != 3:
        failures.append(f"{tag}: num_batches_tracked {bn.num_batches_tracked.item()}")
    for t, n in ((bn.weight, "weight"), (bn.running_var, "running_var")):
        if t.dtype != mdt:
            failures.append(f"{tag}: {n} became {t.dtype}")
    return failures


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_dtypes_against_float64(comm, case):
    """Each dtype case, splits, both layouts, with and without z and ReLU."""
    failures = []
    for split in ("even", "uneven", "empty"):
        if split == "empty" and comm.Get_size() == 1:
            continue
        for cl in (False, True):
            for relu, use_z in ((False, False), (True, True)) if split != "uneven" else \
                    ((False, True), (True, False)):
                failures += one_step(comm, case, split, cl, relu, use_z)
    agree(failures)


def test_autocast_conv_then_bn(comm):
    """Under torch.autocast a convolution hands BN bfloat16; its output dtype is
    BatchNorm2d's there (bfloat16), and a float32 input stays float32 (autocast does
    not cast batch_norm on CPU). The gradient reaches the convolution's output."""
    failures = []
    P, r = comm.Get_size(), comm.Get_rank()
    torch.manual_seed(40)
    conv = nn.Conv2d(2, C, 3, padding=1)
    X = torch.randn(2 * P, 2, 5, 5)
    DY = torch.randn(2 * P, C, 5, 5)
    bn, plain = st.SyncBatchNorm(C, fuse_relu=True), nn.BatchNorm2d(C)
    with torch.autocast("cpu", dtype=BF16):
        h = conv(X)  # the whole batch on every rank: the reference's input
        hs = h[2 * r:2 * r + 2].detach().requires_grad_()
        y = bn(hs)
        yp = plain(hs.detach())
        y32, yp32 = bn(X[:, :1].expand(-1, C, -1, -1).contiguous()), plain(X[:, :1].expand(-1, C, -1, -1))
    if (y.dtype, y32.dtype) != (yp.dtype, yp32.dtype):
        failures.append(f"under autocast: {y.dtype}, {y32.dtype}; BatchNorm2d {yp.dtype}, {yp32.dtype}")
    (y * DY[2 * r:2 * r + 2].to(y.dtype)).sum().backward()
    ry, rdx = reference(h.detach(), None, DY.to(BF16), torch.ones(C), torch.zeros(C), True)[:2]
    within_ulp(y.detach(), ry[2 * r:2 * r + 2], "autocast y", failures)
    within_ulp(hs.grad, rdx[2 * r:2 * r + 2], "autocast conv-output grad", failures)
    agree(failures)


def test_reproducible_bf16_bitwise_across_splits(comm):
    """reduction='reproducible': bfloat16 y, x.grad, z.grad, the module's gradients and
    running statistics bitwise equal to one rank holding the whole batch."""
    failures = []
    P, r = comm.Get_size(), comm.Get_rank()
    for mdt in (torch.float32, BF16):
        for cl in (False, True):
            for split in ("even", "uneven", "empty"):
                counts = counts_for(split, P)
                lo, hi = sum(counts[:r]), sum(counts[:r + 1])
                X, Z, DY = global_batch(50, sum(counts), (4, 3), cl, BF16)
                results = []
                for mcomm, sl in ((comm, slice(lo, hi)), (MPI.COMM_SELF, slice(None))):
                    bn = st.SyncBatchNorm(C, reduction="reproducible", comm=mcomm, fuse_relu=True).to(mdt)
                    bn.load_state_dict(module_state(51, mdt))
                    x, z = X[sl].detach().requires_grad_(), Z[sl].detach().requires_grad_()
                    y = bn(x, z)
                    (y * DY[sl]).sum().backward()
                    one = sl.stop is None  # the whole batch: cut out this rank's part, scale by 1/P
                    part = (lambda t: t[lo:hi]) if one else (lambda t: t)
                    results.append((part(y.detach()), part(x.grad), part(z.grad),
                                    (bn.weight.grad.float() / P).to(mdt) if one else bn.weight.grad,
                                    (bn.bias.grad.float() / P).to(mdt) if one else bn.bias.grad,
                                    bn.running_mean, bn.running_var))
                    bn.close()
                names = ("y", "x.grad", "z.grad", "weight.grad", "bias.grad", "running_mean", "running_var")
                for name, a, b in zip(names, *results):
                    if mdt == BF16 and name in ("weight.grad", "bias.grad"):
                        continue  # one rank's sum/P was rounded to bfloat16 twice above
                    if not torch.equal(a, b):
                        failures.append(f"module {mdt} cl={cl} {split} {name}: not bitwise equal to one rank")
    agree(failures)


def test_relu_gradients_by_finite_differences(comm):
    """x.grad, z.grad, weight.grad of the fused BN + add + ReLU (float32) against
    central differences of the global loss, on data whose pre-activations are at
    least 0.4 away from the kink (perturbations of 1e-2 cannot flip the mask)."""
    failures = []
    P, r = comm.Get_size(), comm.Get_rank()
    gen = torch.Generator().manual_seed(60)
    X = torch.randn(2 * P, C, 3, 3, generator=gen)
    G = torch.randn(X.shape, generator=gen)
    ref = reference(X, torch.zeros_like(X), G, torch.ones(C), torch.zeros(C), False)[0]
    sign = torch.where(torch.rand(X.shape, generator=gen) < 0.5, -1.0, 1.0)
    Z = (sign * (0.4 + torch.rand(X.shape, generator=gen)) - ref).float()  # pre = +-(0.4 .. 1.4)
    lo, hi = 2 * r, 2 * r + 2
    bn = st.SyncBatchNorm(C, fuse_relu=True, track_running_stats=False)

    def loss(Xv, Zv):
        with torch.no_grad():
            y = bn(Xv[lo:hi].contiguous(), Zv[lo:hi].contiguous())
        return comm.allreduce((y.double() * G[lo:hi].double()).sum().item(), op=MPI.SUM)

    x, z = X[lo:hi].clone().requires_grad_(), Z[lo:hi].clone().requires_grad_()
    (bn(x, z) * G[lo:hi]).sum().backward()
    dx = torch.cat(comm.allgather(x.grad))
    dz = torch.cat(comm.allgather(z.grad))
    dw = bn.weight.grad * P
    h = 1e-2
    picks = torch.randint(0, X.numel(), (6,), generator=gen).tolist()
    for flat in picks:
        for name, T, grad in (("x", X, dx), ("z", Z, dz)):
            Tp, Tm = T.clone(), T.clone()
            Tp.view(-1)[flat] += h
            Tm.view(-1)[flat] -= h
            fd = (loss(Tp, Z) - loss(Tm, Z)) / (2 * h) if name == "x" else (loss(X, Tp) - loss(X, Tm)) / (2 * h)
            got = grad.view(-1)[flat].item()
            if not abs(got - fd) <= 2e-3 * max(1.0, abs(fd)):
                failures.append(f"d loss / d {name}[{flat}]: autograd {got:.6f}, finite differences {fd:.6f}")
    for c in range(C):
        wp = bn.weight.detach().clone()
        vals = []
        for d in (h, -h):
            with torch.no_grad():
                bn.weight.copy_(wp)
                bn.weight[c] += d
            vals.append(loss(X, Z))
        with torch.no_grad():
            bn.weight.copy_(wp)
        fd = (vals[0] - vals[1]) / (2 * h)
        if not abs(dw[c].item() - fd) <= 2e-3 * max(1.0, abs(fd)):
            failures.append(f"d loss / d weight[{c}]: {dw[c].item():.6f}, finite differences {fd:.6f}")
    agree(failures)


def test_errors_on_every_rank(comm):
    """Every unsupported case raises the same SyncBNError code on every rank (no hang,
    no crash), and the message names the supported dtypes."""
    failures = []
    P, r = comm.Get_size(), comm.Get_rank()
    last = r == P - 1

    def codes(fn, what, want=None):
        code, msg = "OK", ""
        try:
            fn()
        except syncbn.SyncBNError as e:
            code, msg = e.code, str(e)
        everyone = comm.allgather(code)
        if len(set(everyone)) != 1 or (want and everyone[0] != want) or everyone[0] == "OK":
            failures.append(f"{what}: codes per rank {everyone}, expected {want or 'one error'} everywhere")
        return msg

    x = torch.randn(2, C, 3, 3)
    bn = st.SyncBatchNorm(C)
    fused = st.SyncBatchNorm(C, fuse_relu=True)
    # The same invalid case on every rank: EINVAL, and the module stays usable.
    for dt in (torch.float64, torch.float16):
        msg = codes(lambda: bn(x.to(dt)), f"{dt} on every rank", "EINVAL")
        if "bfloat16" not in msg or "float32" not in msg:
            failures.append(f"{dt}: message does not name the supported dtypes: {msg}")
    codes(lambda: st.SyncBatchNorm(C).bfloat16()(x), "float32 input to a bfloat16 module", "EINVAL")
    codes(lambda: st.SyncBatchNorm(C).double()(x.double()), "float64 module", "EINVAL")
    codes(lambda: fused(x.bfloat16(), x), "float32 z with bfloat16 input", "EINVAL")
    codes(lambda: fused(x, x[:, :, :2]), "z of another shape", "EINVAL")
    for m, t in ((bn, x), (bn, x.bfloat16()), (fused, x.bfloat16())):
        y = m(t, t) if m is fused else m(t)
        if not torch.isfinite(y.float()).all():
            failures.append(f"module unusable after the errors ({t.dtype})")
    if P > 1:
        # One rank differs. Its invalid call joins the float32 NCHW layer, which the
        # others call too (EINVAL everywhere), or another layer of the same module
        # (EMISMATCH everywhere: those layers are then out of step, and close()
        # lets the module start again).
        cases = [(lambda m: m(x.double() if last else x), "float64 on the last rank"),
                 (lambda m: m(x.half() if last else x.bfloat16()), "float16 on the last rank, bfloat16 elsewhere"),
                 (lambda m: m(x.bfloat16() if last else x.contiguous(memory_format=torch.channels_last)),
                  "bfloat16 on the last rank, float32 channels_last elsewhere"),
                 (lambda m: m(x, x.bfloat16() if last else x), "z of another dtype on the last rank"),
                 (lambda m: m(x, x[:, :, :2] if last else x), "z of another shape on the last rank")]
        for fn, what in cases:
            m = st.SyncBatchNorm(C, fuse_relu=True)
            m(x)  # creates the layers
            codes(lambda: fn(m), what)
            m.close()
            if not torch.isfinite(m(x, x)).all():
                failures.append(f"{what}: module unusable after close()")
    agree(failures)


def test_eval_with_z_and_relu(comm):
    """Eval (never communicates; only rank 0 runs it): PyTorch's batch_norm with the
    running statistics, then + z, then ReLU, each rounded to the element type as the
    unfused modules do, against the float64 formula."""
    failures = []
    if comm.Get_rank() == 0:
        for name, xdt, mdt, _ in CASES[:2] + CASES[3:]:
            state = module_state(70, mdt)
            bn = st.SyncBatchNorm(C, fuse_relu=True).to(mdt).eval()
            bn.load_state_dict(state)
            X, Z, _ = global_batch(71, 3, (2, 5), False, xdt)
            y = bn(X, Z)
            shape = (1, C, 1, 1)
            s = {k: v.double().view(shape) for k, v in state.items() if k != "num_batches_tracked"}
            ref = torch.relu((X.double() - s["running_mean"]) / torch.sqrt(s["running_var"] + 1e-5) * s["weight"] +
                             s["bias"] + Z.double())
            if y.dtype != xdt:
                failures.append(f"eval {name}: y is {y.dtype}")
            close(y, ref, 2e-6 if xdt == torch.float32 else 2 ** -7, f"eval {name} y", failures)
    agree(failures)
