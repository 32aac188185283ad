"""keyledger's own store lock: no process opens the DuckDB file while another one has it open.

DuckDB 2.0.1 reads the file's headers before it takes its own lock; a process whose read landed
during another process's checkpoint lost that process's commits (seen as an intent "rolled back
by a concurrent reconcile" and as an audit head ahead of the store). These tests pin the lock
that closes that window and show that several processes taking turns lose no commit.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import keyledger as kl
from keyledger.store import db as store_db
from keyledger.store.db import Database

_HOLDER = """
import sys, time
from pathlib import Path
from keyledger.store.db import Database
db = Database(Path(sys.argv[1]))
with db.hold():
    with db.write() as tx:
        tx.execute("CREATE TABLE IF NOT EXISTS c (k VARCHAR PRIMARY KEY, v BIGINT)")
    print("holding", flush=True)
    sys.stdin.readline()
"""

_INCREMENTER = """
import os, random, sys, threading
from pathlib import Path
from keyledger.store.db import Database
db = Database(Path(sys.argv[1]), busy_timeout=60)
commits = int(sys.argv[2])  # by each thread: a fixed amount of work, not a fixed time
def bump(tag):
    with db.write() as tx:
        v = tx.execute("SELECT v FROM c WHERE k = ?", [tag]).fetchone()[0]
        tx.execute("UPDATE c SET v = ? WHERE k = ?", [v + 1, tag])
def run(tag, out):
    with db.write() as tx:
        tx.execute("INSERT INTO c VALUES (?, 0)", [tag])
    n = 0
    while n < commits:
        if random.random() < 0.3:  # a held store, set aside for a sandboxed read in between
            with db.hold():
                bump(tag)
                with db.snapshot() as tx:
                    tx.execute("SELECT count(*) FROM c").fetchall()
                bump(tag)
                n += 2
        else:
            bump(tag)
            n += 1
    out[tag] = n
done = {}
tags = [f"{os.getpid()}-main", f"{os.getpid()}-thread"]
t = threading.Thread(target=run, args=(tags[1], done))
t.start()
run(tags[0], done)
t.join()
with db.read() as tx:
    stored = dict(tx.execute("SELECT k, v FROM c").fetchall())
print(" ".join(f"{tag}={done[tag]}/{stored[tag]}" for tag in tags), flush=True)
"""


def _spawn(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_a_held_store_is_not_even_opened_by_another_process(tmp_path, monkeypatch):
    path = tmp_path / "s.duckdb"
    holder = _spawn(_HOLDER, str(path))
    try:
        assert holder.stdout.readline() == "holding\n", holder.communicate(timeout=30)[1]
        opened: list[str] = []
        real_attach = store_db.host.attach  # where DuckDB opens (and first reads) the file
        monkeypatch.setattr(store_db.host, "attach",
                            lambda *a, **k: opened.append(str(a[0])) or real_attach(*a, **k))
        busy = f"held by process {holder.pid} for more than"
        with pytest.raises(kl.StoreBusy, match=busy), Database(path).write(timeout=0.3):
            pass
        assert opened == []  # DuckDB never read the file's headers meanwhile
        holder.stdin.write("done\n")
        holder.stdin.flush()
        assert holder.wait(timeout=30) == 0
        with Database(path).write() as tx:  # released with the holder's last connection
            assert tx.execute("SELECT count(*) FROM c").one() == (0,)
        assert opened == [str(path)]
    finally:
        if holder.poll() is None:
            holder.kill()


@pytest.mark.slow
def test_processes_taking_turns_lose_no_commit(tmp_path):
    """Three processes, two threads each, increment their own counters in read-modify-write
    transactions (some inside a hold with a sandboxed read in between): every commit stays."""
    path = tmp_path / "s.duckdb"
    with Database(path).write() as tx:
        tx.execute("CREATE TABLE c (k VARCHAR PRIMARY KEY, v BIGINT)")
    procs = [_spawn(_INCREMENTER, str(path), "60") for _ in range(3)]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        for item in out.split():
            tag, counts = item.split("=")
            made, stored = counts.split("/")
            assert int(made) >= 60 and stored == made, f"{tag}: {made} commits, {stored} kept"


def test_a_symlink_in_place_of_the_lock_file_is_refused(tmp_path):
    path = tmp_path / "s.duckdb"
    target = tmp_path / "elsewhere"
    (tmp_path / "s.duckdb.lock").symlink_to(target)
    with pytest.raises(kl.StoreError, match="symbolic link"), Database(path).write():
        pass
    assert not target.exists() and not path.exists()


def test_two_databases_of_one_file_in_one_process_share_the_lock(tmp_path):
    """A second Database object for the same store (e.g. a restore test next to an open
    ledger) must not wait for the first one's hold: the lock is the process's, not the object's."""
    path = tmp_path / "s.duckdb"
    first, second = Database(path), Database(Path(str(path)))
    with first.hold():
        with first.write() as tx:
            tx.execute("CREATE TABLE t (x INT)")
        with second.write(timeout=0.5) as tx:
            tx.execute("INSERT INTO t VALUES (1)")
    with first.read() as tx:
        assert tx.execute("SELECT count(*) FROM t").one() == (1,)
