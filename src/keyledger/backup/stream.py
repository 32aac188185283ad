"""The sealed stream of a backup: AES-256-GCM chunks under a scrypt-derived key.

Byte layout (``docs/backup.md``): a 56-byte header (magic, format, scrypt parameters, salt,
passphrase check, chunk size, nonce prefix), then chunks of ``CHUNK_SIZE`` plaintext bytes,
each sealed with the header as associated data and a nonce that counts chunks and marks the
last one, so reordering, truncation and extension all fail authentication.
"""

from __future__ import annotations

import hmac
import os
import struct
from hashlib import sha256
from typing import BinaryIO

from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from ..aeadstream import Opener, Sealer, blocks
from ..errors import InvalidCiphertext, InvalidInput

MAGIC = b"KLBACKUP"
FORMAT_VERSION = 1
KDF_SCRYPT = 1
SCRYPT_LOG2_N, SCRYPT_R, SCRYPT_P = 15, 8, 1
CHUNK_SIZE = 1 << 20  # plaintext bytes per sealed chunk (the last one may be shorter)
TAG_LEN = 16
# magic, format, kdf, log2(N), r, p, salt, passphrase check, chunk size, nonce prefix
_HEADER = struct.Struct(">8sBBBBB16s16sI7s")
HEADER_LEN = _HEADER.size  # 56
MIN_PASSPHRASE = 8


def check_passphrase(value: object) -> bytes:
    if isinstance(value, str):
        try:
            value = value.encode()
        except UnicodeEncodeError:  # a lone surrogate: no bytes to derive a key from
            raise InvalidInput("the passphrase must be valid Unicode text") from None
    if not isinstance(value, bytes | bytearray):
        raise InvalidInput("passphrase must be text (or bytes)")
    if len(value) < MIN_PASSPHRASE:
        raise InvalidInput(f"the backup passphrase must be at least {MIN_PASSPHRASE} characters;"
                           " use a long random one kept apart from the backups")
    return bytes(value)


def _derive(passphrase: bytes, salt: bytes, log2n: int, r: int, p: int) -> tuple[bytes, bytes]:
    """scrypt -> (AES-256 key, 16-byte passphrase check)."""
    out = Scrypt(salt=salt, length=64, n=1 << log2n, r=r, p=p).derive(passphrase)
    return out[:32], out[32:48]


class SealedWriter:
    """A write-only stream that seals what it is given in AES-256-GCM chunks (STREAM layout)."""

    def __init__(self, out: BinaryIO, passphrase: bytes, chunk_size: int = CHUNK_SIZE) -> None:
        salt, prefix = os.urandom(16), os.urandom(7)
        key, check = _derive(passphrase, salt, SCRYPT_LOG2_N, SCRYPT_R, SCRYPT_P)
        self.header = _HEADER.pack(MAGIC, FORMAT_VERSION, KDF_SCRYPT, SCRYPT_LOG2_N, SCRYPT_R,
                                   SCRYPT_P, salt, check, chunk_size, prefix)
        self._sealer, self._size = Sealer(key, prefix, self.header), chunk_size
        self._out, self._buf = out, bytearray()
        self._hash = sha256()
        self.bytes = 0
        self._emit(self.header)

    def _emit(self, data: bytes) -> None:
        self._out.write(data)
        self._hash.update(data)
        self.bytes += len(data)

    def _seal(self, chunk: bytes, last: bool) -> None:
        self._emit(self._sealer.seal(chunk, last))

    def write(self, data: bytes) -> int:
        self._buf += data
        # keep at least one byte back: only finish() knows which chunk is the last
        while len(self._buf) > self._size:
            self._seal(bytes(self._buf[:self._size]), last=False)
            del self._buf[:self._size]
        return len(data)

    def finish(self) -> str:
        """Seal the last chunk (possibly empty); returns the archive's sha256 (hex)."""
        self._seal(bytes(self._buf), last=True)
        self._buf.clear()
        return self._hash.hexdigest()


class SealedReader:
    """A read-only stream over a sealed archive; every byte it returns was authenticated."""

    def __init__(self, src: BinaryIO, passphrase: bytes, name: str) -> None:
        self._src, self.name = src, name
        self._hash = sha256()
        self.bytes = 0  # archive bytes read so far
        header = self._take(HEADER_LEN)
        if len(header) < HEADER_LEN or header[:8] != MAGIC:
            raise InvalidCiphertext(f"{name} is not a keyledger backup (bad header)")
        (_, fmt, kdf, log2n, r, p, salt, check, chunk, prefix) = _HEADER.unpack(header)
        if fmt != FORMAT_VERSION:
            raise InvalidCiphertext(f"{name} has backup format {fmt}, which this keyledger does "
                                    "not read; restore it with a newer keyledger")
        # bounds, so a crafted header cannot make scrypt take gigabytes or minutes
        if kdf != KDF_SCRYPT or not (10 <= log2n <= 20 and 1 <= r <= 16 and 1 <= p <= 4
                                     and 128 * r << log2n <= 1 << 28
                                     and 1024 <= chunk <= 64 << 20):
            raise InvalidCiphertext(f"{name} is damaged or was altered (implausible header)")
        key, expect = _derive(passphrase, salt, log2n, r, p)
        if not hmac.compare_digest(check, expect):
            raise InvalidCiphertext(f"wrong passphrase for the backup {name} (or its header was "
                                    "altered); nothing was restored")
        self.header, self._opener = header, Opener(key, prefix, header)
        self._blocks = blocks(self._readinto, chunk + TAG_LEN)
        self._buf, self._eof = bytearray(), False

    def _take(self, n: int) -> bytes:
        parts, want = [], n
        while want > 0:
            got = self._src.read(want)
            if not got:
                break
            parts.append(got)
            want -= len(got)
        data = b"".join(parts)
        self._hash.update(data)
        self.bytes += len(data)
        return data

    def _readinto(self, view: memoryview) -> int:
        n = self._src.readinto(view)  # type: ignore[attr-defined]
        if n:
            self._hash.update(view[:n])
            self.bytes += n
        return n or 0

    def _next_chunk(self) -> None:
        block, last = next(self._blocks)
        try:
            plain = self._opener.open(block, last)
        except InvalidCiphertext:
            raise InvalidCiphertext(
                f"the backup {self.name} is damaged, truncated or was altered (chunk "
                f"{self._opener.chunks} failed authentication); nothing was restored - use "
                "another copy") from None
        self._buf += plain
        self._eof = last

    def read(self, n: int = -1) -> bytes:
        while (n is None or n < 0 or len(self._buf) < n) and not self._eof:
            self._next_chunk()
        if n is None or n < 0:
            n = len(self._buf)
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def drain(self) -> None:
        """Authenticate the rest (tar stops reading at its end marker)."""
        while not self._eof:
            self._next_chunk()
            self._buf.clear()

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()
