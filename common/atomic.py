"""Atomic writes: every file the project writes goes to a temporary name beside its target and is
renamed into place when complete, so an interrupted or failed write never leaves a half-written
file, and a failure is one line naming the file (with the free space when the disk is full)."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from typing import Iterator, Optional

from common.errors import UserError


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _write_error(path: str, directory: str, e: OSError, need: Optional[int]) -> UserError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = _size(shutil.disk_usage(directory).free)
        except OSError:
            free = "unknown"
        needs = f"; it needs about {_size(need)}" if need else ""
        return UserError(f"disk full writing {path}: {free} free in {directory}{needs}; free some space "
                         f"(nothing was left half-written)")
    return UserError(f"cannot write {path}: {e.strerror or e}")


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:          # e.g. Windows cannot open directories; the rename is still done
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _default_mode(folder: bool) -> int:
    """What open()/mkdir would have given (mkstemp/mkdtemp make owner-only files)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if folder else 0o666) & ~umask


@contextlib.contextmanager
def atomic_path(path: str, overwrite: bool = True, folder: bool = False, need: Optional[int] = None) -> Iterator[str]:
    """Yield a temporary path next to `path`; on success it replaces `path` (never half-written),
    on any failure or interruption the temporary goes. An OSError (disk full, permissions) is a
    UserError naming the file; a full disk also says how much was free and, given `need` (bytes),
    how much the file needs."""
    if os.path.lexists(path) and not overwrite:
        raise UserError(f"{path} already exists (pass overwrite to replace it)")
    directory = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(os.path.normpath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        if folder:
            tmp = tempfile.mkdtemp(prefix=f".{base}.", suffix=".tmp", dir=directory)
        else:
            fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=directory)
            os.close(fd)
    except OSError as e:
        raise _write_error(path, directory, e, need) from None
    try:
        yield tmp
        os.chmod(tmp, _default_mode(folder))
        if folder:
            old = None
            if os.path.lexists(path):        # a folder cannot be renamed over: move it aside
                old = tempfile.mkdtemp(prefix=f".{base}.", suffix=".old", dir=directory)
                os.rmdir(old)
                os.rename(path, old)
            os.rename(tmp, path)
            if old:
                shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)
        else:
            with open(tmp, "r+b") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp) if folder else os.remove(tmp)
        if isinstance(e, OSError):
            raise _write_error(path, directory, e, need) from None
        raise
    _fsync_dir(directory)
