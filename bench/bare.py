"""The fair bare baseline: python-pkcs11 alone, in a process of its own.

keyledger's audited calls are compared against the same HSM work done by bare python-pkcs11 in
a *separate process* with its own login and session on the home's token (so it shares no lock,
no GIL and no background thread with the ledger), on the ledger's own *persistent* token key
(``store=True``: SoftHSM2 token objects cost more per call than session objects), with the
ledger's 36-byte AAD (the ciphertext header) and a fresh nonce per call.

``BareWorker`` starts the worker (this file run as a script) and asks it for one timed
measurement at a time, so a benchmark can interleave bare and keyledger rounds:

    with BareWorker(home, key) as bare:
        ops_s = bare.rate("encrypt", seconds=2.0)

Operations: ``encrypt`` and ``decrypt`` (AES-256-GCM, 32 bytes), ``data_key`` (``os.urandom(32)``
and one bare encrypt of it: what ``generate_data_key`` does in the HSM), ``sign`` (ECDSA P-256
over a SHA-256 digest; needs ``ec_key``).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BATCH = 128  # calls between two clock reads
PLAINTEXT = bytes(range(32))
MESSAGE = b"m" * 32


def rate(fn: Callable[[], object], seconds: float) -> float:
    """Calls per second of ``fn`` over at least ``seconds`` (after a short warm-up)."""
    for _ in range(BATCH):
        fn()
    n = 0
    t0 = time.perf_counter()
    while True:
        for _ in range(BATCH):
            fn()
        n += BATCH
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return n / elapsed


class BareWorker:
    """A bare python-pkcs11 process on the home's token, measuring on request."""

    def __init__(self, home: Path, key: Any, ec_key: Any = None) -> None:
        args = [sys.executable, __file__, str(home), key.key_id, key.versions[1].handle.hex(),
                ec_key.versions[1].handle.hex() if ec_key is not None else ""]
        self._proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      text=True, env=os.environ.copy())
        self.sample = bytes.fromhex(self._ask({"op": "sample"})["ciphertext"])

    def _ask(self, request: dict) -> dict:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            raise SystemExit(f"the bare worker died (exit {self._proc.wait()})")
        return json.loads(line)

    def rate(self, op: str, seconds: float) -> float:
        return self.measure(op, seconds)[0]

    def measure(self, op: str, seconds: float) -> tuple[float, float]:
        """(calls/s, the worker's CPU microseconds per call: it has one thread)."""
        reply = self._ask({"op": op, "seconds": seconds})
        return float(reply["ops_s"]), float(reply["cpu_us"])

    def close(self) -> None:
        if self._proc.poll() is None:
            self._ask({"op": "quit"})
            self._proc.wait(timeout=30)

    def __enter__(self) -> BareWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def token_session(home: Path) -> Any:
    """A python-pkcs11 session of its own on the home's token, logged in as its user (the
    bare baseline's: no keyledger code between it and SoftHSM2)."""
    import pkcs11

    from keyledger.config import load_settings

    settings = load_settings(home)
    assert settings is not None, f"{home} is not a keyledger home"
    cfg = settings.hsm
    if cfg.softhsm2_conf is not None:
        os.environ["SOFTHSM2_CONF"] = str(cfg.softhsm2_conf)
    token = pkcs11.lib(cfg.module).get_token(token_label=cfg.token_label)
    return token.open(rw=True, user_pin=cfg.read_pin())


def _serve(home: str, key_id: str, aes_handle: str, ec_handle: str) -> None:
    import uuid

    import pkcs11
    from pkcs11 import Mechanism, ObjectClass

    from keyledger import ciphertext as ct

    session = token_session(Path(home))
    aes = session.get_key(object_class=ObjectClass.SECRET_KEY, id=bytes.fromhex(aes_handle))
    ec = (session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=bytes.fromhex(ec_handle))
          if ec_handle else None)
    gcm, GCMParams, urandom, sha256 = Mechanism.AES_GCM, pkcs11.GCMParams, os.urandom, hashlib.sha256
    prefix = ct.pack_header(uuid.UUID(key_id).bytes, 1, bytes(ct.NONCE_LEN))[:-ct.NONCE_LEN]

    def encrypt(data: bytes = PLAINTEXT) -> bytes:
        nonce = urandom(12)
        aad = prefix + nonce  # the ledger's 36-byte header is the AAD
        return aad + aes.encrypt(data, mechanism=gcm, mechanism_param=GCMParams(nonce, aad, 128))

    sample = encrypt()
    aad0, nonce0, body0 = sample[:ct.HEADER_LEN], sample[24:ct.HEADER_LEN], sample[ct.HEADER_LEN:]

    def decrypt() -> bytes:
        return aes.decrypt(body0, mechanism=gcm, mechanism_param=GCMParams(nonce0, aad0, 128))

    def data_key() -> tuple[bytes, bytes]:
        dk = urandom(32)
        return dk, encrypt(dk)

    def sign() -> bytes:
        assert ec is not None
        return ec.sign(sha256(MESSAGE).digest(), mechanism=Mechanism.ECDSA)

    ops: dict[str, Callable[[], object]] = {"encrypt": encrypt, "decrypt": decrypt,
                                            "data_key": data_key, "sign": sign}
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "quit":
            print("{}", flush=True)
            break
        if req["op"] == "sample":
            print(json.dumps({"ciphertext": sample.hex()}), flush=True)
            continue
        cpu0, t0 = time.process_time(), time.perf_counter()
        ops_s = rate(ops[req["op"]], float(req["seconds"]))
        calls = ops_s * (time.perf_counter() - t0)  # includes the warm-up batch: close enough
        print(json.dumps({"ops_s": ops_s, "cpu_us": (time.process_time() - cpu0) / calls * 1e6}),
              flush=True)
    session.close()


if __name__ == "__main__":
    _serve(*sys.argv[1:5])
