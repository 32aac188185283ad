"""GetParametersForImport and ImportKeyMaterial over keyledger's BYOK (docs/byok.md).

keyledger's wrapping is AWS's RSA_AES_KEY_WRAP: RSA-OAEP (MGF1 and hash alike) of a one-time
AES-256 key, then AES key wrap with padding (RFC 5649) of the material, under an RSA-3072 key
made in the HSM. The hash is SHA-256 when the HSM can do OAEP with SHA-256, else SHA-1
(SoftHSM 2.6.1): RSA_AES_KEY_WRAP_SHA_256 or RSA_AES_KEY_WRAP_SHA_1, key spec RSA_3072.

keyledger creates a key from imported material in one step, so there is no CreateKey with
Origin EXTERNAL: the KeyId of both calls is ``alias/<new name>`` (or its alias ARN), the name
the imported key will have; the material is 32 bytes (SYMMETRIC_DEFAULT, AES-256).
"""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives import serialization

from ...byok import IMPORT_RSA_BITS
from ...errors import InvalidInput, PolicyViolation
from ..errors import ApiError
from .call import Call
from .faults import Recorded, to_api_error, unsupported, validation
from .fields import MAX_CIPHERTEXT, b64
from .mapping import epoch

WRAPPING_ALGORITHMS = ("RSAES_PKCS1_V1_5", "RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256",
                       "RSA_AES_KEY_WRAP_SHA_1", "RSA_AES_KEY_WRAP_SHA_256", "SM2PKE")
WRAPPING_KEY_SPECS = ("RSA_2048", "RSA_3072", "RSA_4096", "SM2")
IMPORT_SPEC = "AES_256"


def _new_key_name(call: Call) -> str:
    """The name the imported key will get: KeyId must be an alias (``alias/<name>``)."""
    raw = call.body.need_text("KeyId")
    if not (raw.startswith("alias/") or (raw.startswith("arn:") and ":alias/" in raw)):
        raise unsupported("keyledger imports material into a new key: send KeyId "
                          "alias/<new key name> (there is no key to import into yet)")
    return call.name()


def _wrapping(call: Call) -> str:
    """The AWS wrapping algorithm keyledger's HSM uses (SHA-256 OAEP or SHA-1)."""
    sha256 = call.ledger.capabilities().supports.get("RSA_OAEP_SHA256", False)
    return "RSA_AES_KEY_WRAP_SHA_256" if sha256 else "RSA_AES_KEY_WRAP_SHA_1"


def get_parameters_for_import(call: Call) -> dict[str, Any]:
    b = call.body
    alg = b.choice("WrappingAlgorithm", WRAPPING_ALGORITHMS)
    spec = b.choice("WrappingKeySpec", WRAPPING_KEY_SPECS)
    if alg is None or spec is None:
        raise validation("WrappingAlgorithm and WrappingKeySpec are required")
    name = _new_key_name(call)
    want, want_spec = _wrapping(call), f"RSA_{IMPORT_RSA_BITS}"
    if (alg, spec) != (want, want_spec):
        raise unsupported(f"this HSM wraps imports with WrappingAlgorithm {want} and "
                          f"WrappingKeySpec {want_spec} only, not {alg} with {spec}")
    params = call.ledger.import_parameters(name)
    der = serialization.load_pem_public_key(params["public_key_pem"].encode()).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return {"KeyId": call.config.alias_arn(name),
            "ImportToken": b64(params["token"].encode()),
            "PublicKey": b64(der), "ParametersValidTo": epoch(params["expires_at"])}


def import_key_material(call: Call) -> dict[str, Any]:
    b = call.body
    token_blob = b.need_blob("ImportToken", MAX_CIPHERTEXT)
    wrapped = b.need_blob("EncryptedKeyMaterial", MAX_CIPHERTEXT)
    model = b.choice("ExpirationModel", ("KEY_MATERIAL_EXPIRES", "KEY_MATERIAL_DOES_NOT_EXPIRE"))
    if model == "KEY_MATERIAL_EXPIRES" or b.present("ValidTo"):
        raise unsupported("keyledger key material does not expire: send ExpirationModel "
                          "KEY_MATERIAL_DOES_NOT_EXPIRE and no ValidTo")
    if b.choice("ImportType", ("NEW_KEY_MATERIAL", "EXISTING_KEY_MATERIAL"),
                "NEW_KEY_MATERIAL") != "NEW_KEY_MATERIAL":
        raise unsupported("keyledger imports material once, into a new key")
    name = _new_key_name(call)
    try:
        token = token_blob.decode("ascii")
    except UnicodeDecodeError:
        raise validation("ImportToken is not a token GetParametersForImport returned") from None
    try:
        key = call.ledger.import_key(name, spec=IMPORT_SPEC, wrapped=wrapped, token=token)
    except (InvalidInput, PolicyViolation) as exc:
        raise _token_error(exc) from None
    return {"KeyId": call.arn(key.key_id)}


def _token_error(exc: InvalidInput | PolicyViolation) -> ApiError:
    """AWS's import-token exceptions for keyledger's token refusals (already audited by
    ``import_key``); any other refusal as ``faults`` maps it."""
    text = str(exc)
    if "token expired" in text:
        return Recorded("ExpiredImportTokenException", text, 400)
    if "import token" in text or text.startswith("token must"):
        return Recorded("InvalidImportTokenException", text, 400)
    error = to_api_error(exc)
    return Recorded(error.code, error.message, error.status)


OPERATIONS = {"GetParametersForImport": get_parameters_for_import,
              "ImportKeyMaterial": import_key_material}

__all__ = ["OPERATIONS"]
