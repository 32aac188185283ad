"""A short scripted tour of the key lifecycle through the public API (``keyledger demo``).

    import keyledger as kl
    from keyledger.demo import run_tour
    with kl.open("demo-home") as ledger:
        run_tour(ledger)

Every run creates keys with fresh names (``demo-<run>-...``), so the tour can be repeated on
the same home: earlier runs' keys stay in the catalog and the audit ledger keeps growing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from .errors import KeyStateError
from .service import KeyLedger

_RUN_RE = re.compile(r"^demo-(\d+)-")


@dataclass
class TourResult:
    """What a tour did: the run number, the keys it created and whether the audit verified."""

    run: int
    keys: list[str] = field(default_factory=list)
    audit_ok: bool = False


def next_run(ledger: KeyLedger) -> int:
    """1 + the highest run number among existing ``demo-<n>-...`` keys."""
    runs = [int(m.group(1)) for name in ledger.list_keys()["name"] if (m := _RUN_RE.match(name))]
    return max(runs, default=0) + 1


def when(value: object) -> str:
    """A timestamp as ``YYYY-MM-DD HH:MM`` (UTC), or ``-`` when missing."""
    if value is None or not isinstance(value, datetime):
        return "-"
    try:
        return value.strftime("%Y-%m-%d %H:%M")
    except ValueError:  # pandas NaT
        return "-"


def _cell(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Plain left-aligned columns separated by two spaces."""
    cells = [[str(h) for h in headers]] + [[_cell(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in cells)


def key_table(ledger: KeyLedger) -> str:
    df = ledger.list_keys()
    rows = [(r.name, r.spec, r.purpose, r.state, r.latest_version, r.owner,
             when(r.next_rotation_due)) for r in df.itertuples()]
    return format_table(("NAME", "SPEC", "PURPOSE", "STATE", "VER", "OWNER", "ROTATION DUE"), rows)


def run_tour(ledger: KeyLedger, echo: Callable[[str], object] = print) -> TourResult:
    """Walk one key through its lifecycle, printing each step; returns a ``TourResult``."""
    run = next_run(ledger)
    result = TourResult(run)
    orders, signing, legacy = (f"demo-{run}-orders", f"demo-{run}-release-signing",
                               f"demo-{run}-legacy")
    step = iter(range(1, 100))

    def say(text: str) -> None:
        echo(f"{next(step):>2}. {text}")

    echo(f"keyledger tour, run {run}, home {ledger.home}, principal {ledger.principal}")

    key = ledger.create_key(orders, spec="AES_256", owner="payments",
                            tags={"env": "demo", "data": "cardholder"}, rotation_period="90d")
    result.keys.append(key.name)
    say(f"created {key.name!r}: {key.spec.name} {key.purpose.value} key, version "
        f"{key.latest_version}, {key.state.value}, next rotation due {when(key.next_rotation_due)}")

    context = {"tenant": "acme"}
    secret = b"card 4111 1111 1111 1111"
    old_blob = ledger.encrypt(orders, secret, context=context)
    say(f"encrypted {len(secret)} bytes under {orders!r} v{key.latest_version} with context "
        f"tenant=acme -> {len(old_blob)}-byte self-describing ciphertext")

    key = ledger.rotate(orders)
    say(f"rotated {orders!r}: version {key.latest_version} now encrypts; older versions still decrypt")

    if ledger.decrypt(old_blob, context=context) != secret:
        raise RuntimeError("decrypted text differs from what was encrypted")
    say("decrypted the version-1 ciphertext after rotation (no key name needed): plaintext matches")

    skey = ledger.create_key(signing, spec="EC_P256", owner="release-eng", tags={"env": "demo"})
    result.keys.append(skey.name)
    message = b"release v1.2.3 sha256:9f86d081884c7d65"
    signature = ledger.sign(signing, message)
    good = ledger.verify(signing, message, signature)
    bad = ledger.verify(signing, message + b" (tampered)", signature)
    say(f"created {signing!r} ({skey.spec.name}), signed a release note ({len(signature)}-byte "
        f"ECDSA signature): verifies {good}; a tampered copy verifies {bad}")

    ledger.disable(orders)
    try:
        ledger.encrypt(orders, b"should be refused", context=context)
        say("disabled key still encrypted: this is a bug")
    except KeyStateError as exc:
        say(f"disabled {orders!r}; encrypt is refused: {exc}")

    key = ledger.enable(orders)
    ledger.encrypt(orders, b"accepted again", context=context)
    say(f"enabled {orders!r} again ({key.state.value}); encrypt works")

    lkey = ledger.create_key(legacy, spec="AES_128", owner="payments", tags={"env": "demo"})
    result.keys.append(lkey.name)
    lkey = ledger.schedule_deletion(legacy, days=7)
    say(f"created {legacy!r} and scheduled its deletion: {lkey.state.value}, destroy allowed "
        f"after {when(lkey.deletion_due)} UTC (cancel-deletion restores it until then)")

    report = ledger.verify_audit()
    result.audit_ok = report.ok
    say(f"verified the audit ledger: {report}")

    say("the key list:")
    for line in key_table(ledger).splitlines():
        echo(f"    {line}")
    return result
