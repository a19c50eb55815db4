"""syncbn.torch.fuse_activations - folds the ReLU (and the residual addition before it)
into the SyncBatchNorm that precedes it, by rewriting the model with torch.fx.

Two patterns, found in the traced graph:
  bn_relu:      y = relu(bn(x))               ->  y = bn'(x)
  bn_add_relu:  y = relu(bn(x) + z)           ->  y = bn'(x, z)      (residual tail)
where bn is a syncbn.torch.SyncBatchNorm and bn' the same layer with fuse_relu=True:
one C call per direction instead of three PyTorch kernels, and a ReLU mask of one bit
per element instead of a saved activation.

Forms recognised. ReLU: an nn.ReLU module (inplace or not; one instance may be called
at several places, as torchvision's ResNet does: calls are rewritten, never modules),
F.relu (inplace or not), torch.relu, torch.relu_ (= F.relu_), Tensor.relu, Tensor.relu_.
Addition: operator.add (what `a + b` and `a += b` trace to), operator.iadd, torch.add
and Tensor.add / Tensor.add_ with alpha absent or 1, in either operand order (an
in-place addition only with the BN output as the operand it overwrites).

Left alone (listed in `unfused_batchnorms` with the reason): a BN that is not a
syncbn SyncBatchNorm (run convert_sync_batchnorm first); a BN module called at more
than one place, or already fused, or already given z; a BN output, or a sum, with any
other user (it would need the value before the ReLU); anything between the BN and the
ReLU other than one addition; an addend that is not a tensor computed in the graph (a
constant or a parameter is most likely a broadcast, which z cannot be); an operation
between the BN and the addition that may write in place (it could change the BN's
input, which the fused call then reads later). When both addends are BN outputs (a
ResNet block with a downsample branch), the first operand's BN is fused.

z must have the shape of the BN output (a residual does); fx cannot see shapes, and a
broadcast addition of two graph tensors would be fused and fail at its first call.

Not done here: convolution folding, any pattern in eval-only code paths that tracing
does not see, models that torch.fx cannot trace (control flow on tensor values).
"""
import operator
from typing import NamedTuple, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from . import torch as _sbt  # syncbn.torch; attributes looked up at call time (it imports this module)

__all__ = ["fuse_activations", "fusion_report", "FusedPattern", "PATTERNS"]


class FusedPattern(NamedTuple):
    """One rewrite. kind: "bn_relu" or "bn_add_relu"; bn: qualified name of the
    SyncBatchNorm (now fuse_relu=True; the same name in the new module, so state_dict
    keys do not change); relu, add, z: names of the nodes of the ReLU, the addition
    and its other operand in the traced graph, before the rewrite (add and z None for
    bn_relu)."""
    kind: str
    bn: str
    relu: str
    add: Optional[str] = None
    z: Optional[str] = None


class _Tracer(fx.Tracer):
    # Every BN stays one call_module node (fx would otherwise trace into our forward).
    def is_leaf_module(self, m, qualname):
        return isinstance(m, _BatchNorm) or super().is_leaf_module(m, qualname)


_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_)
_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
                      operator.ilshift, operator.irshift, operator.imatmul, operator.setitem}


def _relu_operand(node, modules):
    """The node a ReLU node applies to, or None if node is no ReLU."""
    if node.op == "call_module":
        if type(modules.get(node.target)) is nn.ReLU and len(node.args) == 1 and not node.kwargs:
            return node.args[0]
    elif node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        extra = node.args[1:]
        if set(node.kwargs) <= {"inplace"} and len(extra) <= (1 if node.target is F.relu else 0):
            return node.args[0] if node.args else None
    elif node.op == "call_method" and node.target in ("relu", "relu_"):
        if len(node.args) == 1 and not node.kwargs:
            return node.args[0]
    return None


def _addends(node):
    """(a, b, inplace) if node computes a + b (inplace: the result overwrites a), else None."""
    args, kwargs = node.args, dict(node.kwargs)
    if node.op == "call_function" and node.target in (operator.add, operator.iadd):
        ok, inplace = not kwargs, node.target is operator.iadd
    elif node.op == "call_function" and node.target is torch.add:
        ok, inplace = kwargs.pop("alpha", 1) == 1 and not kwargs, False
    elif node.op == "call_method" and node.target in ("add", "add_"):
        ok, inplace = kwargs.pop("alpha", 1) == 1 and not kwargs, node.target == "add_"
    else:
        return None
    return (args[0], args[1], inplace) if ok and len(args) == 2 else None


def _may_write_in_place(node, modules):
    """Whether node might overwrite one of its tensor inputs (conservative)."""
    if node.op == "call_module":
        m = modules.get(node.target)
        if isinstance(m, _BatchNorm):
            return False  # writes its running statistics, never its input
        return getattr(m, "inplace", False) or not type(m).__module__.startswith("torch.nn")
    if node.op in ("call_function", "call_method"):
        name = getattr(node.target, "__name__", str(node.target))
        return (node.target in _INPLACE_OPERATORS or bool(node.kwargs.get("inplace")) or "out" in node.kwargs
                or (name.endswith("_") and not name.endswith("__")))
    return False


class _Matcher:
    def __init__(self, graph, modules, patterns):
        self.modules, self.patterns = modules, patterns
        self.order = {n: i for i, n in enumerate(graph.nodes)}
        self.calls = {}
        for n in graph.nodes:
            if n.op == "call_module" and isinstance(modules.get(n.target), _BatchNorm):
                self.calls[n.target] = self.calls.get(n.target, 0) + 1

    def bn_problem(self, node):
        """Why the BN call `node` cannot be fused whatever follows it, or None."""
        m = self.modules[node.target]
        if type(m) is not _sbt.SyncBatchNorm:
            return f"{type(m).__name__} is not syncbn.torch.SyncBatchNorm (convert_sync_batchnorm first)"
        if getattr(m, "fuse_relu", False):
            return "already fused"
        if len(node.args) != 1 or node.kwargs:
            return "called with z"
        if self.calls[node.target] > 1:
            return f"module called at {self.calls[node.target]} places"
        return None

    def is_bn_call(self, node):
        return isinstance(node, fx.Node) and node.op == "call_module" and node.target in self.calls

    def match(self, bn):
        """A FusedPattern for the BN call node bn, or the reason (a string) why none."""
        p = self._match(bn)
        if isinstance(p, FusedPattern) and p.kind not in self.patterns:
            return f"{p.kind} not among the patterns asked for"
        return p

    def _match(self, bn):
        problem = self.bn_problem(bn)
        if problem:
            return problem
        if len(bn.users) != 1:
            return f"output has {len(bn.users)} users"
        (user,) = bn.users
        if _relu_operand(user, self.modules) is bn:
            return FusedPattern("bn_relu", bn.target, user.name)
        added = _addends(user)
        if added is None:
            return f"followed by {user.name}, neither a ReLU nor an addition"
        a, b, inplace = added
        if a is b:
            return "added to itself"
        z = b if a is bn else a
        if inplace and z is a:
            return f"{user.name} adds it in place into the other operand"
        if bn is b and self.is_bn_call(a) and isinstance(self.match(a), FusedPattern):
            return f"the first addend of {user.name}, {a.name}, is fused with it instead"
        if not isinstance(z, fx.Node) or z.op == "get_attr":
            return f"the other addend of {user.name} is not a tensor computed in the graph"
        if len(user.users) != 1:
            return f"the sum {user.name} has {len(user.users)} users"
        (relu,) = user.users
        if _relu_operand(relu, self.modules) is not user:
            return f"the sum {user.name} is followed by {relu.name}, not a ReLU"
        lo, hi = self.order[bn], self.order[user]
        between = [n for n in self.order if lo < self.order[n] < hi and _may_write_in_place(n, self.modules)]
        if between:
            return f"{between[0].name} between it and {user.name} may write in place"
        return FusedPattern("bn_add_relu", bn.target, relu.name, user.name, z.name)


def _fused_copy(bn):
    """bn with fuse_relu=True, sharing its Parameters and buffers."""
    new = _sbt.SyncBatchNorm(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                             comm=bn.comm, reduction=bn.reduction, timeout=bn.timeout, fuse_relu=True)
    if bn.affine:
        new.weight, new.bias = bn.weight, bn.bias
    new.running_mean, new.running_var = bn.running_mean, bn.running_var
    new.num_batches_tracked = bn.num_batches_tracked
    new.train(bn.training)
    if hasattr(bn, "qconfig"):
        new.qconfig = bn.qconfig
    return new


def _set_submodule(root, target, module):
    *path, name = target.split(".")
    parent = root
    for p in path:
        parent = getattr(parent, p)
    setattr(parent, name, module)


PATTERNS = ("bn_relu", "bn_add_relu")


def fuse_activations(model, patterns=PATTERNS):
    """Returns a torch.fx.GraphModule computing what `model` computes, with every
    SyncBatchNorm -> ReLU and SyncBatchNorm -> add -> ReLU (see this module's
    docstring for the forms) replaced by one SyncBatchNorm(fuse_relu=True) call.
    Not collective (no communication); call it on every rank with the same model
    so that all ranks run the same graph, and before wrapping the model in DDP.

    `model` is not modified. The new module shares its Parameters and buffers with
    model (as convert_sync_batchnorm does); each fused BN is a new SyncBatchNorm
    module under the same name, so the state_dict keys are model's. Its train/eval
    mode is model's. The new module carries two plain attributes:
      fused_patterns:     list of FusedPattern, in graph order;
      unfused_batchnorms: {qualified name: reason} for every BN module left alone.
    fusion_report(new_module) formats both.

    patterns: the kinds to fuse, a subset of ("bn_relu", "bn_add_relu"). In float32,
    "bn_relu" alone gives the unfused model's bits, forward and backward (the fused
    ReLU's mask is PyTorch's ReLU backward); "bn_add_relu" rounds BN(x) + z once
    instead of twice, so results move by rounding.

    A GraphModule is rewritten from its own graph (a copy), anything else traced
    with torch.fx (BN modules as leaves): models with data-dependent control flow
    raise fx's error."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise TypeError("fuse_activations: pass the model before wrapping it in DistributedDataParallel")
    if not set(patterns) <= set(PATTERNS):
        raise ValueError(f"fuse_activations: patterns must be a subset of {PATTERNS}, not {patterns!r}")
    if isinstance(model, fx.GraphModule):
        graph = fx.Graph()
        graph.output(graph.graph_copy(model.graph, {}))
    else:
        graph = _Tracer().trace(model)
    gm = fx.GraphModule(model, graph, model.__class__.__name__)
    modules = dict(gm.named_modules())

    matcher = _Matcher(gm.graph, modules, patterns)
    fused, unfused = [], {}
    for node in list(gm.graph.nodes):
        if matcher.is_bn_call(node):
            m = matcher.match(node)
            if isinstance(m, FusedPattern):
                fused.append((node, m))
            else:
                unfused[node.target] = m

    nodes = {n.name: n for n in gm.graph.nodes}
    now = {}  # a ReLU node already rewritten -> the node now computing its value
    for bn, p in fused:  # in graph order, so an earlier pattern's ReLU can be a later one's z
        _set_submodule(gm, p.bn, _fused_copy(modules[p.bn]))
        relu = nodes[p.relu]
        if p.kind == "bn_relu":
            relu.replace_all_uses_with(bn)
            gm.graph.erase_node(relu)
            now[p.relu] = bn
        else:
            add = nodes[p.add]
            # At the addition: z is read when the original read it, and x was not
            # written since the BN read it (the matcher checked the nodes between).
            with gm.graph.inserting_before(add):
                call = gm.graph.call_module(p.bn, (bn.args[0], now.get(p.z, nodes[p.z])))
            relu.replace_all_uses_with(call)
            for n in (relu, add, bn):
                gm.graph.erase_node(n)
            now[p.relu] = call
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    gm.train(model.training)
    gm.fused_patterns = [p for _, p in fused]
    gm.unfused_batchnorms = unfused
    return gm


def fusion_report(module):
    """What fuse_activations did to module, as text: one line per fused pattern, then
    one per BN left alone with the reason."""
    fused = getattr(module, "fused_patterns", None)
    if fused is None:
        return "not a module returned by fuse_activations"
    kinds = {k: sum(p.kind == k for p in fused) for k in ("bn_relu", "bn_add_relu")}
    lines = [f"fused {len(fused)}: {kinds['bn_relu']} BN->ReLU, {kinds['bn_add_relu']} BN->add->ReLU; "
             f"left alone: {len(module.unfused_batchnorms)} BN"]
    for p in fused:
        lines.append(f"  {p.bn}: {'BN->ReLU' if p.kind == 'bn_relu' else 'BN->add->ReLU'} (relu {p.relu}"
                     + (f", add {p.add}, z {p.z})" if p.add else ")"))
    for name, why in module.unfused_batchnorms.items():
        lines.append(f"  {name}: left alone: {why}")
    return "\n".join(lines)
