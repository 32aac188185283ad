"""keyledger benchmark: bulk rewrap (``rewrap_many``) against bare python-pkcs11 decrypt+encrypt.

One process, one fresh temporary SoftHSM2 home (removed at the end unless ``--home`` keeps it):

1. N ciphertexts of ``--size`` bytes are made with ``KeyLedger.encrypt_many`` under v1 of an
   AES-256 key (timed, for context); the key is rotated to v2.
2. Rounds alternate, so machine noise hits both alike:
   * bare: for each ciphertext, AES-GCM decrypt with v1 and encrypt under v2 with a fresh nonce
     and the v2 header as AAD, straight through python-pkcs11 on a second session of the same
     token, holding ``keyledger.hsm.pkcs11_backend._CALL_LOCK`` for the whole loop (the ledger's
     background thread also calls PKCS#11; SoftHSM2 runs without its own mutexes);
   * ``rewrap_many(ciphertexts, progress=False)`` over the same N v1 ciphertexts (the batch
     path: one ``rewrap_many`` record per chunk of 4,096, plus one for the call);
   * per item: ``KeyLedger.rewrap`` called for each ciphertext (one audited ``rewrap`` each):
     the path ``rewrap_many`` took for every item before it used the batch path, and still
     takes for items the batch path leaves (failures, key specs without batches).
   Pending audit records are flushed, untimed, between rounds. The bare output is checked to
   decrypt with ``KeyLedger.decrypt`` (same bytes on the wire), and every rewrap must succeed.
3. ``rewrap_many(..., dry_run=True)`` (header counting only) is timed once.

Reported: ops/s of each (median over rounds), the ratios rewrap_many / bare and rewrap_many /
per-item (medians of the per-round ratios), and the CPU ratio per-item / rewrap_many (process
CPU of each way including the untimed flush, i.e. the ingest of the records it wrote: steadier
than wall clock on a busy machine).

Usage: ``.venv/bin/python bench/rewrap.py [--n 30000] [--rounds 3] [--size 32] [--home PATH]
[--json]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pkcs11
from pkcs11 import Mechanism, ObjectClass

import keyledger as kl
from keyledger import ciphertext as ct
from keyledger.hsm.pkcs11_backend import _CALL_LOCK

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import machine_info  # noqa: E402  (bench/run.py: CPU, versions, commit)

KEY = "bench-rewrap"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def bare_rewrap_loop(session: pkcs11.Session, old: pkcs11.SecretKey, new: pkcs11.SecretKey,
                     prefix: bytes, blobs: list[bytes]) -> list[bytes]:
    """decrypt with v1 + encrypt under v2, the HSM work a rewrap must do; header by slicing."""
    gcm, params, urandom = Mechanism.AES_GCM, pkcs11.GCMParams, os.urandom
    hl = ct.HEADER_LEN
    out = []
    append = out.append
    for blob in blobs:
        header, nonce = blob[:hl], blob[24:hl]
        plaintext = old.decrypt(blob[hl:], mechanism=gcm, mechanism_param=params(nonce, header, 128))
        nonce2 = urandom(ct.NONCE_LEN)
        header2 = prefix + nonce2
        append(header2 + new.encrypt(plaintext, mechanism=gcm,
                                     mechanism_param=params(nonce2, header2, 128)))
    return out


def bench(led: kl.KeyLedger, n: int, rounds: int, size: int) -> dict:
    key = led.create_key(KEY, spec="AES_256")
    plaintexts = [os.urandom(size) for _ in range(n)]
    log(f"  encrypting {n:,} x {size} B with KeyLedger.encrypt_many ...")
    t0 = time.perf_counter()
    blobs = led.encrypt_many(KEY, plaintexts)
    encrypt_s = time.perf_counter() - t0
    key = led.rotate(KEY)
    led.flush_audit()
    prefix = ct.pack_header(key.key_id_bytes, 2, bytes(ct.NONCE_LEN))[:24]

    with _CALL_LOCK:  # a second session on the token the ledger is logged in to
        session = led._rt.backend._token.open(rw=True)
    try:
        with _CALL_LOCK:
            old = session.get_key(object_class=ObjectClass.SECRET_KEY, id=key.versions[1].handle)
            new = session.get_key(object_class=ObjectClass.SECRET_KEY, id=key.versions[2].handle)
            probe = bare_rewrap_loop(session, old, new, prefix, blobs[:100])
        for p, blob in zip(plaintexts, probe, strict=False):  # the bare output is a real rewrap
            assert led.decrypt(blob) == p, "bare rewrap output does not decrypt"

        rates: dict[str, list[float]] = {"bare": [], "rewrap_many": [], "per_item": []}
        ways = list(rates)
        cpu: dict[str, list[float]] = {who: [] for who in ways}
        for r in range(rounds):
            order = ways[r % 3:] + ways[:r % 3]  # each way goes first once every 3 rounds
            for who in order:
                c0 = time.process_time()
                if who == "bare":
                    with _CALL_LOCK:
                        t0 = time.perf_counter()
                        out = bare_rewrap_loop(session, old, new, prefix, blobs)
                        secs = time.perf_counter() - t0
                    assert len(out) == n
                elif who == "per_item":
                    rewrap = led.rewrap
                    t0 = time.perf_counter()
                    each = [rewrap(b) for b in blobs]
                    secs = time.perf_counter() - t0
                    assert len(each) == n
                else:
                    t0 = time.perf_counter()
                    result = led.rewrap_many(blobs, progress=False)
                    secs = time.perf_counter() - t0
                    if result.ok != n or not result.errors.empty:
                        raise SystemExit(f"rewrap_many failed on {n - result.ok} items:\n"
                                         f"{result.errors.head()}")
                    last = result.ciphertexts
                rates[who].append(n / secs)
                led.flush_audit()  # untimed: leave no backlog to the next measurement
                cpu[who].append(time.process_time() - c0)  # with the ingest of its records
                log(f"  round {r + 1}/{rounds} {who:12s} {n / secs:10,.0f} ops/s ({secs:.2f} s,"
                    f" {cpu[who][-1]:.2f} s CPU with its ingest)")
    finally:
        with _CALL_LOCK:
            session.close()
    for i in (0, n // 2, n - 1):
        assert led.decrypt(last[i]) == plaintexts[i], "rewrapped ciphertext does not decrypt"

    t0 = time.perf_counter()
    dry = led.rewrap_many(blobs, dry_run=True)
    dry_s = time.perf_counter() - t0
    assert int(dry.counts["ciphertexts"].sum()) == n

    ratios = [k / b for b, k in zip(rates["bare"], rates["rewrap_many"], strict=True)]
    vs_item = [k / i for i, k in zip(rates["per_item"], rates["rewrap_many"], strict=True)]
    cpu_vs_item = [i / k for i, k in zip(cpu["per_item"], cpu["rewrap_many"], strict=True)]
    return {
        "n": n, "size": size, "rounds": rounds,
        "encrypt_ops_s": n / encrypt_s,
        "bare_ops_s": statistics.median(rates["bare"]),
        "rewrap_many_ops_s": statistics.median(rates["rewrap_many"]),
        "per_item_ops_s": statistics.median(rates["per_item"]),
        "ratio": statistics.median(ratios),
        "ratio_per_item": statistics.median(vs_item),
        "cpu_ratio_per_item": statistics.median(cpu_vs_item),
        "dry_run_ops_s": n / dry_s,
        "per_round": {**rates, "ratio": ratios, "ratio_per_item": vs_item},
    }


def render(res: dict) -> str:
    b, m = res["rewrap"], res["machine"]
    return "\n".join([
        f"keyledger rewrap bench: {m['nproc']} CPU(s), {m['cpu']}, Python {m['python']}, "
        f"python-pkcs11 {m['packages']['python-pkcs11']}, "
        f"{m['softhsm2'] and 'SoftHSM ' + m['softhsm2']}, commit {m['commit']}",
        f"{b['n']:,} ciphertexts of {b['size']} B, {b['rounds']} rotating rounds (medians); "
        f"1-min load average {m['loadavg_start']:.1f} at start, {m['loadavg_end']:.1f} at end",
        "",
        f"{'measurement':52s} {'ops/s':>10s}",
        "-" * 63,
        f"{'bare python-pkcs11 decrypt(v1) + encrypt(v2)':52s} {b['bare_ops_s']:10,.0f}",
        f"{'rewrap_many (audited, progress=False)':52s} {b['rewrap_many_ops_s']:10,.0f}",
        f"{'per item: KeyLedger.rewrap each (audited)':52s} {b['per_item_ops_s']:10,.0f}",
        f"{'ratio rewrap_many / bare':52s} {b['ratio']:10.1%}",
        f"{'ratio rewrap_many / per-item path (speed-up)':52s} {b['ratio_per_item']:10.2f}x",
        f"{'CPU per-item path / rewrap_many (with ingest)':52s} {b['cpu_ratio_per_item']:10.2f}x",
        "",
        f"{'KeyLedger.encrypt_many, making the input':52s} {b['encrypt_ops_s']:10,.0f}",
        f"{'rewrap_many dry_run (header counts only)':52s} {b['dry_run_ops_s']:10,.0f}",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=30_000, help="ciphertexts (30000)")
    p.add_argument("--rounds", type=int, default=3, help="rotating rounds; medians (3)")
    p.add_argument("--size", type=int, default=32, help="plaintext bytes per item (32)")
    p.add_argument("--home", type=Path, default=None,
                   help="keep the benchmark home at this (new or empty) path")
    p.add_argument("--json", action="store_true", help="print machine-readable results")
    args = p.parse_args(argv)
    if args.n < 100 or args.rounds < 1 or args.size < 0:
        p.error("--n must be at least 100, --rounds positive, --size not negative")
    if args.home is not None:
        kept = args.home.expanduser().absolute()
        if kept.exists() and any(kept.iterdir()):
            p.error(f"--home {kept} is not empty; the benchmark needs a fresh home")
    root = Path(tempfile.mkdtemp(prefix="keyledger-bench-rewrap-", dir="/tmp"))
    home = kept if args.home is not None else root / "home"
    try:
        res: dict = {"machine": machine_info(), "params": vars(args) | {"home": str(home)}}
        log(f"home {home}")
        with kl.open(home, principal="alice") as led:
            res["rewrap"] = bench(led, args.n, args.rounds, args.size)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    res["machine"]["loadavg_end"] = os.getloadavg()[0]
    if args.json:
        print(json.dumps(res, indent=2, default=str))
    else:
        print(render(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
