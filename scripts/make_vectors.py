#!/usr/bin/env python3
"""Generate data/ciphertext_vectors.json: test vectors for the keyledger ciphertext format.

Written from docs/ciphertext.md alone, with only the standard library and ``cryptography``
(keyledger itself is deliberately not imported, so the vectors are an independent check that
the spec is complete and that keyledger follows it). Every key, nonce and data key is fixed, so
the output is byte-for-byte reproducible:

    python scripts/make_vectors.py           # (re)write data/ciphertext_vectors.json
    python scripts/make_vectors.py --check   # exit 1 if the file differs from what we'd write
    python scripts/make_vectors.py -o FILE   # write elsewhere ("-" for stdout)
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import uuid
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "data" / "ciphertext_vectors.json"

# -- the format, restated from docs/ciphertext.md ---------------------------------------------
MAGIC = b"KL"
FORMAT_VERSION = 1
ALG_AES_GCM = 1
HEADER = struct.Struct(">2sBB16sI12s")  # 36 bytes
ENVELOPE_MAGIC = b"KLE"
ENVELOPE_PREFIX = struct.Struct(">3sBI")  # 8 bytes


def canonical_context(context: dict[str, str] | None) -> bytes:
    """Sorted-key (by code point), compact, UTF-8 JSON; no context or {} -> empty."""
    if not context:
        return b""
    return json.dumps(context, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8")


def header(key_id: str, version: int, nonce: bytes) -> bytes:
    return HEADER.pack(MAGIC, FORMAT_VERSION, ALG_AES_GCM, uuid.UUID(key_id).bytes, version,
                       nonce)


def seal(key: bytes, key_id: str, version: int, nonce: bytes, plaintext: bytes,
         context: dict[str, str] | None) -> tuple[bytes, bytes, bytes]:
    """-> (header, aad, full ciphertext)."""
    hdr = header(key_id, version, nonce)
    aad = hdr + canonical_context(context)
    return hdr, aad, hdr + AESGCM(key).encrypt(nonce, plaintext, aad)


def envelope_prefix(wrapped: bytes) -> bytes:
    return ENVELOPE_PREFIX.pack(ENVELOPE_MAGIC, FORMAT_VERSION, len(wrapped)) + wrapped


# -- fixed inputs ------------------------------------------------------------------------------
KEY_256 = bytes(range(0x00, 0x20))                      # 000102...1f
KEY_128 = bytes(range(0x40, 0x50))                      # 404142...4f
KEY_256_B = bytes.fromhex("c0ffee00" * 8)
ID_A = "6f1c3a52-9d4e-4b1a-8c2f-0123456789ab"
ID_B = "00000000-0000-4000-8000-000000000001"
ID_C = "f47ac10b-58cc-4372-a567-0e02b2c3d479"


def nonce(first: int) -> bytes:
    return bytes(range(first, first + 12))


UNICODE_CONTEXT = {
    "tenant": "Zürich",
    "名前": "値",
    "\U0001f511": "\U0001f5dd",       # astral: sorts AFTER U+FF61 by code point (not UTF-16 order)
    "\uff61": "halfwidth full stop",
    "quote": 'a"b\\c\n\t\u0001\u007f/é',  # JSON escapes: \" \\ \n \t \u0001; DEL, / and é stay raw
}

CIPHERTEXTS = [
    dict(name="aes256-basic",
         description="AES-256, version 1, short plaintext, one-entry context (the worked example "
                     "in docs/ciphertext.md)",
         key=KEY_256, key_id=ID_A, version=1, nonce=nonce(0xA0),
         plaintext=b"hello, keyledger", context={"tenant": "acme"}),
    dict(name="aes256-empty-plaintext",
         description="empty plaintext: the ciphertext is the header and the 16-byte tag only",
         key=KEY_256, key_id=ID_A, version=1, nonce=nonce(0xB0),
         plaintext=b"", context={"purpose": "probe"}),
    dict(name="aes256-no-context",
         description="no context (None): the AAD is the 36 header bytes alone",
         key=KEY_256, key_id=ID_A, version=1, nonce=nonce(0xC0),
         plaintext=b"no context at all", context=None),
    dict(name="aes256-empty-context",
         description="an empty context {} is the same as no context: AAD = header only",
         key=KEY_256, key_id=ID_A, version=1, nonce=nonce(0xC0),
         plaintext=b"no context at all", context={}),
    dict(name="aes256-unicode-context",
         description="non-ASCII keys and values, an astral key, characters JSON must escape; "
                     "keys sorted by Unicode code point",
         key=KEY_256_B, key_id=ID_C, version=3, nonce=nonce(0x10),
         plaintext="Grüße, 世界 \U0001f511".encode(), context=UNICODE_CONTEXT),
    dict(name="aes128-basic",
         description="AES-128 key (imported/128-bit keys use the same format)",
         key=KEY_128, key_id=ID_B, version=1, nonce=nonce(0x20),
         plaintext=b"sixteen byte msg", context={"a": "1", "b": "2"}),
    dict(name="aes128-version-2",
         description="AES-128, version 2, several contexts entries given out of order",
         key=KEY_128, key_id=ID_B, version=2, nonce=nonce(0x30),
         plaintext=bytes(range(256)) * 2, context={"z": "last", "a": "first", "m": "middle"}),
    dict(name="aes256-big-version",
         description="version 16909060 = 0x01020304 shows the big-endian u32; 100-byte plaintext",
         key=KEY_256, key_id=ID_A, version=0x01020304, nonce=nonce(0x40),
         plaintext=b"x" * 100, context={"tenant": "acme", "table": "orders"}),
]

ENVELOPES = [
    dict(name="envelope-basic",
         description="envelope: data key sealed under the AES-256 master key as a KL ciphertext, "
                     "body sealed under the data key",
         key=KEY_256, key_id=ID_A, version=2, wrap_nonce=nonce(0x50),
         data_key=bytes(range(0x80, 0xA0)), body_nonce=nonce(0x60),
         plaintext=b"a larger document body, encrypted locally with the data key\n" * 3,
         context={"tenant": "acme"}),
    dict(name="envelope-empty-no-context",
         description="envelope with empty data and no context, under an AES-128 master key",
         key=KEY_128, key_id=ID_B, version=1, wrap_nonce=nonce(0x70),
         data_key=bytes(range(0xE0, 0x100)), body_nonce=nonce(0x90),
         plaintext=b"", context=None),
]

STREAMS = [
    dict(name="stream-three-chunks",
         description="streamed envelope (format 2): 1,024-byte chunks, 2,500 bytes of data, so two "
                     "full chunks and a last one of 452 bytes",
         key=KEY_256, key_id=ID_A, version=3, wrap_nonce=nonce(0xB0),
         data_key=bytes(range(0x20, 0x40)), chunk_size=1024, prefix=bytes(range(0xC0, 0xC7)),
         plaintext=bytes(i * 7 % 256 for i in range(2500)), context={"file": "orders.parquet"}),
    dict(name="stream-empty",
         description="streamed envelope of empty data: one empty last chunk (its tag only)",
         key=KEY_128, key_id=ID_B, version=1, wrap_nonce=nonce(0xD0),
         data_key=bytes(range(0x40, 0x60)), chunk_size=1 << 20, prefix=bytes(range(0xD0, 0xD7)),
         plaintext=b"", context=None),
]


def stream_blob(v: dict, wrapped: bytes) -> tuple[bytes, list[bytes]]:
    """-> (stream header, sealed chunks): STREAM over the data, by docs/ciphertext.md 5b."""
    hdr = (ENVELOPE_PREFIX.pack(ENVELOPE_MAGIC, 2, len(wrapped)) + wrapped
           + struct.pack(">I7s", v["chunk_size"], v["prefix"]))
    data, size = v["plaintext"], v["chunk_size"]
    pieces = [data[i:i + size] for i in range(0, len(data), size)] or [b""]
    aad = hdr + canonical_context(v["context"])
    sealed = [AESGCM(v["data_key"]).encrypt(
        v["prefix"] + i.to_bytes(4, "big") + bytes([i == len(pieces) - 1]), piece, aad)
        for i, piece in enumerate(pieces)]
    return hdr, sealed


def _negative() -> list[dict[str, str]]:
    ok_hdr = header(ID_A, 1, nonce(0xA0))
    tail = bytes(16)
    cases = [
        ("too-short", "fewer than 36 + 16 bytes", ok_hdr + bytes(15)),
        ("bad-magic", "magic is not 'KL'", b"KM" + ok_hdr[2:] + tail),
        ("bad-format-version", "format version 2 is not defined",
         ok_hdr[:2] + b"\x02" + ok_hdr[3:] + tail),
        ("bad-algorithm", "algorithm 2 is not defined", ok_hdr[:3] + b"\x02" + ok_hdr[4:] + tail),
        ("version-zero", "key versions start at 1",
         ok_hdr[:20] + bytes(4) + ok_hdr[24:] + tail),
        ("empty", "no bytes at all", b""),
    ]
    return [{"name": n, "reason": r, "blob": b.hex()} for n, r, b in cases]


def build() -> dict:
    out: dict = {
        "about": "Test vectors for the keyledger ciphertext format; see docs/ciphertext.md. "
                 "Generated by scripts/make_vectors.py from fixed keys and nonces. All byte "
                 "strings are lowercase hex.",
        "format_version": FORMAT_VERSION,
        "ciphertexts": [],
        "envelopes": [],
        "streams": [],
        "invalid": _negative(),
    }
    for v in CIPHERTEXTS:
        hdr, aad, blob = seal(v["key"], v["key_id"], v["version"], v["nonce"], v["plaintext"],
                              v["context"])
        ctx = canonical_context(v["context"])
        out["ciphertexts"].append({
            "name": v["name"],
            "description": v["description"],
            "key": v["key"].hex(),
            "key_bits": len(v["key"]) * 8,
            "key_id": v["key_id"],
            "version": v["version"],
            "nonce": v["nonce"].hex(),
            "plaintext": v["plaintext"].hex(),
            "context": v["context"],
            "context_canonical": ctx.decode("utf-8"),
            "context_bytes": ctx.hex(),
            "header": hdr.hex(),
            "aad": aad.hex(),
            "ciphertext": blob.hex(),
        })
    for v in ENVELOPES:
        ctx = canonical_context(v["context"])
        _, _, wrapped = seal(v["key"], v["key_id"], v["version"], v["wrap_nonce"], v["data_key"],
                             v["context"])
        prefix = envelope_prefix(wrapped)
        body = AESGCM(v["data_key"]).encrypt(v["body_nonce"], v["plaintext"], prefix + ctx)
        out["envelopes"].append({
            "name": v["name"],
            "description": v["description"],
            "key": v["key"].hex(),
            "key_bits": len(v["key"]) * 8,
            "key_id": v["key_id"],
            "version": v["version"],
            "wrap_nonce": v["wrap_nonce"].hex(),
            "data_key": v["data_key"].hex(),
            "body_nonce": v["body_nonce"].hex(),
            "plaintext": v["plaintext"].hex(),
            "context": v["context"],
            "context_bytes": ctx.hex(),
            "wrapped_key": wrapped.hex(),
            "envelope_header": prefix.hex(),
            "envelope": (prefix + v["body_nonce"] + body).hex(),
        })
    for v in STREAMS:
        _, _, wrapped = seal(v["key"], v["key_id"], v["version"], v["wrap_nonce"], v["data_key"],
                             v["context"])
        hdr, sealed = stream_blob(v, wrapped)
        out["streams"].append({
            "name": v["name"],
            "description": v["description"],
            "key": v["key"].hex(),
            "key_bits": len(v["key"]) * 8,
            "key_id": v["key_id"],
            "version": v["version"],
            "wrap_nonce": v["wrap_nonce"].hex(),
            "data_key": v["data_key"].hex(),
            "chunk_size": v["chunk_size"],
            "nonce_prefix": v["prefix"].hex(),
            "plaintext": v["plaintext"].hex(),
            "context": v["context"],
            "context_bytes": canonical_context(v["context"]).hex(),
            "wrapped_key": wrapped.hex(),
            "stream_header": hdr.hex(),
            "chunks": len(sealed),
            "stream": (hdr + b"".join(sealed)).hex(),
        })
    return out


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", default=str(DEFAULT_OUT),
                        help="file to write ('-' for stdout); default data/ciphertext_vectors.json")
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 if the file is missing or differs")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        path = Path(args.output)
        same = path.exists() and path.read_text(encoding="utf-8") == text
        print(f"{path}: {'up to date' if same else 'OUT OF DATE; run scripts/make_vectors.py'}")
        return 0 if same else 1
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text, encoding="utf-8")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
