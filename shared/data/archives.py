"""What an archive entry may be before anything is written: the one set of rules for the page's .zip uploads
(`ui/paths.py`) and downloaded .tar archives (`shared.data.download`).

An entry is refused when its name could write outside the extraction folder (absolute, a drive letter, `..`,
with `\\` read as a separator, as Windows archivers write it), holds a NUL, nests absurdly deep, or when it is
a link or a device rather than a plain file or folder. Zip entries that inflate far beyond their compressed size
are refused too (images are compressed already: that is a zip bomb).
"""

from __future__ import annotations

import re
import stat
import tarfile
import zipfile
from pathlib import PurePosixPath

MAX_ENTRY_DEPTH = 32
# an entry inflating more than this many times (above RATIO_MIN_BYTES) is a bomb, not an image
MAX_COMPRESSION_RATIO = 200
RATIO_MIN_BYTES = 1_000_000

__all__ = ["MAX_COMPRESSION_RATIO", "MAX_ENTRY_DEPTH", "UnsafeEntry", "check_inflation", "entry_parts",
           "tar_member_parts", "zip_entry_parts"]


class UnsafeEntry(ValueError):
    """An archive entry that must not be extracted; the message names the entry and the problem
    ("entry '../x' climbs out of its folder"), the caller adds what to do."""


def entry_parts(name: str) -> tuple[str, ...]:
    """The path parts an entry named `name` would be written to, below the extraction folder; UnsafeEntry for
    a name that could escape it."""
    posix = name.replace("\\", "/")
    if posix.startswith("/") or re.match(r"^[A-Za-z]:", posix):
        raise UnsafeEntry(f"entry {name!r} has an absolute path")
    parts = tuple(p for p in PurePosixPath(posix).parts if p not in ("", "."))
    if ".." in parts:
        raise UnsafeEntry(f"entry {name!r} climbs out of its folder ('..')")
    if any("\x00" in p for p in parts):
        raise UnsafeEntry(f"entry {name!r} has a NUL character in its name")
    if len(parts) > MAX_ENTRY_DEPTH:
        raise UnsafeEntry(f"entry {name!r} nests folders more than {MAX_ENTRY_DEPTH} deep")
    return parts


def zip_entry_parts(info: zipfile.ZipInfo) -> tuple[str, ...]:
    """`entry_parts` of a zip entry, refusing symbolic links (Unix archivers keep st_mode in the high 16 bits
    of `external_attr`)."""
    parts = entry_parts(info.filename)
    if info.create_system == 3 and stat.S_ISLNK(info.external_attr >> 16):
        raise UnsafeEntry(f"entry {info.filename!r} is a link")
    return parts


def check_inflation(info: zipfile.ZipInfo) -> None:
    """Refuse a zip entry that inflates more than MAX_COMPRESSION_RATIO times its compressed size."""
    if info.file_size > RATIO_MIN_BYTES and info.file_size > MAX_COMPRESSION_RATIO * max(1, info.compress_size):
        raise UnsafeEntry(f"entry {info.filename!r} inflates {info.compress_size / 1e6:.0f} MB into "
                          f"{info.file_size / 1e6:.0f} MB, more than {MAX_COMPRESSION_RATIO} times — images do "
                          "not compress like that (a zip bomb?)")


def tar_member_parts(member: tarfile.TarInfo) -> tuple[str, ...]:
    """`entry_parts` of a tar member, refusing links (symbolic and hard) and devices, fifos and the like."""
    parts = entry_parts(member.name)
    if member.issym() or member.islnk():
        raise UnsafeEntry(f"entry {member.name!r} is a link")
    if not (member.isfile() or member.isdir()):
        raise UnsafeEntry(f"entry {member.name!r} is a device or other special file")
    return parts
