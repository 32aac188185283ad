"""``serve``: the home behind the AWS KMS JSON API, for applications on any host (docs/service.md)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .common import AddCommand


def cmd_serve(args: argparse.Namespace) -> int:
    from ..server.app import serve
    from ..server.options import ServeOptions

    return serve(ServeOptions(
        home=Path(args.home) if args.home else None, principal=args.principal,
        address=args.address, port=args.port,
        tls_cert=Path(args.tls_cert) if args.tls_cert else None,
        tls_key=Path(args.tls_key) if args.tls_key else None,
        region=args.region, account=args.account, keep_store_open=args.keep_store_open))


def register(sub: Any, add: AddCommand) -> None:
    """The ``serve`` command."""
    from ..server.options import DEFAULT_ACCOUNT, DEFAULT_PORT, DEFAULT_REGION

    p = add(sub, "serve", cmd_serve,
            "serve the home to AWS KMS clients (boto3, the AWS CLI, any AWS SDK), signed with "
            "access keys; runs until SIGTERM")
    p.add_argument("--address", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; any other needs TLS)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"port (default {DEFAULT_PORT}; 0 picks a free one)")
    p.add_argument("--tls-cert", metavar="FILE", help="PEM certificate (chain) for HTTPS")
    p.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert")
    p.add_argument("--region", default=DEFAULT_REGION,
                   help=f"the region clients sign for and key ARNs name (default "
                        f"{DEFAULT_REGION})")
    p.add_argument("--account", default=DEFAULT_ACCOUNT,
                   help=f"the account id key ARNs name (default {DEFAULT_ACCOUNT})")
    p.add_argument("--keep-store-open", action="store_true",
                   help="hold the DuckDB store for the whole run (faster admin calls; other "
                        "processes, e.g. `keyledger access-key`, wait and fail with StoreBusy)")
