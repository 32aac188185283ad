"""Envelope bodies, the local half of envelope encryption (docs/ciphertext.md, sections 5-6).

A whole envelope is sealed into one buffer sized up front, which becomes the returned bytes,
and opened from a view of the caller's buffer: the data is touched once, by AES-GCM. A
streamed envelope goes chunk by chunk from a file-like or a path to a file-like or a path
(``aeadstream``), with one chunk in memory at a time. The HSM part (the data key, wrapped or
unwrapped) is the caller's: ``CryptoService`` audits it locally, ``RemoteLedger`` asks the
server for it.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .. import ciphertext as ct
from .. import outputs
from ..aeadstream import PREFIX_LEN, TAG_LEN, Opener, Sealer, blocks, fill
from ..errors import InvalidCiphertext, InvalidInput, KeyLedgerError

CHUNK_SIZE = 1 << 20  # plaintext bytes per chunk of a streamed envelope
_PIECE = 1 << 28  # bytes per update_into call when sealing a whole envelope
_SLACK = 15  # update_into wants room for a block beyond the input: the tag's place has it


# -- whole envelopes ---------------------------------------------------------------------------
def seal(data_key: bytes, wrapped: bytes, data: memoryview, ctx: bytes) -> bytes:
    """The whole envelope of ``data``, encrypted straight into the buffer that is returned.

    ``io.BytesIO`` sized once and filled through ``getbuffer()``: ``getvalue()`` then hands
    that very buffer over as ``bytes`` (CPython; elsewhere it is one copy), where a bytearray
    would need a copy to become bytes.
    """
    header = ct.envelope_header(wrapped)
    nonce = os.urandom(ct.NONCE_LEN)
    total = ct.envelope_size(wrapped, len(data))
    start = len(header) + ct.NONCE_LEN
    buf = io.BytesIO()
    buf.seek(total - 1)
    buf.write(b"\0")
    with buf.getbuffer() as out:
        out[:len(header)] = header
        out[len(header):start] = nonce
        enc = Cipher(algorithms.AES(data_key), modes.GCM(nonce)).encryptor()
        enc.authenticate_additional_data(header + ctx)
        for at in range(0, len(data), _PIECE):
            piece = data[at:at + _PIECE]
            done = enc.update_into(piece, out[start + at:start + at + len(piece) + _SLACK])
            if done != len(piece):  # GCM is a stream mode: never short, checked all the same
                raise KeyLedgerError("AES-GCM returned fewer bytes than it was given")
        enc.finalize()
        out[total - TAG_LEN:] = enc.tag
    return buf.getvalue()


def open_body(data_key: bytes, nonce: bytes, body: memoryview, aad: bytes) -> bytes:
    """The plaintext of a whole envelope's body (ciphertext || tag), or ``InvalidCiphertext``.

    Decrypted into one buffer that becomes the returned bytes (as ``seal`` does), in pieces, so
    a body past AESGCM's 2 GiB per call opens too; the buffer is handed out only after the tag
    checked.
    """
    if len(body) < TAG_LEN:
        raise InvalidCiphertext("the envelope body is too short")
    size = len(body) - TAG_LEN
    dec = Cipher(algorithms.AES(data_key), modes.GCM(nonce, bytes(body[size:]))).decryptor()
    dec.authenticate_additional_data(aad)
    buf = io.BytesIO()
    buf.seek(size + _SLACK)  # room for update_into's slack after the last piece
    buf.write(b"\0")
    with buf.getbuffer() as out:
        for at in range(0, size, _PIECE):
            piece = body[at:min(at + _PIECE, size)]
            if dec.update_into(piece, out[at:at + len(piece) + _SLACK]) != len(piece):
                raise KeyLedgerError("AES-GCM returned fewer bytes than it was given")
        try:
            dec.finalize()
        except InvalidTag:
            raise InvalidCiphertext("the envelope body failed authentication") from None
    buf.truncate(size)
    return buf.getvalue()


# -- streamed envelopes ----------------------------------------------------------------------
def check_chunk_size(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not (
            ct.MIN_CHUNK <= value <= ct.MAX_CHUNK):
        raise InvalidInput(f"chunk_size must be a whole number of bytes from {ct.MIN_CHUNK:,} to "
                           f"{ct.MAX_CHUNK:,}, e.g. {CHUNK_SIZE:,} (the default)")
    return value


def encrypt_stream(data_key: Callable[[], tuple[bytes, bytes]], source: object, sink: object,
                   *, ctx: bytes, chunk_size: int, overwrite: bool, progress: bool,
                   protected: Iterable[Path]) -> tuple[int, int]:
    """Seal ``source`` into ``sink`` under a fresh data key from ``data_key()`` -> (key,
    wrapped key); -> (plaintext bytes, chunks). The key is asked for only once both ends
    are open."""
    size = check_chunk_size(chunk_size)
    with _ends(source, sink, overwrite, protected) as (src, dst, total):
        key, wrapped = data_key()
        prefix = os.urandom(PREFIX_LEN)
        header = ct.pack_stream_header(wrapped, size, prefix)
        sealer, done = Sealer(key, prefix, header + ctx), 0
        _write(dst, header)
        with _bar(progress, total, "encrypt") as bar:
            for chunk, last in blocks(_reader(src), size):
                _write(dst, sealer.seal(chunk, last))
                done += len(chunk)
                bar.update(len(chunk))
        return done, sealer.chunks


def decrypt_stream(unwrap: Callable[[bytes], bytes], source: object, sink: object, *,
                   ctx: bytes, overwrite: bool, progress: bool,
                   protected: Iterable[Path]) -> tuple[int, int]:
    """Open the streamed envelope ``source`` into ``sink``; ``unwrap(wrapped key)`` -> the data
    key; -> (plaintext bytes, chunks). Each chunk is authenticated before it is written."""
    with _ends(source, sink, overwrite, protected) as (src, dst, total):
        read = _reader(src)
        header = _read_header(read)
        wrapped, size, prefix = ct.parse_stream_header(header)
        opener, done = Opener(unwrap(wrapped), prefix, header + ctx), 0
        with _bar(progress, total, "decrypt") as bar:
            bar.update(len(header))
            for block, last in blocks(read, size + TAG_LEN):
                try:
                    plain = opener.open(block, last)
                except InvalidCiphertext:
                    raise InvalidCiphertext(
                        f"the streamed envelope cannot be decrypted: chunk {opener.chunks} was "
                        "altered, moved or cut off, or the stream was truncated or extended "
                        "(an output path was not written; discard a file-like sink: it may "
                        "hold the chunks before)") from None
                _write(dst, plain)
                done += len(plain)
                bar.update(len(block))
        return done, opener.chunks


def _read_header(read: Callable[[memoryview], int | None]) -> bytes:
    start = bytearray(8)
    got = fill(read, memoryview(start))
    rest = bytearray(ct.stream_rest_len(bytes(start[:got])))
    if fill(read, memoryview(rest)) < len(rest):
        raise InvalidCiphertext("not a keyledger streamed envelope (too short)")
    return bytes(start + rest)


# -- the two ends: file-likes, or paths (read checked, written through a temporary file) ------
@contextlib.contextmanager
def _ends(source: object, sink: object, overwrite: bool, protected: Iterable[Path]
          ) -> Iterator[tuple[Any, Any, int | None]]:
    """(readable, writable, source size if known); a sink path is written through a temporary
    file renamed into place only when the block ends without an error."""
    if not isinstance(overwrite, bool):
        raise InvalidInput("overwrite must be True or False")
    with contextlib.ExitStack() as stack:
        if isinstance(source, str | os.PathLike):
            src: Any = stack.enter_context(_open_source(outputs.check_source(source, "source")))
        elif callable(getattr(source, "readinto", None)) or callable(getattr(source, "read", None)):
            src = source
        else:
            raise InvalidInput("source must be a path or a binary file-like object (with read), "
                               f"not {type(source).__name__}; wrap bytes in io.BytesIO")
        if isinstance(sink, str | os.PathLike):
            target = outputs.check_target(sink, protected, overwrite=overwrite, what="output file")
            dst: Any = stack.enter_context(outputs.atomic_file(target, overwrite=overwrite))
        elif callable(getattr(sink, "write", None)):
            dst = sink
        else:
            raise InvalidInput("sink must be a path or a binary file-like object (with write), "
                               f"not {type(sink).__name__}")
        yield src, dst, _size(src)


def _open_source(path: Path) -> BinaryIO:
    try:
        return path.open("rb")
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror or exc}") from None


def _size(src: Any) -> int | None:
    """The bytes left in ``src`` when it can tell (for the progress bar), else None."""
    try:
        if not src.seekable():
            return None
        here = src.tell()
        end = src.seek(0, io.SEEK_END)
        src.seek(here)
        return int(end - here)
    except (AttributeError, OSError, ValueError):
        return None


def _reader(src: Any) -> Callable[[memoryview], int | None]:
    """``readinto`` of ``src`` (or one made of its ``read``), with errors a person can act on."""
    readinto = getattr(src, "readinto", None)

    def read(view: memoryview) -> int | None:
        try:
            if readinto is not None:
                n: int | None = readinto(view)
                return n
            data = src.read(len(view))
        except OSError as exc:
            raise KeyLedgerError(f"reading the source failed: {exc.strerror or exc}") from None
        if data is None:
            return None
        if not isinstance(data, bytes | bytearray):
            raise InvalidInput("the source must be opened in binary mode ('rb'), it gave "
                               f"{type(data).__name__}")
        view[:len(data)] = data
        return len(data)

    return read


def _write(dst: Any, data: bytes) -> None:
    try:
        dst.write(data)
    except OSError as exc:
        raise KeyLedgerError(f"writing the output failed: {exc.strerror or exc}") from None
    except TypeError:
        raise InvalidInput("the sink must be opened in binary mode ('wb')") from None


def _bar(progress: bool, total: int | None, what: str) -> Any:
    from tqdm.auto import tqdm  # ~0.15 s of imports (asyncio with it): only when a file streams

    return tqdm(total=total, desc=what, unit="B", unit_scale=True, unit_divisor=1024,
                disable=not progress, leave=False)


__all__ = ["CHUNK_SIZE", "check_chunk_size", "decrypt_stream", "encrypt_stream", "open_body",
           "seal"]
