"""No call writes into the home, and nothing is overwritten by surprise (keyledger.outputs).

An auditor (read-only role) used to make a home unusable with one call:
``compliance_report(home / "user.pin", "md")``. Every path-taking call now resolves the path
(following links, also of parent folders), refuses anything inside the home, refuses an
existing file unless ``overwrite=True`` (``--force``), and writes through a temporary file that
is renamed into place.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from pathlib import Path

import pytest
from cli_support import run_cli

import keyledger as kl
from keyledger import outputs, restore
from keyledger.errors import InvalidInput

PASS = "correct horse battery staple"
SECRETS = ["user.pin", "so.pin", "keyledger.toml", "softhsm2.conf"]


@pytest.fixture
def auditor(ledger, clock):
    ledger.create_key("orders", spec="AES_256", owner="payments")
    ledger.encrypt("orders", b"x")
    ledger.grant("*", "audrey", "auditor")
    led = kl.open(ledger.home, principal="audrey", clock=clock)
    try:
        yield led
    finally:
        led.close()


def _snapshot(home: Path, names: list[str]) -> dict[str, bytes]:
    return {n: (home / n).read_bytes() for n in names}


def _failed(led: kl.KeyLedger, action: str) -> list[str]:
    df = led.audit(action=action, principal=led.principal)
    return df["error"].fillna("").tolist()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# -- the home's own files --------------------------------------------------------------------
@pytest.mark.parametrize("name", SECRETS)
@pytest.mark.parametrize("overwrite", [False, True])
def test_auditor_cannot_write_a_report_onto_the_homes_files(auditor, home, name, overwrite):
    before = _snapshot(home, SECRETS)
    with pytest.raises(kl.InvalidInput, match="outside the home") as err:
        auditor.compliance_report(home / name, "md", overwrite=overwrite)
    assert str(home / name) in str(err.value)
    with pytest.raises(kl.InvalidInput, match="outside the home"):
        auditor.export_audit(home / name, "jsonl", overwrite=overwrite)
    assert _snapshot(home, SECRETS) == before  # byte-identical
    assert _failed(auditor, "compliance_report") == ["InvalidInput"]  # refused and audited
    assert _failed(auditor, "export_audit") == ["InvalidInput"]


@pytest.mark.parametrize("where", ["store", "journal", "new file", "the home itself"])
def test_auditor_cannot_write_onto_the_store_or_a_journal(auditor, home, where):
    target = {"store": home / "keyledger.duckdb",
              "journal": next((home / "journal").glob("*")),
              "new file": home / "journal" / "report.md",
              "the home itself": home}[where]
    existed = target.exists()
    with pytest.raises(kl.InvalidInput, match="outside the home"):
        auditor.compliance_report(target, "md", overwrite=True)
    with pytest.raises(kl.InvalidInput, match="outside the home"):
        auditor.export_audit(target, "parquet", overwrite=True)
    assert target.exists() == existed
    assert auditor.verify_audit().ok  # the store and the journals still work
    assert not list(home.rglob("*.partial"))


def test_a_link_outside_the_home_pointing_into_it_is_refused(auditor, home, tmp_path):
    before = _snapshot(home, SECRETS)
    innocent = tmp_path / "report.md"
    innocent.symlink_to(home / "user.pin")
    for overwrite in (False, True):
        with pytest.raises(kl.InvalidInput, match="outside the home"):
            auditor.compliance_report(innocent, "md", overwrite=overwrite)
        with pytest.raises(kl.InvalidInput, match="outside the home"):
            auditor.export_audit(innocent, "jsonl", overwrite=overwrite)
    assert innocent.is_symlink() and _snapshot(home, SECRETS) == before


def test_a_link_to_a_file_elsewhere_is_not_written_through(auditor, tmp_path):
    elsewhere = tmp_path / "precious.txt"
    elsewhere.write_bytes(b"keep me")
    link = tmp_path / "report.md"
    link.symlink_to(elsewhere)
    with pytest.raises(kl.InvalidInput, match="symbolic link"):
        auditor.compliance_report(link, "md", overwrite=True)
    assert elsewhere.read_bytes() == b"keep me" and link.is_symlink()
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(kl.InvalidInput, match="symbolic links"):
        auditor.compliance_report(loop / "report.md", "md")


def test_a_symlinked_parent_folder_into_the_home_is_refused(auditor, home, tmp_path):
    before = _snapshot(home, SECRETS)
    reports = tmp_path / "reports"
    reports.symlink_to(home)
    for name in ("user.pin", "new-report.md"):
        with pytest.raises(kl.InvalidInput, match="outside the home"):
            auditor.compliance_report(reports / name, "md", overwrite=True)
    nested = tmp_path / "exports"
    nested.symlink_to(home / "journal")
    with pytest.raises(kl.InvalidInput, match="outside the home"):
        auditor.export_audit(nested / "audit", "parquet")
    assert _snapshot(home, SECRETS) == before
    assert not (home / "new-report.md").exists() and not (home / "journal" / "audit").exists()


def test_a_pin_file_kept_outside_the_home_is_protected_too(home, tmp_path, clock):
    kl.open(home, principal="alice", clock=clock).close()
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (home / "user.pin").rename(secrets / "user.pin")
    config = home / "keyledger.toml"
    config.write_text(config.read_text().replace('pin_file = "user.pin"',
                                                 f'pin_file = "{secrets / "user.pin"}"'))
    pin = (secrets / "user.pin").read_bytes()
    with kl.open(home, principal="alice", clock=clock) as led, \
            pytest.raises(kl.InvalidInput, match="outside the home"):
        led.compliance_report(secrets / "user.pin", "md", overwrite=True)
    assert (secrets / "user.pin").read_bytes() == pin


# -- existing files ------------------------------------------------------------------------------
def test_an_existing_file_is_refused_then_replaced_with_overwrite(auditor, tmp_path):
    report = tmp_path / "report.md"
    report.write_bytes(b"last quarter's report")
    with pytest.raises(kl.InvalidInput, match="already exists.*overwrite=True"):
        auditor.compliance_report(report, "md")
    assert report.read_bytes() == b"last quarter's report"
    out = auditor.compliance_report(report, "md", overwrite=True)
    assert out == report.resolve()
    assert report.read_text().startswith("# Key-management compliance report")
    assert stat.S_IMODE(report.stat().st_mode) == 0o600  # reports list keys and principals
    export = tmp_path / "audit.jsonl"
    export.write_bytes(b"old")
    with pytest.raises(kl.InvalidInput, match="already exists"):
        auditor.export_audit(export, "jsonl")
    assert export.read_bytes() == b"old"
    auditor.export_audit(export, "jsonl", overwrite=True)
    assert b'"action"' in export.read_bytes()
    assert _failed(auditor, "compliance_report") == ["InvalidInput", ""]
    assert _leftovers(tmp_path) == []


def test_a_missing_folder_or_a_folder_as_file_name_is_refused(auditor, tmp_path):
    with pytest.raises(kl.InvalidInput, match="does not exist"):
        auditor.compliance_report(tmp_path / "nope" / "r.md", "md")
    with pytest.raises(kl.InvalidInput, match="directory"):
        auditor.export_audit(tmp_path, "jsonl")
    with pytest.raises(kl.InvalidInput, match="file path"):
        auditor.export_audit(42, "jsonl")


def test_a_failed_write_leaves_nothing_behind(auditor, tmp_path, monkeypatch):
    def full(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    report = tmp_path / "report.md"
    report.write_bytes(b"keep me")
    monkeypatch.setattr("keyledger.outputs._place", full)
    with pytest.raises(kl.KeyLedgerError, match="No space left") as err:
        auditor.compliance_report(report, "md", overwrite=True)
    assert str(report.resolve()) in str(err.value)
    with pytest.raises(kl.KeyLedgerError, match="No space left"):
        auditor.export_audit(tmp_path / "audit.jsonl", "jsonl")
    monkeypatch.setattr("keyledger.outputs.os", _FailingRename())
    with pytest.raises(kl.KeyLedgerError, match="No space left"):
        auditor.export_audit(tmp_path / "audit", "parquet")
    assert report.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "report.md"]  # no temp file


class _FailingRename:
    """``os`` whose rename fails (the last step of a folder output)."""

    def __getattr__(self, name: str) -> object:
        return getattr(os, name)

    @staticmethod
    def rename(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")


# -- Parquet exports are folders ------------------------------------------------------------------
def test_parquet_export_folder_rules(auditor, home, tmp_path):
    pq = tmp_path / "audit"
    auditor.export_audit(pq, "parquet")
    first = sorted(p.relative_to(pq) for p in pq.rglob("*.parquet"))
    assert first and all(str(p).startswith("day=") for p in first)
    with pytest.raises(kl.InvalidInput, match="not empty.*overwrite=True"):
        auditor.export_audit(pq, "parquet")
    auditor.export_audit(pq, "parquet", overwrite=True)  # replaces the earlier export
    assert sorted(p.relative_to(pq) for p in pq.rglob("*.parquet")) == first
    empty = tmp_path / "empty"
    empty.mkdir()
    auditor.export_audit(empty, "parquet")  # an empty folder is fine
    assert list(empty.glob("day=*/*.parquet"))
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(kl.InvalidInput, match="does not hold a previous audit export"):
        auditor.export_audit(foreign, "parquet", overwrite=True)
    assert [p.name for p in foreign.iterdir()] == ["cat.jpg"]
    with pytest.raises(kl.InvalidInput, match="contains the keyledger home"):
        auditor.export_audit(tmp_path, "parquet", overwrite=True)
    with pytest.raises(kl.InvalidInput, match="outside the home"):
        auditor.export_audit(home / "audit", "parquet")
    assert not (home / "audit").exists()
    assert _leftovers(tmp_path) == []


# -- backups and restores ------------------------------------------------------------------------
def test_backup_into_the_home_through_a_link_is_refused(ledger, home, tmp_path):
    outside = tmp_path / "backups"
    outside.symlink_to(home)
    with pytest.raises(kl.InvalidInput, match="outside the home"):
        ledger.backup(outside / "b.klbk", passphrase=PASS)
    link = tmp_path / "b.klbk"
    link.symlink_to(home / "user.pin")
    pin = (home / "user.pin").read_bytes()
    with pytest.raises(kl.InvalidInput, match="outside the home"):
        ledger.backup(link, passphrase=PASS, overwrite=True)
    assert not (home / "b.klbk").exists() and (home / "user.pin").read_bytes() == pin
    assert ledger.audit(action="backup")["error"].tolist() == ["InvalidInput"] * 2
    archive = tmp_path / "real.klbk"
    archive.write_bytes(b"an older backup")
    with pytest.raises(kl.InvalidInput, match="already exists"):
        ledger.backup(archive, passphrase=PASS)
    info = ledger.backup(archive, passphrase=PASS, overwrite=True)
    assert info.path == archive.resolve() and archive.read_bytes()[:8] == b"KLBACKUP"


def test_restore_never_writes_into_a_home(ledger, home, tmp_path, clock):
    archive = tmp_path / "b.klbk"
    ledger.backup(archive, passphrase=PASS)
    ledger.close()
    listing = sorted(p.name for p in home.iterdir())
    with pytest.raises(kl.InvalidInput, match="inside the keyledger home"):
        restore(archive, home / "restored", passphrase=PASS, principal="alice", clock=clock)
    link = tmp_path / "looks-outside"
    link.symlink_to(home)
    with pytest.raises(kl.InvalidInput, match="inside the keyledger home"):
        restore(archive, link / "restored", passphrase=PASS, principal="alice", clock=clock)
    assert sorted(p.name for p in home.iterdir()) == listing


# -- the command line ------------------------------------------------------------------------------
def _cli(home: Path, *args: str, subprocess: bool = False) -> subprocess.CompletedProcess:
    """`keyledger --home home --principal alice *args`, in this process unless ``subprocess``
    (tests/cli_support.py)."""
    env = {k: v for k, v in os.environ.items() if k != "KEYLEDGER_HOME"}
    return run_cli(["--home", str(home), "--principal", "alice", *args], text=True, env=env,
                   subprocess=subprocess)


def test_cli_outputs_need_force_and_never_go_into_the_home(ledger, home, tmp_path):
    ledger.create_key("orders", spec="AES_256")
    ledger.close()
    report = tmp_path / "report.md"
    report.write_text("keep me")
    out = _cli(home, "compliance", "report", str(report), subprocess=True)
    assert out.returncode == 1 and "already exists" in out.stderr and "--force" in out.stderr
    assert report.read_text() == "keep me"
    out = _cli(home, "compliance", "report", str(report), "--force")
    assert out.returncode == 0, out.stderr
    assert report.read_text().startswith("# Key-management compliance report")

    plain = tmp_path / "plain.txt"
    plain.write_bytes(b"hello")
    pin = (home / "user.pin").read_bytes()
    out = _cli(home, "encrypt", "orders", "--in", str(plain), "--out", str(home / "user.pin"),
               "--force")
    assert out.returncode == 1 and "outside the home" in out.stderr
    assert (home / "user.pin").read_bytes() == pin
    blob = tmp_path / "blob.kl"
    blob.write_bytes(b"old")
    out = _cli(home, "encrypt", "orders", "--in", str(plain), "--out", str(blob))
    assert out.returncode == 1 and "already exists" in out.stderr
    assert blob.read_bytes() == b"old"
    assert _cli(home, "encrypt", "orders", "--in", str(plain), "--out", str(blob),
                "--force").returncode == 0
    back = tmp_path / "back.txt"
    assert _cli(home, "decrypt", "--in", str(blob), "--out", str(back)).returncode == 0
    assert back.read_bytes() == b"hello"
    assert stat.S_IMODE(back.stat().st_mode) == 0o600  # plaintext stays private
    out = _cli(home, "audit", "export", str(home / "journal" / "x.jsonl"))
    assert out.returncode == 1 and "outside the home" in out.stderr


def test_a_path_with_a_nul_byte_is_refused_clearly(tmp_path):
    """The OS cannot take such a path; os.* raised a bare ValueError (found by test_hostile
    through envelope_encrypt_stream)."""
    for name in ("out\0.bin", "dir\0/out.bin"):
        with pytest.raises(InvalidInput, match="NUL byte"):
            outputs.check_target(tmp_path / name, [], overwrite=False)
        with pytest.raises(InvalidInput, match="NUL byte"):
            outputs.check_source(str(tmp_path / name))


def test_a_path_with_a_lone_surrogate_is_refused_clearly(tmp_path):
    """'\\ud800' cannot be encoded as a file name: os.* raised a bare UnicodeEncodeError (found
    by test_hostile through export_audit)."""
    for name in ("out\ud800.csv", "dir\udfff/out.csv"):
        with pytest.raises(InvalidInput, match="valid text"):
            outputs.check_target(tmp_path / name, [], overwrite=False)
        with pytest.raises(InvalidInput, match="valid text"):
            outputs.check_source(str(tmp_path / name))
    before = sorted(p.name for p in tmp_path.iterdir())
    for home in (tmp_path / "home\ud800", tmp_path / "home\0", tmp_path / "home\udcff"):
        with pytest.raises(InvalidInput):  # was a bare UnicodeEncodeError / ValueError
            kl.open(home, principal="alice")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing made


def test_a_file_name_of_bytes_that_are_not_utf8_is_refused_before_anything_is_written(
        tmp_path, ledger, monkeypatch):
    """b'\\xff' is a file name the OS takes (Python sees '\\udcff'), but DuckDB and the audit
    record cannot hold it: a backup to such a name was written, then failed with DuckDB's
    "Python Conversion Failure", leaving the file behind (found by test_hostile's CLI test)."""
    name = os.fsdecode(b"backup-\xff.klbak")
    with pytest.raises(InvalidInput, match="not UTF-8"):
        outputs.check_target(tmp_path / name, [], overwrite=False)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(InvalidInput, match="not UTF-8"):
        ledger.backup(tmp_path / name, passphrase="correct horse battery staple 42")
    with pytest.raises(InvalidInput, match="not UTF-8"):
        ledger.export_audit(tmp_path / os.fsdecode(b"audit-\xff.csv"))
    assert sorted(os.listdir(tmp_path)) == before  # nothing written
    assert ledger.audit(action="backup")["outcome"].tolist() == ["failed"]


def test_a_path_too_long_for_the_file_system_is_refused_clearly(tmp_path, ledger):
    """A 300-byte name (or a 5,000-byte path): os.* raised a bare OSError (ENAMETOOLONG; found
    by test_hostile through export_audit). Refused, audited, nothing made."""
    for path in (tmp_path / ("1" * 300), tmp_path.joinpath(*["d" * 200] * 25, "out.csv")):
        with pytest.raises(InvalidInput, match="too long for the file system"):
            outputs.check_target(path, [], overwrite=False)
        with pytest.raises(InvalidInput, match="too long"):
            outputs.check_source(str(path))
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(InvalidInput, match="too long"):
        ledger.export_audit(tmp_path / ("a" * 256 + ".csv"))
    assert ledger.audit(action="export_audit")["outcome"].tolist() == ["failed"]
    with pytest.raises(InvalidInput, match="too long"):
        kl.open(tmp_path / ("h" * 300), principal="alice")
    assert sorted(p.name for p in tmp_path.iterdir()) == before
