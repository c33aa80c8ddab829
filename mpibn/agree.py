"""Agreement at construction: every rank builds the same layer, or all raise.

A layer is built collectively over its parent communicator. If one rank
got ``eps=1e-3`` and the others ``1e-5``, or ``process_groups`` differ
between ranks, nothing fails at once: ``Comm.Split`` hangs or builds
groups nobody meant, or the ranks later combine statistics normalised with
different settings. ``agree_construction`` turns all of that into one
ValueError on every rank, naming the field and the ranks, before the
communicator is split.

How: one lowercase ``allgather`` of a small tuple per rank (this rank's
local validation error, if any, and the values of the agreed fields). It
is a collective over the parent communicator; construction is not the hot
path, so pickling a few numbers is fine. The layer's list of fields lives
in ``SyncBatchNorm.AGREED_FIELDS``: extend it there.

This module imports no mpi4py: it only calls ``comm.allgather``. It is
the third of the three ways errors are agreed (``mpibn.errors`` explains
all three); ``AgreementError`` is defined there and exported here too.
"""
from .errors import AgreementError, builtin_exception, ranks_said, said_once

__all__ = ["agree_construction", "disagreement", "AgreementError"]


def _portable_error(error):
    """(type name, message) of a local validation error, or None."""
    if error is None:
        return None
    return type(error).__name__, str(error)


def describe_disagreement(fields_per_rank):
    """Sentences for every field whose value differs between ranks, or [].

    ``fields_per_rank``: list (one entry per rank, in rank order) of dicts
    field name -> value. A field missing on some rank counts as a
    difference (e.g. two mpibn versions on one job).
    """
    names = []
    for fields in fields_per_rank:
        names += [n for n in fields if n not in names]
    missing = object()
    parts = []
    for name in names:
        by_value = []                       # [(value, [ranks])] in first-seen order
        for rank, fields in enumerate(fields_per_rank):
            value = fields.get(name, missing)
            for seen, ranks in by_value:
                if seen is value or (seen is not missing and value is not missing and _same(seen, value)):
                    ranks.append(rank)
                    break
            else:
                by_value.append((value, [rank]))
        if len(by_value) > 1:
            said = ", ".join(f"{ranks_said(ranks)} {_verb(ranks, value is missing)}"
                                                        f"{'' if value is missing else f' {value!r}'}"
                             for value, ranks in by_value)
            parts.append(f"{name}: {said}")
    return parts


def _verb(ranks, missing):
    one = len(ranks) == 1
    if missing:
        return "lacks it" if one else "lack it"
    return "has" if one else "have"


def _same(a, b):
    # type matters: 1 == 1.0 == True, but a bool affine is not an int affine
    return type(a) is type(b) and a == b


def agree_construction(comm, fields, error=None, context="SyncBatchNorm"):
    """Collective over ``comm``: raise on every rank unless all ranks agree.

    ``fields``: dict field name -> value (plain, comparable Python values:
    numbers, strings, bools, None, tuples); may be None when ``error`` is
    set. ``error``: the exception this rank's own argument checks raised,
    or None. Every rank of ``comm`` must call this, in the same order.

    Raises on every rank, after the one allgather:

    * the exception type of the lowest-ranked failing rank (TypeError or
      ValueError as the local check raised it) when any rank's own
      arguments were invalid, naming each failing rank and its message;
    * ``AgreementError`` (a ValueError) naming each field and which ranks
      hold which value, when the ranks' fields differ.
    """
    everyone = comm.allgather((_portable_error(error), None if error is not None else dict(fields)))
    failed = [(rank, err) for rank, (err, _) in enumerate(everyone) if err is not None]
    if failed:
        said = said_once((rank, msg) for rank, (_, msg) in failed)    # each message once
        exc = builtin_exception(failed[0][1][0])(f"{context}: invalid arguments ({len(failed)} of "
                                                 f"{len(everyone)} ranks): {said}")
        raise exc from error
    error = disagreement([fields for _, fields in everyone], context)
    if error is not None:
        raise error


def disagreement(fields_per_rank, context, who="ranks of the communicator"):
    """The AgreementError for ranks whose fields differ (``describe_disagreement``), or None.

    Also what ``mpibn.testing.reference`` raises for simulated ranks given
    different parameters: the layer's own sentence.
    """
    parts = describe_disagreement(fields_per_rank)
    if not parts:
        return None
    return AgreementError(f"{context}: the {len(fields_per_rank)} {who} must construct the same layer, but "
                          f"they disagree on {'; '.join(parts)}")
