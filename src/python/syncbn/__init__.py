"""syncbn - synchronized batch normalization over MPI, for Python.

`syncbn.torch.SyncBatchNorm` is a PyTorch module backed by the C library
libsyncbn through ctypes (no compiled extension). `syncbn.SyncBNError` is raised
for the library's error codes, on every rank alike for collective calls.

The C library is found at $SYNCBN_LIBRARY, else at build/src/libsyncbn.so of the
source tree this package sits in, else on the system's library path.
"""
import importlib

from ._lib import SyncBNError

__all__ = ["SyncBNError", "torch"]
__version__ = "0.1.0"


def __getattr__(name):
    # `import syncbn` then `syncbn.torch.SyncBatchNorm` works without importing
    # PyTorch until it is used.
    if name == "torch":
        return importlib.import_module(".torch", __name__)
    raise AttributeError(f"module 'syncbn' has no attribute {name!r}")
