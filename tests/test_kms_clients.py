"""Existing AWS KMS clients against `keyledger serve`, unchanged but for the endpoint: boto3 (key
management, data keys, signatures checked with `cryptography` over GetPublicKey's DER key, MACs),
the AWS CLI, the AWS Encryption SDK for Python (StrictAwsKmsMasterKeyProvider on a key ARN) and
Node's @aws-sdk/client-kms. Every test checks the ledger: principal, action, key, outcome."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from pathlib import Path

import aws_encryption_sdk
import botocore.session
import pytest
from aws_encryption_sdk import CommitmentPolicy
from botocore.exceptions import ClientError
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from serve_support import AWS, REGION, audit, client, new_home, start

import keyledger as kl

ROOT = Path(__file__).resolve().parents[1]
NODE_CLIENT = ROOT / "tests" / "clients" / "kms_round_trip.mjs"


@pytest.fixture(scope="module")
def estate(tmp_path_factory, simulation_template):
    """A served home: admin ``admin`` (with an access key), ``app1`` a user of ``orders``."""
    home, keys = new_home(tmp_path_factory.mktemp("clients"), simulation_template)
    with kl.open(home, principal="admin") as led:
        keys["admin"] = led.create_access_key("admin").as_aws()
        led.create_key("orders", spec="AES_256", owner="payments")
        led.grant("orders", "app1", "user")
    server = start(home)
    yield server, keys
    assert server.stop() == 0, server.log.read_text()


def records(home: Path, principal: str, action: str):
    df = audit(home, principal=principal, action=action, limit=None)
    return df[["principal", "action", "key", "outcome"]]


def test_boto3_key_management_and_data_plane(estate):
    server, keys = estate
    admin, app = client(server.url, keys["admin"]), client(server.url, keys["app1"])
    made = admin.create_key(KeySpec="SYMMETRIC_DEFAULT", KeyUsage="ENCRYPT_DECRYPT",
                            Description="boto3")["KeyMetadata"]
    assert made["KeyState"] == "Enabled" and made["Arn"].startswith(f"arn:aws:kms:{REGION}:")
    admin.create_alias(AliasName="alias/boto-orders", TargetKeyId=made["KeyId"])
    assert "alias/boto-orders" in {a["AliasName"] for a in admin.list_aliases()["Aliases"]}
    # the app may not use a key it was not granted: refused and recorded
    with pytest.raises(ClientError) as denied:
        app.encrypt(KeyId="alias/boto-orders", Plaintext=b"x")
    assert denied.value.response["Error"]["Code"] == "AccessDeniedException"
    # on its own key: encrypt, decrypt (no KeyId needed), a data key, context enforced
    ctx = {"tenant": "acme"}
    blob = app.encrypt(KeyId="alias/orders", Plaintext=b"4111 1111", EncryptionContext=ctx)
    out = app.decrypt(CiphertextBlob=blob["CiphertextBlob"], EncryptionContext=ctx)
    assert out["Plaintext"] == b"4111 1111" and out["KeyId"] == blob["KeyId"]
    with pytest.raises(ClientError) as wrong:
        app.decrypt(CiphertextBlob=blob["CiphertextBlob"], EncryptionContext={"tenant": "x"})
    assert wrong.value.response["Error"]["Code"] == "InvalidCiphertextException"
    dk = app.generate_data_key(KeyId="alias/orders", KeySpec="AES_256")
    assert len(dk["Plaintext"]) == 32
    assert app.decrypt(CiphertextBlob=dk["CiphertextBlob"])["Plaintext"] == dk["Plaintext"]
    # a disabled key stops the app at once
    orders_id = admin.describe_key(KeyId="alias/orders")["KeyMetadata"]["KeyId"]
    admin.disable_key(KeyId=orders_id)
    with pytest.raises(ClientError) as disabled:
        app.encrypt(KeyId="alias/orders", Plaintext=b"x")
    assert disabled.value.response["Error"]["Code"] == "DisabledException"
    admin.enable_key(KeyId=orders_id)
    enc = records(server.home, "app1", "encrypt")
    assert {"ok", "denied", "failed"} <= set(enc["outcome"])
    assert set(enc[enc["outcome"] == "ok"]["key"]) == {"orders"}
    assert list(records(server.home, "admin", "disable")["key"]) == ["orders"]


def test_boto3_sign_verify_with_the_public_key_outside_and_macs(estate):
    server, keys = estate
    admin = client(server.url, keys["admin"])
    signer = admin.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")["KeyMetadata"]
    message = b"release 1.2.3"
    sig = admin.sign(KeyId=signer["KeyId"], Message=message, MessageType="RAW",
                     SigningAlgorithm="ECDSA_SHA_256")["Signature"]
    der = admin.get_public_key(KeyId=signer["KeyId"])["PublicKey"]
    public = serialization.load_der_public_key(der)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(sig, message, ec.ECDSA(hashes.SHA256()))  # cryptography, outside keyledger
    with pytest.raises(InvalidSignature):
        public.verify(sig, b"release 1.2.4", ec.ECDSA(hashes.SHA256()))
    assert admin.verify(KeyId=signer["KeyId"], Message=message, Signature=sig,
                        SigningAlgorithm="ECDSA_SHA_256")["SignatureValid"]
    with pytest.raises(ClientError) as bad:
        admin.verify(KeyId=signer["KeyId"], Message=b"other", Signature=sig,
                     SigningAlgorithm="ECDSA_SHA_256")
    assert bad.value.response["Error"]["Code"] == "KMSInvalidSignatureException"
    macker = admin.create_key(KeySpec="HMAC_256", KeyUsage="GENERATE_VERIFY_MAC")["KeyMetadata"]
    tag = admin.generate_mac(KeyId=macker["KeyId"], Message=b"m", MacAlgorithm="HMAC_SHA_256")
    assert admin.verify_mac(KeyId=macker["KeyId"], Message=b"m", Mac=tag["Mac"],
                            MacAlgorithm="HMAC_SHA_256")["MacValid"]
    signs = records(server.home, "admin", "sign")
    assert len(signs) == 1 and signs["outcome"].tolist() == ["ok"]


def test_the_aws_cli_encrypts_and_decrypts(estate, tmp_path):
    server, keys = estate
    env = {**os.environ, "AWS_ACCESS_KEY_ID": keys["app1"]["AccessKeyId"],
           "AWS_SECRET_ACCESS_KEY": keys["app1"]["SecretAccessKey"],
           "AWS_DEFAULT_REGION": REGION, "AWS_CONFIG_FILE": os.devnull,
           "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
    (tmp_path / "plain.txt").write_bytes(b"from the aws cli")
    kms = [str(AWS), "kms", "--endpoint-url", server.url]
    enc = subprocess.run([*kms, "encrypt", "--key-id", "alias/orders", "--plaintext",
                          f"fileb://{tmp_path / 'plain.txt'}", "--encryption-context",
                          "tool=cli", "--output", "text", "--query", "CiphertextBlob"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert enc.returncode == 0, enc.stderr
    (tmp_path / "ct.bin").write_bytes(base64.b64decode(enc.stdout.strip()))
    dec = subprocess.run([*kms, "decrypt", "--ciphertext-blob", f"fileb://{tmp_path / 'ct.bin'}",
                          "--encryption-context", "tool=cli", "--output", "text", "--query",
                          "Plaintext"], env=env, capture_output=True, text=True, timeout=120)
    assert dec.returncode == 0, dec.stderr
    assert base64.b64decode(dec.stdout.strip()) == b"from the aws cli"
    refused = subprocess.run([*kms, "schedule-key-deletion", "--key-id", "alias/orders"],
                             env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "AccessDeniedException" in refused.stderr
    denied = records(server.home, "app1", "schedule_deletion")
    assert denied["outcome"].tolist() == ["denied"] and denied["key"].tolist() == ["orders"]


def test_the_aws_encryption_sdk_round_trips_a_message_on_a_key_arn(estate, monkeypatch):
    server, keys = estate
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", server.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", keys["app1"]["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", keys["app1"]["SecretAccessKey"])
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    arn = client(server.url, keys["app1"]).describe_key(KeyId="alias/orders")["KeyMetadata"]["Arn"]
    sdk = aws_encryption_sdk.EncryptionSDKClient(
        commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT)
    provider = aws_encryption_sdk.StrictAwsKmsMasterKeyProvider(
        key_ids=[arn], botocore_session=botocore.session.Session())
    secret = b"patient 42: lab results" * 100
    message, header = sdk.encrypt(source=secret, key_provider=provider,
                                  encryption_context={"purpose": "lab"})
    assert secret not in message
    assert [k.key_provider.key_info.decode() for k in header.encrypted_data_keys] == [arn]
    plain, dec_header = sdk.decrypt(source=message, key_provider=provider)
    assert plain == secret and dec_header.encryption_context["purpose"] == "lab"
    tampered = bytearray(message)
    tampered[len(tampered) // 2] ^= 1
    # a flipped bit in the body: the SDK's own AES-GCM refuses it (after keyledger unwrapped)
    with pytest.raises((aws_encryption_sdk.exceptions.AWSEncryptionSDKClientError, InvalidTag)):
        sdk.decrypt(source=bytes(tampered), key_provider=provider)
    data_keys = records(server.home, "app1", "generate_data_key")
    assert (data_keys["key"] == "orders").all() and "ok" in set(data_keys["outcome"])


def test_nodes_aws_sdk_round_trips(estate):
    server, keys = estate
    assert shutil.which("node"), "make installs Node.js (Debian nodejs)"
    assert (NODE_CLIENT.parent / "node_modules" / "@aws-sdk" / "client-kms").is_dir(), \
        "run `make clients` (npm ci --prefix tests/clients)"
    arn = client(server.url, keys["app1"]).describe_key(KeyId="alias/orders")["KeyMetadata"]["Arn"]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": keys["app1"]["AccessKeyId"],
           "AWS_SECRET_ACCESS_KEY": keys["app1"]["SecretAccessKey"], "AWS_REGION": REGION}
    run = subprocess.run(["node", str(NODE_CLIENT), server.url, arn], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert "error" not in out, out
    assert out["keyArn"] == arn and out["keyState"] == "Enabled"
    assert out["decrypted"] == "hello from node" and out["decryptKeyId"] == arn
    assert out["wrongContext"] == "InvalidCiphertextException"
    assert out["dataKeyBytes"] == 32 and out["dataKeyRoundTrip"] is True
    dec = records(server.home, "app1", "decrypt")
    assert {"ok", "failed"} <= set(dec["outcome"]) and set(dec["key"]) == {"orders"}
