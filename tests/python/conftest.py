"""pytest set-up for the syncbn Python tests, run as `mpirun -np P python3 -m pytest`.

Every rank runs every test. A check failing on some ranks must fail on all of them,
so tests collect their failures and call `agree()`, which sums the failure counts
over ranks before asserting. Any other exception (one rank alone) would leave the
others waiting in a collective: it is reported and the job is aborted instead.
"""
import os
import sys
import traceback

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src", "python"))

from mpi4py import MPI  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


class AgreedFailure(AssertionError):
    """A failure every rank raises together."""


def agree(failures, comm=MPI.COMM_WORLD):
    """Raises AgreedFailure on every rank if any rank has failures (a list of strings)."""
    total = comm.allreduce(len(failures), op=MPI.SUM)
    if total:
        raise AgreedFailure(f"{total} failed check(s) over {comm.Get_size()} ranks; this rank "
                            f"{comm.Get_rank()}: " + "; ".join(failures[:20]))


def close(got, ref, tol, what, failures):
    """Appends to failures unless max|got - ref| <= tol * max(1, max|ref|) (NaN fails)."""
    got, ref = got.detach().double(), ref.detach().double()
    if got.shape != ref.shape:
        failures.append(f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}")
        return
    if got.numel() == 0:
        return
    err = (got - ref).abs().max().item()
    scale = max(1.0, ref.abs().max().item())
    if not err <= tol * scale:  # also catches NaN
        failures.append(f"{what}: max error {err:.3g} > {tol:g} * {scale:.3g}")


@pytest.fixture
def comm():
    return MPI.COMM_WORLD


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if call.excinfo is not None and report.failed and not call.excinfo.errisinstance(AgreedFailure):
        sys.stderr.write(f"\nrank {MPI.COMM_WORLD.Get_rank()}: {item.nodeid} failed on this rank alone; "
                         "aborting the job so that no rank waits forever\n")
        sys.stderr.write("".join(traceback.format_exception(call.excinfo.type, call.excinfo.value,
                                                            call.excinfo.tb)))
        sys.stderr.flush()
        MPI.COMM_WORLD.Abort(1)
