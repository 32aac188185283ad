"""``keyledger serve`` as a real subprocess on a SoftHSM2 home, driven by real AWS clients
(boto3, the AWS CLI) and raw HTTP: authentication, refusals with AWS's codes, the audit of
every refusal, TLS, SIGTERM; and concurrent principals in one process."""

from __future__ import annotations

import base64
import datetime as dt
import http.client
import ipaddress
import json
import os
import re
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from unittest import mock

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError, SSLError
from cli_support import run_cli
from conftest import copy_home
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from serve_support import AWS, REGION, audit, client, new_home, start

import keyledger as kl
from keyledger.server import kms
from keyledger.server.app import KeyService, ServeOptions, create_app


def error_code(exc: pytest.ExceptionInfo) -> str:
    return exc.value.response["Error"]["Code"]


@pytest.fixture(scope="module")
def served(tmp_path_factory, simulation_template):
    home, keys = new_home(tmp_path_factory.mktemp("serve"), simulation_template)
    server = start(home)
    yield server, keys
    assert server.stop() == 0, server.log.read_text()


def test_boto3_calls_as_the_access_keys_principal(served):
    server, keys = served
    out = client(server.url, keys["app1"]).generate_random(NumberOfBytes=32)
    assert len(out["Plaintext"]) == 32
    opens = audit(server.home, principal="app1", action="open")
    assert list(opens["outcome"]) == ["ok"]  # the principal's ledger, opened once


def test_the_aws_cli_works_with_only_an_endpoint_url(served, tmp_path):
    server, keys = served
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID=keys["app2"]["AccessKeyId"],
               AWS_SECRET_ACCESS_KEY=keys["app2"]["SecretAccessKey"],
               AWS_DEFAULT_REGION=REGION, AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true")
    proc = subprocess.run([str(AWS), "kms", "generate-random", "--number-of-bytes", "16",
                           "--endpoint-url", server.url, "--output", "json"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(base64.b64decode(json.loads(proc.stdout)["Plaintext"])) == 16
    assert list(audit(server.home, principal="app2", action="open")["outcome"]) == ["ok"]


def test_a_wrong_secret_is_refused_and_audited_with_the_source(served):
    server, keys = served
    with pytest.raises(ClientError) as info:
        client(server.url, keys["app1"], secret="x" * 40).generate_random(NumberOfBytes=8)
    assert error_code(info) == "InvalidSignatureException"
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    rec = audit(server.home, action="authenticate", outcome="denied").iloc[-1]
    assert rec["principal"] == "(unauthenticated)" and rec["error"] == "InvalidSignatureException"
    assert "from 127.0.0.1:" in rec["detail"] and keys["app1"]["AccessKeyId"] in rec["detail"]
    assert "TrentService.GenerateRandom" in rec["detail"]


def test_disabled_and_unknown_keys_are_unrecognized(served):
    server, keys = served
    kid = keys["app2"]["AccessKeyId"]

    def cli(*args: str) -> None:  # another process than the server's: this one
        done = run_cli(["--home", str(server.home), "--principal", "admin", "access-key", *args])
        assert done.returncode == 0, done.stderr

    cli("disable", kid)
    with pytest.raises(ClientError) as info:
        client(server.url, keys["app2"]).generate_random(NumberOfBytes=8)
    assert error_code(info) == "UnrecognizedClientException"
    cli("enable", kid)  # the running server sees both changes at once
    assert client(server.url, keys["app2"]).generate_random(NumberOfBytes=8)["Plaintext"]
    unknown = {"AccessKeyId": "AKIAIOSFODNN7EXAMPLE", "SecretAccessKey": "s" * 40}
    with pytest.raises(ClientError) as info:
        client(server.url, unknown).generate_random(NumberOfBytes=8)
    assert error_code(info) == "UnrecognizedClientException"
    refused = audit(server.home, action="authenticate", outcome="denied")
    assert {kid, "AKIAIOSFODNN7EXAMPLE"} <= {
        k for d in refused["detail"] for k in re.findall(r"access key (\S+);", d)}
    assert set(refused["error"]) >= {"UnrecognizedClientException"}


def test_a_skewed_client_clock_is_refused(served):
    server, keys = served
    late = dt.datetime.now(dt.UTC).replace(tzinfo=None) - dt.timedelta(minutes=10)
    with mock.patch("botocore.auth.get_current_datetime", lambda remove_tzinfo=True: late), \
            pytest.raises(ClientError) as info:
        client(server.url, keys["app1"]).generate_random(NumberOfBytes=8)
    assert error_code(info) == "InvalidSignatureException"
    assert info.value.response["Error"]["Message"].startswith("Signature expired")
    last = audit(server.home, action="authenticate").iloc[-1]
    assert last["outcome"] == "denied" and "Signature expired" in last["detail"]


def raw(url: str, body: bytes, *, key: dict[str, str] | None = None, method: str = "POST",
        headers: dict[str, str] | None = None) -> tuple[int, dict]:
    """A request with exactly these headers and body, signed by botocore when ``key`` is
    given; returns (status, parsed JSON body)."""
    req = AWSRequest(method=method, url=url + "/", data=body, headers=headers or {})
    if key is not None:
        SigV4Auth(Credentials(key["AccessKeyId"], key["SecretAccessKey"]), "kms",
                  REGION).add_auth(req)
    out = urllib.request.Request(url + "/", data=body or None, method=method,
                                 headers=dict(req.headers.items()))
    try:
        with urllib.request.urlopen(out, timeout=60) as resp:
            status, text = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read()
    assert b"Traceback" not in text
    return status, json.loads(text)


JSON11 = {"Content-Type": "application/x-amz-json-1.1",
          "X-Amz-Target": "TrentService.GenerateRandom"}


@pytest.mark.parametrize("body, headers, code", [
    (b"{not json", JSON11, "SerializationException"),
    (b"[1, 2]", JSON11, "SerializationException"),
    (b'"text"', JSON11, "SerializationException"),
    (b"\xff\xfe", JSON11, "SerializationException"),
    (b"{}", {**JSON11, "Content-Type": "text/plain"}, "SerializationException"),
    (b"{}", {"Content-Type": "application/x-amz-json-1.1"}, "UnknownOperationException"),
    (b"{}", {**JSON11, "X-Amz-Target": "Bogus.GenerateRandom"}, "UnknownOperationException"),
    (b"{}", {**JSON11, "X-Amz-Target": "TrentService.<script>"}, "UnknownOperationException"),
    (b"{}", {**JSON11, "X-Amz-Target": "TrentService.CreateGrant"},
     "UnsupportedOperationException"),
    (b'{"NumberOfBytes": "many"}', JSON11, "ValidationException"),
])
def test_bad_input_from_a_signed_client_gets_a_4xx_json_error(served, body, headers, code):
    server, keys = served
    status, answer = raw(server.url, body, key=keys["app1"], headers=headers)
    assert 400 <= status < 500 and answer["__type"] == code, answer
    if code in ("SerializationException", "UnknownOperationException"):  # refused here
        rec = audit(server.home, principal="app1", action="request").iloc[-1]
        assert rec["outcome"] == "failed" and rec["error"] == code


def test_unauthenticated_and_oversized_requests_get_a_4xx_json_error(served):
    server, _ = served
    status, answer = raw(server.url, b"{}", headers=JSON11)
    assert status == 400 and answer["__type"] == "MissingAuthenticationTokenException"
    status, answer = raw(server.url, b"", method="GET")
    assert status == 400 and answer["__type"] == "MissingAuthenticationTokenException"
    host = server.url.split("//")[1]
    # declared too large: refused before the body is read
    conn = http.client.HTTPConnection(host, timeout=60)
    conn.putrequest("POST", "/")
    conn.putheader("Content-Length", str(64 * 1024 * 1024))
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and json.loads(resp.read())["__type"] == "ValidationException"
    conn.close()
    # streamed (chunked, no length): refused once past the cap
    conn = http.client.HTTPConnection(host, timeout=60)
    conn.request("POST", "/", body=iter([b"x" * 65536] * 20), encode_chunked=True,
                 headers=JSON11)
    resp = conn.getresponse()
    assert resp.status == 413 and json.loads(resp.read())["__type"] == "ValidationException"
    conn.close()
    errors = set(audit(server.home, principal="(unauthenticated)")["error"])
    assert {"MissingAuthenticationTokenException", "ValidationException"} <= errors


def test_non_loopback_without_tls_refuses_to_start(tmp_path):
    # `keyledger serve` in this process (tests/cli_support.py): an exception escaping would
    # be raised here, where a process would print its traceback
    for args, words in ((["--address", "0.0.0.0"], "without TLS"),
                        (["--tls-cert", str(tmp_path / "c.pem")], "--tls-key")):
        proc = run_cli(["--home", str(tmp_path / "home"), "serve", *args], text=True)
        assert proc.returncode == 1 and words in proc.stderr and "Traceback" not in proc.stderr
        assert "listening" not in proc.stdout
    assert not (tmp_path / "home").exists()  # refused before the home was opened


def _wait_until_read(server_port: int, client_port: int, timeout: float = 30.0) -> None:
    """Wait until the server's socket of the connection from ``client_port`` has no unread
    bytes (its receive queue in /proc/net/tcp: the server's loop has read the request)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            local, remote, _, queues = line.split()[1:5]
            if (int(local.rsplit(":", 1)[1], 16) == server_port
                    and int(remote.rsplit(":", 1)[1], 16) == client_port
                    and int(queues.split(":")[1], 16) == 0):
                return
        threading.Event().wait(0.01)
    raise AssertionError("the server did not read the request's headers in time")


def _wait_until_not_listening(server_port: int, timeout: float = 30.0) -> None:
    """Wait until nothing listens on ``server_port`` (no LISTEN socket, state 0A, in
    /proc/net/tcp): uvicorn's shutdown closes its listening socket first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(int(local.rsplit(":", 1)[1], 16) == server_port and state == "0A"
                   for local, _, state in (line.split()[1:4] for line in
                                           Path("/proc/net/tcp").read_text().splitlines()[1:])):
            return
        threading.Event().wait(0.01)
    raise AssertionError("the server did not begin its shutdown in time")


def test_sigterm_finishes_an_in_flight_request_flushes_the_audit_and_exits_0(
        tmp_path, simulation_template):
    home, keys = new_home(tmp_path, simulation_template)
    server = start(home)
    client(server.url, keys["app1"]).generate_random(NumberOfBytes=8)
    host = server.url.split("//")[1]
    conn = http.client.HTTPConnection(host, timeout=60)
    conn.putrequest("POST", "/")  # a request whose body is still on its way
    conn.putheader("Content-Length", "2")
    conn.endheaders()
    conn.send(b"{")
    # the request is in flight once the server has read its headers (uvicorn starts the
    # request's cycle then; a connection it has not read from yet is idle, closed at shutdown):
    # wait until nothing is left unread on the server's side of the connection
    _wait_until_read(int(host.rsplit(":", 1)[1]), conn.sock.getsockname()[1])
    server.proc.send_signal(signal.SIGTERM)
    _wait_until_not_listening(int(host.rsplit(":", 1)[1]))  # the server began its shutdown
    conn.send(b"}")
    resp = conn.getresponse()
    assert resp.status == 400
    assert json.loads(resp.read())["__type"] == "MissingAuthenticationTokenException"
    assert server.stop() == 0, server.log.read_text()
    assert "Traceback" not in server.log.read_text()
    records = audit(home)
    app = records[records["principal"] == "app1"]
    assert list(app["action"]) == ["open", "generate_random"]  # GenerateRandom is audited
    assert list(app["outcome"]) == ["ok", "ok"]
    assert "authenticate" in set(records[records["principal"] == "(unauthenticated)"]["action"])
    with kl.open(home, principal="admin") as led:  # the last use was written at shutdown
        used = led.access_keys().set_index("access_key_id")["last_used_at"]
    assert used.notna()[keys["app1"]["AccessKeyId"]]
    assert not used.notna()[keys["app2"]["AccessKeyId"]]


def test_keep_store_open_serves_and_stops_cleanly(tmp_path, simulation_template):
    home, keys = new_home(tmp_path, simulation_template)
    server = start(home, "--keep-store-open")
    try:
        assert client(server.url, keys["app1"]).generate_random(NumberOfBytes=8)["Plaintext"]
    finally:
        assert server.stop() == 0, server.log.read_text()
    assert list(audit(home, principal="app1", action="open")["outcome"]) == ["ok"]


def self_signed(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


def test_served_over_tls(tmp_path, simulation_template):
    home, keys = new_home(tmp_path, simulation_template)
    cert, key = self_signed(tmp_path)
    server = start(home, "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        assert server.url.startswith("https://127.0.0.1:")
        out = client(server.url, keys["app1"], verify=str(cert)).generate_random(
            NumberOfBytes=16)
        assert len(out["Plaintext"]) == 16
        with pytest.raises(SSLError):  # an unknown certificate is not trusted by default
            client(server.url, keys["app1"]).generate_random(NumberOfBytes=16)
        creds = {"access_key_id": keys["app1"]["AccessKeyId"],
                 "secret_access_key": keys["app1"]["SecretAccessKey"]}
        with kl.connect(server.url, verify=str(cert), **creds) as remote:  # kl.connect too
            assert remote.principal == "app1"
        with pytest.raises(kl.ServiceError, match="(?i)certificate|ssl|tls"):
            kl.connect(server.url, **creds)
    finally:
        assert server.stop() == 0, server.log.read_text()
    assert list(audit(home, principal="app1", action="open")["outcome"]) == ["ok"]


# -- in one process: two principals' ledgers under concurrent requests ---------------------------
def _encrypt_op(call: kms.Call) -> dict:
    body = call.body.data
    blob = call.ledger.encrypt(body["KeyId"], base64.b64decode(body["Plaintext"]))
    return {"CiphertextBlob": base64.b64encode(blob).decode(), "KeyId": body["KeyId"]}


@pytest.fixture
def real_clock_ledger(tmp_path, simulation_template):
    """alice, the admin, on trusted time like the server's ledgers (one journal's records
    must not mix a simulated clock with the real one)."""
    copy_home(simulation_template, tmp_path / "home")
    with kl.open(tmp_path / "home", principal="alice") as led:
        yield led


def test_two_principals_concurrently_share_one_runtime(real_clock_ledger, monkeypatch):
    from starlette.testclient import TestClient

    ledger = real_clock_ledger
    monkeypatch.setitem(kms.OPERATIONS, "TestEncrypt", _encrypt_op)
    ledger.create_key("k-app1", spec="AES_256")
    ledger.create_key("k-app2", spec="AES_256")
    ledger.grant("k-app1", "app1", "user")
    ledger.grant("k-app2", "app2", "user")
    keys = {p: ledger.create_access_key(p).as_aws() for p in ("app1", "app2")}
    service = KeyService(ServeOptions(home=ledger.home, principal="alice"))
    results: dict[str, list[tuple[int, str]]] = {"app1": [], "app2": []}

    def call(http: TestClient, principal: str, key_name: str) -> tuple[int, str]:
        body = json.dumps({"KeyId": key_name,
                           "Plaintext": base64.b64encode(b"data").decode()}).encode()
        req = AWSRequest(method="POST", url="http://testserver/", data=body,
                         headers={**JSON11, "X-Amz-Target": "TrentService.TestEncrypt"})
        key = keys[principal]
        SigV4Auth(Credentials(key["AccessKeyId"], key["SecretAccessKey"]), "kms",
                  REGION).add_auth(req)
        resp = http.post("/", content=body, headers=dict(req.headers.items()))
        return resp.status_code, resp.json().get("__type", "ok")

    with TestClient(create_app(service)) as http:
        def worker(principal: str) -> None:
            for _ in range(15):
                results[principal].append(call(http, principal, f"k-{principal}"))

        threads = [threading.Thread(target=worker, args=(p,)) for p in ("app1", "app2")
                   for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        denied = call(http, "app1", "k-app2")  # the facade's AccessDenied, mapped by faults
    assert all(r == (200, "ok") for rs in results.values() for r in rs), results
    assert denied == (400, "AccessDeniedException")
    ledger.flush_audit()
    enc = ledger.audit(action="encrypt")
    counts = enc.groupby(["principal", "key", "outcome"]).size().to_dict()
    assert counts == {("app1", "k-app1", "ok"): 30, ("app2", "k-app2", "ok"): 30,
                      ("app1", "k-app2", "denied"): 1}
    opens = ledger.audit(action="open")
    assert sorted(opens["principal"]) == ["alice", "alice", "app1", "app2"]  # one ledger each
    assert ledger.verify_audit().ok



def _broken_op(call: kms.Call) -> dict:
    raise RuntimeError(f"internal detail quoting {call.body.data['Plaintext']}")


def test_an_unexpected_error_is_a_generic_500_logged_without_its_message(
        real_clock_ledger, monkeypatch, caplog):
    from starlette.testclient import TestClient

    monkeypatch.setitem(kms.OPERATIONS, "TestBroken", _broken_op)
    key = real_clock_ledger.create_access_key("app1").as_aws()
    service = KeyService(ServeOptions(home=real_clock_ledger.home, principal="alice"))
    body = json.dumps({"Plaintext": "SECRET-PLAINTEXT-42"}).encode()
    req = AWSRequest(method="POST", url="http://testserver/", data=body,
                     headers={**JSON11, "X-Amz-Target": "TrentService.TestBroken"})
    SigV4Auth(Credentials(key["AccessKeyId"], key["SecretAccessKey"]), "kms",
              REGION).add_auth(req)
    with TestClient(create_app(service)) as http:
        resp = http.post("/", content=body, headers=dict(req.headers.items()))
    assert resp.status_code == 500 and resp.json()["__type"] == "KMSInternalException"
    assert "SECRET" not in resp.text and "Traceback" not in resp.text
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "RuntimeError" in logged and "SECRET-PLAINTEXT-42" not in logged


def test_keyledger_errors_map_to_aws_errors_by_class():
    from keyledger import errors as e
    from keyledger.server.faults import api_error

    cases = {e.AccessDenied("no"): ("AccessDeniedException", 400),
             e.KeyNotFound("no"): ("NotFoundException", 400),
             e.InvalidInput("no"): ("ValidationException", 400),
             e.KeyStateError("no"): ("KMSInvalidStateException", 400),
             e.InvalidCiphertext("no"): ("InvalidCiphertextException", 400),
             e.UnsupportedMechanism("no"): ("UnsupportedOperationException", 400),
             e.StoreBusy("/home/x held"): ("DependencyTimeoutException", 503),
             e.StoreError("/home/x broken"): ("KMSInternalException", 500)}
    for exc, (code, status) in cases.items():
        err = api_error(exc)
        assert (err.code, err.status) == (code, status)
        assert status < 500 or "/home/x" not in err.message  # server faults: generic words
