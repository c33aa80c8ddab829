"""Deprecated: a one-release shim. Import ``make_exchange`` from ``mpibn`` (or ``mpibn.comm``).

``from mpibn.sync_exact import make_exchange`` was the documented way to
build an ``exact=True`` exchange for the stateless API. ``make_exchange``
now lives in ``mpibn.comm`` (every layer uses it, in both modes: the width
of the buffer is the transport's decision), and the exact-mode passes this
module held are at the bottom of ``mpibn.sync``, next to the default ones.
This module goes in the next release.
"""
from .comm import make_exchange

__all__ = ["make_exchange"]
