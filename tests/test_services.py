"""The facade over services (docs/design.md "Pieces"): one clock per ledger, an HSM change that
fails in the process rolls back at once, the quorum gate's table, and the layering rules that
keep the services apart from the facade and SQL inside the store."""

from __future__ import annotations

import ast
import json
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import hsm_labels

import keyledger as kl
from keyledger import service
from keyledger.errors import HsmError
from keyledger.services.governance import GUARDED_ACTIONS

SRC = Path(__file__).resolve().parent.parent / "src" / "keyledger"


def test_ledgers_in_one_process_keep_their_own_clocks(home):
    """Two ledgers of one simulation home in one process share the runtime, not the clock:
    each records, schedules and judges waiting periods at its own clock's time."""
    a_time, b_time = datetime(2030, 1, 1, tzinfo=UTC), datetime(2031, 6, 1, tzinfo=UTC)
    with kl.open(home, principal="alice", clock=lambda: a_time) as alice:
        alice.grant("*", "bob", "admin")
        with kl.open(home, principal="bob", clock=lambda: b_time) as bob:
            assert bob._rt is alice._rt  # one runtime per process and home
            bob.create_key("k", spec="AES_256")
            assert bob.get_key("k").created_at == b_time
            assert bob.schedule_deletion("k", days=7).deletion_due == datetime(
                2031, 6, 8, tzinfo=UTC)
            alice.create_key("j", spec="AES_256")
            assert alice.get_key("j").created_at == a_time
            times = alice.audit()[["principal", "time"]]
        assert set(times[times["principal"] == "bob"]["time"]) == {b_time}
        assert set(times[times["principal"] == "alice"]["time"]) == {a_time}


def test_an_hsm_step_that_fails_in_the_process_is_rolled_back_at_once(ledger, home,
                                                                      monkeypatch):
    """create_key whose HSM step fails after making the object: the object and the intent go
    at once, so the next open has nothing to repair and the name stays free."""
    backend = ledger._rt.backend
    real_generate = backend.generate

    def generate_then_fail(*args, **kwargs):
        real_generate(*args, **kwargs)
        raise HsmError("the HSM failed after making the object (simulated)")

    monkeypatch.setattr(backend, "generate", generate_then_fail)
    with pytest.raises(HsmError, match="simulated"):
        ledger.create_key("k", spec="AES_256")
    monkeypatch.setattr(backend, "generate", real_generate)
    assert hsm_labels(home, "kl:k:") == []  # no orphan object
    assert ledger.reconcile(full=True).clean  # and no intent left to repair
    assert ledger.create_key("k", spec="AES_256").latest_version == 1
    assert ledger.audit(action="create_key")["outcome"].tolist() == ["failed", "ok"]


def test_the_quorum_gate_has_a_runner_for_every_guarded_action(ledger):
    """Approved requests run through the gate's table (action -> callable), not by name."""
    gate = ledger._governance.runners
    assert set(gate) == set(GUARDED_ACTIONS) and all(callable(r) for r in gate.values())
    text = (SRC / "services" / "governance.py").read_text()
    assert "getattr(" not in text and "inspect" not in text


# -- layering --------------------------------------------------------------------------------------
def _imports(path: Path) -> set[str]:
    """Every module a file imports (function-level and TYPE_CHECKING imports included), as
    absolute names."""
    package = ".".join(path.relative_to(SRC.parent).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[:len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out |= {f"{name}.{a.name}" for a in node.names}
            if node.module:  # "from .. import x" imports keyledger.x, not the package
                out.add(name)
    return out


def test_services_never_import_the_facade():
    for path in sorted((SRC / "services").glob("*.py")) + [SRC / "intents.py"]:
        bad = {m for m in _imports(path) if m in ("keyledger", "keyledger.service")
               or m.startswith("keyledger.service.")}
        assert not bad, f"{path.name} imports the facade: {bad}"


def test_only_the_store_imports_duckdb():
    users = sorted(str(p.relative_to(SRC)) for p in SRC.rglob("*.py")
                   if "duckdb" in _imports(p) and p.parent.name != "store")
    assert users == []


def test_store_sql_names_the_columns_it_inserts():
    """An INSERT that names no columns breaks silently when a migration adds one."""
    unnamed = re.compile(r"INSERT\s+INTO\s+\w+\s+(VALUES|SELECT|WITH)", re.I)
    found = [f"{p.relative_to(SRC)}: {m.group(0)}" for p in sorted(SRC.rglob("*.py"))
             if p.name not in ("byok.py", "backup.py")  # their tables move with the backup split
             for m in unnamed.finditer(p.read_text())]
    assert found == []


def test_the_facade_only_delegates():
    """Each public KeyLedger method is one line calling a service (docstrings aside)."""
    tree = ast.parse(Path(service.__file__).read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "KeyLedger")
    own = {"simulation", "close", "keep_store_open"}  # the facade's own plumbing
    for fn in cls.body:
        if isinstance(fn, ast.FunctionDef) and not fn.name.startswith("_") \
                and fn.name not in own:
            body = [s for s in fn.body if not (isinstance(s, ast.Expr)
                                               and isinstance(s.value, ast.Constant))]
            assert len(body) == 1 and isinstance(body[0], ast.Return), fn.name


def test_an_intent_written_into_the_store_cannot_destroy_live_material(ledger, home, clock):
    """Someone who can write the store plants intents naming a live version's CKA_ID: the
    next reconcile keeps the material (a roll-back never removes what a version uses; a
    destroy or trim the catalog contradicts is refused and reported)."""
    key = ledger.create_key("k", spec="AES_256")
    blob = ledger.encrypt("k", b"still here")
    live = key.versions[1].handle.hex()
    with ledger._rt.db.write(export=False) as tx:
        for kind in ("rotate", "destroy", "trim"):
            tx.execute("INSERT INTO intents (intent_id, kind, key_id, version, handles, "
                       "started_at, pid, actor) VALUES (?, ?, ?, 2, ?, ?, 4194000, 'mallory')",
                       [f"forged-{kind}", kind, key.key_id,
                        json.dumps({"name": "k", "handles": [live]}),
                        clock().replace(tzinfo=None)])
    report = ledger.reconcile(full=True)
    assert "kept 1 object(s) the catalog uses" in str(report)
    assert len(report.problems) == 2 and all("changed outside keyledger" in p
                                             for p in report.problems), str(report)
    assert hsm_labels(home, "kl:k:") == ["kl:k:v1"]
    assert ledger.decrypt(blob) == b"still here"
    assert ledger.get_key("k").state is kl.KeyState.ACTIVE
    assert ledger.reconcile(full=True).clean  # the forged intents are gone
