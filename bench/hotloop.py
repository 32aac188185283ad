"""The hot-path loop for counting instructions under callgrind (issue 18, docs/benchmarks.md).

Instructions do not depend on the machine's load, so this is the measure to compare trees on a
busy machine. The calls run through ``itertools.starmap``, so callgrind can collect exactly the
calls (``--toggle-collect=starmap_next``) after a warm-up that fills every cache::

    python bench/hotloop.py setup /tmp/cg-home           # once, outside valgrind
    valgrind --tool=callgrind --separate-threads=yes --toggle-collect=starmap_next \\
        --callgrind-out-file=cg.out python bench/hotloop.py enc /tmp/cg-home 400
    grep -m1 '^totals:' cg.out-01                         # the calling thread; / 400 per call

Modes: ``bare`` (python-pkcs11 alone on the home's persistent token key, the ledger's 36-byte
AAD, a fresh nonce: the fair baseline's call, in its own session), ``enc`` / ``dec`` (audited
``encrypt`` / ``decrypt`` of 32 bytes) and ``gdk`` (``generate_data_key``).
"""

from __future__ import annotations

import collections
import itertools
import os
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import keyledger as kl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bare import token_session  # noqa: E402

KEY = "bench-aes"
PLAINTEXT = bytes(range(32))
WARM_UP = 200


def _bare(home: Path) -> Callable[[], bytes]:
    import pkcs11
    from pkcs11 import Mechanism, ObjectClass

    from keyledger import ciphertext as ct

    with kl.open(home, principal="alice") as led:
        key = led.get_key(KEY)
    session = token_session(home)
    aes = session.get_key(object_class=ObjectClass.SECRET_KEY, id=key.versions[1].handle)
    gcm, params, urandom = Mechanism.AES_GCM, pkcs11.GCMParams, os.urandom
    prefix = ct.pack_header(uuid.UUID(key.key_id).bytes, 1, bytes(ct.NONCE_LEN))[:-ct.NONCE_LEN]

    def encrypt() -> bytes:  # bench/bare.py's encrypt
        nonce = urandom(12)
        aad = prefix + nonce
        return aad + aes.encrypt(PLAINTEXT, mechanism=gcm, mechanism_param=params(nonce, aad, 128))

    return encrypt


def main(mode: str, home: Path, n: int) -> None:
    if mode == "setup":
        with kl.open(home, principal="alice") as led:
            led.create_key(KEY, spec="AES_256")
        return
    led = None
    if mode == "bare":
        fn: Callable[[], object] = _bare(home)
    else:
        led = kl.open(home, principal="alice")
        blob = led.encrypt(KEY, PLAINTEXT)
        fn = {"enc": lambda: led.encrypt(KEY, PLAINTEXT), "dec": lambda: led.decrypt(blob),
              "gdk": lambda: led.generate_data_key(KEY)}[mode]
    for _ in range(WARM_UP):
        fn()
    collections.deque(itertools.starmap(fn, itertools.repeat((), n)), 0)  # the counted calls
    if led is not None:
        led.close()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 0)
