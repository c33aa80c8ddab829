"""Construction agreement (mpibn.agree): disagreeing ranks raise on every rank.

Serial tests drive ``agree_construction`` with a stand-in communicator whose
allgather returns what simulated peers sent; the MPI tests construct real
layers with one or several disagreeing ranks and check that every rank gets
the same ValueError, promptly, before Comm.Split.
"""
import numpy as np
import pytest
from mpi4py import MPI

from mpibn import SyncBatchNorm
from mpibn.fingerprint import digest
from mpibn.agree import AgreementError, agree_construction, describe_disagreement
from mpibn import comm as mpibn_comm

FIELDS = {"num_features": 4, "eps": 1e-5, "momentum": 0.9, "dtype": "float32", "affine": True,
          "use_batch_statistics": None, "process_groups": None, "nonfinite": "raise"}


class FakeComm:
    """allgather over simulated ranks: ``others`` are the peers' objects."""

    def __init__(self, rank, others):
        self.rank, self.others = rank, others

    def allgather(self, obj):
        everyone = list(self.others)
        everyone.insert(self.rank, obj)
        return everyone


def test_agreement_passes_when_all_equal():
    comm = FakeComm(1, [(None, dict(FIELDS))] * 3)
    assert agree_construction(comm, dict(FIELDS)) is None


@pytest.mark.parametrize("field, other", [("num_features", 8), ("eps", 1e-3), ("momentum", 0.99),
                                          ("dtype", "float64"), ("affine", False),
                                          ("use_batch_statistics", True),
                                          ("process_groups", ((0, 1), (2, 3))), ("nonfinite", "propagate")])
def test_one_field_differs_names_field_and_ranks(field, other):
    theirs = dict(FIELDS, **{field: other})
    comm = FakeComm(0, [(None, dict(FIELDS)), (None, theirs), (None, theirs)])
    with pytest.raises(AgreementError) as info:
        agree_construction(comm, dict(FIELDS))
    msg = str(info.value)
    assert f"{field}: ranks [0, 1] have {FIELDS[field]!r}, ranks [2, 3] have {other!r}" in msg
    assert isinstance(info.value, ValueError)


def test_several_fields_and_types_differ():
    # 1.0 == 1 == True in Python, but a float momentum is not an int one
    parts = describe_disagreement([dict(FIELDS), dict(FIELDS, eps=1e-3, affine=1), dict(FIELDS, eps=1e-3)])
    assert parts == ["eps: rank 0 has 1e-05, ranks [1, 2] have 0.001",
                     "affine: ranks [0, 2] have True, rank 1 has 1"]


def test_missing_field_is_a_difference():
    short = {k: v for k, v in FIELDS.items() if k != "nonfinite"}
    parts = describe_disagreement([dict(FIELDS), short])
    assert parts == ["nonfinite: rank 0 has 'raise', rank 1 lacks it"]


def test_local_error_on_a_peer_raises_its_type_here():
    comm = FakeComm(0, [(None, dict(FIELDS)), (("TypeError", "eps must be a float, got int: 1"), None)])
    with pytest.raises(TypeError, match=r"invalid arguments \(1 of 3 ranks\): rank 2: eps must be a float"):
        agree_construction(comm, dict(FIELDS))


def test_local_error_wins_over_disagreement_and_unknown_types_become_runtime_error():
    comm = FakeComm(0, [(("KeyError2", "odd"), None), (None, dict(FIELDS, eps=1.0))])
    with pytest.raises(RuntimeError, match="rank 1: odd"):
        agree_construction(comm, dict(FIELDS))


def test_layer_fields_are_canonical():
    with SyncBatchNorm(3, use_batch_statistics=np.bool_(True), dtype="float16", comm=MPI.COMM_SELF) as bn:
        fields = bn.agreed_fields()
    assert fields == {"num_features": 3, "eps": 1e-5, "momentum": 0.9, "dtype": "float16", "affine": True,
                      "use_batch_statistics": True, "process_groups": None, "nonfinite": "raise",
                      "debug_timeout": None, "exact": False, "lockstep": False,
                      "group communicator": "new",
                      "initial gamma (gamma_init)": digest(np.ones(3, np.float16)),
                      "initial beta (beta_init)": digest(np.zeros(3, np.float16)),
                      "initial mean (moving_mean_init)": digest(np.zeros(3, np.float16)),
                      "initial variance (moving_var_init)": digest(np.ones(3, np.float16))}
    assert type(fields["use_batch_statistics"]) is bool


def test_layer_local_error_keeps_type_and_message():
    with pytest.raises(ValueError, match="eps must be a finite float > 0"):
        SyncBatchNorm(3, eps=-1.0, comm=MPI.COMM_SELF)
    with pytest.raises(TypeError, match="process_groups must be a list"):
        SyncBatchNorm(3, process_groups=((0,),), comm=MPI.COMM_SELF)


# -- under mpiexec: real layers, real disagreement ---------------------------------------


def _construct(**kwargs):
    """Construct on COMM_WORLD; return (exception or None, Comm.Split calls so far)."""
    try:
        SyncBatchNorm(**kwargs).close()
        err = None
    except Exception as exc:     # noqa: BLE001 - the test inspects it on every rank
        err = exc
    return err, mpibn_comm.split_calls


def _world():
    comm = MPI.COMM_WORLD
    return comm, comm.Get_rank(), comm.Get_size()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("field, mine, theirs", [
    ("num_features", 4, 5), ("eps", 1e-5, 2e-5), ("momentum", 0.9, 0.1), ("dtype", np.float32, np.float64),
    ("affine", True, False), ("use_batch_statistics", None, True), ("nonfinite", "raise", "propagate"),
    ("debug_timeout", None, 5.0), ("exact", False, True)])
def test_one_rank_disagrees(field, mine, theirs):
    comm, rank, size = _world()
    before = mpibn_comm.split_calls
    kwargs = {"num_features": 4, field: theirs if rank == size - 1 else mine}
    err, after = _construct(**kwargs)
    seen = comm.allgather(str(err))
    assert isinstance(err, AgreementError)
    assert f"{field}: " in str(err)
    assert f"rank {size - 1} has" in str(err)
    assert len(set(seen)) == 1            # bitwise the same message on every rank
    assert after == before                # nothing was split


@pytest.mark.mpi(min_size=4)
def test_process_groups_disagree_before_split():
    # Ranks 0, 1 want [[0, 1], [2, 3]], ranks 2, 3 want [[0, 2], [1, 3]]: a Split
    # with these colours would pair the wrong ranks; we refuse on every rank.
    comm, rank, size = _world()
    groups = [[0, 1], [2, 3]] if rank < 2 else [[0, 2], [1, 3]]
    err, _ = _construct(num_features=3, process_groups=groups)
    assert isinstance(err, ValueError)
    assert "process_groups: ranks [0, 1] have ((0, 1), (2, 3)), ranks [2, 3] have ((0, 2), (1, 3))" in str(err)


@pytest.mark.mpi(min_size=2)
def test_bad_argument_on_some_ranks_raises_everywhere_then_recovers():
    comm, rank, size = _world()
    bad = {0, size - 1}
    err, _ = _construct(num_features=4, momentum=1.5 if rank in bad else 0.9)
    # the next, valid construction works: the failure left no half-built state
    err2, _ = _construct(num_features=4)
    assert isinstance(err, ValueError)
    # one sentence for both ranks: they made the same mistake
    assert (f"invalid arguments (2 of {size} ranks): ranks [0, {size - 1}]: momentum must be in "
            f"range [0, 1], got 1.5") in str(err)
    assert str(err).count("momentum must be") == 1
    assert err2 is None


@pytest.mark.mpi(min_size=2)
def test_invalid_process_groups_on_one_rank():
    comm, rank, size = _world()
    groups = [[0, size]] if rank == 1 else [[0, 1]]
    err, _ = _construct(num_features=2, process_groups=groups)
    assert isinstance(err, ValueError)
    assert f"rank 1: process_groups[0] contains rank id {size}" in str(err)
