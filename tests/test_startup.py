"""Start-up cost (issue 16): ``import keyledger``, the CLI and calls that return no DataFrame
load no pandas, so every CLI run, worker, kernel and server pays only for what it uses.

Each test runs a fresh interpreter (this one has pandas loaded by the other tests) and reads
back, as JSON on its last line, what the script found."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HEAVY = ("pandas", "numpy", "pyarrow")

REPORT = f"""
import json, sys
print(json.dumps({{"loaded": [m for m in {HEAVY!r} if m in sys.modules], **out}}))
"""


def fresh(code: str, tmp_path: Path) -> dict:
    """Run ``code`` (which fills a dict ``out``) in a new interpreter; its report."""
    proc = subprocess.run([sys.executable, "-c", code + REPORT], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_and_cli_help_load_no_pandas_numpy_or_pyarrow(tmp_path: Path) -> None:
    report = fresh("""
import contextlib, io
import keyledger, keyledger.cli
from keyledger.cli.common import jsonable
with contextlib.redirect_stdout(io.StringIO()) as help_text:
    try:
        code = keyledger.cli.main(["--help"])
    except SystemExit as exc:  # argparse's --help exits
        code = exc.code
out = {"code": code, "help": "encrypt" in help_text.getvalue(),
       "nan": jsonable(float("nan")), "one": jsonable(1.5)}
""", tmp_path)
    assert report == {"loaded": [], "code": 0, "help": True, "nan": None, "one": 1.5}


def test_open_encrypt_and_ingest_load_no_pandas(tmp_path: Path) -> None:
    """Open a new home, create a key, encrypt and decrypt (a context with a newline: the
    ingest's JSON path), ingest and verify: no frame handed out, so no pandas. The audit
    records read afterwards (a frame: pandas loaded then) hold what was written."""
    report = fresh("""
import sys
import keyledger as kl
out = {}
with kl.open("home", principal="alice") as ledger:
    ledger.create_key("orders", spec="AES_256")
    ctx = {"tenant": "acme\\nwest", "city": "Zürich"}
    blob = ledger.encrypt("orders", b"card 4111", context=ctx)
    out["plain"] = ledger.decrypt(blob, context=ctx).decode()
    out["ingested"] = ledger.flush_audit()
    out["verified"] = ledger.verify_audit().ok
    out["before_frames"] = [m for m in ("pandas",) if m in sys.modules]
    records = ledger.audit(action="encrypt")
    out["contexts"] = [str(c) for c in records["context"]]
    out["frame"] = type(records).__name__
""", tmp_path)
    assert report["before_frames"] == []
    assert report["plain"] == "card 4111"
    assert report["ingested"] > 0 and report["verified"] is True
    assert report["frame"] == "AuditFrame" and "pandas" in report["loaded"]
    assert len(report["contexts"]) == 1
    assert json.loads(report["contexts"][0]) == {"tenant": "acme\nwest", "city": "Zürich"}


def test_cli_commands_without_frames_load_no_pandas(tmp_path: Path) -> None:
    """``init``, ``key create``, ``encrypt``/``decrypt`` through the CLI's own ``main``."""
    (tmp_path / "card.txt").write_bytes(b"card 4111")
    report = fresh("""
import contextlib, io
from keyledger.cli import main
out = {"codes": []}
with contextlib.redirect_stdout(io.StringIO()):
    for argv in (["init"], ["key", "create", "orders", "--spec", "AES_256"],
                 ["encrypt", "orders", "--in", "card.txt", "--out", "card.kl"],
                 ["decrypt", "--in", "card.kl", "--out", "card.out"]):
        out["codes"].append(main(["--home", "home", "--principal", "alice", *argv]))
out["plain"] = open("card.out").read()
""", tmp_path)
    assert report["codes"] == [0, 0, 0, 0]
    assert report["plain"] == "card 4111"
    assert "pandas" not in report["loaded"]


def test_frames_work_in_a_fresh_interpreter(tmp_path: Path) -> None:
    """Calls that return frames load pandas themselves and keep the frame conventions."""
    report = fresh("""
import keyledger as kl
from keyledger import frames
out = {}
with kl.open("home", principal="alice") as ledger:
    ledger.create_key("orders", spec="AES_256")
    keys = ledger.list_keys()
    out["created"] = str(keys["created_at"].dtype)
    out["name"] = str(keys["name"].dtype)
    out["time_dtype"] = str(frames.TIME_DTYPE)
    out["dir"] = "TIME_DTYPE" in dir(frames)
    import pandas as pd
    blobs = ledger.encrypt_many("orders", pd.Series([b"a", None]))
    out["batch"] = [type(blobs).__name__, bool(blobs.isna()[1])]
    out["findings"] = type(ledger.compliance()).__name__
""", tmp_path)
    assert report["created"] == report["time_dtype"] == "datetime64[us, UTC]"
    assert report["name"] == "string" and report["dir"] is True
    assert report["batch"] == ["Series", True]
    assert report["findings"] == "FindingsFrame"


def test_the_dashboard_command_refuses_a_bad_home_or_bind_without_loading_the_app(tmp_path: Path
                                                                                ) -> None:
    """The app (Panel's widgets, Altair, jsonschema: ~9 s of CPU to import here) loads only in
    the server process, after every check has passed; a folder that is not a home is refused
    before even Panel loads (the bind check reads options with Panel's own parser)."""
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "keyledger.toml").write_text("")  # looks like a home: the bind is checked
    report = fresh(f"""
import contextlib, io, sys
from keyledger.cli import main
ui = lambda: [m for m in ("panel", "altair", "jsonschema") if m in sys.modules]
with contextlib.redirect_stderr(io.StringIO()) as err:
    not_home = main(["dashboard", "--home", {str(tmp_path / "nothing")!r}])
    after_not_home = ui()
    public = main(["dashboard", "--home", {str(tmp_path / "home")!r}, "--address", "0.0.0.0"])
out = {{"codes": [not_home, public], "err": err.getvalue(), "ui": [after_not_home, ui()]}}
""", tmp_path)
    assert report["codes"] == [1, 1], report
    assert "not a keyledger home" in report["err"] and "without a login" in report["err"]
    assert report["ui"] == [[], ["panel"]]
