"""The stateless API equals the layer, bit for bit, serially and over ranks."""
import numpy as np
import pytest
from mpi4py import MPI

from mpibn import SyncBatchNorm
from mpibn.comm import group_comm_for
from mpibn.sync import sync_batch_norm, sync_batch_norm_backward
from conftest import global_batch, shard_slices


def _compare(comm, x, dy):
    gamma, beta = np.array([1.1, 0.9, 1.3]), np.array([0.2, -0.1, 0.0])
    rm, rv = np.zeros(3), np.ones(3)
    group = group_comm_for(comm, None)
    y, saved = sync_batch_norm(x, gamma, beta, group_comm=group, eps=1e-5, training=True,
                               running_mean=rm, running_var=rv, momentum=0.9)
    dx, dgamma, dbeta = sync_batch_norm_backward(dy, saved)
    group.release()
    bn = SyncBatchNorm(3, gamma_init=gamma, beta_init=beta, dtype=np.float64, comm=comm).set_train()
    y2, dx2 = bn(x), None
    dx2 = bn.backward(dy)
    bn.close()
    return (y.tobytes() == y2.tobytes() and dx.tobytes() == dx2.tobytes()
            and rm.tobytes() == bn.moving_mean.data.tobytes()
            and rv.tobytes() == bn.moving_variance.data.tobytes()
            and dgamma.tobytes() == bn.gamma.grad.tobytes() and dbeta.tobytes() == bn.beta.grad.tobytes())


def test_stateless_equals_layer_serially():
    x, dy = global_batch(120, (5, 3, 2, 2))
    assert _compare(MPI.COMM_SELF, x, dy)


def test_stateless_without_group_and_in_eval():
    x, dy = global_batch(121, (5, 3))
    gamma, beta = np.ones(3), np.zeros(3)
    y, saved = sync_batch_norm(x, gamma, beta, group_comm=None, training=True)
    np.testing.assert_allclose(y.mean(axis=0), 0, atol=1e-12)
    y_eval, saved = sync_batch_norm(x, gamma, beta, group_comm=None, training=False,
                                    running_mean=np.full(3, 2.0), running_var=np.full(3, 4.0))
    np.testing.assert_allclose(y_eval, (x - 2) / np.sqrt(4 + 1e-5), rtol=1e-15)
    dx, _, _ = sync_batch_norm_backward(dy, saved)
    np.testing.assert_allclose(dx, dy / np.sqrt(4 + 1e-5), rtol=1e-15)


@pytest.mark.mpi(min_size=2)
def test_stateless_equals_layer_over_ranks():
    comm = MPI.COMM_WORLD
    sizes = [1 + r for r in range(comm.Get_size())]
    sl = shard_slices(sizes)[comm.Get_rank()]
    x, dy = global_batch(122, (sum(sizes), 3, 2, 2), offset=3.0)
    same = _compare(comm, x[sl], dy[sl])
    assert all(comm.allgather(same))
