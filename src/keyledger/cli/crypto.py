"""``encrypt``, ``decrypt``, ``sign``, ``verify`` and ``public-key``: data in, data out."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, BinaryIO

from .. import ciphertext as ct
from .. import outputs
from ..errors import InvalidCiphertext, KeyLedgerError
from ..services.envelopes import CHUNK_SIZE
from .common import (
    AddCommand,
    UsageError,
    add_force,
    home_of,
    ledger_for,
    pair,
    pair_dict,
    print_json,
)


def _read_input(path: str | None, what: str = "input") -> bytes:
    if path is None or path == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise KeyLedgerError(f"cannot read {what} file {path!r}: {exc.strerror}") from None


def _check_binary_out(path: str | None, what: str) -> None:
    if (path is None or path == "-") and sys.stdout.isatty():
        raise UsageError(f"refusing to write binary {what} to a terminal; "
                         "use --out FILE or redirect stdout")


def _output_target(args: argparse.Namespace) -> Path | None:
    """Check ``--out`` before the operation runs: outside the home (and the PIN file it may
    keep elsewhere), new unless ``--force``."""
    from ..config import load_settings

    if args.outfile in (None, "-"):
        return None
    home = home_of(args)
    settings = load_settings(home)
    protected = outputs.protected_paths(settings) if settings is not None else [home]
    return outputs.check_target(args.outfile, protected, overwrite=args.force,
                                what="output file")


def _write_output(target: Path | None, data: bytes, *, overwrite: bool,
                  private: bool = False) -> None:
    """Write to stdout (``None``) or atomically to a file (mode 0600 when ``private``)."""
    if target is None:
        out: BinaryIO = sys.stdout.buffer
        out.write(data)
        out.flush()
        return
    outputs.write_file(target, data, overwrite=overwrite, private=private)


def cmd_encrypt(args: argparse.Namespace) -> int:
    context = pair_dict(args.context, "context key")
    _check_binary_out(args.outfile, "ciphertext")
    target = _output_target(args)
    data = _read_input(args.infile)
    with ledger_for(args) as led:
        blob = led.encrypt(args.name, data, context=context)
    _write_output(target, blob, overwrite=args.force)
    return 0


def cmd_decrypt(args: argparse.Namespace) -> int:
    context = pair_dict(args.context, "context key")
    target = _output_target(args)
    blob = _read_input(args.infile, "ciphertext")
    with ledger_for(args) as led:
        if args.name is not None:
            expected = led.get_key(args.name)
            try:
                header = ct.parse(blob)[0]
            except InvalidCiphertext:
                header = None  # decrypt below reports (and audits) the malformed input
            if header is not None and header.key_id != expected.key_id:
                raise InvalidCiphertext(f"the ciphertext was not made with key {expected.name!r}")
        plaintext = led.decrypt(blob, context=context)
    _write_output(target, plaintext, overwrite=args.force, private=True)
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    _check_binary_out(args.outfile, "signature")
    target = _output_target(args)
    data = _read_input(args.infile)
    with ledger_for(args) as led:
        signature = led.sign(args.name, data)
    _write_output(target, signature, overwrite=args.force)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    if args.signature == "-" and args.infile in (None, "-"):
        raise UsageError("the message and the signature cannot both come from stdin")
    signature = _read_input(args.signature, "signature")
    data = _read_input(args.infile)
    with ledger_for(args) as led:
        valid = led.verify(args.name, data, signature)
    if args.json:
        print_json({"key": args.name, "valid": valid})
    elif valid:
        print(f"signature valid (key {args.name!r})")
    else:
        print(f"error: signature INVALID: key {args.name!r} did not make this signature over "
              "this data", file=sys.stderr)
    return 0 if valid else 1


def cmd_public_key(args: argparse.Namespace) -> int:
    target = _output_target(args)
    with ledger_for(args) as led:
        pem = led.public_key_pem(args.name, version=args.version)
    if target is None:
        sys.stdout.write(pem)
        sys.stdout.flush()
    else:
        _write_output(target, pem.encode(), overwrite=args.force)
    return 0


def _stream_ends(args: argparse.Namespace, what: str) -> tuple[Any, Any, bool]:
    """(source, sink, progress) of ``encrypt-file``/``decrypt-file``: paths, or ``-`` for
    stdin/stdout; the output path checked (outside the home, new unless ``--force``) first."""
    if args.infile == "-" and sys.stdin.isatty():
        raise UsageError("give an input file, or pipe data into stdin")
    if args.outfile == "-":
        _check_binary_out(None, what)
    target = _output_target(args)
    source = sys.stdin.buffer if args.infile == "-" else args.infile
    sink = sys.stdout.buffer if target is None else target
    return source, sink, not args.no_progress and sys.stderr.isatty()


def cmd_encrypt_file(args: argparse.Namespace) -> int:
    context = pair_dict(args.context, "context key")
    source, sink, progress = _stream_ends(args, "ciphertext")
    with ledger_for(args) as led:
        led.envelope_encrypt_stream(args.name, source, sink, context=context,
                                    chunk_size=args.chunk_size, overwrite=args.force,
                                    progress=progress)
    return 0


def cmd_decrypt_file(args: argparse.Namespace) -> int:
    context = pair_dict(args.context, "context key")
    source, sink, progress = _stream_ends(args, "plaintext")
    with ledger_for(args) as led:
        led.envelope_decrypt_stream(source, sink, context=context, overwrite=args.force,
                                    progress=progress)
    return 0


def register(sub: Any, add: AddCommand) -> None:
    """``encrypt``, ``decrypt``, ``sign``, ``verify`` and ``public-key``."""
    p = add(sub, "encrypt", cmd_encrypt, "encrypt data with a key (AES-GCM in the HSM)")
    p.add_argument("name")
    _io(p)
    p.add_argument("--context", type=pair, action="append", metavar="K=V",
                   help="encryption context, bound to the ciphertext (repeatable)")
    p = add(sub, "decrypt", cmd_decrypt,
            "decrypt a keyledger ciphertext (the key is named in the ciphertext)")
    p.add_argument("name", nargs="?",
                   help="optional: fail unless the ciphertext was made with this key")
    _io(p)
    p.add_argument("--context", type=pair, action="append", metavar="K=V",
                   help="the encryption context used when encrypting (repeatable)")
    p = add(sub, "encrypt-file", cmd_encrypt_file,
            "envelope-encrypt a file of any size, chunk by chunk (a streamed envelope)")
    p.add_argument("name")
    _file_io(p, "the file to encrypt", "the encrypted file to write")
    p.add_argument("--chunk-size", type=int, default=CHUNK_SIZE, metavar="BYTES",
                   help=f"plaintext bytes per chunk (default {CHUNK_SIZE})")
    p.add_argument("--context", type=pair, action="append", metavar="K=V",
                   help="encryption context, bound to every chunk (repeatable)")
    p = add(sub, "decrypt-file", cmd_decrypt_file,
            "decrypt a file made by encrypt-file; OUT appears only if all of it is authentic")
    _file_io(p, "the encrypted file", "the decrypted file to write")
    p.add_argument("--context", type=pair, action="append", metavar="K=V",
                   help="the encryption context used when encrypting (repeatable)")
    p = add(sub, "sign", cmd_sign, "sign data with a signing key")
    p.add_argument("name")
    _io(p, out_help="signature file (default: stdout, raw bytes)")
    p = add(sub, "verify", cmd_verify, "verify a signature (exit 0 valid, 1 invalid)",
            json_flag=True)
    p.add_argument("name")
    p.add_argument("--in", dest="infile", metavar="FILE", help="the signed data (default: stdin)")
    p.add_argument("--signature", required=True, metavar="SIGFILE", help="the signature file")
    p = add(sub, "public-key", cmd_public_key, "print a signing key's public key (PEM)")
    p.add_argument("name")
    p.add_argument("--version", type=int, help="key version (default: latest)")
    p.add_argument("--out", dest="outfile", metavar="FILE", help="write to FILE (default: stdout)")
    add_force(p, "an existing --out file")


def _io(p: argparse.ArgumentParser, out_help: str = "output file (default: stdout)") -> None:
    p.add_argument("--in", dest="infile", metavar="FILE", help="input file, or - for stdin "
                   "(default: stdin)")
    p.add_argument("--out", dest="outfile", metavar="FILE", help=out_help)
    add_force(p, "an existing --out file")


def _file_io(p: argparse.ArgumentParser, in_help: str, out_help: str) -> None:
    p.add_argument("infile", metavar="IN", help=f"{in_help} (- for stdin)")
    p.add_argument("outfile", metavar="OUT", help=f"{out_help} (- for stdout)")
    add_force(p, "an existing OUT file")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (there is none unless stderr is a terminal)")
