"""The self-describing ciphertext format (see docs/ciphertext.md for the byte layout).

    offset  size  field
    0       2     magic b"KL"
    2       1     format version (1)
    3       1     algorithm (1 = AES-GCM, 96-bit nonce, 128-bit tag)
    4       16    key id (UUID bytes of the catalog key)
    20      4     key version, unsigned big-endian
    24      12    nonce
    36      n+16  ciphertext || tag
AAD = bytes[0:36] || canonical(context). The header is authenticated, so a ciphertext cannot be
moved to another key or version, and the context must match exactly.
"""

from __future__ import annotations

import json
import struct
import uuid
from collections.abc import Mapping
from typing import NamedTuple

from .errors import InvalidCiphertext, InvalidInput

MAGIC = b"KL"
FORMAT_VERSION = 1
ALG_AES_GCM = 1
NONCE_LEN = 12
TAG_LEN = 16
_HEADER = struct.Struct(">2sBB16sI12s")
HEADER_LEN = _HEADER.size  # 36

ENVELOPE_MAGIC = b"KLE"
_ENVELOPE = struct.Struct(">3sBI")  # magic, format version, wrapped-key length


class Header(NamedTuple):
    """A ciphertext's header (a named tuple: every decrypt builds one, and a frozen dataclass
    costs several times as much to make)."""

    key_id: str
    version: int
    nonce: bytes

    def pack(self) -> bytes:
        return pack_header(uuid.UUID(self.key_id).bytes, self.version, self.nonce)


def pack_header(key_id: bytes, version: int, nonce: bytes) -> bytes:
    return _HEADER.pack(MAGIC, FORMAT_VERSION, ALG_AES_GCM, key_id, version, nonce)


def canonical_context(context: Mapping[str, str] | None) -> bytes:
    """Deterministic bytes for an encryption context: sorted-key compact UTF-8 JSON, or b''."""
    if context is None:
        return b""
    if not isinstance(context, Mapping):
        raise InvalidInput("context must be a mapping of strings to strings, e.g. {'tenant': 'a'}")
    if not context:
        return b""
    for k, v in context.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise InvalidInput("context keys and values must be strings")
    text = json.dumps(dict(context), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    try:
        return text.encode()
    except UnicodeEncodeError:
        raise InvalidInput("context strings must be valid Unicode (no lone surrogates)") from None


def parse(blob: object) -> tuple[Header, bytes, bytes]:
    """Split a ciphertext into (header, header bytes, ciphertext||tag) or raise InvalidCiphertext."""
    if type(blob) is not bytes:  # (the usual case, bytes, skips the union isinstance)
        if not isinstance(blob, bytes | bytearray | memoryview):
            raise InvalidInput(f"ciphertext must be bytes, not {type(blob).__name__}")
        blob = bytes(blob)
    if len(blob) < HEADER_LEN + TAG_LEN:
        raise InvalidCiphertext("not a keyledger ciphertext (too short)")
    magic, fmt, alg, kid, version, nonce = _HEADER.unpack_from(blob)
    if magic != MAGIC or fmt != FORMAT_VERSION or alg != ALG_AES_GCM or version == 0:
        raise InvalidCiphertext("not a keyledger ciphertext (bad header)")
    key_id = _KEY_IDS.get(kid) or _key_id_text(kid)
    return Header(key_id, version, nonce), blob[:HEADER_LEN], blob[HEADER_LEN:]


_KEY_IDS: dict[bytes, str] = {}  # key id bytes -> UUID text (uuid.UUID is most of a parse)
_KEY_IDS_MAX = 4096  # forged headers cannot grow it past this; later ids are just not kept


def _key_id_text(kid: bytes) -> str:
    text = _KEY_IDS.get(kid)
    if text is None:
        text = str(uuid.UUID(bytes=kid))
        if len(_KEY_IDS) < _KEY_IDS_MAX:
            _KEY_IDS[kid] = text
    return text


def byte_view(value: object, what: str) -> memoryview:
    """A flat byte view of bytes, a bytearray or a memoryview, without copying (a strided
    memoryview is copied once); ``InvalidInput`` for anything else."""
    if not isinstance(value, bytes | bytearray | memoryview):
        if isinstance(value, str):
            raise InvalidInput(f"{what} must be bytes; encode text first, e.g. s.encode()")
        raise InvalidInput(f"{what} must be bytes, not {type(value).__name__}")
    view = memoryview(value)
    if not view.c_contiguous:
        return memoryview(view.tobytes())
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def pack_envelope(wrapped_key: bytes, nonce: bytes, body: bytes) -> bytes:
    return _ENVELOPE.pack(ENVELOPE_MAGIC, FORMAT_VERSION, len(wrapped_key)) + wrapped_key + nonce + body


def envelope_header(wrapped_key: bytes) -> bytes:
    return _ENVELOPE.pack(ENVELOPE_MAGIC, FORMAT_VERSION, len(wrapped_key)) + wrapped_key


def parse_envelope(blob: object) -> tuple[bytes, bytes, bytes, memoryview]:
    """-> (header incl. wrapped key, wrapped key, nonce, body) or raise InvalidCiphertext.

    The body is a view into ``blob`` (bytes, bytearray or memoryview), never a copy.
    """
    view = byte_view(blob, "envelope")
    if len(view) < _ENVELOPE.size:
        raise InvalidCiphertext("not a keyledger envelope (too short)")
    magic, fmt, n = _ENVELOPE.unpack_from(view)
    end = _ENVELOPE.size + n
    if magic == ENVELOPE_MAGIC and fmt == STREAM_FORMAT:
        raise InvalidCiphertext("this is a streamed envelope; open it with "
                                "envelope_decrypt_stream")
    if magic != ENVELOPE_MAGIC or fmt != FORMAT_VERSION or len(view) < end + NONCE_LEN + TAG_LEN:
        raise InvalidCiphertext("not a keyledger envelope (bad header)")
    return (bytes(view[:end]), bytes(view[_ENVELOPE.size:end]),
            bytes(view[end:end + NONCE_LEN]), view[end + NONCE_LEN:])


def envelope_size(wrapped_key: bytes, data_len: int) -> int:
    """The length of an envelope of ``data_len`` bytes: header, wrapped key, nonce, body, tag."""
    return _ENVELOPE.size + len(wrapped_key) + NONCE_LEN + data_len + TAG_LEN


# -- streamed envelopes (format 2): the envelope header, then STREAM chunks (aeadstream.py) -----
STREAM_FORMAT = 2
_STREAM_TAIL = struct.Struct(">I7s")  # plaintext bytes per chunk, nonce prefix
MIN_CHUNK, MAX_CHUNK = 1 << 10, 64 << 20  # a crafted header cannot ask for a huge buffer
MAX_WRAPPED = 1024  # a wrapped 32-byte data key is 84 bytes


def pack_stream_header(wrapped_key: bytes, chunk_size: int, prefix: bytes) -> bytes:
    """The header of a streamed envelope (also the chunks' associated data, with the context)."""
    return (_ENVELOPE.pack(ENVELOPE_MAGIC, STREAM_FORMAT, len(wrapped_key)) + wrapped_key
            + _STREAM_TAIL.pack(chunk_size, prefix))


def stream_rest_len(start: bytes) -> int:
    """How many header bytes follow the first 8 of a streamed envelope, or InvalidCiphertext."""
    if len(start) < _ENVELOPE.size:
        raise InvalidCiphertext("not a keyledger streamed envelope (too short)")
    magic, fmt, n = _ENVELOPE.unpack_from(start)
    if magic == ENVELOPE_MAGIC and fmt == FORMAT_VERSION:
        raise InvalidCiphertext("this is a whole (not streamed) envelope; open it with "
                                "envelope_decrypt")
    if magic != ENVELOPE_MAGIC or fmt != STREAM_FORMAT or not HEADER_LEN + TAG_LEN <= n <= MAX_WRAPPED:
        raise InvalidCiphertext("not a keyledger streamed envelope (bad header)")
    return n + _STREAM_TAIL.size


def parse_stream_header(header: bytes) -> tuple[bytes, int, bytes]:
    """-> (wrapped key, chunk size, nonce prefix) of a whole streamed-envelope header."""
    n = stream_rest_len(header) - _STREAM_TAIL.size
    if len(header) != _ENVELOPE.size + n + _STREAM_TAIL.size:
        raise InvalidCiphertext("not a keyledger streamed envelope (too short)")
    chunk, prefix = _STREAM_TAIL.unpack_from(header, _ENVELOPE.size + n)
    if not MIN_CHUNK <= chunk <= MAX_CHUNK:
        raise InvalidCiphertext("not a keyledger streamed envelope (implausible chunk size)")
    return header[_ENVELOPE.size:_ENVELOPE.size + n], chunk, prefix
