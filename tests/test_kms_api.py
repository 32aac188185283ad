"""The AWS KMS JSON API (``keyledger.server.kms.dispatch``) on a real SoftHSM2 home.

Requests are the JSON bodies botocore sends (its own serializer, from its KMS service model,
after its parameter validation); responses are parsed back with botocore's JSON parser, and
every member they carry must be one the model declares. Each test checks what the ledger
recorded: principal, action, key, outcome.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

import botocore.session
import pytest
from botocore.parsers import JSONParser
from botocore.serialize import create_serializer
from botocore.validate import ParamValidator
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding

import keyledger as kl
from keyledger.server.errors import ApiError
from keyledger.server.kms import KmsConfig, dispatch

MODEL = botocore.session.get_session().get_service_model("kms")
SERIALIZER = create_serializer("json")
PARSER = JSONParser()
CONFIG = KmsConfig()
CTX = {"tenant": "acme", "purpose": "kms-test"}


def _declared(shape: Any, value: Any, where: str) -> None:
    """Every member of ``value`` is declared by ``shape`` (botocore's parser drops others)."""
    if shape.type_name == "structure":
        extra = set(value) - set(shape.members)
        assert not extra, f"{where}: members not in the KMS model: {extra}"
        for k, v in value.items():
            _declared(shape.members[k], v, f"{where}.{k}")
    elif shape.type_name == "list":
        for i, v in enumerate(value):
            _declared(shape.member, v, f"{where}[{i}]")


def kms(ledger: kl.KeyLedger, operation: str, **params: Any) -> dict[str, Any]:
    """One call as an AWS SDK makes it: validate, serialize, dispatch, parse the response."""
    op = MODEL.operation_model(operation)
    report = ParamValidator().validate(params, op.input_shape)
    assert not report.has_errors(), report.generate_report()
    request = SERIALIZER.serialize_to_request(params, op)
    body = json.loads(request["body"] or b"{}")
    out = dispatch(ledger, operation, body, config=CONFIG)
    raw = json.dumps(out).encode()  # must be JSON as it is
    if op.output_shape is None:
        assert out == {}
        return {}
    _declared(op.output_shape, out, operation)
    return PARSER.parse({"status_code": 200, "headers": {}, "body": raw}, op.output_shape)


def refused(ledger: kl.KeyLedger, operation: str, code: str, *, raw: Any = None,
            **params: Any) -> ApiError:
    """The ApiError a call gets (``raw``: a body sent as is, not through botocore); its
    wire form parses in botocore to the same code."""
    with pytest.raises(ApiError) as info:
        if raw is not None:
            dispatch(ledger, operation, raw, config=CONFIG)
        else:
            kms(ledger, operation, **params)
    err = info.value
    assert err.code == code, str(err)
    assert err.status == (412 if code == "DryRunOperationException" else
                          500 if code == "KMSInternalException" else 400)
    op = MODEL.operation_model(operation)
    parsed = PARSER.parse({"status_code": err.status, "headers": {}, "body": err.body()},
                          op.output_shape)
    assert parsed["Error"]["Code"] == code
    return err


def last(ledger: kl.KeyLedger, action: str, principal: str = "alice") -> dict[str, Any]:
    """The newest audit record of ``action`` by ``principal``."""
    ledger.flush_audit()
    frame = ledger.audit(action=action, principal=principal, newest_first=True, limit=1)
    assert len(frame), f"no {action} record of {principal}"
    return frame.iloc[0].to_dict()


def new_key(ledger: kl.KeyLedger, **params: Any) -> dict[str, Any]:
    return kms(ledger, "CreateKey", **params)["KeyMetadata"]


@pytest.fixture
def bob(ledger: kl.KeyLedger, clock):
    led = kl.open(ledger.home, principal="bob", clock=clock)
    yield led
    led.close()


# -- key ids and metadata --------------------------------------------------------------------
def test_create_key_and_every_key_id_form(ledger):
    meta = new_key(ledger, Tags=[{"TagKey": "team", "TagValue": "pay"}])
    assert meta["KeySpec"] == "SYMMETRIC_DEFAULT" and meta["KeyUsage"] == "ENCRYPT_DECRYPT"
    assert meta["KeyState"] == "Enabled" and meta["Enabled"] is True
    assert meta["Arn"] == f"arn:aws:kms:us-east-1:111122223333:key/{meta['KeyId']}"
    assert meta["EncryptionAlgorithms"] == ["SYMMETRIC_DEFAULT"]
    name = ledger.list_keys().set_index("key_id").loc[meta["KeyId"], "name"]
    assert name.startswith("kms-")
    rec = last(ledger, "create_key")
    assert (rec["key"], rec["outcome"], rec["version"]) == (name, "ok", 1)
    kms(ledger, "CreateAlias", AliasName="alias/payments", TargetKeyId=meta["KeyId"])
    forms = [meta["KeyId"], meta["Arn"], f"alias/{name}", "alias/payments",
             f"arn:aws:kms:us-east-1:111122223333:alias/{name}",
             "arn:aws:kms:us-east-1:111122223333:alias/payments"]
    for form in forms:
        got = kms(ledger, "DescribeKey", KeyId=form)["KeyMetadata"]
        assert got["KeyId"] == meta["KeyId"], form
        rec = last(ledger, "get_key")
        assert (rec["key"], rec["outcome"]) == (name, "ok")


def test_unknown_and_foreign_key_ids_are_not_found_and_audited(ledger):
    meta = new_key(ledger)
    refused(ledger, "DescribeKey", "NotFoundException",
            KeyId="0b6a4e0e-1111-4222-8333-944445555666")
    rec = last(ledger, "get_key")
    assert (rec["outcome"], rec["error"]) == ("failed", "KeyNotFound")
    refused(ledger, "DescribeKey", "NotFoundException",
            KeyId=f"arn:aws:kms:eu-west-1:999999999999:key/{meta['KeyId']}")
    rec = last(ledger, "kms:DescribeKey")
    assert rec["outcome"] == "failed" and "NotFoundException" in rec["detail"]
    refused(ledger, "DescribeKey", "NotFoundException", KeyId="alias/nothing-here")


def test_list_keys_aliases_and_paging(ledger):
    ids = [new_key(ledger)["KeyId"] for _ in range(3)]
    page = kms(ledger, "ListKeys", Limit=2)
    assert len(page["Keys"]) == 2 and page["Truncated"] is True
    rest = kms(ledger, "ListKeys", Limit=2, Marker=page["NextMarker"])
    assert rest["Truncated"] is False
    listed = [k["KeyId"] for k in page["Keys"] + rest["Keys"]]
    assert sorted(listed) == sorted(ids)
    assert all(k["KeyArn"].endswith(k["KeyId"]) for k in page["Keys"])
    kms(ledger, "CreateAlias", AliasName="alias/orders/v1", TargetKeyId=ids[0])
    aliases = kms(ledger, "ListAliases", KeyId=ids[0])["Aliases"]
    assert {a["TargetKeyId"] for a in aliases} == {ids[0]}
    assert "alias/orders/v1" in {a["AliasName"] for a in aliases} and len(aliases) == 2
    assert last(ledger, "list_keys")["outcome"] == "ok"
    refused(ledger, "ListKeys", "InvalidMarkerException", Marker="garbage")


def test_alias_rules(ledger):
    kid = new_key(ledger)["KeyId"]
    kms(ledger, "CreateAlias", AliasName="alias/app", TargetKeyId=kid)
    assert last(ledger, "set_alias")["outcome"] == "ok"
    refused(ledger, "CreateAlias", "AlreadyExistsException", AliasName="alias/app",
            TargetKeyId=kid)
    assert last(ledger, "set_alias")["error"] == "KeyExists"
    for bad in ("app", "alias/aws/mine", "alias/white space"):
        refused(ledger, "CreateAlias", "InvalidAliasNameException", raw={
            "AliasName": bad, "TargetKeyId": kid})
    assert "InvalidAliasNameException" in last(ledger, "kms:CreateAlias")["detail"]
    other = new_key(ledger)["KeyId"]
    kms(ledger, "UpdateAlias", AliasName="alias/app", TargetKeyId=other)
    assert kms(ledger, "DescribeKey", KeyId="alias/app")["KeyMetadata"]["KeyId"] == other
    rec = last(ledger, "move_alias")
    assert rec["outcome"] == "ok" and rec["detail"].startswith("alias app moved from kms-")
    kms(ledger, "DeleteAlias", AliasName="alias/app")
    assert last(ledger, "remove_alias")["outcome"] == "ok"
    refused(ledger, "DescribeKey", "NotFoundException", KeyId="alias/app")
    refused(ledger, "DeleteAlias", "NotFoundException", AliasName="alias/app")
    name = ledger.list_keys().set_index("key_id").loc[kid, "name"]
    refused(ledger, "DeleteAlias", "ValidationException", AliasName=f"alias/{name}")
    assert last(ledger, "remove_alias")["error"] == "InvalidInput"
    assert kms(ledger, "DescribeKey", KeyId=f"alias/{name}")["KeyMetadata"]["KeyId"] == kid


def test_alias_changes_need_admin_on_the_keys(ledger, bob):
    kid = new_key(ledger)["KeyId"]
    kms(ledger, "CreateAlias", AliasName="alias/shared", TargetKeyId=kid)
    ledger.grant("*", "bob", "user")
    refused(bob, "DeleteAlias", "AccessDeniedException", AliasName="alias/shared")
    rec = last(ledger, "remove_alias", principal="bob")
    assert (rec["outcome"], rec["error"]) == ("denied", "AccessDenied")
    refused(bob, "UpdateAlias", "AccessDeniedException", AliasName="alias/shared",
            TargetKeyId=kid)
    assert kms(ledger, "DescribeKey", KeyId="alias/shared")["KeyMetadata"]["KeyId"] == kid


def test_tags(ledger):
    kid = new_key(ledger, Tags=[{"TagKey": "team", "TagValue": "pay"}])["KeyId"]
    kms(ledger, "TagResource", KeyId=kid, Tags=[{"TagKey": "env", "TagValue": "prod"}])
    tags = kms(ledger, "ListResourceTags", KeyId=kid)["Tags"]
    assert tags == [{"TagKey": "env", "TagValue": "prod"}, {"TagKey": "team", "TagValue": "pay"}]
    kms(ledger, "UntagResource", KeyId=kid, TagKeys=["team"])
    assert kms(ledger, "ListResourceTags", KeyId=kid)["Tags"] == [
        {"TagKey": "env", "TagValue": "prod"}]
    assert last(ledger, "set_tags")["outcome"] == "ok"
    refused(ledger, "TagResource", "TagException", KeyId=kid,
            Tags=[{"TagKey": "aws:x", "TagValue": "1"}])
    refused(ledger, "TagResource", "ValidationException", raw={
        "KeyId": kid, "Tags": [{"TagKey": "k" * 129, "TagValue": "v"}]})
    refused(ledger, "TagResource", "ValidationException", raw={
        "KeyId": kid, "Tags": [{"TagKey": "k", "TagValue": "v" * 257}]})


# -- encryption ------------------------------------------------------------------------------
def test_encrypt_decrypt_round_trip_without_key_id(ledger):
    meta = new_key(ledger)
    out = kms(ledger, "Encrypt", KeyId=meta["KeyId"], Plaintext=b"secret", EncryptionContext=CTX)
    assert out["KeyId"] == meta["Arn"] and out["EncryptionAlgorithm"] == "SYMMETRIC_DEFAULT"
    assert out["CiphertextBlob"][:2] == b"KL"  # keyledger's self-describing format
    rec = last(ledger, "encrypt")
    assert rec["outcome"] == "ok" and json.loads(rec["context"]) == CTX
    back = kms(ledger, "Decrypt", CiphertextBlob=out["CiphertextBlob"], EncryptionContext=CTX)
    assert back["Plaintext"] == b"secret" and back["KeyId"] == meta["Arn"]
    rec = last(ledger, "decrypt")
    assert rec["outcome"] == "ok" and rec["version"] == 1
    # a keyledger ciphertext made by the Python API decrypts through the KMS API too
    name = rec["key"]
    blob = ledger.encrypt(name, b"from python", context=CTX)
    assert kms(ledger, "Decrypt", CiphertextBlob=blob, KeyId=meta["KeyId"],
               EncryptionContext=CTX)["Plaintext"] == b"from python"


def test_decrypt_refusals(ledger):
    a, b = new_key(ledger), new_key(ledger)
    blob = kms(ledger, "Encrypt", KeyId=a["KeyId"], Plaintext=b"x", EncryptionContext=CTX)[
        "CiphertextBlob"]
    refused(ledger, "Decrypt", "IncorrectKeyException", CiphertextBlob=blob, KeyId=b["KeyId"],
            EncryptionContext=CTX)
    rec = last(ledger, "kms:Decrypt")
    assert rec["outcome"] == "failed" and "IncorrectKeyException" in rec["detail"]
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    refused(ledger, "Decrypt", "InvalidCiphertextException", CiphertextBlob=tampered,
            EncryptionContext=CTX)
    rec = last(ledger, "decrypt")
    assert (rec["outcome"], rec["error"]) == ("failed", "InvalidCiphertext")
    refused(ledger, "Decrypt", "InvalidCiphertextException", CiphertextBlob=blob,
            EncryptionContext={"tenant": "other"})
    assert "context" in last(ledger, "decrypt")["detail"]
    refused(ledger, "Decrypt", "InvalidCiphertextException", CiphertextBlob=b"not keyledger")
    assert last(ledger, "decrypt")["detail"] == "malformed ciphertext"


def test_disabled_and_pending_deletion_keys(ledger):
    kid = new_key(ledger)["KeyId"]
    kms(ledger, "DisableKey", KeyId=kid)
    assert kms(ledger, "DescribeKey", KeyId=kid)["KeyMetadata"]["KeyState"] == "Disabled"
    refused(ledger, "Encrypt", "DisabledException", KeyId=kid, Plaintext=b"x")
    rec = last(ledger, "encrypt")
    assert (rec["outcome"], rec["error"]) == ("failed", "KeyStateError")
    kms(ledger, "EnableKey", KeyId=kid)
    kms(ledger, "Encrypt", KeyId=kid, Plaintext=b"x")
    refused(ledger, "ScheduleKeyDeletion", "ValidationException", KeyId=kid,
            PendingWindowInDays=6)
    out = kms(ledger, "ScheduleKeyDeletion", KeyId=kid, PendingWindowInDays=7)
    assert out["KeyState"] == "PendingDeletion" and out["PendingWindowInDays"] == 7
    assert out["KeyId"] == CONFIG.key_arn(kid)
    meta = kms(ledger, "DescribeKey", KeyId=kid)["KeyMetadata"]
    assert meta["KeyState"] == "PendingDeletion" and meta["DeletionDate"] == out["DeletionDate"]
    refused(ledger, "Encrypt", "KMSInvalidStateException", KeyId=kid, Plaintext=b"x")
    assert last(ledger, "schedule_deletion")["outcome"] == "ok"
    kms(ledger, "CancelKeyDeletion", KeyId=kid)
    assert kms(ledger, "DescribeKey", KeyId=kid)["KeyMetadata"]["KeyState"] == "Enabled"


def test_principal_without_the_role_is_denied_and_recorded(ledger, bob):
    kid = new_key(ledger)["KeyId"]
    refused(bob, "Encrypt", "AccessDeniedException", KeyId=kid, Plaintext=b"x")
    rec = last(ledger, "encrypt", principal="bob")
    assert rec["outcome"] == "denied" and rec["error"] == "AccessDenied"
    refused(bob, "CreateKey", "AccessDeniedException")
    assert last(ledger, "create_key", principal="bob")["outcome"] == "denied"
    refused(bob, "Encrypt", "AccessDeniedException", KeyId=kid, Plaintext=b"x", DryRun=True)
    assert last(ledger, "dry_run", principal="bob")["outcome"] == "denied"


def test_dry_run(ledger):
    kid = new_key(ledger)["KeyId"]
    refused(ledger, "Encrypt", "DryRunOperationException", KeyId=kid, Plaintext=b"x",
            DryRun=True)
    rec = last(ledger, "dry_run")
    assert rec["outcome"] == "ok" and "Encrypt" in rec["detail"]
    ledger.flush_audit()
    assert not len(ledger.audit(action="encrypt"))  # nothing was encrypted


def test_malformed_fields_are_validation_errors(ledger):
    kid = new_key(ledger)["KeyId"]
    cases = [
        ("Encrypt", {"Plaintext": "eA=="}),  # no KeyId
        ("Encrypt", {"KeyId": kid, "Plaintext": "not base64!"}),
        ("Encrypt", {"KeyId": kid, "Plaintext": base64.b64encode(b"x" * 4097).decode()}),
        ("Encrypt", {"KeyId": kid, "Plaintext": ""}),
        ("Encrypt", {"KeyId": 7, "Plaintext": "eA=="}),
        ("Encrypt", {"KeyId": kid, "Plaintext": "eA==", "EncryptionContext": {"a": 1}}),
        ("Encrypt", {"KeyId": kid, "Plaintext": "eA==", "DryRun": "yes"}),
        ("GenerateRandom", {"NumberOfBytes": 0}),
        ("GenerateRandom", {"NumberOfBytes": 1025}),
        ("GenerateRandom", {"NumberOfBytes": "5"}),
        ("GenerateRandom", {"NumberOfBytes": True}),
        ("GenerateDataKey", {"KeyId": kid}),
        ("GenerateDataKey", {"KeyId": kid, "KeySpec": "AES_256", "NumberOfBytes": 32}),
        ("GenerateDataKey", {"KeyId": kid, "KeySpec": "AES_512"}),
        ("Decrypt", {}),
        ("ListKeys", {"Limit": 0}),
        ("DescribeKey", []),
    ]
    for operation, body in cases:
        err = refused(ledger, operation, "ValidationException", raw=body)
        assert err.message, (operation, body)
    rec = last(ledger, "kms:Encrypt")
    assert rec["outcome"] == "failed" and rec["detail"].startswith("ValidationException")
    with pytest.raises(ApiError) as info:
        dispatch(ledger, "NoSuchOperation", {})
    assert info.value.code == "UnsupportedOperationException"
    assert "UnsupportedOperationException" in last(ledger, "kms:unknown")["detail"]


def test_generate_data_keys_and_random(ledger):
    kid = new_key(ledger)["KeyId"]
    out = kms(ledger, "GenerateDataKey", KeyId=kid, KeySpec="AES_256", EncryptionContext=CTX)
    assert len(out["Plaintext"]) == 32
    assert last(ledger, "generate_data_key")["outcome"] == "ok"
    assert kms(ledger, "Decrypt", CiphertextBlob=out["CiphertextBlob"],
               EncryptionContext=CTX)["Plaintext"] == out["Plaintext"]
    small = kms(ledger, "GenerateDataKey", KeyId=kid, KeySpec="AES_128")
    assert len(small["Plaintext"]) == 16
    big = kms(ledger, "GenerateDataKeyWithoutPlaintext", KeyId=kid, NumberOfBytes=64)
    assert "Plaintext" not in big
    assert len(kms(ledger, "Decrypt", CiphertextBlob=big["CiphertextBlob"])["Plaintext"]) == 64
    rnd = kms(ledger, "GenerateRandom", NumberOfBytes=48)["Plaintext"]
    assert len(rnd) == 48
    rec = last(ledger, "generate_random")
    assert rec["outcome"] == "ok" and rec["detail"] == "48 bytes from os.urandom"


def test_re_encrypt(ledger):
    a, b = new_key(ledger), new_key(ledger)
    blob = kms(ledger, "Encrypt", KeyId=a["KeyId"], Plaintext=b"move me",
               EncryptionContext=CTX)["CiphertextBlob"]
    out = kms(ledger, "ReEncrypt", CiphertextBlob=blob, SourceEncryptionContext=CTX,
              DestinationKeyId=b["KeyId"], DestinationEncryptionContext={"new": "ctx"})
    assert out["SourceKeyId"] == a["Arn"] and out["KeyId"] == b["Arn"]
    assert kms(ledger, "Decrypt", CiphertextBlob=out["CiphertextBlob"],
               EncryptionContext={"new": "ctx"})["Plaintext"] == b"move me"
    kms(ledger, "RotateKeyOnDemand", KeyId=a["KeyId"])
    same = kms(ledger, "ReEncrypt", CiphertextBlob=blob, SourceEncryptionContext=CTX,
               DestinationKeyId=a["KeyId"], DestinationEncryptionContext=CTX)
    rec = last(ledger, "rewrap")
    assert rec["outcome"] == "ok" and rec["version"] == 2 and rec["detail"] == "from v1"
    assert same["CiphertextBlob"] != blob
    refused(ledger, "ReEncrypt", "IncorrectKeyException", CiphertextBlob=blob,
            SourceKeyId=b["KeyId"], DestinationKeyId=a["KeyId"], SourceEncryptionContext=CTX)
    signer = new_key(ledger, KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")["KeyId"]
    ledger.flush_audit()
    decrypts = len(ledger.audit(action="decrypt"))
    refused(ledger, "ReEncrypt", "InvalidKeyUsageException", CiphertextBlob=blob,
            SourceEncryptionContext=CTX, DestinationKeyId=signer)
    assert last(ledger, "encrypt")["error"] == "PolicyViolation"
    assert len(ledger.audit(action="decrypt")) == decrypts  # nothing was decrypted for it


# -- signatures and MACs ---------------------------------------------------------------------
@pytest.mark.parametrize("spec, alg", [
    ("ECC_NIST_P256", "ECDSA_SHA_256"), ("ECC_NIST_P384", "ECDSA_SHA_384"),
    ("RSA_2048", "RSASSA_PSS_SHA_256"), ("ECC_NIST_EDWARDS25519", "ED25519_SHA_512")])
def test_sign_then_verify_with_cryptography(ledger, spec, alg):
    meta = new_key(ledger, KeySpec=spec, KeyUsage="SIGN_VERIFY")
    assert meta["SigningAlgorithms"] == [alg]
    message = b"pay 42 EUR to bob"
    sig = kms(ledger, "Sign", KeyId=meta["KeyId"], Message=message, MessageType="RAW",
              SigningAlgorithm=alg)
    assert sig["SigningAlgorithm"] == alg and sig["KeyId"] == meta["Arn"]
    assert last(ledger, "sign")["outcome"] == "ok"
    pub = kms(ledger, "GetPublicKey", KeyId=meta["KeyId"])
    assert pub["KeySpec"] == spec and pub["SigningAlgorithms"] == [alg]
    key = serialization.load_der_public_key(pub["PublicKey"])
    if isinstance(key, ec.EllipticCurvePublicKey):
        h = hashes.SHA256() if alg.endswith("256") else hashes.SHA384()
        key.verify(sig["Signature"], message, ec.ECDSA(h))
    elif isinstance(key, rsa.RSAPublicKey):
        key.verify(sig["Signature"], message, padding.PSS(padding.MGF1(hashes.SHA256()), 32),
                   hashes.SHA256())
    else:
        assert isinstance(key, ed25519.Ed25519PublicKey)
        key.verify(sig["Signature"], message)
    with pytest.raises(InvalidSignature):
        key.verify(sig["Signature"], b"other", *(() if isinstance(key, ed25519.Ed25519PublicKey)
                                                  else _verify_args(key, alg)))
    ok = kms(ledger, "Verify", KeyId=meta["KeyId"], Message=message, Signature=sig["Signature"],
             SigningAlgorithm=alg)
    assert ok["SignatureValid"] is True
    refused(ledger, "Verify", "KMSInvalidSignatureException", KeyId=meta["KeyId"],
            Message=b"tampered", Signature=sig["Signature"], SigningAlgorithm=alg)
    rec = last(ledger, "verify")
    assert rec["outcome"] == "ok" and rec["detail"] == "signature did not verify"
    ledger.flush_audit()
    assert not len(ledger.audit(action="kms:Verify"))  # one record per call, not two
    refused(ledger, "Sign", "InvalidKeyUsageException", KeyId=meta["KeyId"], Message=message,
            SigningAlgorithm="ECDSA_SHA_512")


def _verify_args(key: Any, alg: str) -> tuple:
    if isinstance(key, rsa.RSAPublicKey):
        return (padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())
    return (ec.ECDSA(hashes.SHA256() if alg.endswith("256") else hashes.SHA384()),)


def test_wrong_usage_is_invalid_key_usage(ledger):
    enc = new_key(ledger)["KeyId"]
    refused(ledger, "Sign", "InvalidKeyUsageException", KeyId=enc, Message=b"m",
            SigningAlgorithm="ECDSA_SHA_256")
    assert last(ledger, "sign")["error"] == "PolicyViolation"
    refused(ledger, "GetPublicKey", "UnsupportedOperationException", KeyId=enc)
    refused(ledger, "Sign", "UnsupportedOperationException", KeyId=enc, Message=b"m" * 32,
            MessageType="DIGEST", SigningAlgorithm="ECDSA_SHA_256")


def test_mac_round_trip(ledger):
    meta = new_key(ledger, KeySpec="HMAC_256", KeyUsage="GENERATE_VERIFY_MAC")
    assert meta["MacAlgorithms"] == ["HMAC_SHA_256"]
    mac = kms(ledger, "GenerateMac", KeyId=meta["KeyId"], Message=b"hello",
              MacAlgorithm="HMAC_SHA_256")
    assert len(mac["Mac"]) == 32 and last(ledger, "mac")["outcome"] == "ok"
    ok = kms(ledger, "VerifyMac", KeyId=meta["KeyId"], Message=b"hello", Mac=mac["Mac"],
             MacAlgorithm="HMAC_SHA_256")
    assert ok["MacValid"] is True
    refused(ledger, "VerifyMac", "KMSInvalidMacException", KeyId=meta["KeyId"],
            Message=b"hellO", Mac=mac["Mac"], MacAlgorithm="HMAC_SHA_256")
    assert last(ledger, "verify_mac")["detail"] == "signature did not verify"
    refused(ledger, "GenerateMac", "InvalidKeyUsageException", KeyId=meta["KeyId"],
            Message=b"hello", MacAlgorithm="HMAC_SHA_512")


def test_create_key_refusals(ledger):
    refused(ledger, "CreateKey", "UnsupportedOperationException", KeySpec="ECC_NIST_P521",
            KeyUsage="SIGN_VERIFY")
    refused(ledger, "CreateKey", "UnsupportedOperationException", KeySpec="RSA_2048",
            KeyUsage="ENCRYPT_DECRYPT")
    refused(ledger, "CreateKey", "ValidationException", KeySpec="HMAC_256",
            KeyUsage="SIGN_VERIFY")
    refused(ledger, "CreateKey", "UnsupportedOperationException", Origin="EXTERNAL")
    refused(ledger, "CreateKey", "UnsupportedOperationException", MultiRegion=True)
    assert "UnsupportedOperationException" in last(ledger, "kms:CreateKey")["detail"]


# -- rotation --------------------------------------------------------------------------------
def test_rotation_operations(ledger):
    kid = new_key(ledger)["KeyId"]
    status = kms(ledger, "GetKeyRotationStatus", KeyId=kid)
    assert status["KeyRotationEnabled"] is True and status["RotationPeriodInDays"] == 90
    kms(ledger, "EnableKeyRotation", KeyId=kid, RotationPeriodInDays=90)
    assert last(ledger, "set_policy")["outcome"] == "ok"
    refused(ledger, "EnableKeyRotation", "ValidationException", raw={
        "KeyId": kid, "RotationPeriodInDays": 30})
    assert kms(ledger, "ListKeyRotations", KeyId=kid)["Rotations"] == []
    assert kms(ledger, "RotateKeyOnDemand", KeyId=kid)["KeyId"] == kid
    assert last(ledger, "rotate")["version"] == 2
    rotations = kms(ledger, "ListKeyRotations", KeyId=kid)["Rotations"]
    assert len(rotations) == 1 and rotations[0]["KeyId"] == kid
    kms(ledger, "DisableKeyRotation", KeyId=kid)
    assert kms(ledger, "GetKeyRotationStatus", KeyId=kid)["KeyRotationEnabled"] is False


# -- import (BYOK) ---------------------------------------------------------------------------
def test_import_key_material(ledger):
    caps = ledger.capabilities().supports
    alg = ("RSA_AES_KEY_WRAP_SHA_256" if caps.get("RSA_OAEP_SHA256")
           else "RSA_AES_KEY_WRAP_SHA_1")
    other = ("RSA_AES_KEY_WRAP_SHA_1" if alg.endswith("256") else "RSA_AES_KEY_WRAP_SHA_256")
    refused(ledger, "GetParametersForImport", "UnsupportedOperationException",
            KeyId="alias/byok", WrappingAlgorithm=other, WrappingKeySpec="RSA_3072")
    refused(ledger, "GetParametersForImport", "UnsupportedOperationException",
            KeyId="alias/byok", WrappingAlgorithm=alg, WrappingKeySpec="RSA_2048")
    params = kms(ledger, "GetParametersForImport", KeyId="alias/byok", WrappingAlgorithm=alg,
                 WrappingKeySpec="RSA_3072")
    assert last(ledger, "import_parameters")["outcome"] == "ok"
    # what an AWS client does for RSA_AES_KEY_WRAP_SHA_*: OAEP of a one-time AES key + KWP
    public = serialization.load_der_public_key(params["PublicKey"])
    assert isinstance(public, rsa.RSAPublicKey)
    h = hashes.SHA256() if alg.endswith("256") else hashes.SHA1()
    material, ephemeral = os.urandom(32), os.urandom(32)
    wrapped = public.encrypt(ephemeral, padding.OAEP(padding.MGF1(h), h, None)) + \
        aes_key_wrap_with_padding(ephemeral, material)
    refused(ledger, "ImportKeyMaterial", "UnsupportedOperationException", KeyId="alias/byok",
            ImportToken=params["ImportToken"], EncryptedKeyMaterial=wrapped,
            ExpirationModel="KEY_MATERIAL_EXPIRES")
    refused(ledger, "ImportKeyMaterial", "UnsupportedOperationException",
            KeyId="0b6a4e0e-1111-4222-8333-944445555666", ImportToken=params["ImportToken"],
            EncryptedKeyMaterial=wrapped)
    refused(ledger, "ImportKeyMaterial", "InvalidImportTokenException", KeyId="alias/byok",
            ImportToken=b"not-the-token", EncryptedKeyMaterial=wrapped)
    rec = last(ledger, "import_key")
    assert rec["outcome"] == "failed" and rec["error"] == "InvalidInput"
    refused(ledger, "ImportKeyMaterial", "InvalidImportTokenException", KeyId="alias/other",
            ImportToken=params["ImportToken"], EncryptedKeyMaterial=wrapped)
    assert last(ledger, "import_key")["error"] == "PolicyViolation"
    refused(ledger, "ImportKeyMaterial", "ValidationException", KeyId="alias/byok",
            ImportToken=params["ImportToken"], EncryptedKeyMaterial=wrapped[:-8])
    ledger.flush_audit()  # the two refusals above made here; the token ones by import_key
    assert len(ledger.audit(action="kms:ImportKeyMaterial")) == 2
    out = kms(ledger, "ImportKeyMaterial", KeyId="alias/byok", ImportToken=params["ImportToken"],
              EncryptedKeyMaterial=wrapped, ExpirationModel="KEY_MATERIAL_DOES_NOT_EXPIRE")
    assert last(ledger, "import_key")["outcome"] == "ok"
    blob = kms(ledger, "Encrypt", KeyId=out["KeyId"], Plaintext=b"mine")["CiphertextBlob"]
    assert kms(ledger, "Decrypt", CiphertextBlob=blob)["Plaintext"] == b"mine"


# -- never a 500 -----------------------------------------------------------------------------
_WRONG = {"string": [1], "blob": 5, "integer": "5", "boolean": "true", "timestamp": "soon",
          "structure": "x", "list": "x", "map": ["x"]}


def test_every_field_of_every_operation_mistyped_is_a_4xx(ledger):
    """Each member the KMS model declares, sent with the wrong JSON type (alone, and next to a
    real KeyId), is refused with a 4xx ApiError or ignored: never a 500 or another exception."""
    from keyledger.server.kms import OPERATIONS

    kid = new_key(ledger)["KeyId"]
    for operation in OPERATIONS:
        members = MODEL.operation_model(operation).input_shape.members
        for member, shape in members.items():
            for base in ({}, {"KeyId": kid}):
                body = {**base, member: _WRONG[shape.type_name]}
                try:
                    dispatch(ledger, operation, body, config=CONFIG)
                except ApiError as err:
                    assert err.status < 500, (operation, member, str(err))


# -- keys made in Python, and states AWS lacks -------------------------------------------------
def test_python_keys_deactivated_and_destroyed_states(ledger, clock):
    ledger.create_key("legacy", spec="AES_128")
    meta = kms(ledger, "DescribeKey", KeyId="alias/legacy")["KeyMetadata"]
    assert meta["KeySpec"] == "SYMMETRIC_DEFAULT" and meta["KeyState"] == "Enabled"
    assert "alias/legacy" in {a["AliasName"] for a in kms(ledger, "ListAliases")["Aliases"]}
    blob = kms(ledger, "Encrypt", KeyId="alias/legacy", Plaintext=b"old")["CiphertextBlob"]
    ledger.deactivate("legacy")
    assert kms(ledger, "DescribeKey", KeyId="alias/legacy")["KeyMetadata"]["KeyState"] == \
        "Disabled"
    refused(ledger, "Encrypt", "KMSInvalidStateException", KeyId="alias/legacy", Plaintext=b"x")
    assert kms(ledger, "Decrypt", CiphertextBlob=blob)["Plaintext"] == b"old"  # still processes
    kms(ledger, "ScheduleKeyDeletion", KeyId="alias/legacy", PendingWindowInDays=7)
    clock.advance(days=8)
    ledger.destroy("legacy")
    meta = kms(ledger, "DescribeKey", KeyId="alias/legacy")["KeyMetadata"]
    assert meta["KeyState"] == "Unavailable" and meta["Enabled"] is False
    assert meta["KeyId"] not in {k["KeyId"] for k in kms(ledger, "ListKeys")["Keys"]}
    refused(ledger, "Decrypt", "KMSInvalidStateException", CiphertextBlob=blob)
    rec = last(ledger, "decrypt")
    assert (rec["key"], rec["outcome"], rec["error"]) == ("legacy", "failed", "KeyStateError")


# -- a real boto3 client, its HTTP layer replaced by dispatch -----------------------------------
class _Raw:
    """The body botocore's response reads (``stream()``/``read()``)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def stream(self, **_: Any):
        yield self.data

    def read(self, *_: Any) -> bytes:
        return self.data


@pytest.fixture
def boto_kms(ledger):
    """``boto3.client("kms")`` whose requests (signed, serialized as on the wire) are answered
    by ``dispatch`` in process: botocore's own parsing, error classes and retries apply."""
    import boto3
    from botocore.awsrequest import AWSResponse

    client = boto3.client("kms", region_name="us-east-1", endpoint_url="http://kms.invalid",
                          aws_access_key_id="AKIDEXAMPLE", aws_secret_access_key="secret")

    def answer(request, **_: Any) -> AWSResponse:
        target = request.headers["X-Amz-Target"].decode()
        assert target.startswith("TrentService.")
        assert request.headers["Content-Type"] == b"application/x-amz-json-1.1"
        try:
            body = json.dumps(dispatch(ledger, target.split(".", 1)[1],
                                       json.loads(request.body or b"{}"), config=CONFIG))
            status = 200
        except ApiError as err:
            body, status = err.body().decode(), err.status
        return AWSResponse(request.url, status, {"Content-Type": "application/x-amz-json-1.1"},
                           _Raw(body.encode()))

    client.meta.events.register("before-send.kms", answer)
    return client


def test_boto3_client_round_trip_and_errors(ledger, boto_kms):
    meta = boto_kms.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")["KeyMetadata"]
    assert meta["CreationDate"].tzinfo is not None  # botocore parsed the timestamp
    sig = boto_kms.sign(KeyId=meta["Arn"], Message=b"m", SigningAlgorithm="ECDSA_SHA_256")
    der = boto_kms.get_public_key(KeyId=meta["KeyId"])["PublicKey"]
    public = serialization.load_der_public_key(der)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(sig["Signature"], b"m", ec.ECDSA(hashes.SHA256()))
    kid = boto_kms.create_key()["KeyMetadata"]["KeyId"]
    blob = boto_kms.encrypt(KeyId=kid, Plaintext=b"hi", EncryptionContext=CTX)["CiphertextBlob"]
    assert boto_kms.decrypt(CiphertextBlob=blob, EncryptionContext=CTX)["Plaintext"] == b"hi"
    with pytest.raises(boto_kms.exceptions.InvalidCiphertextException):
        boto_kms.decrypt(CiphertextBlob=blob, EncryptionContext={"x": "y"})
    boto_kms.disable_key(KeyId=kid)
    with pytest.raises(boto_kms.exceptions.DisabledException):
        boto_kms.encrypt(KeyId=kid, Plaintext=b"hi")
    with pytest.raises(boto_kms.exceptions.NotFoundException):
        boto_kms.describe_key(KeyId="alias/missing")
    pages = boto_kms.get_paginator("list_aliases").paginate(PaginationConfig={"PageSize": 1})
    names = [a["AliasName"] for page in pages for a in page["Aliases"]]
    assert len(names) == 2 and all(n.startswith("alias/kms-") for n in names)
    rec = last(ledger, "encrypt")
    assert (rec["principal"], rec["outcome"], rec["error"]) == ("alice", "failed", "KeyStateError")


def test_random_bodies_never_crash(ledger):
    """Hypothesis: any JSON object with the operation's member names (and real KeyIds among
    the values) gets a JSON response or a 4xx ApiError, never another exception."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from keyledger.server.kms import OPERATIONS

    kid = new_key(ledger)["KeyId"]
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-2, 5000), st.text(max_size=20),
                        st.sampled_from([kid, CONFIG.key_arn(kid), "alias/x", "AAAA", "S0wB"]))
    values = st.recursive(scalars, lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
        max_leaves=6)

    @st.composite
    def requests(draw):
        operation = draw(st.sampled_from(sorted(OPERATIONS)))
        names = sorted(MODEL.operation_model(operation).input_shape.members)
        body = draw(st.dictionaries(st.sampled_from(names), values, max_size=4))
        return operation, body

    @settings(max_examples=150, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(requests())
    def check(request):
        operation, body = request
        try:
            json.dumps(dispatch(ledger, operation, body, config=CONFIG))
        except ApiError as err:
            assert err.status < 500, (operation, body, str(err))

    check()


def test_closed_ledger_is_an_api_error(ledger, bob):
    bob.close()
    err = refused(bob, "Encrypt", "KMSInvalidStateException", raw={"Plaintext": "eA=="})
    assert "closed" in err.message
