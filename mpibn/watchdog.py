"""Fail-stop for the process: a rank whose group stopped on a timeout ends in bounded time.

A CollectiveTimeout (or a peer's stop notice) may mean that a peer is gone
or cut off. Under ``python -m mpi4py`` an uncaught error calls MPI_Abort,
and Hydra's mpiexec then ends every rank it can reach. Across a network
partition it cannot reach the far side, and there (measured with MPICH
5.0.2, docs/reliability.md) MPI_Abort *returns* after telling the local
Hydra proxy, and the process then waits forever in MPI_Finalize for a
process manager that never answers. A program that catches the error and
carries on may also wait forever in a collective of its own. Nothing in
MPI bounds either, so mpibn does, as PyTorch's NCCL watchdog ends a process
whose collective timed out:

* ``arm(why)``: when this rank stops a group on a timeout or a peer's stop
  notice. A line on stderr says so. If the process still runs ``grace``
  seconds later (``MPIBN_FAILSTOP_GRACE``, default 60 s; ``off`` disables),
  it calls MPI_Abort (mpiexec then ends every rank it can reach) and exits
  with status EXIT_STATUS;
* at interpreter exit, an armed watchdog cuts what is left of the grace to
  EXIT_GRACE seconds (MPI_Finalize or MPI_Abort across a partition never
  return) with ``alarm``: the kernel ends the process (SIGALRM) even while
  it is blocked inside MPI, where no Python code runs;
* ``disarm()``: when the program recovers, that is, constructs new layers
  on every rank (a collective over the parent communicator completed, so
  every rank is alive and reachable).
"""
import atexit
import math
import os
import signal
import sys
import threading
import time

from . import env

__all__ = ["arm", "disarm", "armed", "EXIT_STATUS", "EXIT_GRACE"]

EXIT_STATUS = 1       # as an uncaught exception under python -m mpi4py
EXIT_GRACE = 5.0      # seconds MPI_Finalize / MPI_Abort get at exit once armed

_state = {"deadline": None, "why": None, "generation": 0, "atexit": False}


def armed():
    """True while a countdown runs."""
    return _state["deadline"] is not None


def arm(why):
    """Start the countdown (once; a second failure changes nothing). ``why``: one line."""
    grace = env.failstop_grace()
    if grace is None or armed():
        return
    _state["deadline"] = time.monotonic() + grace
    _state["why"] = why
    _state["generation"] += 1
    sys.stderr.write(f"mpibn: {why}\nmpibn: this process ends in {grace:g} s unless it constructs new "
                     f"layers on every rank or exits first (MPIBN_FAILSTOP_GRACE=off to keep it)\n")
    sys.stderr.flush()
    threading.Thread(target=_countdown, args=(_state["generation"],), daemon=True,
                     name="mpibn-failstop").start()
    if not _state["atexit"]:
        atexit.register(_at_exit)
        _state["atexit"] = True


def disarm():
    """Stop the countdown: the program recovered."""
    _state["deadline"] = None
    _state["generation"] += 1


def _countdown(generation):
    while _state["generation"] == generation:
        left = _state["deadline"] - time.monotonic()
        if left <= 0:
            _end(f"still running {env.failstop_grace():g} s after: {_state['why']}")
        time.sleep(min(left, 0.5))


def _end(why):
    """End the process, as an uncaught error under ``python -m mpi4py`` would: MPI_Abort
    first, so that mpiexec ends every rank it can reach at once (a rank that only
    exits leaves mpiexec waiting for the proxies it cannot reach), then exit, since
    MPI_Abort returns when mpiexec cannot be reached; SIGALRM in case it blocks."""
    try:
        sys.stderr.write(f"mpibn: ending this process (exit status {EXIT_STATUS}): {why}\n")
        sys.stderr.flush()
        signal.alarm(max(1, math.ceil(EXIT_GRACE)))
        MPI = sys.modules.get("mpi4py.MPI")
        if MPI is not None and MPI.Is_initialized() and not MPI.Is_finalized():
            MPI.COMM_WORLD.Abort(EXIT_STATUS)
    finally:
        os._exit(EXIT_STATUS)


def _at_exit():
    """Interpreter exit with the countdown armed: MPI's own exit may never return.
    After this, no Python thread runs (daemon threads stop at finalisation), so
    the kernel keeps the time: SIGALRM, default action, ends the process."""
    if not armed():
        return
    seconds = max(1, math.ceil(min(EXIT_GRACE, _state["deadline"] - time.monotonic())))
    try:
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(seconds)
    except (ValueError, OSError, AttributeError):    # not the main thread, or no SIGALRM
        pass
