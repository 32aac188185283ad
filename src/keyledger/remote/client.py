"""``RemoteLedger``: ``KeyLedger``'s public API as a client of ``keyledger serve``.

Each call is one ``KeyLedger.<method>`` request, signed with AWS Signature Version 4
(botocore's ``SigV4Auth``, service ``kms``) and sent over a keep-alive connection pool
(urllib3; safe to share between threads). The server runs it as the principal its access key
belongs to and audits it there; the answer is rebuilt as the same classes a local ledger
returns (``keyledger.remote.wire``), and a refusal raises the same ``KeyLedgerError`` subclass.
Methods that need the home's files raise ``NotRemote`` saying what to do instead.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import pandas as pd
import urllib3
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from .. import ciphertext as ct
from .. import errors
from ..columns import BatchResult, as_items
from ..errors import ConfigError, InvalidInput, KeyLedgerError, NotRemote, ServiceError
from ..runtime import ReconcileReport
from ..service import KeyLedger
from ..services import envelopes
from . import wire
from .api import CONTENT_TYPE, NOT_SERVED, SERVED, TARGET_PREFIX
from .credentials import AccessKey

SERVICE = "kms"  # the SigV4 scope keyledger serve checks (one door for KMS and keyledger calls)
TIMEOUT_S = 120.0  # a compliance evaluation or run_due can take a while on a big home
# encoded bytes of one batch request: keyledger serve refuses bodies over 1 MiB (server/app.py)
BATCH_REQUEST_BYTES = 768 * 1024
AUTH_CODES = ("InvalidSignatureException", "UnrecognizedClientException",
              "IncompleteSignatureException", "MissingAuthenticationTokenException",
              "InvalidClientTokenId", "ExpiredTokenException")


class RemoteLedger:
    """A ``KeyLedger`` served by ``keyledger serve`` at ``url`` (open with ``kl.connect``).

    Same methods, arguments and results as a local ledger, run as the principal of the access
    key. ``home`` is None (the home is the server's); ``url`` says where the ledger is.
    """

    home = None

    def __init__(self, url: str, key: AccessKey, *, region: str = "us-east-1",
                 verify: bool | str = True, timeout: float = TIMEOUT_S) -> None:
        self.url = _check_url(url)
        self.last_reconcile = ReconcileReport()  # the server reconciles its home on open
        self._key = key
        self._region = region
        self._auth = SigV4Auth(Credentials(key.access_key_id, key.secret_access_key),
                               SERVICE, region)
        self._http = _pool(self.url, verify, timeout)
        self._closed = False
        try:
            who = self._call("whoami", {})
        except BaseException:
            self.close()
            raise
        self._principal: str = who["principal"]
        self._simulation: bool = bool(who["simulation"])

    # -- the ledger's identity ----------------------------------------------------------------------
    @property
    def principal(self) -> str:
        """The principal the server authenticated this client's access key as."""
        return self._principal

    @property
    def simulation(self) -> bool:
        """True when the server's home is a simulation home."""
        return self._simulation

    def now(self) -> datetime:
        """The server ledger's time (trusted time, or a simulation home's clock)."""
        now: datetime = self._call("now", {})
        return now

    def change_token(self) -> tuple[str, tuple]:
        """The server home's change token (for the dashboard's polling; not audited)."""
        catalog, activity = self._call("changes", {})
        return catalog, tuple(activity)

    def __repr__(self) -> str:
        return f"<RemoteLedger url={self.url!r} principal={self._principal!r}>"

    def __enter__(self) -> RemoteLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections (the server's ledger stays open for other clients)."""
        self._closed = True
        self._http.clear()

    # -- calls ---------------------------------------------------------------------------------------
    def _call(self, method: str, arguments: Mapping[str, Any]) -> Any:
        """One signed ``KeyLedger.<method>`` request; its decoded result or the error it raised."""
        if self._closed:
            raise errors.KeyStateError("this RemoteLedger is closed; kl.connect again")
        try:
            body = json.dumps(wire.encode(dict(arguments))).encode()
        except TypeError as exc:
            raise InvalidInput(f"{method}: {exc}") from None
        request = AWSRequest(method="POST", url=self.url, data=body, headers={
            "Content-Type": CONTENT_TYPE, "X-Amz-Target": f"{TARGET_PREFIX}{method}"})
        self._auth.add_auth(request)
        try:
            response = self._http.request("POST", self.url, body=body,
                                          headers=dict(request.headers.items()))
        except urllib3.exceptions.HTTPError as exc:
            raise ServiceError(f"cannot reach keyledger serve at {self.url}: "
                               f"{_reason(exc)}") from None
        return self._answer(method, response.status, response.data)

    def _answer(self, method: str, status: int, data: bytes) -> Any:
        try:
            doc = json.loads(data)
        except ValueError:
            raise ServiceError(f"keyledger serve at {self.url} answered {method} with HTTP "
                               f"{status} and no JSON; is that URL keyledger serve?") from None
        if status == 200 and isinstance(doc, dict) and "result" in doc:
            return wire.decode(doc["result"])
        code = str(doc.get("__type", "")) if isinstance(doc, dict) else ""
        message = str(doc.get("message", "")) if isinstance(doc, dict) else ""
        raise _error(self.url, method, status, code, message)

    # -- what needs the home's files ---------------------------------------------------------------
    def rewrap_many(self, ciphertexts: Iterable[bytes] | pd.Series | str | os.PathLike,
                    *, context: Mapping[str, str] | None = None, dry_run: bool = False,
                    column: str = "ciphertext", out: str | os.PathLike | None = None,
                    progress: bool = True) -> Any:
        """``KeyLedger.rewrap_many`` over ciphertexts sent with the request (bytes or a Series);
        a Parquet file is read here (``column``) and, with ``out``, written here too."""
        if isinstance(ciphertexts, str | os.PathLike):
            frame = pd.read_parquet(ciphertexts, columns=[column])
            result = self.rewrap_many(frame[column], context=context, dry_run=dry_run)
            if out is not None and not dry_run:
                frame[column] = result.ciphertexts
                frame.to_parquet(out)
            return result
        if out is not None:
            raise InvalidInput("out is for a Parquet file of ciphertexts, not a list")
        items = list(ciphertexts)
        if not all(isinstance(c, bytes) for c in items):
            raise InvalidInput("rewrap_many takes bytes ciphertexts")
        return self._call("rewrap_many", {"ciphertexts": items, "context": context,
                                          "dry_run": dry_run})


    # -- streamed envelopes: the data key from the server, the chunks here -------------------------
    def envelope_encrypt_stream(self, name: str, source: Any, sink: Any, *,
                                context: Mapping[str, str] | None = None,
                                chunk_size: int = envelopes.CHUNK_SIZE, overwrite: bool = False,
                                progress: bool = True) -> int:
        """``KeyLedger.envelope_encrypt_stream`` with the data key from the server's
        ``generate_data_key`` (its audit record) and the chunks sealed here: the data never
        travels. The same format: a local ledger opens what this writes, and the reverse."""
        ctx = ct.canonical_context(context)

        def data_key() -> tuple[bytes, bytes]:
            dk = self._call("generate_data_key", {"name": name, "context": context})
            return dk.plaintext, dk.wrapped

        size, _ = envelopes.encrypt_stream(data_key, source, sink, ctx=ctx,
                                           chunk_size=chunk_size, overwrite=overwrite,
                                           progress=progress, protected=())
        return size

    def envelope_decrypt_stream(self, source: Any, sink: Any, *,
                                context: Mapping[str, str] | None = None,
                                overwrite: bool = False, progress: bool = True) -> int:
        """``KeyLedger.envelope_decrypt_stream`` with the wrapped data key opened by the server's
        ``decrypt`` (its audit record) and the chunks opened here."""
        ctx = ct.canonical_context(context)

        def unwrap(wrapped: bytes) -> bytes:
            key: bytes = self._call("decrypt", {"ciphertext": wrapped, "context": context})
            return key

        size, _ = envelopes.decrypt_stream(unwrap, source, sink, ctx=ctx, overwrite=overwrite,
                                           progress=progress, protected=())
        return size

    # -- batches: the column travels as a list, the answer is rebuilt as the input's kind ------
    def encrypt_many(self, name: str, values: Any, *, context: Mapping[str, str] | None = None,
                     errors: str = "raise") -> Any:
        """``KeyLedger.encrypt_many`` on the server (docs/batch.md, "Over kl.connect")."""
        return self._batch("encrypt_many", values, {"name": name, "context": context,
                                                    "errors": errors})

    def decrypt_many(self, values: Any, *, context: Mapping[str, str] | None = None,
                     errors: str = "raise") -> Any:
        """``KeyLedger.decrypt_many`` on the server (docs/batch.md, "Over kl.connect")."""
        return self._batch("decrypt_many", values, {"context": context, "errors": errors})

    def _batch(self, method: str, values: Any, arguments: dict[str, Any]) -> Any:
        """One request per part of at most ``BATCH_REQUEST_BYTES`` (each a batch, one audit
        record, on the server); indices in errors are the whole column's."""
        items, rebuild = as_items(values)
        out: list[bytes | None] = []
        failed: list[tuple[int, str, str]] = []
        for start, part in _parts(items):
            try:
                got = self._call(method, {**arguments, "values": part})
            except KeyLedgerError as exc:
                raise _shifted(exc, start) from None
            if isinstance(got, BatchResult):
                out.extend(got.values)
                failed.extend((i + start, cls, _shift(text, start)) for i, cls, text in got.errors)
            else:
                out.extend(got)
        return BatchResult(rebuild(out), failed) if arguments["errors"] == "return" \
            else rebuild(out)


def _parts(items: list[Any]) -> list[tuple[int, list[Any]]]:
    """``items`` cut into (first index, items) parts whose wire form fits one request."""
    parts: list[tuple[int, list[Any]]] = []
    start, size = 0, 0
    for i, v in enumerate(items):
        n = 4 * (len(v) + 2) // 3 + 20 if isinstance(v, bytes | bytearray | memoryview) \
            else 6 * len(v) + 10 if isinstance(v, str) else 32
        if size + n > BATCH_REQUEST_BYTES and i > start:
            parts.append((start, items[start:i]))
            start, size = i, 0
        size += n
    parts.append((start, items[start:]))
    return parts


def _shift(text: str, start: int) -> str:
    """A message's ``item <i>`` of a part as the index in the whole column."""
    if not start:
        return text
    return re.sub(r"\bitem (\d+)", lambda m: f"item {int(m[1]) + start}", text)


def _shifted(exc: KeyLedgerError, start: int) -> KeyLedgerError:
    return type(exc)(_shift(str(exc), start)) if start else exc


def _remote(name: str) -> Callable[..., Any]:
    """The client method ``name``: ``KeyLedger.name``'s signature, run on the server."""
    local = getattr(KeyLedger, name)  # name comes from SERVED, never from a caller
    sig = inspect.signature(local)

    @functools.wraps(local)
    def method(self: RemoteLedger, *args: Any, **kwargs: Any) -> Any:
        try:
            bound = sig.bind(self, *args, **kwargs)
        except TypeError as exc:
            raise InvalidInput(f"{name}: {exc}") from None
        arguments = dict(bound.arguments)
        del arguments["self"]
        for p in sig.parameters.values():  # **params travel as arguments of their own
            if p.kind is inspect.Parameter.VAR_KEYWORD:
                arguments.update(arguments.pop(p.name, {}))
        return self._call(name, arguments)

    return method


def _not_remote(name: str) -> Callable[..., Any]:
    local = getattr(KeyLedger, name)
    why = NOT_SERVED[name]

    @functools.wraps(local)
    def method(self: RemoteLedger, *args: Any, **kwargs: Any) -> Any:
        raise NotRemote(f"{name} does not work over kl.connect: {why}")

    return method


for _name in SERVED:
    if not hasattr(RemoteLedger, _name):
        setattr(RemoteLedger, _name, _remote(_name))
for _name in NOT_SERVED:
    setattr(RemoteLedger, _name, _not_remote(_name))


def _error(url: str, method: str, status: int, code: str, message: str) -> KeyLedgerError:
    """The exception an error answer stands for: the same keyledger class when the server
    names one, else ``ServiceError`` with what the server said."""
    cls = getattr(errors, code, None) if code in errors.__all__ else None
    if isinstance(cls, type) and issubclass(cls, KeyLedgerError):
        return cls(message)
    if code in AUTH_CODES:
        return ServiceError(
            f"keyledger serve at {url} refused the credentials ({code}): {message} — check "
            "the access key id and secret (kl.connect arguments, KEYLEDGER_ACCESS_KEY_ID / "
            "KEYLEDGER_SECRET_ACCESS_KEY, or the credentials file) and this host's clock")
    if status >= 500:
        return ServiceError(f"keyledger serve at {url} could not complete {method} "
                            f"({code or status}); the server's log has the details")
    return ServiceError(f"keyledger serve at {url} refused {method}: {code or status}: "
                        f"{message}")


def _check_url(url: object) -> str:
    if not isinstance(url, str):
        raise InvalidInput(f"url must be text such as 'https://kms.example:8200', not "
                           f"{type(url).__name__}")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput(f"url must be http(s)://host[:port] of keyledger serve, not {url!r}")
    if parts.path not in ("", "/") or parts.query:
        raise InvalidInput(f"url must name the server only (no path or query): {url!r}")
    return f"{parts.scheme}://{parts.netloc}/"


def _pool(url: str, verify: bool | str, timeout: float) -> urllib3.PoolManager:
    """A keep-alive pool; ``verify``: check TLS certificates (True), with this CA bundle (a
    path), or not at all (False, for a test server's self-signed certificate)."""
    tls: dict[str, Any] = {}
    if url.startswith("https:"):
        if verify is False:
            tls = {"cert_reqs": "CERT_NONE"}
        elif isinstance(verify, str):
            if not os.path.exists(verify):
                raise ConfigError(f"verify: no CA bundle at {verify}")
            tls = {"cert_reqs": "CERT_REQUIRED", "ca_certs": verify}
    return urllib3.PoolManager(num_pools=2, maxsize=8, retries=False,
                               timeout=urllib3.Timeout(connect=10.0, read=timeout), **tls)


def _reason(exc: urllib3.exceptions.HTTPError) -> str:
    reason = getattr(exc, "reason", None) or exc
    return f"{type(reason).__name__}: {str(reason)[:200]}"


__all__ = ["RemoteLedger"]
