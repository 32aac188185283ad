"""Chunked AES-256-GCM, the STREAM construction (Hoang, Reyhanitabar, Rogaway, Vizar 2015),
shared by backups (``backup/stream.py``) and streamed envelopes (``services/envelopes.py``).

Data is cut into chunks of a fixed plaintext size (the last one may be shorter, or empty).
Chunk ``i`` is sealed under the stream's key with

    nonce = prefix (7 random bytes) || u32 big-endian i || last (1 byte: 01 on the last chunk)

and one associated data for the whole stream (its header, and for envelopes the context).
The nonce is authenticated by GCM, so a chunk moved to another place (reordered, dropped,
duplicated), a stream cut at a chunk boundary (its last chunk was sealed with ``last = 00``)
and bytes appended after the last chunk all fail authentication.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import InvalidCiphertext, InvalidInput

PREFIX_LEN = 7
TAG_LEN = 16
MAX_CHUNKS = 1 << 32  # the counter is 32 bits


def nonce(prefix: bytes, counter: int, last: bool) -> bytes:
    """The 12-byte nonce of chunk ``counter``; ``InvalidInput`` past 2^32 chunks."""
    if counter >= MAX_CHUNKS:
        raise InvalidInput("the data is too large for the chunked format (2^32 chunks); "
                           "use a larger chunk size")
    return prefix + counter.to_bytes(4, "big") + (b"\x01" if last else b"\x00")


class Sealer:
    """Seals the chunks of one stream in order (the counter is kept here, never passed)."""

    def __init__(self, key: bytes, prefix: bytes, aad: bytes) -> None:
        self._aes, self._prefix, self._aad = AESGCM(key), prefix, aad
        self.chunks = 0

    def seal(self, chunk: bytes | memoryview, last: bool) -> bytes:
        out = self._aes.encrypt(nonce(self._prefix, self.chunks, last), chunk, self._aad)
        self.chunks += 1
        return out


class Opener:
    """Opens the chunks of one stream in order; a chunk is returned only once authenticated."""

    def __init__(self, key: bytes, prefix: bytes, aad: bytes) -> None:
        self._aes, self._prefix, self._aad = AESGCM(key), prefix, aad
        self.chunks = 0

    def open(self, block: bytes | memoryview, last: bool) -> bytes:
        """The chunk's plaintext, or ``InvalidCiphertext`` naming the chunk that failed."""
        try:
            if len(block) < TAG_LEN:
                raise InvalidTag
            plain = self._aes.decrypt(nonce(self._prefix, self.chunks, last), block, self._aad)
        except InvalidTag:
            raise InvalidCiphertext(f"chunk {self.chunks} failed authentication") from None
        self.chunks += 1
        return plain


def blocks(readinto: Callable[[memoryview], int | None], size: int
           ) -> Iterator[tuple[memoryview, bool]]:
    """The source cut into blocks of ``size`` bytes, each with whether it is the last one
    (the last may be shorter, or empty for an empty source).

    One byte is read ahead to know which block is the last, into one buffer reused for every
    block: a block is valid only until the next one is asked for.
    """
    view = memoryview(bytearray(size + 1))
    have = 0
    while True:
        have += fill(readinto, view[have:])
        if have <= size:
            yield view[:have], True
            return
        yield view[:size], False
        view[0] = view[size]
        have = 1


def fill(readinto: Callable[[memoryview], int | None], view: memoryview) -> int:
    """Read into ``view`` until it is full or the source ends; the number of bytes read."""
    got = 0
    while got < len(view):
        n = readinto(view[got:])
        if n is None:  # a non-blocking source with nothing yet: not the end, but no data
            raise InvalidInput("the source is a non-blocking stream with no data ready; "
                               "give a blocking file or stream")
        if not n:
            break
        got += n
    return got


__all__ = ["MAX_CHUNKS", "PREFIX_LEN", "TAG_LEN", "Opener", "Sealer", "blocks", "fill", "nonce"]
