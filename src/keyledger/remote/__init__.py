"""keyledger as a client of ``keyledger serve``: ``kl.connect(url)`` returns a ``RemoteLedger``
with ``KeyLedger``'s public API, so scripts, the CLI (``--url``), notebooks, widgets and the
dashboard work against a server that alone holds the PIN and the home.

Modules: ``client`` (``RemoteLedger``), ``credentials`` (where the access key comes from),
``wire`` (values, dataclasses and frames as JSON), ``api`` (what client and server agree on).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # botocore and urllib3 load on the first connect, not with `import keyledger`
    from .client import RemoteLedger


def connect(url: str, *, access_key_id: str | None = None,
            secret_access_key: str | None = None, region: str = "us-east-1",
            verify: bool | str = True) -> RemoteLedger:
    """A ``RemoteLedger`` for ``keyledger serve`` at ``url``, signed with an access key.

    The key comes from the arguments, else ``KEYLEDGER_ACCESS_KEY_ID`` /
    ``KEYLEDGER_SECRET_ACCESS_KEY`` (or ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``),
    else ``$KEYLEDGER_CREDENTIALS`` or ``~/.keyledger/credentials`` (mode 0600). ``region``
    must be the server's (``keyledger serve --region``). ``verify``: check the server's TLS
    certificate (default), against a CA bundle (a path), or not (False). Asks the server who
    the key belongs to, so wrong credentials fail here with ``ServiceError``.
    """
    from .client import RemoteLedger
    from .credentials import resolve

    return RemoteLedger(url, resolve(access_key_id, secret_access_key), region=region,
                        verify=verify)


__all__ = ["connect"]
