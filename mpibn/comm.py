"""The communication room: group communicators and the one stacked Allreduce.

This is the only module that imports mpi4py. It knows nothing of batch norm
formulas: it builds one communicator per process group, owns the layout of
the buffer that travels and performs the Allreduce. What a row's problem
code means, and the one exception every rank then raises, is
``mpibn.errors`` (the home of every cross-rank error).

Buffer layout (``RowExchange``): a float64 array of shape (P, width), one
row per rank of the group, P the group size::

    row r = [status_r, count_r, layer_r, call_r, detail_r(8), payload_r(k * C)]

HEADER = 12 numbers (status, count, layer, call and 8 details), then the
payload (k = 2 vectors of C numbers for batch norm). Each rank writes only
its own row and leaves the others zero; the Allreduce is a SUM, which then
works as an allgather: adding zeros is exact, so every rank gets every row
bitwise as it was sent, whatever order or tree the MPI library used (only a
-0.0 comes back as +0.0), and the caller combines the rows in rank order
itself. Why, and why an Allreduce rather than an Allgather (a choice for
simplicity: one code path for both modes; in the default mode an Allgather
would move about half the bytes): docs/derivation.md, sections 1 and 7. The
price is P rows instead of one: P * (12 + 2C) numbers, small next to the
activations for any realistic P.

The count travels in the buffer, so uneven and empty shards are weighted
by their counts (never divide by the number of ranks). ``status_r`` is non-zero when rank r
found a problem in its own input: it still joins the collective, so nobody
hangs, and then every rank raises the same exception (``errors.raise_agreed``).
``layer_r`` and ``call_r`` say which layer and which of its calls the rank
is in: ranks that mix up their layers get an agreed error, not a silent mix
of two layers' statistics, and the group stops (fail-stop, ``mpibn.errors``).

Fail-stop's requests and buffers are here: a request left pending when a
rank gives up keeps its buffers for good (``GroupComm._abandon``), and in
debug mode the rank tells its peers with a stop notice (``heed_stops``).
"""
import time

import numpy as np

from . import env, watchdog
from .errors import (N_DETAILS, STOP_INTERRUPTED, STOP_MPI_ERROR, STOP_TIMEOUT, GroupFailed, check_alive,
                     check_tags, collective_timeout, describe_stop, raise_agreed, stop_group)
# Moved to mpibn.errors (the home of every cross-rank error); importable from here for one release.
from .errors import CollectiveTimeout, describe_tag, local_problem  # noqa: F401
from .exact import SUMMED_WIDTH


class MPIUnavailable(ImportError):
    """mpi4py, or the MPI library it loads, is missing."""


def _mpi():
    # mpi4py is imported (and MPI initialised) on the first collective, not
    # at import: mpibn.sync and mpibn.testing import this module and must
    # run where mpi4py is not installed (mpibn.testing simulates the group).
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError) as exc:
        # mpi4py's own message lists every libmpi path it tried, over many lines.
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise MPIUnavailable(
            f"mpibn needs an MPI library for SyncBatchNorm and the synced functions, and none could be "
            f"loaded ({first}): pip install 'mpibn[mpich]', or install a system MPI; mpibn.testing and "
            f"mpibn.functional need none") from None
    return MPI


__all__ = ["GroupComm", "RowExchange", "CollectiveTimeout", "MPIUnavailable", "group_comm_for",
           "validate_process_groups", "group_of", "make_exchange"]

# A row's header, column by column: status (a problem code, 0 for none), count,
# the (layer, call) tag, then N_DETAILS integer details of the problem.
STATUS, COUNT, LAYER, CALL = 0, 1, 2, 3
TAG = slice(LAYER, CALL + 1)
DETAILS = slice(4, 4 + N_DETAILS)
HEADER = 4 + N_DETAILS

# The (layer, call) tag: a layer's forward sends (2 * serial, call), its
# backward (2 * serial + 1, call), serial = 1, 2, ... in construction order;
# the stateless API (0, 0); a backward with no forward NO_FORWARD_TAG.
# Ranks in different calls get an agreed error (errors.check_tags, describe_tag).
NO_FORWARD_TAG = (-1, -1)


def forward_tag(serial, call):
    """The tag of call ``call`` of the forward of the group's layer number ``serial``."""
    return (2 * serial, call)


def backward_tag(tag):
    """The tag of the backward of the forward that sent ``tag``."""
    return (tag[0] + 1, tag[1])


def validate_process_groups(process_groups, size):
    """Check MindSpore's ``process_groups`` argument against a comm of ``size``.

    TypeError for a non-list (the seed contract) or a non-list entry;
    ValueError for non-int ids, ids outside [0, size), repeated ids, an
    empty group and an empty list (``[]`` would silently turn
    synchronisation off; ``None`` means all ranks). Returns the canonical
    form: a tuple of sorted tuples, in sorted order, so that the same
    partition written in any order is the same key on every rank.
    """
    if process_groups is None:
        return None
    if not isinstance(process_groups, list):
        raise TypeError(f"process_groups must be a list of lists of rank ids or None, "
                        f"got {type(process_groups).__name__}: {process_groups!r}")
    if not process_groups:
        raise ValueError("process_groups is [], which names no group; pass None to synchronise "
                         "over all ranks of comm, or a list of non-empty lists of rank ids")
    seen = {}
    groups = []
    for i, group in enumerate(process_groups):
        if not isinstance(group, list):
            raise TypeError(f"process_groups[{i}] must be a list of rank ids, "
                            f"got {type(group).__name__}: {group!r}")
        if not group:
            raise ValueError(f"process_groups[{i}] is empty; every group needs at least one rank id")
        for rank in group:
            if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
                raise ValueError(f"process_groups[{i}] contains {rank!r} "
                                 f"({type(rank).__name__}); rank ids must be int")
            if not 0 <= rank < size:
                raise ValueError(f"process_groups[{i}] contains rank id {rank}, outside "
                                 f"[0, {size}) for a communicator of size {size}")
            if rank in seen:
                raise ValueError(f"rank id {rank} appears twice in process_groups "
                                 f"(in groups {seen[rank]} and {i}); ids must be distinct")
            seen[int(rank)] = i
        groups.append(tuple(sorted(int(r) for r in group)))
    return tuple(sorted(groups))


def group_of(rank, groups):
    """The group in ``groups`` that holds ``rank``, or ``(rank,)`` when none
    does (a rank in no group synchronises with nobody but itself)."""
    return next((g for g in groups if rank in g), (rank,))


class GroupComm:
    """The communicator of the group this rank synchronises with.

    ``comm`` is an MPI intracommunicator of the group, or None when the
    rank is alone (in no group, or in a group of one): then nothing is
    communicated. ``ranks`` are the members' ranks in the parent
    communicator, in group-rank order. ``allreduce_calls`` counts the
    collectives made, for tests and for the curious.

    ``failure``: None, or the first fatal error on this group (fail-stop,
    ``mpibn.errors``): then every call raises GroupFailed before touching
    the buffer. A request left pending at a failure keeps its buffers in
    ``_abandoned`` for good, and the group gets new ones: MPI may still
    write into the old ones, so they are never reused, and never freed.
    """

    def __init__(self, comm, ranks, parent_rank, debug_timeout=None):
        self.comm = comm
        self.ranks = tuple(ranks)
        self.rank = self.ranks.index(parent_rank)
        self.size = len(self.ranks)
        self.allreduce_calls = 0
        # Debug mode (see _allreduce_with_deadline): seconds, or None.
        self.debug_timeout = debug_timeout if debug_timeout is not None else env.debug_timeout()
        self.failure = self.failure_text = None
        self._abandoned = []
        self._users = 0
        self._cache, self._key = {}, None     # where group_comm_for keeps this group
        self._layers = 0
        self._flat = np.zeros(self.size * HEADER)
        self._buf = self._flat.reshape(self.size, HEADER)
        self._summed = self._flat[self._flat.size:]

    def reserve(self, width, summed=0):
        """Make the group's one buffer at least ``width`` numbers per row.

        Every layer of the group exchanges the *same* (P, width) buffer, the
        widest any of them needs. Were widths per layer, ranks that called a
        C=64 and a C=128 layer in the same slot would pass different counts
        to Allreduce (MPICH aborts with "Message truncated"; other MPIs may
        corrupt memory); with one width the call goes through and the tags
        in the header give a clear, agreed error instead. Layers are made
        collectively, so every rank reserves the same widths in the same order.

        ``summed``: numbers of a summed region after the rows (``exact=True``
        layers send integer limbs there), also the widest any layer needs.
        """
        width, summed = max(width, self._buf.shape[1]), max(summed, self._summed.size)
        if (width, summed) != (self._buf.shape[1], self._summed.size):
            self._new_buffer(width, summed)

    def _new_buffer(self, width, summed):
        self._flat = np.zeros(self.size * width + summed)
        self._buf = self._flat[:self.size * width].reshape(self.size, width)
        self._summed = self._flat[self.size * width:]

    def buffer(self):
        """The group's (P, width) exchange buffer, zeroed (and its summed region)."""
        self._flat.fill(0.0)
        return self._buf

    def new_layer_serial(self):
        """A number for a new layer on this group, the same on every rank
        (layers are constructed collectively, in the same order)."""
        self._layers += 1
        return self._layers

    def allreduce_sum(self, buf, tag=(0, 0)):
        """In-place SUM Allreduce of a float64 array over the group.

        An exception inside the collective (an MPI error) stops the group:
        whether the peers completed it is unknown."""
        if self.comm is None:
            return buf
        if self.debug_timeout is None:
            # Uppercase (buffer) Allreduce: no pickling on the hot path.
            MPI = _mpi()
            try:
                self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
            except MPI.Exception as exc:
                raise stop_group(self, exc) from None
        elif not self._allreduce_with_deadline(buf, tag):
            return buf                # a peer stopped the group: the caller raises GroupFailed
        self.allreduce_calls += 1
        return buf

    def _allreduce_with_deadline(self, buf, tag):
        """Debug mode: a non-blocking Allreduce that reports who is missing.

        A rank that never calls its layer cannot be detected by the other
        ranks without waiting: the collective simply does not complete. Here
        each rank also tells every peer "I am in (layer, call)" by a small
        point-to-point message, then polls. Past the deadline it raises
        ``CollectiveTimeout`` naming the peers it heard nothing from (and
        those that are in another call, and those that arrived but went
        silent: ``_silent``); under ``python -m mpi4py`` that ends the whole
        job instead of leaving it to hang.

        Fail-stop: a rank that gives up (deadline, or any exception while
        the request is pending) stops the group, abandons the pending
        request with its buffers and sends every peer a stop notice. A rank
        that is only late finds the notice before it joins, or while it
        polls, and stops too (``heed_stops``; the caller checks after the
        reduction: a late rank whose reduction completed from its peers'
        abandoned requests must not use it).
        """
        MPI = _mpi()
        if self.heed_stops():
            return False              # a peer stopped the group: do not join
        me = np.array(tag, dtype=np.float64)
        peers = [r for r in range(self.size) if r != self.rank]
        heard = {r: np.zeros(2) for r in peers}
        requests = [self.comm.Isend(me, dest=r, tag=_DEBUG_TAG) for r in peers]
        receives = {r: self.comm.Irecv(heard[r], source=r, tag=_DEBUG_TAG) for r in peers}
        reduction = self.comm.Iallreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        pending = (reduction, buf, me, heard, requests, receives)
        deadline = time.monotonic() + self.debug_timeout
        try:
            while not reduction.Test():
                if self.heed_stops():
                    self._abandon(pending)
                    return False
                if time.monotonic() > deadline:
                    exc = self._timeout(tag, me, heard, receives, peers)
                    self._abandon(pending, STOP_TIMEOUT, tag)
                    raise self._stop_unreachable(exc)
                time.sleep(1e-4)
        except CollectiveTimeout:
            raise
        except BaseException as exc:          # KeyboardInterrupt, an MPI error: still pending
            self._abandon(pending, STOP_MPI_ERROR if isinstance(exc, MPI.Exception) else STOP_INTERRUPTED,
                          tag)
            if isinstance(exc, Exception):
                stop_group(self, exc)
            else:
                stop_group(self, RuntimeError(f"{type(exc).__name__} while waiting in "
                                              f"{describe_tag(tag)}"))
            raise
        MPI.Request.Waitall(requests + list(receives.values()))
        return True

    def _timeout(self, tag, me, heard, receives, peers):
        """The CollectiveTimeout for a deadline passed: who never arrived, who is
        elsewhere, who arrived and went silent."""
        missing = [self.ranks[r] for r, q in receives.items() if not q.Test()]
        elsewhere = [(self.ranks[r], heard[r]) for r, q in receives.items()
                     if self.ranks[r] not in missing and tuple(heard[r]) != tuple(me)]
        lost = self._silent([r for r in peers if self.ranks[r] not in missing])
        return collective_timeout(self.ranks[self.rank], self.debug_timeout, tag, self.ranks,
                                  missing, elsewhere, lost, _PROBE_GRACE)

    def _abandon(self, pending, why=None, tag=None):
        """Leave a pending request behind for good: keep it and every buffer it
        uses alive (freeing an active collective request is erroneous, and MPI
        may still write into them), give the group a new buffer of the same
        size, and (``why``) tell every peer that this rank stopped the group."""
        self._abandoned.append(pending)
        self._new_buffer(self._buf.shape[1], self._summed.size)
        if why is not None:
            notice = np.array([why, *tag, self.ranks[self.rank]], dtype=np.float64)
            sends = [self.comm.Isend(notice, dest=r, tag=_STOP_TAG)
                     for r in range(self.size) if r != self.rank]
            self._abandoned.append((notice, sends))

    def heed_stops(self):
        """Debug mode: take in the peers' stop notices that have arrived (no
        waiting, no collective); the first stops this group. True if stopped."""
        if self.comm is None or self.debug_timeout is None:
            return self.failure is not None
        while True:
            notice = self._next_notice()
            if notice is None:
                return self.failure is not None
            if self.failure is None:
                self._stop_unreachable(GroupFailed(describe_stop(notice)))

    def _next_notice(self):
        """The next stop notice that has arrived, or None; never blocks.

        One probe drives MPI's progress once, and a message that arrived while
        this rank made no MPI call is often matched only by the next (measured
        with MPICH/UCX): up to _STOP_PROBES probes, microseconds each. A matched
        probe (Improbe) takes that very message off the queue, and its receive
        is waited for at most _PROBE_GRACE s (a blocking Recv after Iprobe hung
        across emulated hosts): a notice whose data never comes still says that
        a peer stopped the group."""
        MPI = _mpi()
        message = next((m for m in (self.comm.Improbe(source=MPI.ANY_SOURCE, tag=_STOP_TAG)
                                    for _ in range(_STOP_PROBES)) if m is not None), None)
        if message is None:
            return None
        notice = np.full(4, -1.0)
        request = message.Irecv(notice)
        end = time.monotonic() + _PROBE_GRACE
        while not request.Test():
            if time.monotonic() > end:
                self._abandoned.append((request, notice))
                return np.array([0, -2, 0, -1])          # "a peer stopped the group", no details
            time.sleep(1e-4)
        return notice

    def _stop_unreachable(self, exc):
        """Stop the group on a failure after which a peer may be gone or cut off: the
        process must then end in bounded time unless it recovers (``mpibn.watchdog``)."""
        stop_group(self, exc)
        watchdog.arm(f"process group {list(self.ranks)} stopped on rank {self.ranks[self.rank]}: "
                     f"{self.failure_text.splitlines()[0][:300]}")
        return exc

    def _silent(self, arrived):
        """Which of the peers that arrived are gone (debug mode, past the deadline).

        They all sent "I am here", yet the reduction did not complete: a
        rank died or a link failed inside it. Every rank still waiting
        reaches its deadline too, so each sends every peer a probe; a peer
        whose probe does not come within _PROBE_GRACE s is reported lost.
        """
        sends = [self.comm.Isend(np.zeros(1), dest=r, tag=_PROBE_TAG) for r in arrived]
        probes = {r: self.comm.Irecv(np.zeros(1), source=r, tag=_PROBE_TAG) for r in arrived}
        end = time.monotonic() + _PROBE_GRACE
        while not all(q.Test() for q in probes.values()) and time.monotonic() < end:
            time.sleep(1e-3)
        # Probes to and from lost peers never complete: keep them (and their
        # buffers) alive rather than let MPI write into freed memory.
        self._abandoned.append((sends, probes))
        return [self.ranks[r] for r, q in probes.items() if not q.Test()]

    def forget(self):
        """Leave the cache of communicators (fail-stop): new layers with this
        grouping split a new communicator instead of sharing a stopped one."""
        if self._cache.get(self._key) is self:
            del self._cache[self._key]

    def release(self):
        """Drop one user; the communicator is freed with its last user (a
        stopped group's is not: abandoned requests may still use it)."""
        self._users -= 1
        if self._users > 0:
            return
        self.forget()
        if self.comm is not None and not self._abandoned:
            self.comm.Free()
        self.comm = None



_DEBUG_TAG = 0x6D70   # point-to-point tag of the debug-mode "I am here" messages
_PROBE_TAG = 0x6D71   # and of the probes sent past a deadline
_STOP_TAG = 0x6D72    # and of the stop notices (fail-stop)
_PROBE_GRACE = 2.0    # seconds a rank waits for its peers' probes
_STOP_PROBES = 3      # Iprobe calls that look for a stop notice before a collective

# Comm.Split calls made so far (tests check that layers share communicators).
split_calls = 0

# The cache lives *on the parent communicator*, as an MPI attribute (the
# standard way for a library to keep per-communicator state): a dict
# {canonical groups: GroupComm}. It dies with the parent, so a communicator
# freed and another created with the same handle can never be confused.
# Every rank of the parent builds the same layers in the same order, so a
# hit on one rank is a hit on all: Comm.Split (a collective) is called by
# all ranks or by none.
_KEYVAL = None


def group_cache(comm):
    """{canonical process_groups: GroupComm} kept on ``comm``."""
    global _KEYVAL
    if _KEYVAL is None:
        _KEYVAL = _mpi().Comm.Create_keyval()
    cache = comm.Get_attr(_KEYVAL)
    if cache is None:
        cache = {}
        comm.Set_attr(_KEYVAL, cache)
    return cache


def group_comm_for(comm, process_groups):
    """The (shared, reference-counted) GroupComm of this rank.

    A collective over ``comm`` the first time a grouping is seen: every rank
    of ``comm`` must call it (i.e. construct the layer) together, in the
    same order. Later layers with the same grouping share the communicator,
    unless it stopped (fail-stop): then a new one is split.
    """
    groups = validate_process_groups(process_groups, comm.Get_size())
    cache = group_cache(comm)
    group = cached_group(comm, groups)
    if group is None:
        # A bad MPIBN_DEBUG_TIMEOUT on one rank must not leave the others in
        # the Split: every rank raises it (one small allgather per new group).
        from .agree import agree_construction
        try:
            timeout, error = env.debug_timeout(), None
        except ValueError as exc:
            timeout, error = None, exc
        agree_construction(comm, {}, error, "process group communicator")
        watchdog.disarm()        # every rank of comm answered: the program recovered
        group = _split(comm, groups, timeout)
        group._cache, group._key = cache, groups
        cache[groups] = group
    group._users += 1
    return group


def cached_group(comm, groups):
    """The live GroupComm for canonical ``groups`` on ``comm``, or None (none yet,
    or it stopped; a peer's stop notice that arrived counts)."""
    group = group_cache(comm).get(groups)
    if group is not None and group.heed_stops():
        return None
    return group


def _split(comm, groups, debug_timeout=None):
    MPI = _mpi()
    rank, size = comm.Get_rank(), comm.Get_size()
    if groups is None:
        groups = (tuple(range(size)),)
    mine = group_of(rank, groups)
    color = groups.index(mine) if len(mine) > 1 else MPI.UNDEFINED
    # Split is collective over the parent: ranks that will not communicate
    # (alone, or in no group) still take part, with color UNDEFINED.
    global split_calls
    split_calls += 1
    sub = comm.Split(color, key=rank)
    return GroupComm(None if sub == MPI.COMM_NULL else sub, mine, rank, debug_timeout)


class RowExchange:
    """One layer's view of its group's buffer: rows of HEADER + k*C numbers.

    With ``summed`` > 0 the same Allreduce also carries a summed region of
    that many numbers after the rows (``exact=True`` sends its integer limbs
    there): every rank adds its own part and reads the group's sum in
    ``self.summed``. The sum is exact in any reduction order only for
    integers whose partial sums stay below 2^53, which is all it carries.
    """

    def __init__(self, group, channels, k, summed=0):
        self.group = group
        self.channels = channels
        self.k = k
        self.width = HEADER + k * channels
        self.summed_width = summed
        group.reserve(self.width, summed)

    @property
    def buf(self):
        """The buffer of the last exchange (for explain and debugging)."""
        return self.group._buf

    @property
    def summed(self):
        """The group's sum of the summed region after the last exchange."""
        return self.group._summed[:self.summed_width]

    def payload(self):
        """Zero the group's buffer and return this rank's payload, a (k, C)
        view of its row, to fill in place before ``exchange(..., FILLED, ...)``
        (saves a copy of the payload on every call)."""
        buf = self.group.buffer()
        return buf[self.group.rank, HEADER:self.width].reshape(self.k, self.channels)

    def exchange(self, problem, count, payload, context, tag=(0, 0), summed=None):
        """Send this rank's (problem, count, payload (k, C)); return every rank's.

        ``tag`` = (layer, call) identifies the call; all ranks must agree.
        ``summed``: this rank's addend to the summed region (None: zeros).

        Returns (counts (P,), payloads (P, k, C)) after one Allreduce, or
        raises the agreed exception on every rank when any rank reported a
        problem. ``payload`` may be None when ``problem`` is set, and
        ``FILLED`` when it was written into ``payload()`` already.
        """
        group = self.group
        check_alive(group, context)                    # a stopped group runs nothing (fail-stop)
        buf = group._buf if payload is FILLED else group.buffer()
        row = buf[group.rank]
        row[LAYER], row[CALL] = tag                    # two scalars: no array made from a tuple
        if problem is not None:
            row[STATUS] = problem.code
            row[DETAILS] = problem.details
            row[HEADER:] = 0.0                         # a half-filled payload travels as zeros
        else:
            row[COUNT] = count
            if payload is not FILLED:
                rows = row[HEADER:self.width].reshape(self.k, self.channels)
                for i, values in enumerate(payload):   # k (C,) arrays: no stacked copy
                    rows[i] = values
            if summed is not None:
                group._summed[:self.summed_width] = np.ravel(summed)
        # The rows alone when the group has no summed region (the same memory).
        group.allreduce_sum(group._flat if group._summed.size else buf, tag)
        # A peer stopped the group while this rank was late: its result is not used.
        check_alive(group, context)
        # Cheap tests first (this is every call's path); the functions build the
        # messages, and an error with the ranks out of step stops the group.
        tags = buf[:, TAG] if group.size > 1 else None
        if (row[STATUS] != 0.0) if tags is None else buf[:, STATUS].any():
            raise_agreed(buf[:, STATUS], buf[:, DETAILS], group.ranks, context, problem, tags,
                         group)
        if tags is not None:
            check_tags(tags, group.ranks, context, group)
        rows = buf[:, :self.width].copy()              # one copy: the buffer serves the next call
        return rows[:, COUNT], rows[:, HEADER:].reshape(-1, self.k, self.channels)


#: ``RowExchange.exchange``'s payload when it was written into ``payload()`` in place.
FILLED = "filled"


def make_exchange(group_comm, channels, exact=False):
    """A layer's exchange: 2 numbers per channel and rank, plus the summed
    integer limbs (``exact.SUMMED_WIDTH`` per channel) when exact.

    Every layer makes one, in both modes: its width is the transport's
    decision (what travels, how wide), so it lives here with the rows."""
    return RowExchange(group_comm, channels, 2, summed=SUMMED_WIDTH * channels if exact else 0)
