"""syncbn.torch - synchronized batch normalization for PyTorch on CPUs, over MPI.

SyncBatchNorm normalizes each rank's slice of the global batch with the mean and
variance of the whole global batch (libsyncbn: one MPI_Allreduce of O(C) words in
the training forward, one in the backward). torch.nn.SyncBatchNorm refuses CPU
tensors; this module is its CPU counterpart, and works under DDP over gloo.

Ownership: the module owns ordinary PyTorch Parameters and buffers (weight, bias,
running_mean, running_var, num_batches_tracked, as BatchNorm2d). The C layer owns
its own float arrays; every training forward copies the module's values into them
(O(C)), calls the library, and copies the running statistics and
num_batches_tracked back. Optimizers, state_dict and DDP see only PyTorch tensors.

C layers are created lazily, on the first training forward, for both element
types (float32, bfloat16) and both layouts at once (four collective creates in the
same order on every rank), and again if eps, momentum, affine,
track_running_stats or fuse_relu change. They are destroyed when the module is
garbage collected, or at once by close(), without any collective call: see
syncbn._lib ("Lifetime of C layers") for why that is safe on each rank alone.

Layout: a tensor whose channel stride is 1 (channels_last, channels_last_3d, or
(N, C, L) with L-major storage) goes through the NHWC layout without a copy; any
other through NCHW (.contiguous(), a no-op for contiguous input). An empty slice
(N = 0) must carry the same memory format as the other ranks' (x[:0] does), else
every rank gets SyncBNError EMISMATCH.

Eval mode never communicates: it is PyTorch's own batch_norm with the running
statistics (or, untracked, this rank's batch), as torch.nn.SyncBatchNorm does.

Gradients: x.grad is torch.nn.SyncBatchNorm's (global sums of the upstream
gradients of all ranks); weight.grad and bias.grad are the global sums divided by
the number of ranks P, identical on every rank: the value torch.nn.SyncBatchNorm
reaches after DDP averages it, so DDP's averaging leaves it unchanged.

Element types (training; each case as torch.nn.BatchNorm2d of PyTorch 1.13):
  float32 input, float32 module       float32 layer; everything float32.
  bfloat16 input, float32 module      bfloat16 layer: y, x.grad (and z.grad) bfloat16,
    (explicit, or a conv's output       each computed in double and rounded once;
    under torch.autocast("cpu",         weight/bias grads and running statistics
    dtype=torch.bfloat16), which        float32. autocast leaves batch_norm alone on
    does not cast batch_norm)           CPU, so float32 input stays float32 there.
  bfloat16 input, bfloat16 module     bfloat16 layer; the layer's parameters and
    (.bfloat16())                       running statistics are float32 in C: each
                                        training forward widens the module's bfloat16
                                        weight, bias and running statistics into them
                                        (exact), and afterwards rounds the updated
                                        running statistics back to bfloat16 (nearest
                                        even); weight.grad and bias.grad come out of C
                                        in float32 (global sum, then /P) and are
                                        rounded once to bfloat16.
  anything else (float64, float16,    SyncBNError EINVAL on every rank, naming the
    float32 input to a bfloat16         supported cases (BatchNorm2d raises for all
    module, mixed parameter types)      of these but float64, which we do not support).

Fusion (fuse_relu, z): forward(input, z) returns BN(input) + z, then ReLU when
fuse_relu is set, as Apex's SyncBatchNorm(fuse_relu=...)(x, z). In training it is
one pass of the C library: BN(x) + z is formed in double and rounded once to the
element type, and the ReLU keeps a mask of one bit per element for the backward
(whose gradient at the kink is PyTorch's: 0 where the rounded sum is <= 0). z must
have input's shape and element type (else SyncBNError EINVAL on every rank); it is
read in input's memory format (a z in another one is copied once). z.grad is the
upstream gradient masked by the ReLU. Eval runs PyTorch's batch_norm, then + z,
then relu (rounded after each step, as the unfused modules).

Every rank must make the same calls in the same order (forward of the same
modules, backward of the same graph), as for any collective.
"""
import copy
import math
import os
import socket

import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from . import _lib
from ._lib import SyncBNError

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm", "init_process_group", "SyncBNError", "fuse_activations",
           "fusion_report"]

_REDUCTIONS = {"fast": _lib.FAST, "reproducible": _lib.REPRODUCIBLE}


def _comm_or_world(comm):
    if comm is None:
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
    return comm


class SyncBatchNorm(_BatchNorm):
    """Batch normalization over the global batch of all ranks of `comm` (an mpi4py
    communicator, MPI.COMM_WORLD by default). Input: float32 or bfloat16 (N, C),
    (N, C, L), (N, C, H, W) or (N, C, D, H, W), contiguous or channels_last; N may be
    0 on some ranks; see the module's docstring for the element types. reduction:
    "fast" or "reproducible" (bitwise the same for any number of ranks and any
    split; see docs/reproducible.md). timeout: seconds a training forward or
    backward may wait for the other ranks before raising SyncBNError ETIMEOUT
    instead of hanging (0, the default: wait forever); after a timeout every later
    call on that communicator raises ETIMEOUT at once (the library's contract).
    fuse_relu: apply ReLU after the normalization (and the addition of z), fused.

    forward(input, z=None): BN(input) [+ z] [then ReLU]; z, if given, is like input.

    close(): destroys the module's C layers now instead of when the module is
    garbage collected (a later training forward creates them again, collectively).
    Call it on every rank, as everything else; it communicates nothing."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, comm=None,
                 reduction="fast", timeout=0.0, fuse_relu=False):
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be 'fast' or 'reproducible', not {reduction!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        if not (math.isfinite(timeout) and timeout >= 0):
            raise ValueError(f"timeout must be finite and >= 0 seconds, not {timeout!r}")
        self.comm = _comm_or_world(comm)
        self.reduction = reduction
        self.timeout = float(timeout)
        self.fuse_relu = bool(fuse_relu)
        self._nranks = self.comm.Get_size()
        self._layers = {}  # (eps, momentum, affine, track, timeout, relu) -> 4 layers: (F32, BF16) x (NCHW, NHWC)

    def __deepcopy__(self, memo):
        # A copy shares the communicator (mpi4py cannot copy one) and gets no C layers:
        # it creates its own, collectively, at its first training forward.
        memo[id(self.comm)] = self.comm
        memo[id(self._layers)] = {}
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__dict__.update({k: copy.deepcopy(v, memo) for k, v in self.__dict__.items()})
        return new

    def extra_repr(self):
        return super().extra_repr() + f", reduction={self.reduction}" + (", fuse_relu=True" if self.fuse_relu else "")

    def _check_input_dim(self, input):
        if not 2 <= input.dim() <= 5:
            raise ValueError(f"expected 2D to 5D input (got {input.dim()}D input)")

    def _c_layers(self, dtype=_lib.F32):
        """The (NCHW, NHWC) C layers of the current configuration for element type
        dtype. All four (float32 and bfloat16, both layouts) are created at once,
        collectively, when the configuration is new: ranks that disagree on the
        input's type or layout then call different layers of the same size and get
        SyncBNError EMISMATCH, rather than one rank creating a layer the others do
        not."""
        momentum = None if self.momentum is None else float(self.momentum)
        act = _lib.ACT_RELU if self.fuse_relu else _lib.ACT_NONE
        key = (float(self.eps), momentum, bool(self.affine), self.running_mean is not None, self.timeout, act)
        layers = self._layers.get(key)
        if layers is None:
            layers = tuple(_lib.Layer(self.comm, self.num_features, key[0], momentum, key[2], key[3], layout,
                                      _REDUCTIONS[self.reduction], self.timeout, t, act)
                           for t in (_lib.F32, _lib.BF16) for layout in (_lib.NCHW, _lib.NHWC))
            self._layers[key] = layers
        return layers[2 * dtype:2 * dtype + 2]
    def close(self):
        """Destroys this module's C layers now (not collective; see the class docstring)."""
        layers, self._layers = self._layers, {}
        for group in layers.values():
            for layer in group:
                layer.close()

    def forward(self, input, z=None):
        if not self.training:
            # Never communicates: the running statistics, or (untracked) this rank's batch.
            self._check_input_dim(input)
            tracked = self.running_mean is not None
            y = F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, not tracked, 0.0,
                             self.eps)
            if z is not None:
                y = y + z
            return F.relu(y) if self.fuse_relu else y
        return _SyncBNFunction.apply(input, z, self.weight, self.bias, self)


def _layout_view(x, C):
    """(nhwc, xp, S): xp is x as the C library reads it, [n][C][S] (NCHW) or [n][S][C]
    (NHWC, x.movedim(1, -1)), dense. When C == 1 or S == 1 both layouts are the same
    memory and NCHW is used, so that ranks cannot disagree on the layer."""
    S = 1
    for d in x.shape[2:]:
        S *= d
    if C > 1 and S > 1 and x.stride(1) == 1:
        return True, x.movedim(1, -1).contiguous(), S
    return False, x.contiguous(), S


_SUPPORTED = ("float32 input with float32 parameters, or bfloat16 input with float32 or bfloat16 parameters "
              "(e.g. under torch.autocast('cpu', dtype=torch.bfloat16), or a .bfloat16() module)")
_C_DTYPE = {torch.float32: _lib.F32, torch.bfloat16: _lib.BF16}


def _bad_input(x, z, bn):
    """Why x (and z) cannot be passed to the C library, or None."""
    C = bn.num_features
    if x.device.type != "cpu":
        return f"input on {x.device}; syncbn runs on CPU tensors"
    params = [t.dtype for t in (bn.weight, bn.running_mean) if t is not None]
    if x.dtype not in _C_DTYPE or any(d not in _C_DTYPE for d in params) or len(set(params)) > 1 or \
            (x.dtype == torch.float32 and torch.bfloat16 in params):
        names = ", ".join(sorted({str(d).replace("torch.", "") for d in params})) or "none"
        return (f"input dtype {str(x.dtype).replace('torch.', '')} with parameters of dtype {names}; "
                f"SyncBatchNorm takes {_SUPPORTED}")
    if not 2 <= x.dim() <= 5:
        return f"expected 2D to 5D input (got {x.dim()}D input)"
    if x.shape[1] != C:
        return f"input has {x.shape[1]} channels, the module {C}"
    if z is not None and (z.shape != x.shape or z.dtype != x.dtype or z.device != x.device):
        return f"z is {tuple(z.shape)} {z.dtype} on {z.device}, input {tuple(x.shape)} {x.dtype}: they must match"
    return None


def _ptr(t):
    return None if t is None or t.numel() == 0 else t.data_ptr()


def _as_layout(t, nhwc):
    return (t.movedim(1, -1) if nhwc else t).contiguous()


class _SyncBNFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, z, weight, bias, bn):
        L = _lib.lib()
        _lib.collect()
        C = bn.num_features
        bad = _bad_input(x, z, bn)
        nchw_layer, nhwc_layer = bn._c_layers(_C_DTYPE.get(x.dtype, _lib.F32) if bad is None else _lib.F32)
        if bad is not None:
            # Join the collective with an invalid argument (n = -1): every rank then
            # fails with the same code instead of the others waiting.
            rc = L.syncbn_forward_ex(nchw_layer.handle, None, None, -1, 1, 1, None)
            raise SyncBNError(rc, f"{L.syncbn_strerror(rc).decode()} (this rank: {bad})")
        nhwc, xp, S = _layout_view(x, C)
        layer = nhwc_layer if nhwc else nchw_layer
        h = layer.handle
        if weight is not None:
            layer.weight.copy_(weight)  # bfloat16 -> float32 is exact
            layer.bias.copy_(bias)
        if layer.running_mean is not None:
            layer.running_mean.copy_(bn.running_mean)
            layer.running_var.copy_(bn.running_var)
        tracked = bn.num_batches_tracked
        _lib.check(L.syncbn_set_num_batches_tracked(h, 0 if tracked is None else int(tracked)), h)

        zp = None if z is None else _as_layout(z, nhwc)
        yp = torch.empty_like(xp)
        _lib.check(L.syncbn_forward_ex(h, _ptr(xp), _ptr(zp), xp.shape[0], S, 1, _ptr(yp)), h)
        layer.generation += 1

        if layer.running_mean is not None:
            bn.running_mean.copy_(layer.running_mean)  # rounded to nearest even for a bfloat16 module
            bn.running_var.copy_(layer.running_var)
        if tracked is not None:
            tracked.fill_(L.syncbn_num_batches_tracked(h))

        ctx.save_for_backward(xp, zp, weight)
        ctx.layer, ctx.generation, ctx.nhwc, ctx.S, ctx.C, ctx.nranks = layer, layer.generation, nhwc, S, C, bn._nranks
        return yp.movedim(-1, 1) if nhwc else yp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        L = _lib.lib()
        xp, zp, weight = ctx.saved_tensors
        layer, n = ctx.layer, xp.shape[0]
        if layer.handle is None:
            raise SyncBNError(-7, f"{L.syncbn_strerror(-7).decode()} (the module was closed before this backward)")
        h = layer.handle
        if layer.generation != ctx.generation:
            # The layer saw a later forward (a module called twice before backward):
            # redo this one's statistics (and ReLU mask), with this forward's weight.
            # Collective, and the same on every rank since all ranks make the same
            # calls. The running statistics it moves are scratch: the next forward
            # copies the module's over them. (Otherwise the layer still holds this
            # forward's weight.)
            if weight is not None:
                layer.weight.copy_(weight)
            scratch = torch.empty_like(xp)
            _lib.check(L.syncbn_forward_ex(h, _ptr(xp), _ptr(zp), n, ctx.S, 1, _ptr(scratch)), h)
            layer.generation += 1
            ctx.generation = layer.generation

        dyp = _as_layout(dy.to(xp.dtype), ctx.nhwc)
        need_x, need_z, need_w, need_b = ctx.needs_input_grad[:4]
        dxp = torch.empty_like(xp) if need_x else None
        dzp = torch.empty_like(xp) if need_z and zp is not None else None
        dw = torch.empty(ctx.C, dtype=torch.float32) if need_w else None
        db = torch.empty(ctx.C, dtype=torch.float32) if need_b else None
        _lib.check(L.syncbn_backward_ex(h, _ptr(xp), _ptr(dyp), n, ctx.S, _ptr(dxp), _ptr(dzp), _ptr(dw), _ptr(db)),
                   h)

        dx, dz = ((None if t is None else (t.movedim(-1, 1) if ctx.nhwc else t)) for t in (dxp, dzp))
        # The library's dweight/dbias are global sums; /P gives what DDP's average of
        # torch.nn.SyncBatchNorm's per-rank gradients would be. A bfloat16 module's
        # gradients are rounded once more, to bfloat16.
        grads = []
        for g in (dw, db):
            if g is not None:
                if ctx.nranks > 1:
                    g.div_(ctx.nranks)
                g = g.to(weight.dtype)
            grads.append(g)
        return (dx, dz) + tuple(grads) + (None,)


def convert_sync_batchnorm(module, comm=None, reduction="fast", timeout=0.0):
    """Replaces every _BatchNorm in module (BatchNorm1d/2d/3d, torch.nn.SyncBatchNorm,
    this SyncBatchNorm) by a SyncBatchNorm sharing its parameters and buffers, with
    requires_grad and train/eval state carried over. Returns the converted module.
    timeout: as SyncBatchNorm's."""
    out = module
    if isinstance(module, _BatchNorm):
        out = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, comm, reduction, timeout)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias  # the same Parameters
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
        if hasattr(module, "qconfig"):
            out.qconfig = module.qconfig
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, comm, reduction, timeout))
    return out


def init_process_group(comm=None, backend="gloo"):
    """torch.distributed for DDP inside the mpirun job: rank and world size from the
    mpi4py communicator; MASTER_ADDR 127.0.0.1 (one host) unless set; MASTER_PORT
    from the environment, else a free port chosen by rank 0 and broadcast over MPI.
    Does nothing if torch.distributed is already initialized."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    comm = _comm_or_world(comm)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if os.environ["MASTER_ADDR"] == "127.0.0.1":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if "MASTER_PORT" not in os.environ:
        port = None
        if comm.Get_rank() == 0:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        os.environ["MASTER_PORT"] = str(comm.bcast(port, root=0))
    dist.init_process_group(backend, rank=comm.Get_rank(), world_size=comm.Get_size())


from .fuse import fuse_activations, fusion_report  # noqa: E402  (fuse.py uses this module's names)
