"""Where keyledger writes a file or folder a caller names, and how (docs/security.md).

Every report, export, backup and CLI output goes through here, so that no call can write into
a keyledger home (its PIN files, token, settings, store or journals), whoever makes it:

- the path is resolved, following links (also of parent folders), and refused when it lies
  inside a protected path (the home, or a PIN file or SoftHSM2 config kept elsewhere), is one,
  or is a parent of one;
- a final component that is a symbolic link is refused (nothing is written through a link);
- an existing file (or non-empty folder) is refused unless the caller passes ``overwrite=True``;
- the data goes to a temporary file created with ``O_EXCL | O_NOFOLLOW`` (or a fresh temporary
  folder) next to the target, which is then renamed into place, so a failure leaves nothing
  behind and a reader never sees half a file.

Every refusal is an ``InvalidInput`` that names the path and says what to do.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, NoReturn

from .errors import InvalidInput, KeyLedgerError

if TYPE_CHECKING:
    from .config import Settings

NAME_MAX, PATH_MAX = 255, 4095  # bytes (Linux and most file systems)
OVERWRITE_HINT = "pass overwrite=True (--force on the command line) to replace it"


def protected_paths(settings: Settings) -> list[Path]:
    """The home and the secrets it points at outside itself (PIN file, SoftHSM2 config)."""
    paths = [settings.home]
    for extra in (settings.hsm.pin_file, settings.hsm.softhsm2_conf):
        if extra is not None:
            paths.append(Path(extra))
    return paths


def check_target(path: object, protected: Iterable[Path], *, overwrite: bool,
                 folder: bool = False, replaceable: Callable[[Path], bool] | None = None,
                 what: str = "file") -> Path:
    """The path to write ``path`` to (parent folders resolved), or ``InvalidInput``.

    ``folder``: the output is a folder (an existing empty folder is fine; a non-empty one is
    replaced only with ``overwrite`` and only when ``replaceable(folder)`` says it holds a
    previous output of the same kind, so a slip never deletes someone's folder).
    """
    if not isinstance(path, str | os.PathLike):
        raise InvalidInput(f"the {what} path must be a file path, not {type(path).__name__}")
    raw = Path(path).expanduser()
    refuse_unusable(raw)
    if raw.name in ("", ".", ".."):
        raise InvalidInput(f"{path} names no {what}; give a new name, e.g. {raw}/out")
    target = _resolve(raw.absolute().parent) / raw.name
    try:  # a folder we may not look into: PermissionError from the checks below
        _refuse_protected(path, target, protected, what, folder)
        if target.is_symlink():
            raise InvalidInput(f"{target} is a symbolic link (to {os.readlink(target)}); keyledger "
                               f"does not write through links - give the real path of the {what}")
        if not target.parent.is_dir():
            raise InvalidInput(f"the folder {target.parent} does not exist; create it first or "
                               f"choose another folder for the {what}")
        if folder:
            _check_folder(target, overwrite, replaceable, what)
        elif target.is_dir():
            raise InvalidInput(f"{target} is a directory; give a file name inside it, e.g. "
                               f"{target / ('new-' + what.replace(' ', '-'))}")
        elif target.exists() and not overwrite:
            raise InvalidInput(f"{target} already exists; choose a new name for the {what}, or "
                               f"{OVERWRITE_HINT}")
    except OSError as exc:
        raise InvalidInput(f"cannot check {target}: {exc.strerror or exc}; choose a folder "
                           "you can read and write") from None
    return target


def check_source(path: object, what: str = "file") -> Path:
    """A file to read, resolved through links; ``InvalidInput`` unless it is a regular file."""
    if not isinstance(path, str | os.PathLike):
        raise InvalidInput(f"the {what} path must be a file path, not {type(path).__name__}")
    src = _resolve(Path(path).expanduser())
    if not src.is_file():
        raise InvalidInput(f"no {what} at {src}" + (f" (given as {path})"
                                                   if str(path) != str(src) else ""))
    return src


def refuse_unusable(path: Path) -> None:
    """Refuse what the OS cannot take as a path: os.* would raise a bare ValueError (a NUL
    byte), UnicodeEncodeError (a lone surrogate such as '\\ud800') or OSError (a name or a
    path too long for the file system); and a name of bytes that are not UTF-8, which the OS
    takes but the store and the audit record cannot."""
    if "\0" in str(path):
        raise InvalidInput(f"a path cannot contain a NUL byte: {str(path)!r}")
    try:
        encoded = os.fsencode(str(path))
    except UnicodeEncodeError:
        raise InvalidInput(f"a path must be valid text: {str(path)!r} cannot be encoded as a "
                           "file name") from None
    try:  # bytes that are not UTF-8 come in as '\udcXX' escapes: the OS takes them back,
        str(path).encode("utf-8")  # but DuckDB and the audit record (UTF-8 both) cannot
    except UnicodeEncodeError:
        raise InvalidInput(f"a path must be valid text: {str(path)!r} holds bytes that are not "
                           f"UTF-8 ({encoded!r}); keyledger records the paths it reads and "
                           "writes in its audit ledger, so rename the file or choose a UTF-8 "
                           "name") from None
    longest = max((len(part) for part in encoded.split(b"/")), default=0)
    if longest > NAME_MAX or len(encoded) > PATH_MAX:  # os.* would raise ENAMETOOLONG
        raise InvalidInput(f"a path too long for the file system: {_abbreviate(str(path))} "
                           f"({len(encoded)} bytes, a name of {longest}; the limits are "
                           f"{NAME_MAX} bytes a name and {PATH_MAX} a path)")


def _abbreviate(text: str, keep: int = 60) -> str:
    return text if len(text) <= 2 * keep else f"{text[:keep]}...{text[-keep:]}"


def _resolve(path: Path) -> Path:
    """``path`` with every link followed (``InvalidInput`` for a link loop)."""
    refuse_unusable(path)
    try:
        return path.resolve()
    except (RuntimeError, OSError) as exc:  # 3.11 raises RuntimeError for a loop
        raise InvalidInput(f"cannot resolve {path}: {getattr(exc, 'strerror', None) or exc}; "
                           "check its symbolic links") from None


def _refuse_protected(given: object, target: Path, protected: Iterable[Path], what: str,
                      folder: bool) -> None:
    real = _resolve(target)  # through a final link too
    for place in protected:
        place = _resolve(Path(place).absolute())
        for candidate in {target, real}:
            if candidate == place or candidate.is_relative_to(place):
                raise InvalidInput(
                    f"{given} is inside the keyledger home or its secrets ({place}); writing "
                    f"there could destroy its keys, PINs or ledger - choose a path outside the "
                    f"home for the {what}")
            if folder and place.is_relative_to(candidate):  # (a file there is a directory)
                raise InvalidInput(
                    f"{given} contains the keyledger home or its secrets ({place}); choose a "
                    f"path outside the home for the {what}")


def _check_folder(target: Path, overwrite: bool, replaceable: Callable[[Path], bool] | None,
                  what: str) -> None:
    if not target.exists():
        return
    if not target.is_dir():
        raise InvalidInput(f"{target} exists and is not a folder; the {what} is a folder - "
                           "choose a new name")
    if not any(target.iterdir()):
        return
    if not overwrite:
        raise InvalidInput(f"{target} already exists and is not empty; choose a new name for "
                           f"the {what}, or {OVERWRITE_HINT}")
    if replaceable is None or not replaceable(target):
        raise InvalidInput(f"{target} is a folder that does not hold a previous {what}; "
                           "overwrite=True replaces only such a folder - choose a new name")


# -- writing -------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_file(target: Path, *, overwrite: bool, private: bool = True) -> Iterator[BinaryIO]:
    """Write ``target`` (from ``check_target``) through a temporary file in its folder.

    The temporary file is created with ``O_EXCL | O_NOFOLLOW`` (mode 0600; the umask's mode
    unless ``private``), synced, and renamed into place when the block ends without an error;
    on an error it is removed. Without ``overwrite`` a file that appeared meanwhile is kept.
    """
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.partial")
    fd = _open_new(tmp, target)
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        if not private:
            os.chmod(tmp, 0o666 & ~_umask())
        _place(tmp, target, overwrite)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        _raise_write_error(exc, target)
    _fsync_dir(target.parent)


def write_file(target: Path, data: bytes, *, overwrite: bool, private: bool = True) -> Path:
    """``data`` into ``target`` through ``atomic_file``."""
    with atomic_file(target, overwrite=overwrite, private=private) as out:
        out.write(data)
    return target


@contextlib.contextmanager
def staged_file(target: Path, *, overwrite: bool) -> Iterator[Path]:
    """A path in a fresh private folder next to ``target`` for a writer that creates the file
    itself (DuckDB's COPY); the file is made private and renamed to ``target`` when the block
    ends without an error. The folder is removed either way."""
    folder = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial",
                                   dir=target.parent))
    try:
        tmp = folder / target.name
        yield tmp
        os.chmod(tmp, 0o600)
        _place(tmp, target, overwrite)
    except BaseException as exc:
        _raise_write_error(exc, target)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    _fsync_dir(target.parent)


@contextlib.contextmanager
def atomic_folder(target: Path, *, overwrite: bool) -> Iterator[Path]:
    """A fresh, empty temporary folder next to ``target`` (from ``check_target(folder=True)``)
    to build the output in; renamed to ``target`` when the block ends without an error (a
    previous output there is replaced only with ``overwrite``), removed on an error."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial",
                                dir=target.parent))
    try:
        yield tmp
        _place_folder(tmp, target, overwrite)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_write_error(exc, target)
    _fsync_dir(target.parent)


def _raise_write_error(exc: BaseException, target: Path) -> NoReturn:
    """Re-raise ``exc``, an ``OSError`` as a ``KeyLedgerError`` a person can act on (an
    ``AccessDenied`` raised while writing is a ``PermissionError`` too, and stays itself)."""
    if isinstance(exc, OSError) and not isinstance(exc, KeyLedgerError):
        raise KeyLedgerError(f"writing {target} failed: {exc.strerror or exc}; check the folder "
                             "is writable and has free space (nothing was written)") from None
    raise exc


def _open_new(tmp: Path, target: Path) -> int:
    try:
        return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise InvalidInput(f"cannot write {target}: {exc.strerror or exc}; check the folder "
                           "is writable") from None


def _place(tmp: Path, target: Path, overwrite: bool) -> None:
    """Rename ``tmp`` to ``target``; without ``overwrite`` never replace what is there."""
    if overwrite:
        os.replace(tmp, target)
        return
    try:
        os.link(tmp, target)  # fails if target exists (even as a dangling link)
    except FileExistsError:
        raise InvalidInput(f"{target} already exists (it appeared while writing); choose a "
                           f"new name, or {OVERWRITE_HINT}") from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        if os.path.lexists(target):  # a file system without hard links
            raise InvalidInput(f"{target} already exists; {OVERWRITE_HINT}") from None
        os.replace(tmp, target)
        return
    tmp.unlink()


def _place_folder(tmp: Path, target: Path, overwrite: bool) -> None:
    """Rename ``tmp`` to ``target``; an empty folder there is replaced by the rename itself,
    a previous output (checked by ``check_target``) only with ``overwrite``."""
    try:
        os.rename(tmp, target)
        return
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not overwrite:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise InvalidInput(f"{target} already exists (it appeared while writing); "
                                   f"choose a new name, or {OVERWRITE_HINT}") from None
            raise
    old = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.old")
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


__all__ = ["OVERWRITE_HINT", "atomic_file", "atomic_folder", "check_source", "check_target",
           "protected_paths", "staged_file", "write_file"]
