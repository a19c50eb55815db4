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

C layers are created lazily, on the first training forward, for both layouts at
once (NCHW, then NHWC: two collective creates in the same order on every rank), and
again if eps, momentum, affine or track_running_stats change. They are never
destroyed: syncbn_destroy is collective and Python's garbage collector does not run
in step across ranks; each costs a few arrays of C floats.

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
    communicator, MPI.COMM_WORLD by default). Input: float32 (N, C), (N, C, L),
    (N, C, H, W) or (N, C, D, H, W), contiguous or channels_last; N may be 0 on some
    ranks. reduction: "fast" or "reproducible" (bitwise the same for any number of
    ranks and any split; see the README). timeout: seconds a training forward or
    backward may wait for the other ranks before raising SyncBNError ETIMEOUT
    instead of hanging (0, the default: wait forever); after a timeout every later
    call on that communicator raises ETIMEOUT at once (the library's contract)."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, comm=None,
                 reduction="fast", timeout=0.0):
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be 'fast' or 'reproducible', not {reduction!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        if not (math.isfinite(timeout) and timeout >= 0):
            raise ValueError(f"timeout must be finite and >= 0 seconds, not {timeout!r}")
        self.comm = _comm_or_world(comm)
        self.reduction = reduction
        self.timeout = float(timeout)
        self._nranks = self.comm.Get_size()
        self._layers = {}  # (eps, momentum, affine, track) -> (NCHW layer, NHWC layer)

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
        return super().extra_repr() + f", reduction={self.reduction}"

    def _check_input_dim(self, input):
        if not 2 <= input.dim() <= 5:
            raise ValueError(f"expected 2D to 5D input (got {input.dim()}D input)")

    def _c_layers(self):
        """Both C layers of the current configuration, created collectively when new."""
        momentum = None if self.momentum is None else float(self.momentum)
        key = (float(self.eps), momentum, bool(self.affine), self.running_mean is not None, self.timeout)
        pair = self._layers.get(key)
        if pair is None:
            pair = tuple(_lib.Layer(self.comm, self.num_features, key[0], momentum, key[2], key[3], layout,
                                    _REDUCTIONS[self.reduction], self.timeout) for layout in (_lib.NCHW, _lib.NHWC))
            self._layers[key] = pair
        return pair

    def forward(self, input):
        if not self.training:
            # Never communicates: the running statistics, or (untracked) this rank's batch.
            self._check_input_dim(input)
            tracked = self.running_mean is not None
            return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, not tracked, 0.0,
                                self.eps)
        return _SyncBNFunction.apply(input, self.weight, self.bias, self)


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


def _bad_input(x, C):
    """Why x cannot be passed to the C library, or None."""
    if x.device.type != "cpu":
        return f"input on {x.device}; syncbn runs on CPU tensors"
    if x.dtype != torch.float32:
        return f"input dtype {x.dtype}; SyncBatchNorm takes float32"
    if not 2 <= x.dim() <= 5:
        return f"expected 2D to 5D input (got {x.dim()}D input)"
    if x.shape[1] != C:
        return f"input has {x.shape[1]} channels, the module {C}"
    return None


def _ptr(t):
    return None if t is None or t.numel() == 0 else t.data_ptr()


class _SyncBNFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, bn):
        L = _lib.lib()
        nchw_layer, nhwc_layer = bn._c_layers()
        C = bn.num_features
        bad = _bad_input(x, C)
        if bad is not None:
            # Join the collective with an invalid argument (n = -1): every rank then
            # fails with the same code instead of the others waiting.
            rc = L.syncbn_forward(nchw_layer.handle, None, -1, 1, 1, None)
            raise SyncBNError(rc, f"{L.syncbn_strerror(rc).decode()} (this rank: {bad})")
        nhwc, xp, S = _layout_view(x, C)
        layer = nhwc_layer if nhwc else nchw_layer
        h = layer.handle
        if weight is not None:
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
        if layer.running_mean is not None:
            layer.running_mean.copy_(bn.running_mean)
            layer.running_var.copy_(bn.running_var)
        tracked = bn.num_batches_tracked
        _lib.check(L.syncbn_set_num_batches_tracked(h, 0 if tracked is None else int(tracked)), h)

        yp = torch.empty_like(xp)
        _lib.check(L.syncbn_forward(h, _ptr(xp), xp.shape[0], S, 1, _ptr(yp)), h)
        layer.generation += 1

        if layer.running_mean is not None:
            bn.running_mean.copy_(layer.running_mean)
            bn.running_var.copy_(layer.running_var)
        if tracked is not None:
            tracked.fill_(L.syncbn_num_batches_tracked(h))

        ctx.save_for_backward(xp, weight)
        ctx.layer, ctx.generation, ctx.nhwc, ctx.S, ctx.C, ctx.nranks = layer, layer.generation, nhwc, S, C, bn._nranks
        return yp.movedim(-1, 1) if nhwc else yp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        L = _lib.lib()
        xp, weight = ctx.saved_tensors
        layer, h, n = ctx.layer, ctx.layer.handle, xp.shape[0]
        if layer.generation != ctx.generation:
            # The layer saw a later forward (a module called twice before backward):
            # redo this one's statistics, with this forward's weight. Collective, and
            # the same on every rank since all ranks make the same calls. The running
            # statistics it moves are scratch: the next forward copies the module's
            # over them. (Otherwise the layer still holds this forward's weight.)
            if weight is not None:
                layer.weight.copy_(weight)
            scratch = torch.empty_like(xp)
            _lib.check(L.syncbn_forward(h, _ptr(xp), n, ctx.S, 1, _ptr(scratch)), h)
            layer.generation += 1
            ctx.generation = layer.generation

        dyp = (dy.movedim(1, -1) if ctx.nhwc else dy).contiguous()
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dxp = torch.empty_like(xp) if need_x else None
        dw = torch.empty(ctx.C, dtype=torch.float32) if need_w else None
        db = torch.empty(ctx.C, dtype=torch.float32) if need_b else None
        _lib.check(L.syncbn_backward(h, _ptr(xp), _ptr(dyp), n, ctx.S, _ptr(dxp), _ptr(dw), _ptr(db)), h)

        dx = None if dxp is None else (dxp.movedim(-1, 1) if ctx.nhwc else dxp)
        # The library's dweight/dbias are global sums; /P gives what DDP's average of
        # torch.nn.SyncBatchNorm's per-rank gradients would be.
        if ctx.nranks > 1:
            for g in (dw, db):
                if g is not None:
                    g.div_(ctx.nranks)
        return dx, dw, db, None


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
