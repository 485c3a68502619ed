"""The one atomic write: a reader (or a crash, or a power cut) never finds half a file in place of a good one.

Every file the app writes into a run folder goes through `atomic_path` (or `atomic_open`, `write_atomic`): the data
goes to a temporary file in the same folder, is flushed to the disk (fsync), renamed over the target, and then the
folder itself is flushed so the rename survives a power loss too. Without both fsyncs a power cut can leave an *empty*
`status.json` behind (the rename reached the disk, the data did not).

Temporary files are named `.<name>.tmp<pid>-<host>-<random>` so that `remove_stale_temps` can recognise what a
crashed writer left behind: the pid tells whether the writer still lives (on this machine; `<host>` says which
machine, since the models folder may be shared over NFS), and anything untouched for `STALE_AFTER_S` is stale
wherever it came from.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import stat
import time
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

log = logging.getLogger(__name__)

# a temp file untouched this long is stale whoever wrote it (a live writer touches its file as it writes)
STALE_AFTER_S = 15 * 60
# folders a crashed `RunStore.delete` left behind (renamed away, not yet removed) start with this
TRASH_PREFIX = ".deleting-"
_TEMP = re.compile(r"^\.(?P<target>.+)\.tmp(?P<pid>\d+)-(?P<host>[0-9a-f]{6})-[0-9a-f]{6}$")


@lru_cache(maxsize=1)
def _host_tag() -> str:
    """This machine (and pid namespace: containers sharing a volume may share a host name) in 6 hex digits."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:  # not Linux
        namespace = 0
    return hashlib.sha1(f"{socket.gethostname()}/{namespace}".encode()).hexdigest()[:6]


def temp_path(path: Path) -> Path:
    """Where `atomic_open` writes before the rename: same folder (a rename never crosses filesystems)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}-{_host_tag()}-{secrets.token_hex(3)}")


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename or a new file in it) to the disk."""
    if os.name == "nt":  # Windows cannot open a folder as a file; NTFS journals renames itself
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        # some filesystems (certain FUSE/network mounts) refuse fsync on a folder: the rename itself has happened
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        log.debug("cannot fsync folder %s (%s): the filesystem does not support it", folder, exc.strerror)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path to write `path`'s new content to (for writers that want a file name, like `torch.save`).
    On a clean exit the file is flushed to the disk and replaces `path`, then the folder is flushed; on an error
    it is removed and `path` keeps its previous content."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)  # fsync flushes the file's data whichever descriptor asks
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", **open_kwargs: Any) -> Iterator[IO]:
    """`atomic_path` as an open file: mode "w" or "wb", other keywords go to `open`."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode, **open_kwargs) as fh:
        yield fh


def write_atomic(path: str | os.PathLike, data: str | bytes, encoding: str = "utf-8") -> Path:
    """Write all of `data` to `path` atomically and durably (see `atomic_open`)."""
    if isinstance(data, str):
        with atomic_open(path, "w", encoding=encoding) as fh:
            fh.write(data)
    else:
        with atomic_open(path, "wb") as fh:
            fh.write(data)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, data: Any, **dumps_kwargs: Any) -> Path:
    """`data` as JSON (indented, sorted keys unless told otherwise), written atomically and durably."""
    options = {"indent": 2, "sort_keys": True, **dumps_kwargs}
    return write_atomic(path, json.dumps(data, **options))


# --- what a crash leaves behind -----------------------------------------------------------------------------------

class NotARegularFile(OSError):
    """A path that names a FIFO, a device, a socket or a folder where a file was expected."""


def open_regular(path: str | os.PathLike, *, follow_links: bool = True) -> IO[bytes]:
    """Open `path` for binary reading only if it is a regular file; NotARegularFile otherwise.

    O_NONBLOCK, because opening a FIFO blocks until someone writes to it: a FIFO named `x.png` in a dataset would
    otherwise hang a dataset check or a training worker for ever, and `/dev/zero` would be read without end. The
    type is checked on the open descriptor, so a file swapped for a FIFO after a check cannot slip through.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_links else os.O_NOFOLLOW)
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
            raise NotARegularFile(errno.EINVAL, f"not a regular file: it is {kind}", os.fspath(path))
        os.set_blocking(fd, True)  # a regular file never blocks; later reads behave as usual
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill would terminate the process there; leave such temps to the age rule
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def is_stale_temp(path: Path, now: float | None = None, max_age: float = STALE_AFTER_S) -> bool:
    """True for an `atomic_open` temp file whose writer is gone: its pid is dead on this machine, or it was
    not touched for `max_age` seconds (a writer on another machine, or a reused pid)."""
    match = _TEMP.match(path.name)
    if not match:
        return False
    try:
        age = (time.time() if now is None else now) - path.lstat().st_mtime
    except FileNotFoundError:  # its writer just renamed it into place
        return False
    if age > max_age:
        return True
    return match["host"] == _host_tag() and not _pid_alive(int(match["pid"]))


def remove_tree(folder: Path) -> None:
    """`shutil.rmtree` that lets another process remove parts of the same tree at the same time."""
    def onerror(func, path, exc_info):
        if not issubclass(exc_info[0], FileNotFoundError):
            raise exc_info[1]

    shutil.rmtree(folder, onerror=onerror)


def remove_stale_temps(folders: Iterable[Path], max_age: float = STALE_AFTER_S) -> list[Path]:
    """Remove stale temp files (see `is_stale_temp`) and half-deleted run folders (`TRASH_PREFIX`) directly in
    `folders`; returns what was removed. A file that vanishes meanwhile (its writer finished) is left alone."""
    removed: list[Path] = []
    now = time.time()
    for folder in folders:
        try:
            entries = list(Path(folder).iterdir())
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            if entry.name.startswith(TRASH_PREFIX) and entry.is_dir() and not entry.is_symlink():
                remove_tree(entry)
                removed.append(entry)
            elif entry.is_file() and is_stale_temp(entry, now, max_age):
                entry.unlink(missing_ok=True)
                removed.append(entry)
    if removed:
        log.info("removed %d file(s) left by an interrupted write or delete: %s", len(removed),
                 ", ".join(str(p) for p in removed[:10]))
    return removed
