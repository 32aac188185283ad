"""Batch encryption (issue 18 section 2): ``encrypt_many``/``decrypt_many`` against a bare
python-pkcs11 loop doing the same HSM calls.

The bare loop runs in a SEPARATE PROCESS, logged in to the same SoftHSM2 token of a fresh
temporary home, on the same persistent token key (``store=True``, made by ``create_key``); per
item it draws a fresh 12-byte nonce, builds the same 36-byte header as AAD (no context) and
makes one C_EncryptInit/C_Encrypt (decrypt: slices nonce, AAD and body from the ciphertext and
one C_DecryptInit/C_Decrypt). keyledger runs ``encrypt_many``/``decrypt_many`` on a list of
N 32-byte values (one audit record per batch, usage counted per item). Bare and keyledger
rounds alternate so machine noise hits both alike; the ratio is the median of the per-round
ratios (keyledger items/s / bare items/s; the goal is >= 0.9).

Usage: ``PYTHONPATH=src .venv/bin/python bench/batch.py [--items 10000] [--rounds 7]
[--json]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VALUE = b"v" * 32
KEY = "bench-batch"


# -- the bare loop (child process) -------------------------------------------------------------
def bare_child(module: str, conf: str, label: str, pin_file: str, handle_hex: str,
               prefix_hex: str) -> None:
    """Serve timing requests on stdin: ``enc N`` / ``dec N`` -> seconds for N items."""
    os.environ["SOFTHSM2_CONF"] = conf
    import pkcs11
    from pkcs11 import Mechanism, ObjectClass

    token = pkcs11.lib(module).get_token(token_label=label)
    session = token.open(rw=True, user_pin=Path(pin_file).read_text().strip())
    key = session.get_key(object_class=ObjectClass.SECRET_KEY, id=bytes.fromhex(handle_hex))
    prefix = bytes.fromhex(prefix_hex)
    gcm, params, urandom = Mechanism.AES_GCM, pkcs11.GCMParams, os.urandom
    blobs: list[bytes] = []
    for line in sys.stdin:
        op, n = line.split()
        count = int(n)
        started, cpu = time.perf_counter(), time.process_time()
        if op == "enc":
            out = []
            for _ in range(count):
                nonce = urandom(12)
                head = prefix + nonce
                out.append(head + key.encrypt(VALUE, mechanism=gcm,
                                              mechanism_param=params(nonce, head, 128)))
            blobs = out
        else:
            for blob in blobs[:count]:
                key.decrypt(blob[36:], mechanism=gcm,
                            mechanism_param=params(blob[24:36], blob[:36], 128))
        print(time.perf_counter() - started, time.process_time() - cpu, flush=True)
    session.close()


# -- the driver ---------------------------------------------------------------------------------
def run(items: int, rounds: int) -> dict:
    import keyledger as kl
    from keyledger.config import load_settings

    tmp = Path(tempfile.mkdtemp(prefix="kl-bench-batch-"))
    home = tmp / "home"
    led = kl.open(home, principal="bench")
    child = None
    try:
        key = led.create_key(KEY, spec="AES_256")
        settings = load_settings(home)
        assert settings is not None
        cfg = settings.hsm
        prefix = led.encrypt(KEY, VALUE)[:24]  # magic, format, algorithm, key id, version
        child = subprocess.Popen(
            [sys.executable, __file__, "--bare", cfg.module, str(cfg.softhsm2_conf),
             cfg.token_label, str(cfg.pin_file), key.versions[1].handle.hex(), prefix.hex()],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert child.stdin is not None and child.stdout is not None

        def bare(op: str) -> tuple[float, float]:
            child.stdin.write(f"{op} {items}\n")  # type: ignore[union-attr]
            child.stdin.flush()  # type: ignore[union-attr]
            wall, cpu = child.stdout.readline().split()  # type: ignore[union-attr]
            return float(wall), float(cpu)

        values = [VALUE] * items
        cts: list = []

        def ours(op: str) -> tuple[float, float, float]:
            """Wall and CPU seconds of this process (background threads included), and CPU
            seconds of the calling thread alone."""
            nonlocal cts
            started, cpu, own = time.perf_counter(), time.process_time(), time.thread_time()
            if op == "enc":
                cts = led.encrypt_many(KEY, values)
            else:
                led.decrypt_many(cts)
            return (time.perf_counter() - started, time.process_time() - cpu,
                    time.thread_time() - own)

        bare("enc"), ours("enc")  # warm up both (session, key lookup, usage block)
        rows: dict[str, list[tuple[tuple[float, float], tuple[float, float, float]]]] = {
            "enc": [], "dec": []}
        for r in range(rounds):
            for op in ("enc", "dec"):
                if r % 2 == 0:
                    first = bare(op)
                    rows[op].append((first, ours(op)))
                else:
                    first = ours(op)
                    rows[op].append((bare(op), first))
        assert led.decrypt_many(cts) == values
    finally:
        if child is not None:
            child.stdin.close()  # type: ignore[union-attr]
            child.wait(timeout=30)
        led.close()
        shutil.rmtree(tmp, ignore_errors=True)
    out = {"items": items, "rounds": rounds, "loadavg": os.getloadavg()[0]}
    for op, name in (("enc", "encrypt"), ("dec", "decrypt")):
        pairs = rows[op]
        out[name] = {"bare_items_per_s": statistics.median(items / b[0] for b, _ in pairs),
                     "keyledger_items_per_s": statistics.median(items / o[0] for _, o in pairs),
                     "ratio": statistics.median(b[0] / o[0] for b, o in pairs),
                     "cpu_ratio": statistics.median(b[1] / o[1] for b, o in pairs),
                     "caller_cpu_ratio": statistics.median(b[1] / o[2] for b, o in pairs)}
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--bare":
        bare_child(*sys.argv[2:8])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args.items, args.rounds)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"batch of {args.items:,} x 32 B, {args.rounds} interleaved rounds, "
          f"load {result['loadavg']:.1f}")
    print(f"{'':10}{'bare pkcs11 items/s':>22}{'keyledger items/s':>20}{'ratio':>8}"
          f"{'CPU ratio':>11}{'caller CPU':>12}")
    for name in ("encrypt", "decrypt"):
        r = result[name]
        print(f"{name + '_many':<14}{r['bare_items_per_s']:>18,.0f}"
              f"{r['keyledger_items_per_s']:>20,.0f}{r['ratio']:>8.2f}{r['cpu_ratio']:>11.2f}"
              f"{r['caller_cpu_ratio']:>12.2f}")
    print("ratio = keyledger / bare items/s (wall clock; median of per-round ratios); goal "
          ">= 0.90.\nCPU ratio = bare / keyledger CPU seconds per batch (whole processes, "
          "keyledger's background ingest and seal threads included); caller CPU = the same "
          "with only\nthe calling thread's CPU on keyledger's side. Both are steadier than "
          "wall clock on a loaded machine.")


if __name__ == "__main__":
    main()
