"""``kl.connect``: keyledger's own API through ``keyledger serve`` (a real server subprocess on
a SoftHSM2 home), signed with SigV4 by botocore: the same methods, results and errors as a
local ledger, run and audited as the access key's principal; credentials from arguments,
environment or a private file; the CLI's ``--url``; widgets and analytics over a client."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest
from cli_support import run_cli
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from serve_support import audit, new_home, start

import keyledger as kl
from keyledger.remote import api
from keyledger.remote.client import RemoteLedger
from keyledger.server import native


@pytest.fixture(scope="module")
def estate(tmp_path_factory, simulation_template):
    """A served home: ``admin`` (admin everywhere), ``app1`` a user of ``orders``, ``app2``
    with no role; an access key for each."""
    home, keys = new_home(tmp_path_factory.mktemp("connect"), simulation_template)
    with kl.open(home, principal="admin") as led:
        keys["admin"] = led.create_access_key("admin").as_aws()
        led.create_key("orders", spec="AES_256", owner="payments", tags={"env": "prod"})
        led.create_key("signer", spec="EC_P256")
        led.create_key("macs", spec="HMAC_SHA256")
        led.grant("orders", "app1", "user")
        led.grant("*", "admin2", "admin")
        keys["admin2"] = led.create_access_key("admin2").as_aws()
        keys["nobody"] = led.create_access_key("nobody").as_aws()
        led.create_key("gov", spec="AES_256")
        led.set_policy("gov", quorum=2)
    server = start(home)
    yield server, keys
    assert server.stop() == 0, server.log.read_text()


def connect(server, key: dict[str, str]) -> RemoteLedger:
    return kl.connect(server.url, access_key_id=key["AccessKeyId"],
                      secret_access_key=key["SecretAccessKey"])


@pytest.fixture(scope="module")
def admin(estate):
    server, keys = estate
    with connect(server, keys["admin"]) as led:
        yield led


def local(server, principal: str = "admin") -> kl.KeyLedger:
    return kl.open(server.home, principal=principal)


def records(server, principal: str, action: str) -> pd.DataFrame:
    df = audit(server.home, principal=principal, action=action, limit=None)
    return df[["principal", "action", "key", "outcome", "error"]]


# -- lifecycle and crypto ---------------------------------------------------------------------------
def test_lifecycle_round_trip_returns_the_same_classes(estate, admin):
    server, _ = estate
    assert admin.principal == "admin" and admin.simulation
    key = admin.create_key("remote-life", spec="AES_256", owner="ops", tags={"t": "1"},
                           rotation_period="30d")
    assert isinstance(key, kl.Key) and key.spec is kl.SPECS["AES_256"]
    assert key.state is kl.KeyState.ACTIVE and key.rotation_period == timedelta(days=30)
    assert admin.rotate("remote-life").latest_version == 2
    assert admin.set_alias("remote-life", "life-alias").aliases == ("life-alias",)
    assert admin.set_tags("remote-life", {"t": "2"}).tags == {"t": "2"}
    assert admin.set_policy("remote-life", min_decryption_version=1).min_decryption_version == 1
    assert admin.disable("remote-life").state is kl.KeyState.SUSPENDED
    assert admin.enable("remote-life").state is kl.KeyState.ACTIVE
    due = admin.schedule_deletion("remote-life", 7)
    assert due.state is kl.KeyState.PENDING_DELETION and due.deletion_due is not None
    assert admin.cancel_deletion("remote-life").state is kl.KeyState.ACTIVE
    with local(server) as led:
        assert admin.get_key("remote-life") == led.get_key("remote-life")
    assert list(records(server, "admin", "rotate")["key"]) == ["remote-life"]


def test_crypto_round_trip(estate, admin):
    blob = admin.encrypt("orders", b"card 4111", context={"tenant": "acme"})
    assert admin.decrypt(blob, context={"tenant": "acme"}) == b"card 4111"
    with local(estate[0], "app1") as led:  # the same ciphertext format as a local ledger's
        assert led.decrypt(blob, context={"tenant": "acme"}) == b"card 4111"
    dk = admin.generate_data_key("orders")
    assert isinstance(dk, kl.DataKey) and len(dk.plaintext) == 32
    assert admin.decrypt(dk.wrapped) == dk.plaintext
    sig = admin.sign("signer", b"msg")
    assert admin.verify("signer", b"msg", sig) and not admin.verify("signer", b"other", sig)
    pub = load_pem_public_key(admin.public_key_pem("signer").encode())
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    pub.verify(sig, b"msg", ec.ECDSA(hashes.SHA256()))
    tag = admin.mac("macs", b"msg")
    assert admin.verify_mac("macs", b"msg", tag) and not admin.verify_mac("macs", b"x", tag)
    env = admin.envelope_encrypt("orders", b"x" * 10_000)
    assert admin.envelope_decrypt(env) == b"x" * 10_000
    assert admin.capabilities() == local_capabilities(estate[0])


def test_envelopes_over_a_client_whole_and_streamed(estate, admin, tmp_path):
    """Whole envelopes travel (bytearray and memoryview too); a streamed one stays here: the
    server gives the data key (one generate_data_key / decrypt record), the client does the
    chunks, in the format a local ledger reads."""
    data = os.urandom(3 * 1024 + 5)
    env = admin.envelope_encrypt("orders", bytearray(data), context={"t": "1"})
    assert admin.envelope_decrypt(memoryview(env), context={"t": "1"}) == data
    (tmp_path / "in.bin").write_bytes(data)
    assert admin.envelope_encrypt_stream("orders", tmp_path / "in.bin", tmp_path / "s.kle",
                                         context={"t": "1"}, chunk_size=1024,
                                         progress=False) == len(data)
    assert admin.envelope_decrypt_stream(tmp_path / "s.kle", tmp_path / "out.bin",
                                         context={"t": "1"}, progress=False) == len(data)
    assert (tmp_path / "out.bin").read_bytes() == data
    with local(estate[0], "app1") as led:  # a local ledger opens the client's stream
        sink = io.BytesIO()
        led.envelope_decrypt_stream(tmp_path / "s.kle", sink, context={"t": "1"},
                                    progress=False)
        assert sink.getvalue() == data
    blob = (tmp_path / "s.kle").read_bytes()
    with pytest.raises(kl.InvalidCiphertext):
        admin.envelope_decrypt_stream(io.BytesIO(blob[:-1]), io.BytesIO(),
                                      context={"t": "1"}, progress=False)
    with pytest.raises(kl.InvalidCiphertext):  # the server refuses the data key
        admin.envelope_decrypt_stream(io.BytesIO(blob), io.BytesIO(), progress=False)
    records = audit(estate[0].home, principal="admin", key="orders", limit=None)
    mine = records[records["context"] == '{"t":"1"}']
    assert list(mine["action"]) == ["envelope_encrypt", "envelope_decrypt", "generate_data_key",
                                    "decrypt", "decrypt"]
    assert list(mine["outcome"]) == ["ok", "ok", "ok", "ok", "ok"]


# -- errors ---------------------------------------------------------------------------------------
def test_widgets_and_analytics_work_over_a_client(admin):
    from keyledger import analytics
    from keyledger.widgets import KeyInventory

    status = analytics.key_status(admin)
    assert {"orders", "signer", "macs"} <= set(status["name"])
    inv = KeyInventory(admin)
    inv.select_key("orders")
    assert inv.selected == "orders"
    assert "payments" in inv.detail.value  # the key's details, read through the server


def test_charts_and_every_widget_work_over_a_client(estate, admin):
    """The notebook tools take a RemoteLedger where they take a KeyLedger: the audit browser,
    the compliance view (evaluated through the server), the dashboard and the charts."""
    from keyledger import analytics, charts
    from keyledger.widgets import AuditBrowser, ComplianceView, dashboard

    server, keys = estate
    app1 = connect(server, keys["app1"])
    for _ in range(3):
        app1.encrypt("orders", b"from a notebook elsewhere")
    app1.close()
    ab = AuditBrowser(admin, page_size=10)
    ab.filters["principal"].value = "app1"
    ab.filters["action"].value = "encrypt"
    assert ab.total >= 3 and set(ab.page["principal"]) == {"app1"}
    cv = ComplianceView(admin)
    cv.evaluate_button.click()
    assert "evaluated:" in cv.status.value
    assert cv.chart is not None and "$schema" in cv.chart.to_dict()
    with local(server) as led:  # the same findings as the home's own evaluation
        assert set(cv.findings["rule_id"]) == set(led.findings()["rule_id"])
    spec = charts.rotation_status(analytics.key_status(admin)).to_dict()
    assert "$schema" in spec and "orders" in json.dumps(spec)
    ops = analytics.ops_per_period(admin, by="principal", bucket="day")
    assert "app1" in set(ops["group"].astype(str))
    assert "$schema" in charts.operations(ops).to_dict()
    desk = dashboard(admin)
    assert desk.inventory.grid.rows and desk.audit.total >= 3


NOTEBOOK_CELLS = [
    "import keyledger as kl\nfrom keyledger import analytics as kla, charts as klc\n"
    "from keyledger.widgets import KeyInventory, ComplianceView\n"
    "ledger = kl.connect(URL)  # credentials from KEYLEDGER_ACCESS_KEY_ID/..._SECRET_ACCESS_KEY\n"
    "print('PRINCIPAL', ledger.principal)",
    "status = kla.key_status(ledger)\nprint('KEYS', sorted(status['name']))\n"
    "klc.rotation_status(status)",
    "inventory = KeyInventory(ledger)\ninventory.select_key('orders')\n"
    "print('SELECTED', inventory.selected)\ninventory",
    "print(ledger.audit(limit=3).tail())\nComplianceView(ledger)",
]


def test_a_notebook_works_over_a_client_on_a_real_kernel(estate, tmp_path):
    """A notebook elsewhere (a real ipykernel, via nbclient) uses the service: connect with
    credentials from the environment, a chart (rendered offline to SVG), the widgets."""
    import nbformat
    from nbclient import NotebookClient
    from test_notebooks import _kernel_manager

    server, keys = estate
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(f"URL = {server.url!r}")] + [
        nbformat.v4.new_code_cell(c) for c in NOTEBOOK_CELLS]
    env = {**os.environ, "KEYLEDGER_ACCESS_KEY_ID": keys["admin"]["AccessKeyId"],
           "KEYLEDGER_SECRET_ACCESS_KEY": keys["admin"]["SecretAccessKey"],
           "KEYLEDGER_HOME": str(tmp_path / "no-home-here")}
    NotebookClient(nb, km=_kernel_manager(tmp_path / "kernels"), timeout=180,
                   allow_errors=False).execute(env=env)
    text = "\n".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "PRINCIPAL admin" in text and "SELECTED orders" in text
    assert "'orders'" in text.split("KEYS", 1)[1]
    chart = nb.cells[2].outputs[-1]["data"]
    assert "image/svg+xml" in chart  # keyledger.notebook.setup's offline renderer
    widgets = [o for c in nb.cells[3:] for o in c.outputs
               if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert len(widgets) == 2
    assert not (tmp_path / "no-home-here").exists()  # the notebook never opened a home
    reads = records(server, "admin", "list_keys")
    assert "ok" in set(reads["outcome"])


def test_errors_raise_the_same_classes(estate, admin):
    server, keys = estate
    with pytest.raises(kl.KeyNotFound, match="no-such"):
        admin.get_key("no-such")
    with pytest.raises(kl.InvalidCiphertext):
        admin.decrypt(b"KL" + b"\0" * 60)
    with pytest.raises(kl.PolicyViolation):
        admin.schedule_deletion("orders", 3)
    with connect(server, keys["app1"]) as app1, pytest.raises(kl.AccessDenied):
        app1.rotate("orders")
    with pytest.raises(kl.InvalidInput):
        admin.create_key("bad name!", spec="AES_256")


def local_capabilities(server):
    with local(server) as led:
        return led.capabilities()


# -- keyledger's extras -----------------------------------------------------------------------------
def test_frames_through_the_wire_equal_local_ones(estate, admin):
    server, _ = estate
    admin.encrypt("orders", b"x")
    admin.flush_audit()
    calls = {
        "list_keys": lambda led: led.list_keys(),
        "audit": lambda led: led.audit(key="orders", action="encrypt", limit=5, offset=0),
        "grants": lambda led: led.grants(),
        "version_usage": lambda led: led.version_usage("orders"),
        "compliance_rules": lambda led: led.compliance_rules(),
        "query": lambda led: led.query("SELECT name, created_at FROM keys ORDER BY name"),
        "backups": lambda led: led.backups(),
    }
    remote = {name: call(admin) for name, call in calls.items()}
    with local(server) as led:
        mine = {name: call(led) for name, call in calls.items()}
    for name, frame in remote.items():
        assert type(frame) is type(mine[name]), name
        pd.testing.assert_frame_equal(frame, mine[name], obj=name)
    assert len(remote["audit"]) >= 1 and set(remote["audit"]["action"]) == {"encrypt"}
    assert isinstance(remote["list_keys"]["state"].dtype, pd.CategoricalDtype)


def test_audit_filters_limit_offset_and_verify(admin):
    for _ in range(3):
        admin.encrypt("orders", b"page")
    page1 = admin.audit(key="orders", action="encrypt", limit=2, newest_first=True)
    page2 = admin.audit(key="orders", action="encrypt", limit=2, offset=2, newest_first=True)
    assert len(page1) == 2 and not set(page1["seq"]) & set(page2["seq"])
    assert admin.audit(since=datetime.now(UTC) + timedelta(days=3650)).empty
    report = admin.verify_audit()
    assert isinstance(report, kl.VerifyReport) and report.ok, report.problems


def test_compliance_over_the_wire(admin):
    findings = admin.compliance()
    assert {"rule_id", "severity", "key"} <= set(findings.columns)
    assert isinstance(admin.findings(), pd.DataFrame)
    assert not admin.compliance_trend().empty
    rule = admin.compliance_rules()["rule_id"].iloc[0]
    accepted = admin.accept_finding(rule, "orders", "documented decision", "30d")
    assert isinstance(accepted, dict)
    assert rule in set(admin.compliance_exceptions()["rule_id"])


def test_grants_requests_and_approvals(estate, admin):
    server, keys = estate
    admin.grant("signer", "app2", "user")
    assert "app2" in set(admin.grants("signer")["principal"])
    assert admin.revoke("signer", "app2") == 1
    request_id = admin.request("set_policy", "gov", "longer period", rotation_period="400d")
    assert request_id in set(admin.requests("pending")["request_id"])
    with connect(server, keys["admin2"]) as admin2:
        assert admin2.principal == "admin2"
        result = admin2.approve(request_id)
    assert isinstance(result, dict)
    assert admin.get_key("gov").rotation_period == timedelta(days=400)
    assert list(records(server, "admin2", "approve")["outcome"]) == ["ok"]


def test_rewrap_many_takes_a_list_or_a_series(admin):
    old = [admin.encrypt("orders", b"r%d" % i) for i in range(3)]
    admin.rotate("orders")
    result = admin.rewrap_many(pd.Series(old), progress=False)
    assert isinstance(result, kl.RewrapResult) and result.ok == 3
    assert [admin.decrypt(c) for c in result.ciphertexts] == [b"r0", b"r1", b"r2"]
    dry = admin.rewrap_many(result.ciphertexts, dry_run=True)
    assert dry.dry_run and int(dry.counts["ciphertexts"].sum()) == 3


def test_what_needs_the_servers_files_is_refused_clearly(admin, tmp_path):
    with pytest.raises(kl.NotRemote, match="keyledger backup"):
        admin.backup(tmp_path / "b.klbak", passphrase="pw")
    with pytest.raises(kl.NotRemote, match="store open"):
        admin.keep_store_open()
    with pytest.raises(kl.NotRemote):
        admin.reconcile()
    with pytest.raises(kl.NotRemote):
        admin.export_audit(tmp_path / "audit.jsonl", "jsonl")
    assert not list(tmp_path.iterdir())


def test_every_public_method_is_served_or_refused_by_name():
    public = {n for n in dir(kl.KeyLedger) if not n.startswith("_")
              and callable(getattr(kl.KeyLedger, n))} - {"close", "now"}
    assert public == set(api.SERVED) | set(api.NOT_SERVED) | set(api.CLIENT_SIDE)
    assert all(callable(getattr(RemoteLedger, n)) for n in api.CLIENT_SIDE)
    assert callable(RemoteLedger.now)  # the client's own: the internal "now" call
    assert set(native.METHODS) == set(api.SERVED) | {"whoami", "now", "changes"}


def test_unknown_methods_and_arguments_are_refused_and_audited(estate, admin):
    server, _ = estate
    with pytest.raises(kl.InvalidInput, match="no method"):
        admin._call("no_such", {})
    with pytest.raises(kl.InvalidInput, match="not served remotely.*server's host"):
        admin._call("backup", {"path": "/tmp/x", "passphrase": "pw"})
    with pytest.raises(kl.ServiceError, match="UnknownOperation"):
        admin._call("_rt", {})  # not even a method name: refused before any dispatch
    with pytest.raises(kl.InvalidInput, match="takes no argument"):
        admin._call("get_key", {"name": "orders", "sql": "x"})
    with pytest.raises(kl.InvalidInput, match="name must be str"):
        admin._call("get_key", {"name": 5})
    with pytest.raises(kl.InvalidInput, match="missing"):
        admin._call("get_key", {})
    refused = records(server, "admin", "keyledger:get_key")
    assert list(refused["outcome"]) == ["failed"] * 3
    assert list(records(server, "admin", "keyledger:no_such")["error"]) == ["InvalidInput"]


# -- principals and credentials -------------------------------------------------------------------
def test_a_principal_without_a_role_is_denied_and_audited_as_itself(estate):
    server, keys = estate
    with connect(server, keys["nobody"]) as nobody:
        assert nobody.principal == "nobody"
        with pytest.raises(kl.AccessDenied):
            nobody.encrypt("orders", b"x")
        with pytest.raises(kl.AccessDenied):
            nobody.audit()
    denied = records(server, "nobody", "encrypt")
    assert list(denied["outcome"]) == ["denied"] and list(denied["key"]) == ["orders"]


def test_a_wrong_secret_is_a_clear_service_error(estate):
    server, keys = estate
    with pytest.raises(kl.ServiceError, match="refused the credentials.*InvalidSignature"):
        kl.connect(server.url, access_key_id=keys["app1"]["AccessKeyId"],
                   secret_access_key="wrong" * 8)
    with pytest.raises(kl.ServiceError, match="cannot reach"):
        kl.connect("http://127.0.0.1:9", access_key_id="a", secret_access_key="b")
    denied = audit(server.home, action="authenticate", limit=None)
    mine = denied[denied["detail"].str.contains(keys["app1"]["AccessKeyId"], regex=False)]
    assert list(mine["outcome"]) == ["denied"]
    assert "wrong" not in " ".join(denied["detail"].astype(str))  # never the secret tried


def test_credentials_from_the_environment(estate, monkeypatch):
    server, keys = estate
    monkeypatch.setenv("KEYLEDGER_ACCESS_KEY_ID", keys["app1"]["AccessKeyId"])
    monkeypatch.setenv("KEYLEDGER_SECRET_ACCESS_KEY", keys["app1"]["SecretAccessKey"])
    with kl.connect(server.url) as led:
        assert led.principal == "app1"


def test_the_credentials_file_must_be_private(estate, monkeypatch, tmp_path):
    server, keys = estate
    for var in ("KEYLEDGER_ACCESS_KEY_ID", "KEYLEDGER_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var, raising=False)
    path = tmp_path / "credentials"
    path.write_text(f"[default]\naccess_key_id = {keys['app2']['AccessKeyId']}\n"
                    f"secret_access_key = {keys['app2']['SecretAccessKey']}\n")
    monkeypatch.setenv("KEYLEDGER_CREDENTIALS", str(path))
    path.chmod(0o644)
    with pytest.raises(kl.ConfigError, match="readable by others.*chmod 600"):
        kl.connect(server.url)
    path.chmod(0o600)
    with kl.connect(server.url) as led:
        assert led.principal == "app2"
    monkeypatch.setenv("KEYLEDGER_CREDENTIALS", str(tmp_path / "missing"))
    with pytest.raises(kl.ConfigError, match="no access key"):
        kl.connect(server.url)


# -- the CLI --------------------------------------------------------------------------------------
def test_cli_url_encrypts_and_decrypts_through_the_server(estate, tmp_path):
    server, keys = estate
    env = {**os.environ, "KEYLEDGER_ACCESS_KEY_ID": keys["app1"]["AccessKeyId"],
           "KEYLEDGER_SECRET_ACCESS_KEY": keys["app1"]["SecretAccessKey"],
           "KEYLEDGER_HOME": str(tmp_path / "no-home")}
    cli = [sys.executable, "-m", "keyledger.cli", "--url", server.url]
    plain = tmp_path / "plain.txt"
    plain.write_bytes(b"via the CLI")
    enc = subprocess.run([*cli, "encrypt", "orders", "--in", str(plain), "--out",
                          str(tmp_path / "blob")], env=env, capture_output=True, text=True,
                         timeout=120)
    assert enc.returncode == 0, enc.stderr
    dec = subprocess.run([*cli, "decrypt", "--in", str(tmp_path / "blob")], env=env,
                         capture_output=True, timeout=120)
    assert dec.returncode == 0, dec.stderr
    assert dec.stdout == b"via the CLI"
    assert not (tmp_path / "no-home").exists()  # no local home was opened
    assert "ok" in set(records(server, "app1", "decrypt")["outcome"])


def test_cli_url_runs_key_audit_and_compliance_commands_remotely(estate, tmp_path):
    server, keys = estate
    env = {**os.environ, "KEYLEDGER_ACCESS_KEY_ID": keys["admin"]["AccessKeyId"],
           "KEYLEDGER_SECRET_ACCESS_KEY": keys["admin"]["SecretAccessKey"],
           "KEYLEDGER_HOME": str(tmp_path / "no-home")}

    def cli(*args: str) -> subprocess.CompletedProcess:  # in this process: no home is opened
        return run_cli(["--url", server.url, *args], env=env, text=True)

    made = cli("key", "create", "cli-remote", "--spec", "AES_256", "--json")
    assert made.returncode == 0, made.stderr
    assert json.loads(cli("key", "show", "cli-remote", "--json").stdout)["latest_version"] == 1
    assert cli("key", "rotate", "cli-remote").returncode == 0
    listed = json.loads(cli("key", "list", "--json").stdout)
    assert {"cli-remote", "orders"} <= {row["name"] for row in listed}
    tail = cli("audit", "tail", "--json")
    assert tail.returncode == 0 and "cli-remote" in tail.stdout
    assert cli("audit", "verify").returncode == 0
    assert cli("compliance", "list", "--json").returncode == 0
    env["KEYLEDGER_BACKUP_PASSPHRASE"] = "a long passphrase"
    refused = cli("backup", str(tmp_path / "b.klbak"))
    assert refused.returncode == 1 and "does not work over kl.connect" in refused.stderr
    both = cli("--home", str(tmp_path), "key", "list")
    assert both.returncode == 2 and "drop --home" in both.stderr
    assert not (tmp_path / "no-home").exists()
    assert list(records(server, "admin", "rotate")["key"])[-1] == "cli-remote"


# -- the dashboard as a client of the service ------------------------------------------------------
def admin_env(keys, **extra: str) -> dict[str, str]:
    return {"KEYLEDGER_ACCESS_KEY_ID": keys["admin"]["AccessKeyId"],
            "KEYLEDGER_SECRET_ACCESS_KEY": keys["admin"]["SecretAccessKey"], **extra}


def test_dashboard_state_over_a_client_sees_the_servers_changes(estate, monkeypatch):
    from keyledger.dashboard.app import build_app

    server, keys = estate
    for name, value in admin_env(keys).items():
        monkeypatch.setenv(name, value)
    template = build_app(url=server.url)
    st = template.dashboard.state
    assert st.principal == "admin" and st.home == server.url.rstrip("/") + "/"
    assert {"orders", "signer"} <= set(st.data.keys()["name"])
    before = st.detector.token()
    assert st.detector.token() == before  # its own reads are no change
    with connect(server, keys["admin2"]) as other:
        other.create_key("made-elsewhere", spec="AES_256")
    assert st.detector.token().catalog_changed(before)
    st.ledger.close()


def test_keyledger_dashboard_url_serves_without_opening_a_home(estate, tmp_path):
    import socket
    import time
    import urllib.request

    server, keys = estate
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, **admin_env(keys, KEYLEDGER_HOME=str(tmp_path / "no-home"))}
    proc = subprocess.Popen([sys.executable, "-m", "keyledger.cli", "--url", server.url,
                             "dashboard", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert f":{port}/" in line, line + proc.stdout.read()
        deadline, body = time.monotonic() + 90, ""
        while time.monotonic() < deadline and not body:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as resp:
                    body = resp.read().decode()
            except OSError:
                time.sleep(0.5)
        assert "<title>keyledger" in body
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        maps = "".join(Path(f"/proc/{c}/maps").read_text() for c in children)
        assert children and "softhsm" not in maps.lower()  # the dashboard never loaded the HSM
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert not (tmp_path / "no-home").exists()
    assert "ok" in set(records(server, "admin", "list_keys")["outcome"])


def test_wire_round_trips_keyledger_values_and_frames_exactly():
    from keyledger.frames import normalize
    from keyledger.remote.wire import decode, encode

    frame = normalize(pd.DataFrame({
        "name": ["a", "b", None], "n": pd.array([1, None, 3], dtype="Int64"),
        "ok": pd.array([True, None, False], dtype="boolean"), "x": [1.5, float("nan"), 0.0],
        "at": [datetime(2024, 1, 1, tzinfo=UTC), None, datetime(2025, 6, 1, tzinfo=UTC)],
        "tags": [{"env": "prod"}, {}, {"__bytes__": "not a tag"}], "aliases": [("x",), (), ("y", "z")],
        "state": ["retired", "active", None]}), categories={"state": ["active", "retired"]})
    filtered = kl.display.AuditFrame(frame[frame["name"] != "a"])  # index 1, 2: not 0..n-1
    for value in (frame, filtered):
        back = decode(json.loads(json.dumps(encode(value))))
        assert type(back) is type(value)
        pd.testing.assert_frame_equal(back, value)
    key_data = {1: b"\x00\xff", "when": timedelta(days=3), "s": frozenset({"a"})}
    assert decode(json.loads(json.dumps(encode(key_data)))) == key_data
