"""SigV4 verification (keyledger.server.sigv4) against botocore's own signer, the AWS test
suite's vector, and tampering: changed body, header, date, region, secret."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from unittest import mock

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from keyledger.server import sigv4
from keyledger.server.errors import ApiError

KEY_ID, SECRET = "AKIDEXAMPLE00000", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
BODY = b'{"NumberOfBytes": 16}'


def lookup(access_key_id: str) -> tuple[str, str] | None:
    return ("app1", SECRET) if access_key_id == KEY_ID else None


def signed(body: bytes = BODY, *, when: datetime = NOW, region: str = "us-east-1",
           secret: str = SECRET, url: str = "http://127.0.0.1:8200/",
           method: str = "POST", extra: dict[str, str] | None = None) -> sigv4.SignedRequest:
    """A request signed by botocore (the signer every AWS SDK for Python uses)."""
    req = AWSRequest(method=method, url=url, data=body, headers={
        "Content-Type": "application/x-amz-json-1.1",
        "X-Amz-Target": "TrentService.GenerateRandom", **(extra or {})})
    with mock.patch("botocore.auth.get_current_datetime",
                    lambda remove_tzinfo=True: when.replace(tzinfo=None)):
        SigV4Auth(Credentials(KEY_ID, secret), "kms", region).add_auth(req)
    host = url.split("/")[2]
    headers = [("host", host), *((k, v) for k, v in req.headers.items())]
    path, _, query = url.split(host, 1)[1].partition("?")
    return sigv4.SignedRequest(method, path, query, headers, body)


def verify(req: sigv4.SignedRequest, *, now: datetime = NOW,
           region: str = "us-east-1") -> sigv4.Identity:
    return sigv4.verify(req, lookup, region=region, now=now)


def refused(req: sigv4.SignedRequest, **kw) -> ApiError:
    with pytest.raises(ApiError) as info:
        verify(req, **kw)
    assert info.value.status == 400
    return info.value


def replace_header(req: sigv4.SignedRequest, name: str, value: str) -> sigv4.SignedRequest:
    headers = [(k, value if k.lower() == name else v) for k, v in req.headers]
    return sigv4.SignedRequest(req.method, req.path, req.query, headers, req.body)


def test_the_aws_test_suite_vector_get_vanilla():
    """aws-sig-v4-test-suite get-vanilla: our canonical request and HMAC chain give AWS's
    published signature."""
    req = sigv4.SignedRequest("GET", "/", "", [("Host", "example.amazonaws.com"),
                                                ("X-Amz-Date", "20150830T123600Z")], b"")
    creq = sigv4.canonical_request(req, ["host", "x-amz-date"],
                                   hashlib.sha256(b"").hexdigest())
    to_sign = "\n".join(["AWS4-HMAC-SHA256", "20150830T123600Z",
                         "20150830/us-east-1/service/aws4_request",
                         hashlib.sha256(creq.encode()).hexdigest()])
    assert sigv4.signature(SECRET, "20150830", "us-east-1", "service", to_sign) == \
        "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"


def test_a_botocore_signature_verifies_and_names_the_principal():
    assert verify(signed()) == sigv4.Identity("app1", KEY_ID)


def test_query_strings_and_paths_canonicalise_like_botocore():
    req = signed(b"", method="GET", url="http://127.0.0.1:8200/a%20b/c?z=1&a=x%2Fy&a=b")
    assert verify(req).principal == "app1"


def test_a_changed_body_is_refused():
    req = signed()
    tampered = sigv4.SignedRequest(req.method, req.path, req.query, req.headers,
                                   b'{"NumberOfBytes": 1024}')
    assert refused(tampered).code == "InvalidSignatureException"


def test_a_changed_signed_header_is_refused():
    tampered = replace_header(signed(), "x-amz-target", "TrentService.Decrypt")
    err = refused(tampered)
    assert err.code == "InvalidSignatureException" and "does not match" in err.message


def test_a_changed_date_is_refused():
    tampered = replace_header(signed(), "x-amz-date", "20260301T120001Z")
    assert refused(tampered).code == "InvalidSignatureException"


def test_another_region_is_refused():
    err = refused(signed(region="eu-west-1"))
    assert err.code == "InvalidSignatureException" and "region" in err.message
    # the scope's region edited in the Authorization header no longer matches the signature
    req = signed(region="eu-west-1")
    auth = dict(req.headers)["Authorization"].replace("/eu-west-1/", "/us-east-1/")
    assert refused(replace_header(req, "authorization", auth)).code == \
        "InvalidSignatureException"


def test_a_wrong_secret_is_refused():
    assert refused(signed(secret="x" * 40)).code == "InvalidSignatureException"


def test_an_unknown_or_disabled_key_id_is_unrecognized():
    with pytest.raises(ApiError) as info:
        sigv4.verify(signed(), lambda _id: None, region="us-east-1", now=NOW)
    assert info.value.code == "UnrecognizedClientException"


@pytest.mark.parametrize("offset, words", [
    (timedelta(minutes=-5, seconds=-1), "Signature expired"),
    (timedelta(minutes=5, seconds=1), "Signature not yet current")])
def test_a_request_outside_five_minutes_is_refused(offset, words):
    err = refused(signed(when=NOW + offset))
    assert err.code == "InvalidSignatureException" and err.message.startswith(words)
    assert verify(signed(when=NOW + offset / 2)).principal == "app1"  # within the window


def test_missing_and_malformed_authorization():
    req = signed()
    bare = sigv4.SignedRequest(req.method, req.path, req.query,
                               [(k, v) for k, v in req.headers if k.lower() != "authorization"],
                               req.body)
    assert refused(bare).code == "MissingAuthenticationTokenException"
    garbage = replace_header(req, "authorization", "AWS4-HMAC-SHA256 Credential=nonsense")
    assert refused(garbage).code == "IncompleteSignatureException"


def test_a_declared_payload_hash_must_match_the_body():
    req = signed(extra={"X-Amz-Content-SHA256": hashlib.sha256(BODY).hexdigest()})
    assert verify(req).principal == "app1"
    other = sigv4.SignedRequest(req.method, req.path, req.query, req.headers, b"{}")
    assert refused(other).code == "InvalidSignatureException"


def test_session_tokens_are_not_accepted():
    req = signed(extra={"X-Amz-Security-Token": "token"})
    assert refused(req).code == "UnrecognizedClientException"
