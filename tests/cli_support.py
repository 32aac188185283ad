"""Running the `keyledger` command line from tests: in the test process, or as a real process.

A real `keyledger` process costs ~1.3 s of CPU (interpreter start and ``import keyledger``)
before it does anything, so most CLI tests call ``keyledger.cli.main(argv)`` in the pytest
process instead, with stdin, stdout, stderr, the environment and the working directory
swapped in for the call as a process would have them. ``run_cli(..., subprocess=True)`` runs
the installed console script for what only a process shows: the exit status ``sys.exit``
gives, real pipes, the entry point itself, signals, ``demo``; with ``zygote=`` (a
tests/proc_support.py fork server) that process is forked from an interpreter that has
imported keyledger instead of starting one (the console script still runs as ``__main__``).

A home is embedded in one process at a time (one runtime per home, one SoftHSM2
configuration per process): an in-process call refuses to run while this process has a home
open (a ``ledger`` fixture still open: use ``subprocess=True`` or close it first), and checks
that the command closed everything it opened and left no logging handler behind.
"""

from __future__ import annotations

import io
import logging
import os
import subprocess as sp
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from proc_support import Zygote

from keyledger.cli import main
from keyledger.hsm import pkcs11_backend
from keyledger.runtime import HomeRuntime

SCRIPT = Path(sys.executable).with_name("keyledger")
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "keyledger.cli"]

Output = sp.CompletedProcess


def run_cli(args: Sequence[str], *, input: bytes | str | None = None,
            env: Mapping[str, str] | None = None, cwd: Path | str | None = None,
            text: bool = False, subprocess: bool = False, zygote: Zygote | None = None,
            timeout: float = 120) -> Output:
    """`keyledger *args` as ``subprocess.run(..., capture_output=True)`` reports it: ``env`` is
    the whole environment (default: this process's), stdin is ``input`` (empty when None, never
    a terminal), stdout/stderr are bytes, or str with ``text``. In this process unless
    ``subprocess``; an exception the CLI lets escape is raised here (a process would print a
    traceback and exit 1). With ``subprocess`` and a ``zygote``, the process is forked from it."""
    data = input if input is not None else ("" if text else b"")
    if subprocess and zygote is not None:
        return zygote.run([*COMMAND, *args], input=data, capture_output=True, text=text,
                          env=dict(env) if env is not None else None, cwd=cwd, timeout=timeout)
    if subprocess:
        return sp.run([*COMMAND, *args], input=data, capture_output=True, text=text,
                      env=dict(env) if env is not None else None, cwd=cwd, timeout=timeout)
    stdin = data.encode() if isinstance(data, str) else data
    with _nothing_left_open(), _environment(env), _working_dir(cwd), _stdio(stdin) as (out, err):
        try:
            code = main(list(args))
        except SystemExit as exc:  # what `sys.exit(main())` would turn into a status
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    stdout, stderr = out.getvalue(), err.getvalue()
    if text:
        return sp.CompletedProcess(list(args), code, stdout.decode(), stderr.decode())
    return sp.CompletedProcess(list(args), code, stdout, stderr)


def _open_state() -> tuple[list[object], dict[str, int]]:
    """What a CLI command may open in this process: home runtimes, PKCS#11 logins, keyledger's
    threads (a runtime's ingester), and the logging handlers of the loggers that exist."""
    loggers = [logging.getLogger(), *(lg for lg in logging.root.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    threads = [t.name for t in threading.enumerate() if t.name.startswith("keyledger")]
    return ([*sorted(HomeRuntime._registry), *sorted(pkcs11_backend._Process.backends),
             *threads], {lg.name: len(lg.handlers) for lg in loggers})


@contextmanager
def _nothing_left_open() -> Iterator[None]:
    opened, handlers = _open_state()
    assert not opened, (
        f"this process has {opened} open: running the CLI in-process would embed a second "
        "home (one SoftHSM2 configuration per process); close it or use subprocess=True")
    yield
    left, after_handlers = _open_state()
    assert not left, f"the CLI left {left} open"
    grown = {n: c for n, c in after_handlers.items() if c > handlers.get(n, 0)}
    assert not grown, f"the CLI added logging handlers: {grown}"


@contextmanager
def _environment(env: Mapping[str, str] | None) -> Iterator[None]:
    """``env`` as the whole environment during the call; this process's restored after it
    (including what keyledger itself sets, such as SOFTHSM2_CONF)."""
    saved = dict(os.environ)
    if env is not None:
        os.environ.clear()
        os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextmanager
def _working_dir(cwd: Path | str | None) -> Iterator[None]:
    saved = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        yield
    finally:
        os.chdir(saved)


@contextmanager
def _stdio(stdin: bytes) -> Iterator[tuple[io.BytesIO, io.BytesIO]]:
    """sys.stdin/stdout/stderr as text streams over bytes, as a process has them on pipes (not
    terminals; ``.buffer`` for binary data). Text is written through, so text and bytes
    written to stdout keep their order."""
    out, err = io.BytesIO(), io.BytesIO()
    streams = (io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"),
               io.TextIOWrapper(out, encoding="utf-8", write_through=True),
               io.TextIOWrapper(err, encoding="utf-8", write_through=True))
    saved = sys.stdin, sys.stdout, sys.stderr
    sys.stdin, sys.stdout, sys.stderr = streams
    try:
        yield out, err
    finally:
        for stream in streams[1:]:
            stream.flush()
            stream.detach()  # keep the BytesIO readable
        sys.stdin, sys.stdout, sys.stderr = saved
