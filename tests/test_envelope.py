"""Envelope encryption of large data (issue 18 section 4), on a real SoftHSM2 token.

Whole envelopes: bytes, bytearray and memoryview in, bytes out, no extra copy of the data (the
peak memory of a call stays near one copy), envelopes of the format-1 recipe still decrypt.
Streamed envelopes: round trips over file-likes and paths at chunk boundaries, the byte layout
of docs/ciphertext.md (read back without keyledger), every way of cutting, moving, repeating or
extending chunks refused with InvalidCiphertext before the chunk's plaintext is written, the
context, key state and roles enforced, and one audit record per stream.
"""

from __future__ import annotations

import io
import json
import os
import struct
import tracemalloc

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import keyledger as kl
from keyledger import ciphertext as ct

CTX = {"tenant": "acme", "file": "orders.parquet"}
CHUNK = 1024  # the smallest chunk size: many chunks from little data
TAG = 16


@pytest.fixture
def work(tmp_path):
    """A folder for the test's files (the home is in tmp_path too)."""
    (tmp_path / "work").mkdir()
    return tmp_path / "work"


@pytest.fixture
def aes(ledger):
    ledger.create_key("files", spec="AES_256")
    return ledger


def canon(context: dict[str, str] | None) -> bytes:
    if not context:
        return b""
    return json.dumps(context, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode()


def seal_stream(led: kl.KeyLedger, data: bytes, context=CTX, chunk_size: int = CHUNK) -> bytes:
    sink = io.BytesIO()
    assert led.envelope_encrypt_stream("files", io.BytesIO(data), sink, context=context,
                                       chunk_size=chunk_size, progress=False) == len(data)
    return sink.getvalue()


def open_stream(led: kl.KeyLedger, blob: bytes, context=CTX) -> bytes:
    sink = io.BytesIO()
    assert led.envelope_decrypt_stream(io.BytesIO(blob), sink, context=context,
                                       progress=False) == sink.tell()
    return sink.getvalue()


def split(blob: bytes) -> tuple[bytes, list[bytes]]:
    """A streamed envelope's header and its sealed chunks, by the documented layout."""
    (w,) = struct.unpack_from(">I", blob, 4)
    end = 8 + w + 11
    (size,) = struct.unpack_from(">I", blob, 8 + w)
    body = blob[end:]
    return blob[:end], [body[i:i + size + TAG] for i in range(0, len(body), size + TAG)]


# -- whole envelopes ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
@pytest.mark.parametrize("size", [0, 1, 4097])
def test_whole_envelope_takes_any_buffer_and_returns_bytes(aes, kind, size):
    data = os.urandom(size)
    blob = aes.envelope_encrypt("files", kind(data), context=CTX)
    assert type(blob) is bytes and len(blob) == 8 + 84 + 12 + size + TAG
    assert aes.envelope_decrypt(kind(blob), context=CTX) == data
    assert type(aes.envelope_decrypt(kind(blob), context=CTX)) is bytes


def test_whole_envelope_of_views_that_are_not_plain_bytes(aes):
    data = os.urandom(3000)
    strided = memoryview(data)[::3]  # not contiguous: copied once, still right
    assert aes.envelope_decrypt(aes.envelope_encrypt("files", strided)) == data[::3]
    words = memoryview(bytearray(data[:2000])).cast("I")  # 4-byte items: the bytes count
    assert aes.envelope_decrypt(aes.envelope_encrypt("files", words)) == data[:2000]
    sliced = memoryview(data)[100:900]
    blob = aes.envelope_encrypt("files", sliced)
    assert aes.envelope_decrypt(memoryview(b"xx" + blob)[2:]) == data[100:900]
    with pytest.raises(kl.InvalidInput, match="encode text"):
        aes.envelope_encrypt("files", "text")
    with pytest.raises(kl.InvalidInput):
        aes.envelope_decrypt(12)


def _peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("kind", [bytes, bytearray])
def test_whole_envelope_holds_one_copy_of_the_data_not_two(aes, kind):
    """Encrypting writes straight into the returned buffer, decrypting reads a view of the
    caller's: the peak of new memory stays near one copy (the old code needed two)."""
    size = 8 << 20
    data = kind(os.urandom(size))
    blob = aes.envelope_encrypt("files", data)
    aes.envelope_decrypt(blob)  # warm: first-call allocations are not the data's
    given = kind(blob)
    assert _peak(lambda: aes.envelope_encrypt("files", data)) < 1.4 * size
    assert _peak(lambda: aes.envelope_decrypt(given)) < 1.4 * size


def test_format_1_envelopes_made_by_the_old_recipe_still_decrypt(aes):
    """An envelope built exactly as the previous code built it (pack_envelope of the wrapped
    key, nonce and AESGCM body) opens; a new one opens by the documented recipe."""
    data = os.urandom(50_000)
    dk = aes.generate_data_key("files", context=CTX)
    nonce = os.urandom(12)
    body = AESGCM(dk.plaintext).encrypt(nonce, data, ct.envelope_header(dk.wrapped) + canon(CTX))
    old = ct.pack_envelope(dk.wrapped, nonce, body)
    assert aes.envelope_decrypt(old, context=CTX) == data
    new = aes.envelope_encrypt("files", data, context=CTX)
    (w,) = struct.unpack_from(">I", new, 4)
    assert new[:4] == b"KLE\x01"
    key = aes.decrypt(new[8:8 + w], context=CTX)
    assert AESGCM(key).decrypt(new[8 + w:20 + w], new[20 + w:],
                               new[:8 + w] + canon(CTX)) == data


def test_whole_and_streamed_envelopes_are_not_mistaken_for_each_other(aes):
    whole = aes.envelope_encrypt("files", b"x" * 100, context=CTX)
    streamed = seal_stream(aes, b"x" * 100)
    with pytest.raises(kl.InvalidCiphertext, match="envelope_decrypt_stream"):
        aes.envelope_decrypt(streamed, context=CTX)
    with pytest.raises(kl.InvalidCiphertext, match="envelope_decrypt"):
        open_stream(aes, whole)


# -- streamed envelopes: round trips and layout ----------------------------------------------------
@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 5 * CHUNK + 7])
def test_stream_round_trips_at_chunk_boundaries(aes, size):
    data = os.urandom(size)
    blob = seal_stream(aes, data)
    header, chunks = split(blob)
    assert header[:4] == b"KLE\x02"
    assert len(chunks) == max(1, -(-size // CHUNK))  # an empty stream is one empty chunk
    assert len(blob) == len(header) + size + TAG * len(chunks)
    assert data[:64] not in blob or size < 16
    assert open_stream(aes, blob) == data


def test_stream_reads_by_the_documented_recipe_without_keyledger(aes):
    data = os.urandom(3 * CHUNK + 100)
    blob = seal_stream(aes, data)
    header, chunks = split(blob)
    (w,) = struct.unpack_from(">I", header, 4)
    key = aes.decrypt(header[8:8 + w], context=CTX)  # the wrapped data key: a KL ciphertext
    prefix = header[8 + w + 4:]
    out = b""
    for i, sealed in enumerate(chunks):
        nonce = prefix + i.to_bytes(4, "big") + bytes([i == len(chunks) - 1])
        out += AESGCM(key).decrypt(nonce, sealed, header + canon(CTX))
    assert out == data


def test_stream_with_the_default_chunk_size_and_a_read_only_source(aes):
    class Reader:  # read(n) only, short reads: a pipe, a socket, an HTTP body
        def __init__(self, data: bytes) -> None:
            self.data = data

        def read(self, n: int) -> bytes:
            out, self.data = self.data[:min(n, 777)], self.data[min(n, 777):]
            return out

    data = os.urandom((1 << 20) + 5)
    sink = io.BytesIO()
    aes.envelope_encrypt_stream("files", Reader(data), sink, progress=False)
    assert len(split(sink.getvalue())[1]) == 2
    assert open_stream(aes, sink.getvalue(), context=None) == data


def test_stream_between_paths(aes, work):
    data = os.urandom(10 * CHUNK)
    (work / "plain.bin").write_bytes(data)
    aes.envelope_encrypt_stream("files", work / "plain.bin", work / "sealed.kle",
                                context=CTX, chunk_size=CHUNK, progress=False)
    aes.envelope_decrypt_stream(str(work / "sealed.kle"), work / "out.bin",
                                context=CTX, progress=False)
    assert (work / "out.bin").read_bytes() == data
    assert oct((work / "sealed.kle").stat().st_mode & 0o777) == "0o600"
    with pytest.raises(kl.InvalidInput, match="already exists"):
        aes.envelope_decrypt_stream(work / "sealed.kle", work / "out.bin",
                                    context=CTX, progress=False)
    aes.envelope_decrypt_stream(work / "sealed.kle", work / "out.bin", context=CTX,
                                overwrite=True, progress=False)
    with pytest.raises(kl.InvalidInput, match="inside the keyledger home"):
        aes.envelope_encrypt_stream("files", work / "plain.bin", aes.home / "x.kle",
                                    progress=False)
    with pytest.raises(kl.InvalidInput, match="no source"):
        aes.envelope_encrypt_stream("files", work / "missing", work / "y.kle",
                                    progress=False)
    assert sorted(p.name for p in work.iterdir()) == ["out.bin", "plain.bin", "sealed.kle"]


# -- streamed envelopes: tampering -----------------------------------------------------------------
def _tampered(blob: bytes, other: bytes) -> dict[str, bytes]:
    """``blob`` altered in each way; ``other`` is another stream of the same size and key."""
    header, c = split(blob)  # five chunks: 4 full and a short last one
    flipped = bytearray(c[1])
    flipped[5] ^= 1
    bad_size = header[:-11] + struct.pack(">I", 2 * CHUNK) + header[-7:]
    bad_prefix = header[:-1] + bytes([header[-1] ^ 1])
    return {
        "altered chunk": header + c[0] + bytes(flipped) + b"".join(c[2:]),
        "reordered": header + c[1] + c[0] + b"".join(c[2:]),
        "chunk dropped": header + c[0] + b"".join(c[2:]),
        "chunk repeated": header + c[0] + c[1] + b"".join(c[1:]),
        "last chunk cut off": header + b"".join(c[:-1]),
        "cut mid-chunk": blob[:len(header) + 2 * (CHUNK + TAG) + 100],
        "cut inside the tag": blob[:-1],
        "bytes appended": blob + b"\0",
        "last chunk appended again": blob + c[-1],
        "another stream's chunk": header + c[0] + split(other)[1][1] + b"".join(c[2:]),
        "chunk size changed": bad_size + b"".join(c),
        "nonce prefix changed": bad_prefix + b"".join(c),
        "header only": header,
        "header cut": header[:20],
    }


TAMPERING = ["altered chunk", "reordered", "chunk dropped", "chunk repeated",
             "last chunk cut off", "cut mid-chunk", "cut inside the tag", "bytes appended",
             "last chunk appended again", "another stream's chunk", "chunk size changed",
             "nonce prefix changed", "header only", "header cut"]


@pytest.mark.parametrize("how", TAMPERING)
def test_tampered_streams_are_refused_and_nothing_unauthenticated_is_written(aes, how):
    data = os.urandom(4 * CHUNK + 300)
    ways = _tampered(seal_stream(aes, data), seal_stream(aes, data))
    assert sorted(ways) == sorted(TAMPERING)
    blob = ways[how]
    sink = io.BytesIO()
    with pytest.raises(kl.InvalidCiphertext):
        aes.envelope_decrypt_stream(io.BytesIO(blob), sink, context=CTX, progress=False)
    written = sink.getvalue()
    # only whole chunks that authenticated before the failure, never a byte of a bad one
    assert len(written) % CHUNK == 0 and written == data[:len(written)]
    last = aes.audit(action="envelope_decrypt").iloc[-1]
    assert last["outcome"] == "failed" and last["error"] == "InvalidCiphertext"


def test_a_failed_stream_into_a_path_leaves_no_file(aes, work):
    blob = seal_stream(aes, os.urandom(4 * CHUNK))
    (work / "cut.kle").write_bytes(blob[:-CHUNK])
    with pytest.raises(kl.InvalidCiphertext, match="discard"):
        aes.envelope_decrypt_stream(work / "cut.kle", work / "out.bin", context=CTX,
                                    progress=False)
    assert sorted(p.name for p in work.iterdir()) == ["cut.kle"]


def test_stream_context_must_match(aes):
    blob = seal_stream(aes, b"payload" * 300)
    for wrong in (None, {"tenant": "acme"}, {**CTX, "file": "other"}):
        sink = io.BytesIO()
        with pytest.raises(kl.InvalidCiphertext):
            aes.envelope_decrypt_stream(io.BytesIO(blob), sink, context=wrong, progress=False)
        assert sink.getvalue() == b""


# -- keys, roles, audit ----------------------------------------------------------------------------
def test_stream_respects_key_state(aes, clock):
    blob = seal_stream(aes, b"z" * 3000)
    aes.disable("files")
    with pytest.raises(kl.KeyStateError):
        seal_stream(aes, b"more")
    sink = io.BytesIO()
    with pytest.raises(kl.KeyStateError):
        aes.envelope_decrypt_stream(io.BytesIO(blob), sink, context=CTX, progress=False)
    assert sink.getvalue() == b""
    aes.enable("files")
    aes.rotate("files")  # older streams still open after a rotation
    assert open_stream(aes, blob) == b"z" * 3000
    aes.schedule_deletion("files", 7)
    with pytest.raises(kl.KeyStateError):
        open_stream(aes, blob)


def test_stream_needs_the_user_role_and_refusals_are_audited(aes, home, clock, work):
    blob = seal_stream(aes, b"secret data" * 200)
    (work / "in.bin").write_bytes(b"plain")
    with kl.open(home, principal="mallory", clock=clock) as mallory:
        with pytest.raises(kl.AccessDenied):
            mallory.envelope_encrypt_stream("files", work / "in.bin", work / "o.kle",
                                            progress=False)
        with pytest.raises(kl.AccessDenied):
            mallory.envelope_decrypt_stream(io.BytesIO(blob), work / "o.bin", context=CTX,
                                            progress=False)
    assert sorted(p.name for p in work.iterdir()) == ["in.bin"]
    refused = aes.audit(principal="mallory", outcome="denied")
    assert list(refused["action"]) == ["envelope_encrypt", "envelope_decrypt"]
    assert set(refused["key"]) == {"files"}


def test_one_audit_record_per_stream(aes):
    before = len(aes.audit(limit=None))
    data = os.urandom(3 * CHUNK + 1)
    blob = seal_stream(aes, data)
    open_stream(aes, blob)
    records = aes.audit(limit=None).iloc[before:]
    records = records[records["action"] != "audit"]  # the audit() reads are recorded too
    assert list(records["action"]) == ["envelope_encrypt", "envelope_decrypt"]
    assert list(records["outcome"]) == ["ok", "ok"]
    assert set(records["key"]) == {"files"} and set(records["version"]) == {1}
    assert set(records["detail"]) == {f"streamed: {len(data)} bytes in 4 chunks"}
    assert set(records["context"]) == {canon(CTX).decode()}
    usage = aes.version_usage("files")
    assert int(usage["encryptions"].sum()) == 1  # one data key wrapped: one encryption


def test_stream_arguments_are_checked_before_any_key_is_used(aes, work):
    with pytest.raises(kl.InvalidInput, match="source"):
        aes.envelope_encrypt_stream("files", 5, io.BytesIO(), progress=False)
    with pytest.raises(kl.InvalidInput, match="sink"):
        aes.envelope_encrypt_stream("files", io.BytesIO(b"x"), object(), progress=False)
    with pytest.raises(kl.InvalidInput, match="chunk_size"):
        aes.envelope_encrypt_stream("files", io.BytesIO(b"x"), io.BytesIO(), chunk_size=10,
                                    progress=False)
    (work / "t.txt").write_text("text")
    with open(work / "t.txt") as text, pytest.raises(kl.InvalidInput, match="binary"):
        aes.envelope_encrypt_stream("files", text, io.BytesIO(), progress=False)
    with pytest.raises(kl.InvalidInput, match="binary"):
        aes.envelope_encrypt_stream("files", io.BytesIO(b"x"), io.StringIO(), progress=False)
    assert int(aes.version_usage("files")["encryptions"].sum()) == 0


def test_progress_bar_only_when_asked(aes, capfd):
    data = os.urandom(4 * CHUNK)
    seal_stream(aes, data)
    assert capfd.readouterr().err == ""
    aes.envelope_encrypt_stream("files", io.BytesIO(data), io.BytesIO(), chunk_size=CHUNK,
                                progress=True)
    assert "encrypt" in capfd.readouterr().err


def test_whole_envelope_in_many_pieces(aes, monkeypatch):
    """Bodies past AESGCM's 2 GiB per call are sealed and opened piece by piece: the same
    bytes as one piece (shown with 1 KiB pieces, not 2 GiB of memory)."""
    from keyledger.services import envelopes

    data = os.urandom(5000)
    one = aes.envelope_encrypt("files", data, context=CTX)
    monkeypatch.setattr(envelopes, "_PIECE", 1024)
    many = aes.envelope_encrypt("files", data, context=CTX)
    assert aes.envelope_decrypt(many, context=CTX) == data
    assert aes.envelope_decrypt(one, context=CTX) == data
    bad = bytearray(many)
    bad[-TAG - 1] ^= 1
    with pytest.raises(kl.InvalidCiphertext):
        aes.envelope_decrypt(bad, context=CTX)
