"""The HTTP side of ``keyledger serve``: a Starlette app under uvicorn.

One process opens the home once (``KeyService``: the HSM login, the store, the journal) and
keeps a ``KeyLedger`` per authenticated principal, all sharing the process's ``HomeRuntime``.
Per request: read the body (capped), verify its SigV4 signature, parse the JSON 1.1 call,
then run ``kms.dispatch`` in a worker thread, so the event loop never waits on the HSM or the
store. Every refusal before an operation runs is audited here (``record_refused``); the
operations audit themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
import signal
import socket
import sys
import threading
import traceback
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from ..errors import ConfigError, KeyLedgerError
from ..service import KeyLedger
from ..service import open as open_ledger
from ..services.accesskeys import AccessKeyDirectory
from . import faults, kms, native, sigv4
from .errors import ApiError
from .options import ServeOptions, check_options

log = logging.getLogger("keyledger.server")
MAX_BODY = 1024 * 1024  # bytes; KMS's own payloads are far smaller (4 KiB plaintext)
CONTENT_TYPES = ("application/x-amz-json-1.1", "application/x-amz-json-1.0")
JSON_11 = "application/x-amz-json-1.1"
USED_FLUSH_S = 60.0  # how often access keys' last-use times are written to the store
_OPERATION_RE = re.compile(r"[A-Za-z][A-Za-z0-9]{0,63}")
_METHOD_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")  # keyledger's own methods (KeyLedger.<method>)


class KeyService:
    """The opened home and a ledger per principal (thread-safe; used from worker threads)."""

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self.region, self.account = options.region, options.account
        self.kms_config = kms.KmsConfig(region=options.region, account=options.account)
        self.base = open_ledger(options.home, principal=options.principal)
        self.home = self.base.home
        self._rt = self.base._rt  # the process's runtime, shared by every principal's ledger
        self.directory = AccessKeyDirectory(self._rt)
        self._ledgers: dict[str, KeyLedger] = {}
        self._lock = threading.Lock()
        self._store = contextlib.ExitStack()
        if options.keep_store_open:  # ~1 ms store transactions; other processes' wait
            self._store.enter_context(self.base.keep_store_open())

    def authenticate(self, req: sigv4.SignedRequest) -> sigv4.Identity:
        identity = sigv4.verify(req, self.directory.credentials, region=self.region,
                                now=self._rt.trusted_now())
        self.directory.note_used(identity.access_key_id, self._rt.trusted_now())
        return identity

    def ledger_for(self, principal: str) -> KeyLedger:
        """The principal's ledger, opened on its first request (an audited ``open``); the
        lock only guards opening, so known principals never wait for another's open."""
        led = self._ledgers.get(principal)
        if led is not None:
            return led
        with self._lock:
            led = self._ledgers.get(principal)
            if led is None:
                led = self._ledgers[principal] = open_ledger(self.home, principal=principal)
            return led

    def refused(self, err: ApiError, detail: str, principal: str | None) -> None:
        """Audit a refusal: ``denied`` for authentication, ``failed`` for bad input."""
        try:
            if principal is None:
                self.base.record_refused("authenticate", err.code, detail, unauthenticated=True)
            else:
                self.ledger_for(principal).record_refused("request", err.code, detail,
                                                          outcome="failed")
        except Exception as exc:  # the refusal itself still reaches the client
            log.error("could not audit a refused request: %s", type(exc).__name__)

    def flush_used(self) -> None:
        try:
            self.directory.flush_used()
        except KeyLedgerError as exc:
            log.warning("access keys' last-use times not written: %s", exc)

    def close(self) -> None:
        """Flush what is pending, close every ledger (the last close releases the HSM)."""
        self.flush_used()
        with self._lock:
            ledgers, self._ledgers = list(self._ledgers.values()), {}
        for led in ledgers:
            led.close()
        try:
            self.base.flush_audit()
        finally:
            try:
                self._store.close()
            finally:
                self.base.close()


# -- one request ------------------------------------------------------------------------------------
def _error(err: ApiError, request_id: str) -> Response:
    return Response(err.body(), status_code=err.status, media_type=JSON_11,
                    headers={"x-amzn-RequestId": request_id, "x-amzn-ErrorType": err.code})


async def _read_body(request: Request) -> bytes:
    """The body, refused (without reading it all) when over ``MAX_BODY``."""
    too_big = ApiError("ValidationException",
                       f"the request body is larger than {MAX_BODY} bytes", 413)
    declared = request.headers.get("content-length")
    if declared is not None and not declared.isdigit():
        raise ApiError("ValidationException", "Content-Length must be a number of bytes")
    if declared is not None and int(declared) > MAX_BODY:
        raise too_big
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY:
                raise too_big
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError("ValidationException",
                       "the client closed the connection before sending the whole body") from None
    return b"".join(chunks)


def _signed_request(request: Request, body: bytes) -> sigv4.SignedRequest:
    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw]
    return sigv4.SignedRequest(request.method, request.url.path,
                               request.scope.get("query_string", b"").decode("latin-1"),
                               headers, body)


def parse_call(request: Request, body: bytes) -> tuple[str, str, dict[str, Any]]:
    """(target prefix, operation, parameters) of a JSON 1.1 call, or ``ApiError``: a KMS
    operation (``TrentService.``) or a keyledger method (``KeyLedger.``, server/native.py)."""
    if request.method != "POST" or request.url.path != "/":
        raise ApiError("UnknownOperationException",
                       "the KMS API takes POST / with an X-Amz-Target header", 404)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in CONTENT_TYPES:
        raise ApiError("SerializationException",
                       f"Content-Type must be {JSON_11}, not {ctype[:60]!r}")
    target = request.headers.get("x-amz-target", "")
    prefix, _, op = target.partition(".")
    known = {kms.TARGET_PREFIX: _OPERATION_RE, native.TARGET_PREFIX: _METHOD_RE}
    pattern = known.get(f"{prefix}.")
    if pattern is None or not pattern.fullmatch(op):
        raise ApiError("UnknownOperationException",
                       f"X-Amz-Target must be {kms.TARGET_PREFIX}<Operation> or "
                       f"{native.TARGET_PREFIX}<method>, not {target[:80]!r}")
    try:
        params = json.loads(body) if body.strip() else {}
    except (ValueError, UnicodeDecodeError):
        raise ApiError("SerializationException", "the request body is not valid JSON") from None
    if not isinstance(params, dict):
        raise ApiError("SerializationException", "the request body must be a JSON object")
    return f"{prefix}.", op, params


def _source(request: Request) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "unknown"


async def handle(request: Request) -> Response:
    """POST / : authenticate, parse, dispatch; every failure answers as AWS JSON."""
    svc: KeyService = request.app.state.service
    request_id = str(uuid.uuid4())
    target = request.headers.get("x-amz-target", "")[:100] or "no X-Amz-Target"
    where = f"from {_source(request)}; {target}"
    try:
        body = await _read_body(request)
    except ApiError as err:
        detail = f"{where}; access key -; {err.message[:200]}"
        await run_in_threadpool(svc.refused, err, detail, None)
        return _error(err, request_id)
    except Exception as exc:
        return _internal_error(exc, request_id, target, None)
    # the rest in ONE worker-thread hop: each hop through the event loop cost more than the
    # SigV4 check (bench/service.py, docs/benchmarks.md "Key service")
    return await run_in_threadpool(_answer, svc, request, body, request_id, target, where)


def _answer(svc: KeyService, request: Request, body: bytes, request_id: str, target: str,
            where: str) -> Response:
    """In a worker thread (it waits on the HSM and the store): verify, parse, dispatch."""
    principal: str | None = None
    try:
        signed = _signed_request(request, body)
        try:
            identity = svc.authenticate(signed)
        except ApiError as err:
            claimed = sigv4.access_key_id_of(signed)
            detail = f"{where}; access key {claimed or '-'}; {err.message[:200]}"
            svc.refused(err, detail, None)
            return _error(err, request_id)
        principal = identity.principal
        try:
            prefix, op, params = parse_call(request, body)
        except ApiError as err:
            detail = f"{where}; access key {identity.access_key_id}; {err.message[:200]}"
            svc.refused(err, detail, principal)
            return _error(err, request_id)
        ledger = svc.ledger_for(principal)
        if prefix == native.TARGET_PREFIX:
            result = native.dispatch(ledger, op, params)
        else:
            result = kms.dispatch(ledger, op, params, config=svc.kms_config)
        return Response(json.dumps(result).encode(), media_type=JSON_11,
                        headers={"x-amzn-RequestId": request_id})
    except ApiError as err:  # dispatch's own refusals (it audits them)
        return _error(err, request_id)
    except KeyLedgerError as exc:  # audited by the service that raised it
        return _error(faults.api_error(exc), request_id)
    except Exception as exc:
        return _internal_error(exc, request_id, target, principal)


def _internal_error(exc: Exception, request_id: str, target: str,
                    principal: str | None) -> Response:
    # the type and where, never the message (it could quote an input)
    log.error("request %s (%s, principal %s) failed: %s\n%s", request_id, target,
              principal or "-", type(exc).__name__,
              "".join(traceback.format_tb(exc.__traceback__)))
    return _error(faults.internal_error(), request_id)


def create_app(service: KeyService) -> Starlette:
    """The ASGI app over an opened ``KeyService`` (closed when the app shuts down)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async def flush_periodically() -> None:
            while True:
                await asyncio.sleep(USED_FLUSH_S)
                await run_in_threadpool(service.flush_used)

        task = asyncio.create_task(flush_periodically())
        try:
            yield
        finally:
            task.cancel()
            await run_in_threadpool(service.close)

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
    app = Starlette(routes=[Route("/{path:path}", handle, methods=methods)], lifespan=lifespan)
    app.state.service = service
    return app


# -- the process ------------------------------------------------------------------------------------
def _bind(address: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(address, port,
                                                          type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(1024)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {address}:{port}: {exc.strerror or exc}") from None
    return sock


def serve(options: ServeOptions) -> int:
    """Run until SIGTERM or SIGINT: in-flight requests finish, the audit is flushed, the HSM
    released; returns 0. Prints the URL once listening."""
    import uvicorn

    check_options(options)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s "
                        "%(message)s", stream=sys.stderr)
    service = KeyService(options)
    try:
        sock = _bind(options.address, options.port)
    except BaseException:
        service.close()
        raise
    port = sock.getsockname()[1]
    config = uvicorn.Config(create_app(service), log_level="warning", access_log=False,
                            ssl_certfile=options.tls_cert, ssl_keyfile=options.tls_key,
                            lifespan="on", timeout_graceful_shutdown=30)
    server = uvicorn.Server(config)
    bound = dataclasses.replace(options, port=port)
    print(f"keyledger serve: listening on {bound.url} (home {service.home}, region "
          f"{options.region})", flush=True)
    # uvicorn re-raises the signal that stopped it once it is done; ours lets the process end
    # with exit code 0 after a clean shutdown instead of dying by that signal
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
    return 0 if server.started else 1


__all__ = ["KeyService", "ServeOptions", "create_app", "parse_call", "serve"]
