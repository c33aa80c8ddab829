"""The public API (``mpibn.__all__``), the one-release shims, and what importing loads."""
import subprocess
import sys
import types
import warnings

import pytest

import mpibn


def test_every_public_name_resolves():
    for name in mpibn.__all__:
        assert getattr(mpibn, name) is not None, name
    for name in ("functional", "init", "testing", "golden", "verify"):
        assert isinstance(getattr(mpibn, name), types.ModuleType), name
    assert set(mpibn.__all__) <= set(dir(mpibn))


def test_public_names_are_their_homes():
    from mpibn import checkpoint, comm, errors, layer, parameter, sync
    assert mpibn.SyncBatchNorm is layer.SyncBatchNorm
    assert mpibn.Parameter is parameter.Parameter
    assert mpibn.sync_batch_norm is sync.sync_batch_norm
    assert mpibn.sync_batch_norm_backward is sync.sync_batch_norm_backward
    assert mpibn.group_comm_for is comm.group_comm_for
    assert mpibn.make_exchange is comm.make_exchange
    assert mpibn.load_checkpoint is checkpoint.load_checkpoint
    assert mpibn.AgreementError is errors.AgreementError
    assert mpibn.CollectiveTimeout is errors.CollectiveTimeout


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError):
        mpibn.no_such_name


def test_importing_the_package_the_math_and_testing_loads_no_mpi4py():
    # In a fresh interpreter: this one already imported mpi4py (conftest).
    code = ("import sys\n"
            "import mpibn\n"
            "assert 'numpy' not in sys.modules, 'import mpibn imported numpy'\n"
            "import mpibn.functional, mpibn.testing\n"
            "[getattr(mpibn, name) for name in mpibn.__all__]\n"
            "assert 'mpi4py' not in sys.modules, 'mpi4py imported'\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


# -- one-release shims: the old paths still work --------------------------------------------

def test_functional_sync_batch_norm_is_a_deprecated_shim():
    from mpibn import functional, sync
    for name in ("sync_batch_norm", "sync_batch_norm_backward"):
        with pytest.warns(DeprecationWarning, match="import it from mpibn.sync"):
            assert getattr(functional, name) is getattr(sync, name)
    with pytest.warns(DeprecationWarning):
        from mpibn.functional import sync_batch_norm     # the documented old import
    assert sync_batch_norm is sync.sync_batch_norm
    with pytest.raises(AttributeError):
        functional.no_such_name


def test_old_homes_still_export_the_moved_names():
    from mpibn import comm, layer, parameter
    with warnings.catch_warnings():
        warnings.simplefilter("error")                  # documented, so no warning
        from mpibn.sync_exact import make_exchange
    assert make_exchange is comm.make_exchange
    assert layer.Parameter is parameter.Parameter
