"""AWS Signature Version 4 verification (what every AWS SDK signs requests with).

``verify(request, lookup, region=..., now=...)`` rebuilds the canonical request from what
arrived (method, path, query, the signed headers, the body's SHA-256), the string to sign
for the credential scope ``<date>/<region>/kms/aws4_request``, and the HMAC-SHA256 chain from
the access key's secret; the signatures are compared in constant time. ``X-Amz-Date`` must be
within ``MAX_SKEW`` of the server's trusted clock. Refusals are ``ApiError`` with AWS's codes
and wording. Spec: https://docs.aws.amazon.com/IAM/latest/UserGuide/create-signed-request.html
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import posixpath
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import quote, unquote

from .errors import ApiError

ALGORITHM = "AWS4-HMAC-SHA256"
SERVICE = "kms"
MAX_SKEW = timedelta(minutes=5)
_AMZ_DATE = "%Y%m%dT%H%M%SZ"
_AUTH_RE = re.compile(
    r"AWS4-HMAC-SHA256\s+Credential=(?P<cred>[^,\s]+)\s*,\s*"
    r"SignedHeaders=(?P<headers>[^,\s]+)\s*,\s*Signature=(?P<sig>[0-9a-fA-F]{64})\s*")
_BAD_SIGNATURE = ("The request signature we calculated does not match the signature you "
                  "provided. Check your AWS Secret Access Key and signing method. Consult the "
                  "service documentation for details.")
_UNRECOGNIZED = "The security token included in the request is invalid."

# (principal, secret) of an active access key id, or None
Lookup = Callable[[str], "tuple[str, str] | None"]


@dataclass(frozen=True)
class SignedRequest:
    """What verification needs of an HTTP request; ``headers`` as received (names any case,
    a name may repeat), ``query`` the raw query string."""

    method: str
    path: str
    query: str
    headers: Sequence[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name]


@dataclass(frozen=True)
class Identity:
    """Who signed: the principal of the access key, and the key's id."""

    principal: str
    access_key_id: str


@dataclass(frozen=True)
class _Authorization:
    access_key_id: str
    date: str
    region: str
    service: str
    signed_headers: list[str]
    signature: str


def _parse_authorization(values: list[str]) -> _Authorization:
    if not values:
        raise ApiError("MissingAuthenticationTokenException", "Missing Authentication Token")
    m = _AUTH_RE.fullmatch(values[0].strip()) if len(values) == 1 else None
    if m is None:
        raise ApiError("IncompleteSignatureException",
                       "Authorization header requires 'Credential', 'SignedHeaders' and "
                       "'Signature' with the AWS4-HMAC-SHA256 algorithm")
    parts = m["cred"].split("/")
    if len(parts) != 5 or parts[4] != "aws4_request":
        raise ApiError("IncompleteSignatureException",
                       "Credential must be <access key id>/<date>/<region>/<service>/"
                       "aws4_request")
    headers = m["headers"].split(";")
    if headers != sorted(set(headers)) or any(h != h.lower() for h in headers):
        raise ApiError("IncompleteSignatureException",
                       "SignedHeaders must be lower-case header names, sorted, without repeats")
    return _Authorization(parts[0], parts[1], parts[2], parts[3], headers, m["sig"].lower())


def _request_time(req: SignedRequest, auth: _Authorization) -> datetime:
    values = req.header("x-amz-date")
    if len(values) != 1 or "x-amz-date" not in auth.signed_headers:
        raise ApiError("IncompleteSignatureException",
                       "the request needs one signed X-Amz-Date header")
    try:
        when = datetime.strptime(values[0].strip(), _AMZ_DATE).replace(tzinfo=UTC)
    except ValueError:
        raise ApiError("IncompleteSignatureException",
                       "X-Amz-Date must look like 20260101T120000Z") from None
    if auth.date != when.strftime("%Y%m%d"):
        raise ApiError("InvalidSignatureException",
                       "Date in Credential scope does not match YYYYMMDD from ISO-8601 "
                       "version of date from HTTP")
    return when


def _check_skew(when: datetime, now: datetime) -> None:
    """AWS's wording, so clients' clock-skew handling recognises it."""
    fmt = lambda t: t.strftime(_AMZ_DATE)  # noqa: E731
    if when < now - MAX_SKEW:
        raise ApiError("InvalidSignatureException",
                       f"Signature expired: {fmt(when)} is now earlier than "
                       f"{fmt(now - MAX_SKEW)} ({fmt(now)} - 5 min.)")
    if when > now + MAX_SKEW:
        raise ApiError("InvalidSignatureException",
                       f"Signature not yet current: {fmt(when)} is still later than "
                       f"{fmt(now + MAX_SKEW)} ({fmt(now)} + 5 min.)")


def _canonical_query(query: str) -> str:
    pairs = []
    for item in query.split("&") if query else []:
        key, _, value = item.partition("=")
        pairs.append((quote(unquote(key), safe="-_.~"), quote(unquote(value), safe="-_.~")))
    return "&".join(f"{k}={v}" for k, v in sorted(pairs))


def _canonical_path(path: str) -> str:
    normal = posixpath.normpath(path) if path not in ("", "/") else "/"
    if path.endswith("/") and normal != "/":
        normal += "/"
    return quote(normal, safe="/~")


def _payload_hash(req: SignedRequest, auth: _Authorization) -> str:
    actual = hashlib.sha256(req.body).hexdigest()
    declared = req.header("x-amz-content-sha256")
    if declared:
        if len(declared) != 1 or not hmac.compare_digest(declared[0].strip().lower(), actual):
            raise ApiError("InvalidSignatureException",
                           "The provided 'x-amz-content-sha256' header does not match what "
                           "was computed.")
        return declared[0].strip()
    return actual


def canonical_request(req: SignedRequest, signed_headers: list[str], payload_hash: str) -> str:
    """The canonical request as the SigV4 spec (and botocore) builds it."""
    lines = []
    for name in signed_headers:
        values = req.header(name)
        if not values:
            raise ApiError("InvalidSignatureException",
                           f"the signed header {name!r} is missing from the request")
        lines.append(f"{name}:{','.join(' '.join(v.split()) for v in values)}")
    return "\n".join([req.method.upper(), _canonical_path(req.path), _canonical_query(req.query),
                      "\n".join(lines) + "\n", ";".join(signed_headers), payload_hash])


@functools.lru_cache(maxsize=256)
def _signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    """kSigning: the same for a key's every request of a day (four HMACs saved per request)."""
    key = f"AWS4{secret}".encode()
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def signature(secret: str, date: str, region: str, service: str, string_to_sign: str) -> str:
    """The HMAC chain: kDate, kRegion, kService, kSigning, then the signature (hex)."""
    key = _signing_key(secret, date, region, service)
    return hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()


def access_key_id_of(req: SignedRequest) -> str | None:
    """The access key id a request claims (for the audit record of a refusal), if readable."""
    try:
        return _parse_authorization(req.header("authorization")).access_key_id[:128]
    except ApiError:
        return None


def verify(req: SignedRequest, lookup: Lookup, *, region: str, now: datetime) -> Identity:
    """The identity that signed ``req``, or ``ApiError`` (nothing else) saying why not."""
    if req.header("x-amz-security-token"):
        raise ApiError("UnrecognizedClientException",
                       "keyledger issues no session tokens; sign with an access key made by "
                       "`keyledger access-key create`")
    auth = _parse_authorization(req.header("authorization"))
    when = _request_time(req, auth)
    if "host" not in auth.signed_headers:
        raise ApiError("IncompleteSignatureException", "the Host header must be signed")
    if auth.service != SERVICE:
        raise ApiError("InvalidSignatureException",
                       f"Credential should be scoped to correct service: '{SERVICE}'.")
    if auth.region != region:
        raise ApiError("InvalidSignatureException",
                       f"Credential should be scoped to a valid region, not '{auth.region[:40]}'"
                       f"; this service is '{region}'.")
    _check_skew(when, now)
    found = lookup(auth.access_key_id)
    if found is None:
        raise ApiError("UnrecognizedClientException", _UNRECOGNIZED)
    principal, secret = found
    creq = canonical_request(req, auth.signed_headers, _payload_hash(req, auth))
    scope = f"{auth.date}/{auth.region}/{auth.service}/aws4_request"
    to_sign = "\n".join([ALGORITHM, when.strftime(_AMZ_DATE), scope,
                         hashlib.sha256(creq.encode()).hexdigest()])
    expected = signature(secret, auth.date, auth.region, auth.service, to_sign)
    if not hmac.compare_digest(expected, auth.signature):
        raise ApiError("InvalidSignatureException", _BAD_SIGNATURE)
    return Identity(principal, auth.access_key_id)


__all__ = ["MAX_SKEW", "Identity", "Lookup", "SignedRequest", "access_key_id_of",
           "canonical_request", "signature", "verify"]
