"""Errors are both mpumap's and the matching builtins, by errno."""
import builtins
import errno

import pytest

import mpumap
from mpumap.client import request_timeout
from mpumap.errors import error


@pytest.mark.parametrize("code,ours,builtin", [
    (errno.EACCES, mpumap.PermissionError, builtins.PermissionError),
    (errno.EPERM, mpumap.PermissionError, builtins.PermissionError),
    (errno.ENOENT, mpumap.FileNotFoundError, builtins.FileNotFoundError),
    (errno.EEXIST, mpumap.FileExistsError, builtins.FileExistsError),
    (errno.ETIMEDOUT, mpumap.TimeoutError, builtins.TimeoutError),
    (errno.ECONNRESET, mpumap.ServerUnavailable, builtins.ConnectionError),
    (errno.EDQUOT, mpumap.MpumapError, OSError),
    (errno.ENFILE, mpumap.MpumapError, OSError),
])
def test_an_errno_picks_a_class_that_is_both(code, ours, builtin):
    exc = error(code, "the server says no")
    assert type(exc) is ours
    assert isinstance(exc, builtin) and isinstance(exc, mpumap.MpumapError)
    assert exc.errno == code and exc.strerror == "the server says no"
    with pytest.raises(builtin):
        raise exc


def test_the_timeout_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("MPUMAP_TIMEOUT", raising=False)
    assert request_timeout() == 10.0
    monkeypatch.setenv("MPUMAP_TIMEOUT", "2.5")
    assert request_timeout() == 2.5
    assert request_timeout(1) == 1
    monkeypatch.setenv("MPUMAP_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="MPUMAP_TIMEOUT"):
        request_timeout()


def test_a_star_import_shadows_no_builtin():
    scope = {}
    exec("from mpumap import *", scope)
    assert not {"PermissionError", "FileNotFoundError", "FileExistsError",
                "TimeoutError"} & set(scope)
    assert "MpumapError" in scope and "ServerUnavailable" in scope
