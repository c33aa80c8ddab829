"""mpibn.errors on its own: the codes, the table, and the agreed exception read back from rows."""
import numpy as np
import pytest

from mpibn import errors
from mpibn.errors import (N_DETAILS, PROBLEMS, AgreementError, Code, CollectiveTimeout, Problem,
                          builtin_exception, check_tags, collective_timeout, raise_agreed)


def test_every_code_has_its_row_in_the_table():
    assert set(PROBLEMS) == set(Code)
    assert 0 not in set(Code)                       # 0 in a row's status means "no problem"
    for code in Code:
        assert Problem(int(code)).code is code      # numbers from the buffer become codes


def test_builtin_exception_by_name():
    assert builtin_exception("ZeroDivisionError") is ZeroDivisionError
    assert builtin_exception("AgreementError") is RuntimeError     # not a builtin
    assert builtin_exception("print") is RuntimeError              # a builtin, not an exception
    assert issubclass(AgreementError, ValueError) and issubclass(CollectiveTimeout, RuntimeError)


def rows(*problems):
    """(codes (P,), details (P, N_DETAILS)) as the buffer holds them after the Allreduce."""
    codes = np.zeros(len(problems))
    details = np.zeros((len(problems), N_DETAILS))
    for r, p in enumerate(problems):
        if p is not None:
            codes[r], details[r] = p.code, p.details
    return codes, details


def test_raise_agreed_names_every_offender_once_with_the_first_type():
    codes, details = rows(None, Problem(Code.X_NDIM, 3), Problem(Code.X_NOT_ARRAY), Problem(Code.X_NDIM, 3))
    with pytest.raises(ValueError) as info:
        raise_agreed(codes, details, (4, 5, 6, 7), "ctx")
    assert str(info.value) == ("ctx (group ranks [4, 5, 6, 7]): ranks [5, 7]: x must be 2-D (N, C) or 4-D "
                               "(N, C, H, W), got a 3-D array; rank 6: x must be a numpy.ndarray")
    raise_agreed(*rows(None, None), (0, 1), "ctx")  # no problem: returns


def test_a_local_error_is_chained_on_its_own_rank():
    try:
        1 / 0
    except ZeroDivisionError as exc:
        own = Problem.from_exception(exc)
    with pytest.raises(ZeroDivisionError) as info:
        raise_agreed(*rows(own), (0,), "ctx", own)
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    assert "rank 0: ZeroDivisionError raised in this rank's own computation" in str(info.value)


def test_check_tags_and_timeout_describe_the_calls():
    check_tags(np.array([[2.0, 1.0], [2.0, 1.0]]), (0, 1), "ctx")
    with pytest.raises(RuntimeError, match=r"rank 0: layer 1 forward call 1; rank 1: layer 1 backward call 1"):
        check_tags(np.array([[2.0, 1.0], [3.0, 1.0]]), (0, 1), "ctx")
    exc = collective_timeout(0, 2.0, (2, 2), (0, 1, 2), [2], [(1, np.array([3.0, 1.0]))], [], 2.0)
    assert isinstance(exc, CollectiveTimeout)
    assert str(exc) == ("rank 0 waited 2.0 s in layer 1 forward call 2 of group [0, 1, 2]; never arrived: "
                        "[2]; in another call: rank 1 in layer 1 backward call 1")
    assert errors.describe_tag((0, 3)) == "a stateless call (call 3)"
