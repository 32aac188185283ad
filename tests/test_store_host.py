"""Store files attached to the process's one DuckDB instance (store/host.py, design decision 14):
each connection sees its own file's tables, a detached file is checkpointed and free for other
processes, and a forked child does not use its parent's instance."""

from __future__ import annotations

import multiprocessing
import os

import pytest

from keyledger.errors import StoreError
from keyledger.store import host
from keyledger.store.db import Database


def test_two_stores_open_at_once_each_see_their_own_tables(tmp_path):
    a, b = Database(tmp_path / "a.duckdb"), Database(tmp_path / "b.duckdb")
    with a.write() as tx:
        tx.execute("CREATE TABLE t (v VARCHAR)")
        tx.execute("INSERT INTO t (v) VALUES ('from a')")
    with a.hold(), b.write() as tx:  # both files attached to one instance
        tx.execute("CREATE TABLE t (v VARCHAR)")
        tx.execute("INSERT INTO t (v) VALUES ('from b')")
        with a.read() as other:
            assert other.execute("SELECT v FROM t").fetchall() == [("from a",)]
        assert tx.execute("SELECT v FROM t").fetchall() == [("from b",)]
    with b.read() as tx:
        assert tx.execute("SELECT v FROM t").fetchall() == [("from b",)]


def test_a_detached_store_is_checkpointed_and_open_to_another_process(tmp_path):
    path = tmp_path / "s.duckdb"
    with Database(path).write() as tx:
        tx.execute("CREATE TABLE t AS SELECT range AS v FROM range(50000)")
    assert not (tmp_path / "s.duckdb.wal").exists()  # the detach checkpointed the file
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        assert pool.apply(_count, (str(path),)) == 50000


def _count(path: str) -> int:
    import duckdb
    con = duckdb.connect(path)  # DuckDB's own lock was dropped with the detach
    try:
        return con.execute("SELECT count(*) FROM t").fetchall()[0][0]
    finally:
        con.close()


def _child_writes(path: str, parent_instance, conn) -> None:
    try:
        with Database(path).write() as tx:
            tx.execute("INSERT INTO t (v) VALUES (2)")
        conn.send("parent's" if host._instance() is parent_instance else "own")
    except BaseException as exc:  # reported to the parent
        conn.send(repr(exc))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_uses_an_instance_of_its_own(tmp_path):
    path = tmp_path / "s.duckdb"
    db = Database(path)
    with db.write() as tx:
        tx.execute("CREATE TABLE t (v INTEGER)")
        tx.execute("INSERT INTO t (v) VALUES (1)")
    parent_instance = host._instance()
    ctx = multiprocessing.get_context("fork")
    here, there = ctx.Pipe()
    child = ctx.Process(target=_child_writes, args=(str(path), parent_instance, there))
    child.start()
    assert here.recv() == "own"  # DuckDB's threads and state belong to the parent
    child.join(30)
    assert host._instance() is parent_instance
    with db.read() as tx:
        assert tx.execute("SELECT v FROM t ORDER BY v").fetchall() == [(1,), (2,)]


def test_a_store_path_with_a_quote_attaches(tmp_path):
    odd = tmp_path / "it's here"
    odd.mkdir()
    with Database(odd / "s.duckdb").write() as tx:
        tx.execute("CREATE TABLE t (v INTEGER)")
    with Database(odd / "s.duckdb").read() as tx:
        assert tx.execute("SELECT count(*) FROM t").one() == (0,)


def test_a_file_that_is_not_a_store_is_a_store_error_and_leaves_nothing_attached(tmp_path):
    bad = tmp_path / "bad.duckdb"
    bad.write_bytes(b"not a database" * 1000)
    with pytest.raises(StoreError, match="cannot open the store"), Database(bad).read():
        pass
    good = Database(tmp_path / "good.duckdb")
    with good.write() as tx:  # the instance is still usable
        tx.execute("CREATE TABLE t (v INTEGER)")


def test_snapshots_share_a_sandbox_that_keeps_refusing_files_and_lets_go_of_the_store(tmp_path):
    path = tmp_path / "s.duckdb"
    db = Database(path)
    with db.write() as tx:
        tx.execute("CREATE TABLE t AS SELECT range AS v FROM range(3)")
    for _ in range(3):  # the second and third reuse the sandbox: file access stays off
        with pytest.raises(StoreError, match="Permission"), db.snapshot() as tx:
            assert tx.execute("SELECT count(*) FROM t").one() == (3,)
            tx.execute("SELECT * FROM read_csv('/etc/passwd')")
        with multiprocessing.get_context("spawn").Pool(1) as pool:  # detached after each read
            assert pool.apply(_count, (str(path),)) == 3
    with db.hold(), db.snapshot() as tx:  # a held store is set aside for the sandbox
        assert tx.execute("SELECT count(*) FROM t").one() == (3,)
    assert len(host._sandboxes) <= host.SANDBOXES_KEPT


def test_a_held_stores_transactions_share_its_keeper_and_a_failed_one_leaves_it_working(tmp_path):
    """Inside ``hold()`` every transaction runs on the keeper connection (design decision 10):
    one that fails is rolled back and the next sees only what was committed; one whose own
    COMMIT fails (here: the caller's SQL already ended the transaction) gets the keeper
    replaced, and the hold goes on."""
    db = Database(tmp_path / "s.duckdb")
    with db.write() as tx:
        tx.execute("CREATE TABLE t (v INTEGER)")
    with db.hold():
        with db.write() as tx:
            keeper = tx.con
            tx.execute("INSERT INTO t (v) VALUES (1)")
        with pytest.raises(StoreError), db.write() as tx:
            assert tx.con is keeper
            tx.execute("INSERT INTO t (v) VALUES (2)")
            tx.execute("SELECT nope FROM t")
        with db.read() as tx:
            assert tx.con is keeper
            assert tx.execute("SELECT v FROM t").fetchall() == [(1,)]
        held = db._lock.since()
        with pytest.raises(StoreError), db.write() as tx:
            tx.execute("COMMIT")  # the transaction's own COMMIT then fails
        assert db._lock.since()[0] == held[0]  # the store lock was never let go
        with db.write() as tx:
            assert tx.con is not keeper  # a fresh keeper
            tx.execute("INSERT INTO t (v) VALUES (3)")
    with db.read() as tx:
        assert tx.execute("SELECT v FROM t ORDER BY v").fetchall() == [(1,), (3,)]
