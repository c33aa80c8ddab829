"""The ``MPIBN_*`` environment variables, checked exactly like the arguments they stand for.

``MPIBN_DEBUG_TIMEOUT``  seconds > 0: the ``debug_timeout`` of every group (``mpibn.comm``)
``MPIBN_LOCKSTEP``       1/0 (also true/false, yes/no): ``lockstep`` when the argument is None
``MPIBN_FAILSTOP_GRACE`` seconds > 0, or ``off``: how long a process may run on after one of
                         its groups stopped on a timeout (``mpibn.watchdog``; default 60)

An empty or unset variable means "not set". A bad value raises the argument's
exception type, in a message that names the variable and its value. No
mpi4py here: reading the environment must not initialise MPI.
"""
import numbers
import os

__all__ = ["check_debug_timeout", "debug_timeout", "check_lockstep", "lockstep", "failstop_grace"]

#: MPIBN_FAILSTOP_GRACE when unset (seconds).
FAILSTOP_GRACE = 60.0


def check_debug_timeout(value, name="debug_timeout"):
    """``value`` as float seconds (None stays None); ValueError unless a real number > 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"{name} must be a number of seconds > 0 or None, got {value!r}")
    return float(value)


def _text(variable):
    text = os.environ.get(variable, "").strip()
    return text or None


def debug_timeout():
    """MPIBN_DEBUG_TIMEOUT as float seconds, or None when unset."""
    text = _text("MPIBN_DEBUG_TIMEOUT")
    if text is None:
        return None
    try:
        return check_debug_timeout(float(text), "MPIBN_DEBUG_TIMEOUT")
    except ValueError:               # not a number, or not > 0: the argument's rule, named
        raise ValueError(f"MPIBN_DEBUG_TIMEOUT must be a number of seconds > 0 (or unset), "
                         f"got {os.environ['MPIBN_DEBUG_TIMEOUT']!r}") from None


_TRUE, _FALSE = ("1", "true", "yes"), ("0", "false", "no")


def check_lockstep(value, name="lockstep"):
    """``value`` as bool; TypeError unless a bool (None: read MPIBN_LOCKSTEP)."""
    if value is None:
        return lockstep()
    if not isinstance(value, bool) and type(value).__name__ != "bool_":
        raise TypeError(f"{name} must be a bool or None, got {type(value).__name__}: {value!r}")
    return bool(value)


def lockstep():
    """MPIBN_LOCKSTEP as bool (False when unset)."""
    text = _text("MPIBN_LOCKSTEP")
    if text is None:
        return False
    if text.lower() not in _TRUE + _FALSE:
        raise ValueError(f"MPIBN_LOCKSTEP must be 1 or 0, got {os.environ['MPIBN_LOCKSTEP']!r} "
                         f"(also accepted: true/false, yes/no; empty or unset: 0)")
    return text.lower() in _TRUE


def failstop_grace():
    """MPIBN_FAILSTOP_GRACE as float seconds, None for ``off``, FAILSTOP_GRACE when unset."""
    text = _text("MPIBN_FAILSTOP_GRACE")
    if text is None:
        return FAILSTOP_GRACE
    if text.lower() == "off":
        return None
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not value > 0 or value == float("inf"):
        raise ValueError(f"MPIBN_FAILSTOP_GRACE must be a number of seconds > 0 or 'off', got "
                         f"{os.environ['MPIBN_FAILSTOP_GRACE']!r}")
    return value
