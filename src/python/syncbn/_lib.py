"""_lib.py - ctypes binding of libsyncbn (include/syncbn.h): finding the library,
the one mirror of syncbn_config, argument types, and C codes -> SyncBNError.

What it does not do: no compiled extension, no MPI calls of its own. mpi4py is
imported before the library is loaded, so that Open MPI (which libsyncbn links)
is initialized by mpi4py and loaded with RTLD_GLOBAL for its plugins.

Lifetime of C layers. syncbn_destroy is collective only when it destroys the LAST
layer of a communicator (it then frees the library's private duplicate of it, an
MPI_Comm_free); any other destroy only frees this rank's memory. So the first layer
created on a communicator is preceded by an anchor: a one-channel layer created
collectively with it and kept until the process ends. With the anchor alive no
other destroy can be the last one, and a Layer that Python drops (on any rank, at
any time, in any order: the garbage collector does not run in step across ranks)
is queued by its finalizer and destroyed at the next call of this package into the
library (a Layer's create, a training forward, close()), in the thread making that
call, never from inside the garbage collector (syncbn_create and syncbn_destroy must
not run concurrently).
"""
import ctypes
import os
import pathlib
import threading
import weakref

# The codes of SYNCBN_ERRNO_MAP in include/syncbn.h (tests/python checks this table
# against the header). Messages come from the library (syncbn_strerror).
CODES = {0: "OK", -1: "EINVAL", -2: "ENOMEM", -3: "EMISMATCH", -4: "EEMPTY", -5: "ENONFINITE",
         -6: "EMPI", -7: "ESTATE", -8: "EIO", -9: "EFORMAT", -10: "ETIMEOUT"}

NCHW, NHWC = 0, 1
FAST, REPRODUCIBLE = 0, 1
F32, BF16 = 0, 1
ACT_NONE, ACT_RELU = 0, 1

# Names tried on the system's library path (dlopen: LD_LIBRARY_PATH, ld.so.cache, /usr/lib...).
SYSTEM_NAMES = ("libsyncbn.so.0.3", "libsyncbn.so")  # the ABI this package mirrors (0.3: dtype, activation)


class SyncBNError(RuntimeError):
    """An error code of the C library. `.code` is its name without the SYNCBN_
    prefix ("EMISMATCH", "EINVAL", ...), `.errno` the negative integer. Collective
    calls fail with the same code on every rank."""

    def __init__(self, code, message):
        self.errno = code
        self.code = CODES.get(code, str(code))
        super().__init__(f"{self.code}: {message}")


class Config(ctypes.Structure):
    """The mirror of syncbn_config. Fields must stay in the header's order: a field
    added there is added here, and nowhere else (before `_tail`).

    `_tail` is room for fields a newer library appends: a Config is always made by
    syncbn_config_default (which fills them with their defaults) and handed back to
    syncbn_create unchanged there, so an older mirror stays safe, only unable to set
    the new fields."""

    _fields_ = [
        ("channels", ctypes.c_int64),
        ("eps", ctypes.c_double),
        ("momentum", ctypes.c_double),
        ("affine", ctypes.c_int),
        ("track_running_stats", ctypes.c_int),
        ("layout", ctypes.c_int),
        ("reduction", ctypes.c_int),
        ("timeout", ctypes.c_double),
        ("dtype", ctypes.c_int),
        ("activation", ctypes.c_int),
        ("_tail", ctypes.c_char * 64),
    ]


def source_tree_library():
    """build/src/libsyncbn.so of the source tree this package sits in
    (src/python/syncbn/_lib.py -> the tree is three directories up), or None when the
    package is not in a source tree (installed: never look beside the install)."""
    tree = pathlib.Path(__file__).resolve().parents[3]
    if not (tree / "CMakeLists.txt").is_file() or not (tree / "include" / "syncbn.h").is_file():
        return None
    return tree / "build" / "src" / "libsyncbn.so"


def find_library(env=None, tree_library=None, system_names=SYSTEM_NAMES):
    """Loads libsyncbn: $SYNCBN_LIBRARY, else the source tree's build, else the
    system's library path. Raises OSError naming all three if none loads.
    The arguments exist for tests; the defaults are the real places."""
    env = os.environ if env is None else env
    tree_library = source_tree_library() if tree_library is None else tree_library
    tried = []
    path = env.get("SYNCBN_LIBRARY")
    if path:
        try:
            return ctypes.CDLL(path)
        except OSError as e:
            tried.append(f"SYNCBN_LIBRARY={path}: {e}")
    else:
        tried.append("SYNCBN_LIBRARY: not set")
    if tree_library is None:
        tried.append("source tree build: the package is not in a source tree")
    elif pathlib.Path(tree_library).exists():
        try:
            return ctypes.CDLL(str(tree_library))
        except OSError as e:
            tried.append(f"{tree_library}: {e}")
    else:
        tried.append(f"{tree_library}: no such file")
    for name in system_names:
        try:
            return ctypes.CDLL(name)
        except OSError as e:
            tried.append(f"system library path ({name}): {e}")
    raise OSError("syncbn: libsyncbn.so not found; tried\n  " + "\n  ".join(tried) +
                  "\nSet SYNCBN_LIBRARY to the library, build the source tree (build/src), or install it.")


def _declare(lib):
    c_int, c_int64, vp = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p
    sigs = {
        "syncbn_strerror": (ctypes.c_char_p, [c_int]),
        "syncbn_config_default": (Config, [c_int64]),
        "syncbn_create": (c_int, [ctypes.POINTER(Config), vp, ctypes.POINTER(vp)]),
        "syncbn_destroy": (None, [vp]),
        "syncbn_weight": (vp, [vp]),
        "syncbn_bias": (vp, [vp]),
        "syncbn_running_mean": (vp, [vp]),
        "syncbn_running_var": (vp, [vp]),
        "syncbn_num_batches_tracked": (c_int64, [vp]),
        "syncbn_set_num_batches_tracked": (c_int, [vp, c_int64]),
        "syncbn_get_config": (c_int, [vp, ctypes.POINTER(Config)]),
        "syncbn_forward": (c_int, [vp, vp, c_int64, c_int64, c_int, vp]),
        "syncbn_backward": (c_int, [vp, vp, vp, c_int64, c_int64, vp, vp, vp]),
        "syncbn_forward_ex": (c_int, [vp, vp, vp, c_int64, c_int64, c_int, vp]),
        "syncbn_backward_ex": (c_int, [vp, vp, vp, c_int64, c_int64, vp, vp, vp, vp]),
    }
    for name, (res, args) in sigs.items():
        f = getattr(lib, name)
        f.restype, f.argtypes = res, args
    # Newer libraries explain the last failure of a layer in words; optional.
    if hasattr(lib, "syncbn_last_error"):
        lib.syncbn_last_error.restype, lib.syncbn_last_error.argtypes = ctypes.c_char_p, [vp]
    return lib


_lock = threading.Lock()
_lib = None


def lib():
    """The loaded, declared library (loaded once, on first use)."""
    global _lib
    with _lock:
        if _lib is None:
            from mpi4py import MPI  # noqa: F401  (initializes MPI, loads libmpi globally)
            _lib = _declare(find_library())
        return _lib


def check(rc, layer=None):
    """Raises SyncBNError for a non-zero C code; the message is syncbn_last_error
    of the layer when the library has it, else syncbn_strerror."""
    if rc == 0:
        return
    L = lib()
    msg = None
    if layer and hasattr(L, "syncbn_last_error"):
        msg = L.syncbn_last_error(layer)
    if not msg:
        msg = L.syncbn_strerror(rc)
    raise SyncBNError(rc, msg.decode())


def comm_handle(comm):
    """The MPI_Comm of an mpi4py communicator as a C value (Open MPI: a pointer)."""
    from mpi4py import MPI
    return ctypes.c_void_p(MPI._handleof(comm))


_anchors = {}  # MPI handle of a communicator -> (the mpi4py communicator, anchor layer handle)
_pending = []  # handles of dropped Layers, destroyed by collect()
_pending_lock = threading.Lock()
_live = [0]  # C layers alive that this module created, anchors included


def _drop(handle):
    """A Layer's finalizer: queue only (it may run inside the garbage collector, in
    any thread, while another thread is in the library)."""
    with _pending_lock:
        _pending.append(handle)


def collect():
    """Destroys the queued layers of dropped Layers. Not collective (no queued layer
    is the last of its communicator: see the module's docstring)."""
    if not _pending:  # the common case, without the lock
        return
    with _pending_lock:
        handles = _pending[:]
        del _pending[:]
    L = lib()
    for h in handles:
        L.syncbn_destroy(h)
        _live[0] -= 1


def live_layers():
    """C layers alive that this package created (anchors included), after collect()."""
    collect()
    return _live[0]


def _create(cfg, comm):
    handle = ctypes.c_void_p()
    check(lib().syncbn_create(ctypes.byref(cfg), comm_handle(comm), ctypes.byref(handle)))
    _live[0] += 1
    return handle.value


def _ensure_anchor(comm, timeout):
    """Collective on the first layer of `comm` in this process (every rank creates its
    first layer on `comm` at the same call, so they agree)."""
    from mpi4py import MPI
    key = MPI._handleof(comm)
    known = _anchors.get(key)
    # A communicator freed through the object we keep has another handle now: its
    # handle value may have been reused by a new communicator, which needs its own.
    if known is not None and MPI._handleof(known[0]) == key:
        return
    cfg = lib().syncbn_config_default(1)
    cfg.timeout = timeout
    _anchors[key] = (comm, _create(cfg, comm))


class Layer:
    """One C layer (collective create) and float32 tensor views of the arrays it owns.
    Dropping the last reference queues the C layer for destruction (see collect)."""

    def __init__(self, comm, channels, eps, momentum, affine, track, layout, reduction, timeout=0.0,
                 dtype=F32, activation=ACT_NONE):
        import torch
        import numpy as np

        collect()
        _ensure_anchor(comm, timeout)
        L = lib()
        cfg = L.syncbn_config_default(channels)
        cfg.eps = eps
        cfg.momentum = float("nan") if momentum is None else momentum
        cfg.affine, cfg.track_running_stats = int(affine), int(track)
        cfg.layout, cfg.reduction = layout, reduction
        cfg.timeout = timeout
        cfg.dtype, cfg.activation = dtype, activation
        self.handle = _create(cfg, comm)
        self._finalizer = weakref.finalize(self, _drop, self.handle)
        self._finalizer.atexit = False  # at exit MPI may be finalized already: leave it
        self.layout, self.dtype, self.activation = layout, dtype, activation
        self.generation = 0  # training forwards made; a backward must follow its own

        def view(getter):
            addr = getter(self.handle)
            if not addr:
                return None
            arr = np.ctypeslib.as_array((ctypes.c_float * channels).from_address(addr))
            return torch.from_numpy(arr)

        self.weight, self.bias = view(L.syncbn_weight), view(L.syncbn_bias)
        self.running_mean, self.running_var = view(L.syncbn_running_mean), view(L.syncbn_running_var)

    def close(self):
        """Queues the C layer for destruction now and destroys the queue. The views
        above must not be used afterwards."""
        self.weight = self.bias = self.running_mean = self.running_var = None
        self.handle = None
        self._finalizer()
        collect()
