"""The ciphertext format: properties against the real HSM, and the published test vectors.

Properties (hypothesis, one key per test on the embedded SoftHSM2 token): round trip for any
bytes and any string context; any single-byte change, any truncation and random bytes are
refused with ``InvalidCiphertext``. Vectors (data/ciphertext_vectors.json, made from
docs/ciphertext.md by scripts/make_vectors.py without keyledger's code): keyledger parses and
packs them byte for byte, and the doc's recipe decrypts them with ``cryptography`` alone.
"""

from __future__ import annotations

import ast
import importlib.util
import io
import json
import re
import struct
import uuid
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import keyledger as kl
from keyledger import ciphertext as ct
from keyledger.services import envelopes

ROOT = Path(__file__).resolve().parent.parent
VECTORS_PATH = ROOT / "data" / "ciphertext_vectors.json"
DOC_PATH = ROOT / "docs" / "ciphertext.md"
SCRIPT_PATH = ROOT / "scripts" / "make_vectors.py"
VECTORS = json.loads(VECTORS_PATH.read_text(encoding="utf-8"))

HEADER_LEN, TAG_LEN = 36, 16
VERSION_FIELD = range(20, 24)

PROPS = settings(max_examples=60, deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture])

contexts = st.none() | st.dictionaries(st.text(max_size=12), st.text(max_size=24), max_size=5)
plaintexts = st.binary(min_size=0, max_size=4096)


@pytest.fixture
def aes(ledger):
    ledger.create_key("prop", spec="AES_256")
    return ledger


def _canon(context: dict[str, str] | None) -> bytes:
    """The canonical context exactly as docs/ciphertext.md section 2 states it."""
    if not context:
        return b""
    return json.dumps(context, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8")


# -- properties against the real HSM ---------------------------------------------------------
@PROPS
@given(plaintext=plaintexts, context=contexts)
def test_round_trip_any_bytes_any_context(aes, plaintext, context):
    blob = aes.encrypt("prop", plaintext, context=context)
    assert len(blob) == HEADER_LEN + len(plaintext) + TAG_LEN
    header, header_bytes, _ = ct.parse(blob)
    assert header.key_id == aes.get_key("prop").key_id and header.version == 1
    assert header_bytes == blob[:HEADER_LEN]
    assert plaintext not in blob[HEADER_LEN:] or len(plaintext) < 8
    assert aes.decrypt(blob, context=context) == plaintext
    # the same mapping with its entries in another order is the same context
    if context:
        assert aes.decrypt(blob, context=dict(reversed(list(context.items())))) == plaintext


@PROPS
@given(plaintext=st.binary(max_size=64), ctx1=contexts, ctx2=contexts)
def test_other_context_is_refused(aes, plaintext, ctx1, ctx2):
    assume(_canon(ctx1) != _canon(ctx2))
    blob = aes.encrypt("prop", plaintext, context=ctx1)
    with pytest.raises(kl.InvalidCiphertext):
        aes.decrypt(blob, context=ctx2)


def test_empty_context_equals_no_context(aes):
    blob = aes.encrypt("prop", b"data", context={})
    assert aes.decrypt(blob) == b"data"
    assert aes.decrypt(aes.encrypt("prop", b"data"), context={}) == b"data"


def test_nonces_are_fresh(aes):
    blobs = [aes.encrypt("prop", b"same") for _ in range(50)]
    assert len({ct.parse(b)[0].nonce for b in blobs}) == 50


@PROPS
@given(data=st.data(), plaintext=st.binary(max_size=256), context=contexts)
def test_any_single_byte_change_is_invalid_ciphertext(aes, data, plaintext, context):
    blob = aes.encrypt("prop", plaintext, context=context)
    pos = data.draw(st.integers(0, len(blob) - 1), label="position")
    xor = data.draw(st.integers(1, 255), label="xor")
    bad = bytearray(blob)
    bad[pos] ^= xor
    with pytest.raises(kl.InvalidCiphertext):
        aes.decrypt(bytes(bad), context=context)
    assert aes.decrypt(blob, context=context) == plaintext


@pytest.mark.parametrize("pos", list(VERSION_FIELD))
def test_unknown_version_is_invalid_ciphertext(aes, pos):
    """A header naming a version the key never had (up to 2**32-1) is tampering, not a state."""
    blob = bytearray(aes.encrypt("prop", b"secret"))
    blob[pos] ^= 0x02 if pos == 23 else 0x80  # never version 0 (that is a 'bad header')
    assert ct.parse(bytes(blob))[0].version not in (0, 1)
    with pytest.raises(kl.InvalidCiphertext):
        aes.decrypt(bytes(blob))
    # the failed call is audited (the 32-bit version fits the ledger) and the home stays sound
    rows = aes.audit(action="decrypt")
    assert list(rows["outcome"]) == ["failed"] and rows["error"].iloc[0] == "InvalidCiphertext"
    assert aes.verify_audit().ok


def test_version_field_change_to_other_existing_version_is_invalid(aes):
    """v1 ciphertext relabelled as v2 reaches AES-GCM with the wrong key and fails the tag."""
    blob = bytearray(aes.encrypt("prop", b"secret"))
    aes.rotate("prop")
    blob[23] = 2
    with pytest.raises(kl.InvalidCiphertext):
        aes.decrypt(bytes(blob))


@PROPS
@given(data=st.data(), plaintext=st.binary(max_size=256), context=contexts)
def test_truncation_is_invalid_ciphertext(aes, data, plaintext, context):
    blob = aes.encrypt("prop", plaintext, context=context)
    cut = data.draw(st.integers(0, len(blob) - 1), label="length")
    with pytest.raises(kl.InvalidCiphertext):
        aes.decrypt(blob[:cut], context=context)


@PROPS
@given(junk=st.binary(max_size=512), context=contexts)
def test_random_bytes_are_invalid_ciphertext(aes, junk, context):
    with pytest.raises(kl.InvalidCiphertext):
        aes.decrypt(junk, context=context)


@PROPS
@given(nonce=st.binary(min_size=12, max_size=12), body=st.binary(min_size=16, max_size=300))
def test_forged_body_under_a_real_header_is_invalid_ciphertext(aes, nonce, body):
    header = ct.Header(aes.get_key("prop").key_id, 1, nonce).pack()
    with pytest.raises(kl.InvalidCiphertext):
        aes.decrypt(header + body)


@PROPS
@given(value=st.none() | st.integers() | st.text() | st.floats() | st.lists(st.binary())
       | st.dictionaries(st.text(), st.text()))
def test_non_bytes_is_invalid_input(aes, value):
    with pytest.raises(kl.InvalidInput):
        aes.decrypt(value)


def test_failures_are_audited_with_a_precise_reason(aes):
    blob = aes.encrypt("prop", b"secret", context={"t": "1"})
    bad = bytearray(blob)
    bad[-1] ^= 1
    for attempt in (bytes(bad), blob[:20], b"KL" + bytes(60)):
        with pytest.raises(kl.InvalidCiphertext):
            aes.decrypt(attempt, context={"t": "1"})
    with pytest.raises(kl.InvalidCiphertext):
        aes.decrypt(blob, context={"t": "2"})
    rows = aes.audit(action="decrypt")
    assert list(rows["outcome"]) == ["failed"] * 4
    assert set(rows["error"]) == {"InvalidCiphertext"}
    details = list(rows["detail"])
    assert "authentication failed" in details[0] and "malformed" in details[1]
    assert "malformed" in details[2] and "authentication failed" in details[3]
    assert list(rows["context"]) == ['{"t":"1"}'] * 3 + ['{"t":"2"}']


@PROPS
@given(data=st.binary(max_size=2048), context=contexts)
def test_envelope_round_trip_and_tamper(aes, data, context):
    blob = aes.envelope_encrypt("prop", data, context=context)
    assert aes.envelope_decrypt(blob, context=context) == data
    bad = bytearray(blob)
    bad[-1] ^= 0x40
    with pytest.raises(kl.InvalidCiphertext):
        aes.envelope_decrypt(bytes(bad), context=context)


@pytest.mark.parametrize("bad_context", [
    pytest.param({"a": 1}, id="int-value"),
    pytest.param({1: "a"}, id="int-key"),
    pytest.param("tenant=a", id="str"),
    pytest.param({"a": "\ud800"}, id="lone-surrogate"),
    pytest.param(5, id="int"),
    pytest.param([], id="empty-list"),
])
def test_invalid_context_is_invalid_input(aes, bad_context):
    with pytest.raises(kl.InvalidInput):
        aes.encrypt("prop", b"x", context=bad_context)
    with pytest.raises(kl.InvalidInput):
        aes.decrypt(aes.encrypt("prop", b"x"), context=bad_context)


def test_invalid_context_call_is_audited(aes):
    before = len(aes.audit(action="encrypt"))
    with pytest.raises(kl.InvalidInput):
        aes.encrypt("prop", b"x", context={"a": 1})
    rows = aes.audit(action="encrypt")
    assert len(rows) == before + 1 and rows["outcome"].iloc[-1] == "failed"


# -- the published vectors ---------------------------------------------------------------------
def _spec_decrypt(raw_key: bytes, blob: bytes, context) -> bytes:
    """docs/ciphertext.md section 4, written out independently of keyledger."""
    magic, fmt, alg, _kid, version, nonce = struct.unpack_from(">2sBB16sI12s", blob)
    assert (magic, fmt, alg) == (b"KL", 1, 1) and version >= 1
    return AESGCM(raw_key).decrypt(nonce, blob[36:], blob[:36] + _canon(context))


def _ids(vectors):
    return [v["name"] for v in vectors]


@pytest.mark.parametrize("vec", VECTORS["ciphertexts"], ids=_ids(VECTORS["ciphertexts"]))
def test_vector_parses_packs_and_decrypts(vec):
    blob = bytes.fromhex(vec["ciphertext"])
    header, header_bytes, body = ct.parse(blob)
    assert header.key_id == vec["key_id"]
    assert header.version == vec["version"]
    assert header.nonce.hex() == vec["nonce"]
    assert header_bytes.hex() == vec["header"] == blob[:36].hex()
    assert ct.Header(vec["key_id"], vec["version"], bytes.fromhex(vec["nonce"])).pack() \
        == bytes.fromhex(vec["header"])
    assert ct.canonical_context(vec["context"]).hex() == vec["context_bytes"]
    assert (header_bytes + ct.canonical_context(vec["context"])).hex() == vec["aad"]
    assert len(body) == len(bytes.fromhex(vec["plaintext"])) + 16
    key = bytes.fromhex(vec["key"])
    assert len(key) * 8 == vec["key_bits"]
    plaintext = _spec_decrypt(key, blob, vec["context"])
    assert plaintext.hex() == vec["plaintext"]
    wrong = {"tenant": "someone-else"}
    with pytest.raises(InvalidTag):
        _spec_decrypt(key, blob, wrong)


@pytest.mark.parametrize("vec", VECTORS["envelopes"], ids=_ids(VECTORS["envelopes"]))
def test_envelope_vector_parses_and_decrypts(vec):
    blob = bytes.fromhex(vec["envelope"])
    env_header, wrapped, nonce, body = ct.parse_envelope(blob)
    assert env_header.hex() == vec["envelope_header"]
    assert ct.envelope_header(wrapped) == env_header
    assert wrapped.hex() == vec["wrapped_key"] and nonce.hex() == vec["body_nonce"]
    assert ct.pack_envelope(wrapped, nonce, body) == blob
    header, _, _ = ct.parse(wrapped)
    assert (header.key_id, header.version) == (vec["key_id"], vec["version"])
    data_key = _spec_decrypt(bytes.fromhex(vec["key"]), wrapped, vec["context"])
    assert data_key.hex() == vec["data_key"]
    # envelope by the doc: w = u32 at offset 4; body AAD = bytes[0 : 8+w] || context
    (w,) = struct.unpack_from(">I", blob, 4)
    assert blob[:3] == b"KLE" and blob[3] == 1 and w == len(wrapped)
    plain = AESGCM(data_key).decrypt(blob[8 + w:20 + w], blob[20 + w:],
                                     blob[:8 + w] + _canon(vec["context"]))
    assert plain.hex() == vec["plaintext"]


@pytest.mark.parametrize("vec", VECTORS["streams"], ids=_ids(VECTORS["streams"]))
def test_stream_vector_opens_with_keyledgers_reader(vec):
    """keyledger's stream reader (the data key given as the vector's) opens a stream written
    from the doc alone, and parses its header the same way."""
    blob = bytes.fromhex(vec["stream"])
    header = bytes.fromhex(vec["stream_header"])
    assert ct.parse_stream_header(header) == (bytes.fromhex(vec["wrapped_key"]),
                                              vec["chunk_size"], bytes.fromhex(vec["nonce_prefix"]))
    data_key = _spec_decrypt(bytes.fromhex(vec["key"]), bytes.fromhex(vec["wrapped_key"]),
                             vec["context"])
    assert data_key.hex() == vec["data_key"]
    sink = io.BytesIO()
    size, chunks = envelopes.decrypt_stream(
        lambda wrapped: data_key, io.BytesIO(blob), sink, ctx=_canon(vec["context"]),
        overwrite=False, progress=False, protected=())
    assert sink.getvalue().hex() == vec["plaintext"] and chunks == vec["chunks"]
    assert size == len(bytes.fromhex(vec["plaintext"]))


@pytest.mark.parametrize("vec", VECTORS["invalid"], ids=_ids(VECTORS["invalid"]))
def test_invalid_vector_is_refused_by_parse(vec):
    with pytest.raises(kl.InvalidCiphertext):
        ct.parse(bytes.fromhex(vec["blob"]))


def test_invalid_vector_is_refused_by_decrypt(ledger):
    for vec in VECTORS["invalid"]:
        with pytest.raises(kl.InvalidCiphertext):
            ledger.decrypt(bytes.fromhex(vec["blob"]))


def test_vectors_cover_the_promised_cases():
    vs = VECTORS["ciphertexts"]
    assert any(v["plaintext"] == "" for v in vs)
    assert any(v["context"] is None for v in vs) and any(v["context"] == {} for v in vs)
    assert any(v["context"] and any(ord(c) > 0xFFFF for c in "".join(v["context"])) for v in vs)
    assert {v["key_bits"] for v in vs} == {128, 256}
    assert any(v["version"] > 1 for v in vs) and any(v["version"] > 0xFFFF for v in vs)
    assert all(uuid.UUID(v["key_id"]).bytes.hex() == v["header"][8:40] for v in vs)


def test_doc_worked_example_matches_first_vector():
    doc = DOC_PATH.read_text(encoding="utf-8")
    first = VECTORS["ciphertexts"][0]
    assert first["name"] == "aes256-basic"
    assert first["ciphertext"] in re.sub(r"\s+", "", doc)


def test_doc_decrypt_recipe_runs():
    """The code block of docs/ciphertext.md section 4 runs as written and asserts its result."""
    doc = DOC_PATH.read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"```python\n(.*?)```", doc, re.S) if "def decrypt" in b]
    assert len(blocks) == 1
    namespace: dict = {}
    exec(compile(blocks[0], str(DOC_PATH), "exec"), namespace)  # noqa: S102
    for vec in VECTORS["ciphertexts"]:
        assert namespace["decrypt"](bytes.fromhex(vec["key"]), bytes.fromhex(vec["ciphertext"]),
                                    vec["context"]).hex() == vec["plaintext"]


def _load_script():
    spec = importlib.util.spec_from_file_location("make_vectors", SCRIPT_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_vectors_file_is_reproducible_and_independent_of_keyledger():
    tree = ast.parse(SCRIPT_PATH.read_text(encoding="utf-8"))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert "keyledger" not in imported
    assert _load_script().render() == VECTORS_PATH.read_text(encoding="utf-8")
