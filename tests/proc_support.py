"""Child processes without the interpreter start: a fork server with keyledger imported.

A fresh ``python -c ...`` that imports keyledger costs ~0.7 s of CPU before it does anything
(interpreter start, ``import keyledger``). Tests whose point is concurrency, crashes or what
another process sees, not interpreter start-up, get their children from a ``Zygote``: a fresh
interpreter, started once per test module, that imports keyledger and then only forks. Each
child is a real, separate process (its own pid, PKCS#11 login, journal, DuckDB instance and
file locks; it can be SIGKILLed) running its code as ``__main__``, with the stdin, stdout and
stderr pipes, environment, working directory and arguments it was given, and it exits as that
interpreter would (exit status, traceback and status 1 for an uncaught exception, non-daemon
threads joined, atexit handlers run, stdio flushed), except that it skips the teardown of every
module and object that follows. What it does not have is a fresh interpreter's own imports: the
zygote has imported keyledger (and keyledger.cli) but never opened a home, started a thread or
loaded the PKCS#11 module, so there is nothing live to inherit; the start-up itself is tested by
tests/test_startup.py with real interpreters.

``Zygote.popen(args, ...)`` is ``subprocess.Popen`` (the same class, with the process made by
the zygote instead of fork+exec) for ``[sys.executable, "-c", code, *argv]``,
``[sys.executable, "-m", module, *argv]`` or ``[script, *argv]`` (a Python script such as the
``keyledger`` console script). The zygote reaps its children, and the test module's fixture
reaps the zygote: the children's CPU counts to the test process's children when the module ends.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pytest

_SERVER = r'''
import json, os, selectors, socket, sys

for _name in sys.argv[2:]:
    __import__(_name)
with open("/proc/self/status") as _fh:
    _threads = int(_fh.read().split("Threads:")[1].split()[0])
if _threads != 1:  # a fork would copy a process whose other threads vanish in the child
    raise SystemExit(f"zygote: importing {sys.argv[2:]} started {_threads - 1} threads")
import gc

gc.freeze()  # the children's collections leave the imported objects (and their pages) alone


def _serve():
    """Fork a child per request; report its pid, then its wait status, on its status socket.
    Returns (request, fds) in a child; exits when the test process closes the control socket,
    after killing and reaping any child still running."""
    ctl = socket.socket(fileno=int(sys.argv[1]))
    sel = selectors.DefaultSelector()
    sel.register(ctl, selectors.EVENT_READ)
    ctl.send(b"ready")
    while True:
        for key, _ in sel.select():
            if key.fileobj is ctl:
                msg, fds, _flags, _addr = socket.recv_fds(ctl, 1 << 20, 4)
                if not msg:  # the test process is done with us
                    for other in list(sel.get_map().values()):
                        if other.data is not None:
                            pid, status = other.data
                            os.kill(pid, 9)
                            try:
                                status.send(str(os.waitpid(pid, 0)[1]).encode())
                            except OSError:
                                pass
                    raise SystemExit(0)
                request = json.loads(msg)
                pid = os.fork()
                if pid == 0:
                    for other in list(sel.get_map().values()):  # no fd of ours in the child
                        if other.data is not None:
                            other.data[1].close()
                            os.close(other.fd)
                    sel.close()
                    ctl.close()
                    return request, fds
                status = socket.socket(fileno=fds[3])
                for fd in fds[:3]:
                    os.close(fd)
                sel.register(os.pidfd_open(pid), selectors.EVENT_READ, (pid, status))
                status.send(str(pid).encode())
            else:
                pid, status = key.data
                sel.unregister(key.fd)
                os.close(key.fd)
                _, wait_status = os.waitpid(pid, 0)
                try:
                    status.send(str(wait_status).encode())
                except OSError:  # the test process no longer asks
                    pass
                status.close()


_request, _fds = _serve()
del _serve
# -- the child: become the process that was asked for ------------------------------------------
import io, runpy, types

for _target, _fd in enumerate(_fds[:3]):
    os.dup2(_fd, _target)
for _fd in set(_fds):
    if _fd > 2:
        os.close(_fd)
if _request["cwd"] is not None:
    os.chdir(_request["cwd"])
os.environ.clear()
os.environ.update(_request["env"])


def _stdio(fd, mode, errors, line_buffering=False):
    binary = io.open(fd, mode + "b", closefd=False)
    stream = io.TextIOWrapper(binary, encoding=sys.__stdout__.encoding, errors=errors,
                              line_buffering=line_buffering)
    stream.mode = mode
    return stream


sys.stdin = sys.__stdin__ = _stdio(0, "r", sys.__stdin__.errors)
sys.stdout = sys.__stdout__ = _stdio(1, "w", sys.__stdout__.errors)
sys.stderr = sys.__stderr__ = _stdio(2, "w", "backslashreplace", line_buffering=True)
_args = _request["args"]
del _request, _fds, _target, _fd, _stdio


def _run(args):
    if args[1:2] == ["-c"]:
        sys.argv = ["-c", *args[3:]]
        main = types.ModuleType("__main__")
        sys.modules["__main__"] = main
        exec(compile(args[2], "<string>", "exec"), main.__dict__)
    elif args[1:2] == ["-m"]:
        sys.argv = [args[2], *args[3:]]
        sys.path[0] = os.getcwd()
        runpy.run_module(args[2], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(args)
        sys.path[0] = os.path.dirname(os.path.abspath(args[0]))
        runpy.run_path(args[0], run_name="__main__")


# Exit as Py_FinalizeEx would, up to what a process shows: the status of SystemExit (its message
# on stderr if it is not an int) or 1 and the traceback for another exception; then non-daemon
# threads joined, atexit handlers run (keyledger closes its runtimes there) and stdout/stderr
# flushed; then _exit, skipping the interpreter's teardown of every module and object (~80 ms
# of CPU in a fork of this interpreter, whose pages that teardown all copies).
try:
    _run(_args)
    _status = 0
except SystemExit as exc:
    if exc.code is None:
        _status = 0
    elif isinstance(exc.code, int):
        _status = exc.code
    else:
        print(exc.code, file=sys.stderr)
        _status = 1
except BaseException:
    sys.excepthook(*sys.exc_info())
    _status = 1
import atexit, threading

threading._shutdown()
atexit._run_exitfuncs()
for _stream in (sys.stdout, sys.stderr):
    try:
        _stream.flush()
    except Exception:  # as Python: a failed flush of stdout makes the status 120
        _status = 120
os._exit(_status & 0xFF)
'''

PRELOAD = ("keyledger", "keyledger.cli")


class Zygote:
    """A fork server: ``popen``, ``run`` and ``run_python`` as ``subprocess`` has them, each
    child forked from an interpreter that has only imported ``preload``."""

    def __init__(self, preload: Sequence[str] = PRELOAD) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _SERVER, str(theirs.fileno()), *preload],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        theirs.close()
        self._ctl = mine
        self._lock = threading.Lock()
        if mine.recv(16) != b"ready":
            self._proc.wait(timeout=60)
            raise RuntimeError(f"the zygote did not start (exit status {self._proc.returncode})")

    def close(self) -> None:
        """Kill any child still running, then end and reap the zygote."""
        self._ctl.close()
        self._proc.wait(timeout=60)

    def __enter__(self) -> Zygote:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _fork(self, args: list[str], cwd: str | None, env: Mapping[str, str] | None,
              stdio: list[int]) -> socket.socket:
        """Ask for a child with these fds as 0, 1, 2; returns its status socket."""
        request = json.dumps({"args": args, "cwd": cwd,
                              "env": dict(os.environ if env is None else env)})
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            with self._lock:
                socket.send_fds(self._ctl, [request.encode()], [*stdio, theirs.fileno()])
        finally:
            theirs.close()
        return mine

    def popen(self, args: Sequence[str | os.PathLike[str]], **kwargs: Any) -> ForkedPopen:
        return ForkedPopen(self, args, **kwargs)

    def run(self, args: Sequence[str | os.PathLike[str]], *, input: Any = None,
            timeout: float | None = None, check: bool = False,
            capture_output: bool = False, **kwargs: Any) -> subprocess.CompletedProcess:
        """``subprocess.run`` with the process from the zygote."""
        if input is not None:
            kwargs["stdin"] = subprocess.PIPE
        if capture_output:
            kwargs["stdout"] = kwargs["stderr"] = subprocess.PIPE
        with self.popen(args, **kwargs) as proc:
            try:
                out, err = proc.communicate(input, timeout=timeout)
            except BaseException:
                proc.kill()
                raise
        done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        if check:
            done.check_returncode()
        return done

    def run_python(self, code: str, *, env: dict[str, str] | None = None, timeout: float = 120,
                   check: bool = False) -> subprocess.CompletedProcess:
        """conftest.run_python: a snippet in its own process (own PKCS#11 login and journal)."""
        return self.run([sys.executable, "-c", code], capture_output=True, text=True,
                        env={**os.environ, **(env or {})}, timeout=timeout, check=check)


class ForkedPopen(subprocess.Popen):
    """``subprocess.Popen`` whose process is forked by a Zygote (the pipes, ``communicate``,
    ``poll``, ``wait``, ``send_signal``, ``kill`` and ``returncode`` are Popen's own)."""

    def __init__(self, zygote: Zygote, args: Sequence[str | os.PathLike[str]],
                 **kwargs: Any) -> None:
        self._zygote = zygote
        self._status: socket.socket | None = None
        super().__init__(args, **kwargs)

    def _execute_child(self, args, executable, preexec_fn, close_fds, pass_fds, cwd, env,  # type: ignore[override]
                       startupinfo, creationflags, shell, p2cread, p2cwrite, c2pread, c2pwrite,
                       errread, errwrite, restore_signals, gid, gids, uid, umask,
                       start_new_session, process_group) -> None:
        if (shell or executable is not None or preexec_fn is not None or pass_fds
                or start_new_session or gid is not None or gids is not None or uid is not None):
            raise ValueError("a zygote child takes args, stdio, cwd and env only")
        args = [os.fspath(a) for a in args]
        if args[0] != sys.executable and args[1:2] in (["-c"], ["-m"]):
            raise ValueError(f"the zygote runs this interpreter, not {args[0]}")
        stdio = [p2cread if p2cread != -1 else 0, c2pwrite if c2pwrite != -1 else 1,
                 errwrite if errwrite != -1 else 2]
        status = self._zygote._fork(args, None if cwd is None else os.fspath(cwd), env, stdio)
        pid = status.recv(32)
        if not pid:
            status.close()
            raise RuntimeError("the zygote did not fork (has it ended?)")
        self.pid, self._status, self._child_created = int(pid), status, True
        self._close_pipe_fds(p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite)

    def _collect(self, timeout: float | None) -> bool:
        """Read the wait status if it is there within ``timeout``; caller holds the lock."""
        if self.returncode is not None:
            return True
        status = self._status
        assert status is not None
        if not select.select([status], [], [], timeout)[0]:
            return False
        message = status.recv(32)
        status.close()
        if not message:
            raise ChildProcessError(f"the zygote ended before reporting process {self.pid}")
        self._handle_exitstatus(int(message))
        return True

    def _internal_poll(self, _deadstate: int | None = None, **_: Any) -> int | None:
        if self.returncode is None and self._waitpid_lock.acquire(False):
            try:
                self._collect(0)
            except (OSError, ValueError):
                if _deadstate is not None:
                    self.returncode = _deadstate
            finally:
                self._waitpid_lock.release()
        return self.returncode

    def _wait(self, timeout: float | None) -> int:
        if self.returncode is not None:
            return self.returncode
        if timeout is not None:
            endtime = subprocess._time() + timeout  # type: ignore[attr-defined]
        while True:
            left = None if timeout is None else max(0.0, endtime - subprocess._time())  # type: ignore[attr-defined]
            status = self._status
            if self.returncode is None and status is not None and status.fileno() != -1:
                select.select([status], [], [], left)
            with self._waitpid_lock:
                if self._collect(0):
                    return self.returncode  # type: ignore[return-value]
            if left == 0.0:
                raise subprocess.TimeoutExpired(self.args, timeout)


def zygote_fixture(preload: Sequence[str] = PRELOAD) -> Any:
    """A module-scoped ``zygote`` fixture: ``zygote = zygote_fixture()`` in a test module."""

    @pytest.fixture(scope="module", name="zygote")
    def zygote() -> Iterator[Zygote]:
        with Zygote(preload) as z:
            yield z

    return zygote
