"""The command line's process set-up: it restarts itself once with glibc's huge-page tunable set."""
import os
import subprocess
import sys

import pytest

from jaxgen import cli


@pytest.mark.parametrize("environ, libc, tunables", [
    ({}, "glibc", "glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "glibc", "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "glibc", None),  # the user's own choice (opting out) stays
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, "glibc", None),  # already restarted
    ({}, "", None),  # not glibc (musl, macOS): nothing to set
])
def test_huge_pages_environment_adds_the_tunable_once(environ, libc, tunables):
    out = cli.huge_pages_environment({"PATH": "/bin", **environ}, libc)
    assert (out if out is None else out["GLIBC_TUNABLES"]) == tunables
    assert out is None or out["PATH"] == "/bin"


class Restarted(Exception):
    """Raised by the stand-in for os.execve, carrying what it was given."""


def test_main_as_a_process_restarts_itself_with_its_own_arguments(monkeypatch):
    def execve(path, argv, environ):
        raise Restarted(path, argv, environ)

    monkeypatch.setattr(os, "execve", execve)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setattr(cli.platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(sys, "argv", ["jaxgen", "serve", "--port", "9000"])
    with pytest.raises(Restarted) as restart:
        cli.main()
    path, argv, environ = restart.value.args
    assert path == sys.executable and argv == [sys.executable, "-m", "jaxgen", "serve", "--port", "9000"]
    assert environ["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")  # the restarted image runs on
    assert cli.restart_with_huge_pages(argv) is None


def test_the_restarted_process_runs_the_command_it_was_given():
    """A real `python -m jaxgen` process without the tunable: the restarted image parses the same arguments."""
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-m", "jaxgen", "serve", "--num-processes", "2", "--process-id", "2"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--process-id 2 must be in 0 .. 1" in out.stderr, out.stderr
