"""keyledger serve against moto's KMS (server mode), and CreateKey against bare python-pkcs11.

One harness drives every server the same way: ``--threads`` client threads, each with its own
boto3 KMS client (botocore keeps its connection alive), call for ``--seconds``; the servers take
turns round by round (moto, keyledger, keyledger --keep-store-open, then the next round in
rotated order) so machine noise hits all of them alike. The table shows requests/s as the
median over rounds, p50 and p99 latency over all of a server's calls, and the ratio
keyledger/moto as the median of the per-round ratios.

* Encrypt of 32 bytes with a small EncryptionContext on a symmetric key (and Decrypt of such a
  blob). keyledger does its real work: SigV4 verification, SoftHSM2 AES-GCM through PKCS#11 and
  one audit record per call. After the run the bench checks, in each keyledger home, that the
  ledger holds at least as many ``ok`` encrypt/decrypt records as calls were answered, and that
  ``verify_audit()`` passes.
* Admin: CreateKey (SYMMETRIC_DEFAULT) latency through ``keyledger serve`` (store held open, and
  not) against a bare python-pkcs11 AES-256 key generation (``store=True``, the same template)
  on a twin token in this process; moto's CreateKey for reference.

Each server runs on a fresh temporary home that is removed at the end. The client threads run
in this process, so their own cost (boto3 signing and parsing) is in every figure alike.

Usage: ``.venv/bin/python bench/service.py [--threads 8] [--seconds 5] [--rounds 3]
[--admin-calls 30] [--json]`` (``make bench-service`` runs it with the defaults).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import secrets
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3  # type: ignore[import-untyped]
from botocore.config import Config  # type: ignore[import-untyped]
from pkcs11 import Attribute, KeyType, MechanismFlag

import keyledger as kl
from keyledger.hsm import pkcs11_backend

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import log, machine_info  # noqa: E402  (bench/run.py: the same machine note)

REGION = "us-east-1"
PLAINTEXT = bytes(range(32))
CONTEXT = {"tenant": "acme", "purpose": "bench"}
APP, ADMIN = "app", "admin"
TARGETS = {"encrypt": 1.5, "create_key": 3.0}  # from issue 17 section 6
MOTO = "moto"
KL, KL_OPEN = "keyledger", "keyledger --keep-store-open"


# -- servers --------------------------------------------------------------------------------------
@dataclass
class Server:
    name: str
    url: str
    proc: subprocess.Popen
    log_path: Path
    home: Path | None = None
    app: dict[str, str] = field(default_factory=dict)  # the app's access key (AWS names)
    admin: dict[str, str] = field(default_factory=dict)
    key_id: str = ""
    answered: dict[str, int] = field(default_factory=dict)  # op -> calls answered

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_moto(root: Path) -> Server:
    port = free_port()
    log_path = root / "moto.log"
    with log_path.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.2)
    else:
        proc.kill()
        raise SystemExit(f"moto server did not start: {log_path.read_text()}")
    if proc.poll() is not None:
        raise SystemExit(f"moto server exited: {log_path.read_text()}")
    creds = {"AccessKeyId": "AKIAMOTOBENCH0000000", "SecretAccessKey": "moto-bench-secret"}
    server = Server(MOTO, f"http://127.0.0.1:{port}", proc, log_path, app=creds, admin=creds)
    server.key_id = kms(server.url, creds).create_key(
        KeySpec="SYMMETRIC_DEFAULT", KeyUsage="ENCRYPT_DECRYPT")["KeyMetadata"]["KeyId"]
    return server


def make_home(home: Path) -> tuple[dict[str, str], dict[str, str]]:
    """A fresh home: key ``bench-aes`` (AES-256) granted to ``app``; access keys for ``app`` and
    ``admin`` (the home's first admin)."""
    with kl.open(home, principal=ADMIN) as led:
        led.create_key("bench-aes", spec="AES_256")
        led.grant("bench-aes", APP, "user")
        return led.create_access_key(APP).as_aws(), led.create_access_key(ADMIN).as_aws()


def start_keyledger(root: Path, name: str, *args: str) -> Server:
    """``keyledger serve --port 0`` on a fresh home; waits for its "listening on" line."""
    slug = re.sub(r"[^a-z]+", "-", name).strip("-")
    home = root / slug
    app, admin = make_home(home)
    log_path = root / f"{slug}.log"
    with log_path.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "keyledger.cli", "--home", str(home), "--principal", ADMIN,
             "serve", "--port", "0", *args], stdout=subprocess.PIPE, stderr=err, text=True)
    sel = selectors.DefaultSelector()
    assert proc.stdout is not None
    sel.register(proc.stdout, selectors.EVENT_READ)
    line = proc.stdout.readline() if sel.select(timeout=120) else ""
    m = re.search(r"listening on (\S+)", line)
    if m is None:
        proc.kill()
        raise SystemExit(f"keyledger serve did not start: {line!r} {log_path.read_text()}")
    server = Server(name, m.group(1), proc, log_path, home=home, app=app, admin=admin)
    server.key_id = kms(server.url, admin).describe_key(
        KeyId="alias/bench-aes")["KeyMetadata"]["KeyId"]
    return server


def kms(url: str, creds: dict[str, str]) -> Any:
    """A KMS client of its own (one connection, kept alive), no retries: every call counts."""
    return boto3.client("kms", endpoint_url=url, region_name=REGION,
                        aws_access_key_id=creds["AccessKeyId"],
                        aws_secret_access_key=creds["SecretAccessKey"],
                        config=Config(retries={"max_attempts": 1}, max_pool_connections=1))


# -- load ------------------------------------------------------------------------------------------
@dataclass
class Round:
    requests: int
    seconds: float
    latencies: list[float]
    server_cpu: float = 0.0  # CPU seconds the server process used in the round
    client_cpu: float = 0.0  # ... and this process (the boto3 clients)

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load(calls: list[Callable[[], object]], seconds: float, pid: int) -> Round:
    """Every ``calls[i]`` in a thread of its own, back to back for ``seconds``; ``pid`` is the
    server's, whose CPU time is counted."""
    start = threading.Barrier(len(calls) + 1)
    lats: list[list[float]] = [[] for _ in calls]
    errors: list[BaseException] = []
    deadline = [0.0]

    def worker(call: Callable[[], object], out: list[float]) -> None:
        clock = time.perf_counter
        start.wait()
        try:
            while True:
                t0 = clock()
                call()
                t1 = clock()
                out.append(t1 - t0)
                if t1 >= deadline[0]:
                    return
        except BaseException as exc:  # noqa: BLE001 - reported below, the run stops
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(c, o), daemon=True)
               for c, o in zip(calls, lats, strict=True)]
    for t in threads:
        t.start()
    cpu0, mine0 = cpu_seconds(pid), time.process_time()
    t0 = time.perf_counter()
    deadline[0] = t0 + seconds
    start.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    cpu, mine = cpu_seconds(pid) - cpu0, time.process_time() - mine0
    if errors:
        raise SystemExit(f"a call failed: {type(errors[0]).__name__}: {errors[0]}")
    flat = [x for lat in lats for x in lat]
    return Round(len(flat), elapsed, flat, cpu, mine)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def op_calls(server: Server, op: str, threads: int) -> list[Callable[[], object]]:
    """One bound call per thread, each on its own client (warmed: connection open)."""
    calls: list[Callable[[], object]] = []
    for _ in range(threads):
        c = kms(server.url, server.app)
        blob = c.encrypt(KeyId=server.key_id, Plaintext=PLAINTEXT,
                         EncryptionContext=CONTEXT)["CiphertextBlob"]
        server.answered["Encrypt"] = server.answered.get("Encrypt", 0) + 1
        if op == "Encrypt":
            calls.append(functools.partial(c.encrypt, KeyId=server.key_id,
                                           Plaintext=PLAINTEXT, EncryptionContext=CONTEXT))
        else:
            calls.append(functools.partial(c.decrypt, CiphertextBlob=blob,
                                           EncryptionContext=CONTEXT))
    return calls


def throughput(servers: list[Server], op: str, threads: int, seconds: float,
               rounds: int) -> dict[str, Any]:
    calls = {s.name: op_calls(s, op, threads) for s in servers}
    per: dict[str, list[Round]] = {s.name: [] for s in servers}
    for r in range(rounds):
        order = servers[r % len(servers):] + servers[:r % len(servers)]
        for s in order:
            rnd = load(calls[s.name], seconds, s.proc.pid)
            s.answered[op] = s.answered.get(op, 0) + rnd.requests
            per[s.name].append(rnd)
            log(f"  round {r + 1}/{rounds} {op:8s} {s.name:28s} {rnd.rate:8,.0f} req/s  "
                f"p50 {pct(rnd.latencies, 0.5) * 1e3:6.1f} ms  "
                f"p99 {pct(rnd.latencies, 0.99) * 1e3:6.1f} ms  server CPU "
                f"{rnd.server_cpu / rnd.requests * 1e6:5.0f} us/req")
    moto = per[MOTO]
    out: dict[str, Any] = {}
    for name, rr in per.items():
        lats = [x for rnd in rr for x in rnd.latencies]
        ratios = [k.rate / m.rate for k, m in zip(rr, moto, strict=True)]
        out[name] = {"req_s": statistics.median(r.rate for r in rr),
                     "p50_ms": pct(lats, 0.5) * 1e3, "p99_ms": pct(lats, 0.99) * 1e3,
                     "vs_moto": statistics.median(ratios),
                     "server_cpu_us": statistics.median(r.server_cpu / r.requests * 1e6
                                                        for r in rr),
                     "client_cpu_us": statistics.median(r.client_cpu / r.requests * 1e6
                                                        for r in rr),
                     "rounds_req_s": [r.rate for r in rr], "requests": sum(r.requests for r in rr)}
    return out


# -- admin: CreateKey against bare python-pkcs11 ---------------------------------------------------
class BareToken:
    """A twin token (its own fresh home) and a second session on it, as bench/run.py's bare
    baseline: AES-256 generation with keyledger's own template, ``store=True``."""

    def __init__(self, home: Path) -> None:
        self.led = kl.open(home, principal=ADMIN)
        # python-pkcs11 calls must not overlap (see bench/run.py): hold the backend's lock
        self.guard = pkcs11_backend._CALL_LOCK
        with self.guard:
            backend: Any = self.led._rt.backend  # a Pkcs11Backend (the home's SoftHSM2)
            self.session = backend._token.open(rw=True)

    def generate(self) -> None:
        caps = MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT | MechanismFlag.WRAP \
            | MechanismFlag.UNWRAP
        with self.guard:
            self.session.generate_key(KeyType.AES, 256, id=secrets.token_bytes(16),
                                      label="bench-bare", store=True, capabilities=caps,
                                      template={Attribute.SENSITIVE: True,
                                                Attribute.EXTRACTABLE: False})

    def close(self) -> None:
        with self.guard:
            self.session.close()
        self.led.close()


def create_key_bench(servers: list[Server], bare: BareToken, calls: int,
                     rounds: int) -> dict[str, Any]:
    """Latency of one CreateKey at a time (an admin's script), rounds interleaved."""
    makers: dict[str, Callable[[], object]] = {"bare python-pkcs11": bare.generate}
    for s in servers:
        c = kms(s.url, s.admin)
        c.list_keys(Limit=1)  # connection open
        makers[s.name] = functools.partial(c.create_key, KeySpec="SYMMETRIC_DEFAULT",
                                           KeyUsage="ENCRYPT_DECRYPT")
    lats: dict[str, list[float]] = {k: [] for k in makers}
    meds: dict[str, list[float]] = {k: [] for k in makers}
    names = list(makers)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            fn = makers[name]
            fn()  # warm-up
            got = []
            for _ in range(calls):
                t0 = time.perf_counter()
                fn()
                got.append(time.perf_counter() - t0)
            lats[name] += got
            meds[name].append(statistics.median(got))
            log(f"  round {r + 1}/{rounds} CreateKey {name:28s} "
                f"p50 {meds[name][-1] * 1e3:7.2f} ms")
    base = meds["bare python-pkcs11"]
    return {name: {"p50_ms": pct(v, 0.5) * 1e3, "p99_ms": pct(v, 0.99) * 1e3,
                   "vs_bare": statistics.median(m / b for m, b in zip(meds[name], base,
                                                                      strict=True)),
                   "calls": len(v)}
            for name, v in lats.items()}


# -- the ledgers recorded it ---------------------------------------------------------------------
def check_ledger(server: Server) -> dict[str, Any]:
    """After the server stopped: ``ok`` records per operation >= calls answered; verify_audit."""
    assert server.home is not None
    with kl.open(server.home, principal=ADMIN) as led:
        led.flush_audit()
        out: dict[str, Any] = {}
        for op, action in (("Encrypt", "encrypt"), ("Decrypt", "decrypt")):
            df = led.audit(principal=APP, action=action, outcome="ok", limit=None)
            out[op] = {"answered": server.answered.get(op, 0), "recorded": len(df)}
        report = led.verify_audit()
        out["verify_audit"] = {"ok": bool(report.ok), "records": int(report.records),
                               "text": str(report)}
    out["ok"] = report.ok and all(out[op]["recorded"] >= out[op]["answered"]
                                  for op in ("Encrypt", "Decrypt"))
    return out


# -- report ---------------------------------------------------------------------------------------
def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def render(res: dict[str, Any]) -> str:
    m, p = res["machine"], res["params"]
    lines = [
        f"keyledger service bench: {m['nproc']} CPU(s), {m['cpu']}, Python {m['python']}, "
        f"moto {res['moto_version']}, {m['softhsm2'] and 'SoftHSM ' + m['softhsm2']}, "
        f"commit {m['commit']}",
        f"{p['threads']} client threads (own boto3 client each, keep-alive), {p['seconds']:g} s "
        f"per round, {p['rounds']} rounds interleaved; req/s = median of rounds, ratio = median "
        f"of per-round ratios; load average (1/5/15 min) {m['uptime_start']} at start, "
        f"{m['uptime_end']} at end",
    ]
    for op in res["throughput"]:
        lines += ["", f"{op + ' (32 B, EncryptionContext)':34s} {'req/s':>7s} {'p50 ms':>7s} "
                  f"{'p99 ms':>7s} {'srv us':>7s} {'cli us':>7s} {'vs moto':>8s} {'goal':>7s} "
                  f"{'result':>6s}", "-" * 92]
        for name, row in res["throughput"][op].items():
            goal = f">= {TARGETS['encrypt']:g}x" if name != MOTO and op == "Encrypt" else "-"
            ok = verdict(row["vs_moto"] >= TARGETS["encrypt"]) if goal != "-" else "-"
            lines.append(f"{name:34s} {row['req_s']:7,.0f} {row['p50_ms']:7.1f} "
                         f"{row['p99_ms']:7.1f} {row['server_cpu_us']:7,.0f} "
                         f"{row['client_cpu_us']:7,.0f} {row['vs_moto']:7.2f}x {goal:>7s} "
                         f"{ok:>6s}")
    lines.append("(srv us / cli us: CPU time per request of the server process / of this "
                 "process's boto3 clients)")
    lines += ["", f"{'CreateKey (SYMMETRIC_DEFAULT), one at a time':46s} {'p50 ms':>8s} "
              f"{'p99 ms':>8s} {'vs bare':>8s} {'goal':>7s} {'result':>6s}", "-" * 92]
    for name, row in res["create_key"].items():
        goal = f"<= {TARGETS['create_key']:g}x" if name == KL_OPEN else "-"  # "store held open"
        ok = verdict(row["vs_bare"] <= TARGETS["create_key"]) if goal != "-" else "-"
        lines.append(f"{name:46s} {row['p50_ms']:8.2f} {row['p99_ms']:8.2f} "
                     f"{row['vs_bare']:7.1f}x {goal:>7s} {ok:>6s}")
    lines += ["", "ledger check after the run (ok records >= calls answered; verify_audit)"]
    for name, chk in res["ledger_check"].items():
        lines.append(f"  {name}: Encrypt {chk['Encrypt']['recorded']:,} recorded / "
                     f"{chk['Encrypt']['answered']:,} answered, Decrypt "
                     f"{chk['Decrypt']['recorded']:,} / {chk['Decrypt']['answered']:,}; "
                     f"{chk['verify_audit']['text']} -> {verdict(chk['ok'])}")
    return "\n".join(lines)


def uptime() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=8, help="client threads (8)")
    p.add_argument("--seconds", type=float, default=5.0, help="seconds per round (5)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians (3)")
    p.add_argument("--admin-calls", type=int, default=30,
                   help="CreateKey calls per server per round (30)")
    p.add_argument("--no-decrypt", action="store_true", help="measure Encrypt only")
    p.add_argument("--json", action="store_true", help="print machine-readable results")
    args = p.parse_args(argv)
    if args.threads < 1 or args.seconds <= 0 or args.rounds < 1 or args.admin_calls < 1:
        p.error("--threads, --seconds, --rounds and --admin-calls must be positive")

    from importlib import metadata
    root = Path(tempfile.mkdtemp(prefix="keyledger-sbench-", dir="/tmp"))
    res: dict[str, Any] = {"machine": machine_info(), "moto_version": metadata.version("moto"),
                           "params": {k: getattr(args, k) for k in
                                      ("threads", "seconds", "rounds", "admin_calls")},
                           "targets": TARGETS}
    res["machine"]["uptime_start"] = uptime()
    servers: list[Server] = []
    bare: BareToken | None = None
    try:
        log(f"starting servers under {root}")
        servers = [start_moto(root), start_keyledger(root, KL),
                   start_keyledger(root, KL_OPEN, "--keep-store-open")]
        ops = ["Encrypt"] + ([] if args.no_decrypt else ["Decrypt"])
        res["throughput"] = {}
        for op in ops:
            log(f"{op}: {args.threads} threads x {args.seconds:g} s x {args.rounds} rounds")
            res["throughput"][op] = throughput(servers, op, args.threads, args.seconds,
                                               args.rounds)
        log("CreateKey: keyledger serve vs bare python-pkcs11 (twin token)")
        bare = BareToken(root / "bare")
        order = [servers[2], servers[1], servers[0]]  # keyledger first: the goal's rows
        res["create_key"] = create_key_bench(order, bare, args.admin_calls, args.rounds)
        bare.close()
        bare = None
        for s in servers:
            code = s.stop()
            if code != 0 and s.name != MOTO:
                raise SystemExit(f"{s.name} exited {code}: {s.log_path.read_text()[-2000:]}")
        log("checking the ledgers")
        res["ledger_check"] = {s.name: check_ledger(s) for s in servers if s.home is not None}
    finally:
        if bare is not None:
            bare.close()
        for s in servers:
            s.stop()
        shutil.rmtree(root, ignore_errors=True)
    res["machine"]["uptime_end"] = uptime()
    print(json.dumps(res, indent=2) if args.json else render(res))
    return 0 if all(c["ok"] for c in res["ledger_check"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
