"""Bounded reading of the zip archives sources come in (``.keras`` files, torch's zip format).

A zip's directory says how large each member unpacks to; an archive built to exhaust memory or disk (a
"zip bomb": members that inflate a thousandfold, millions of members, sizes that lie) is refused from
that directory before anything is inflated, and members are read with a hard cap whatever the
directory claims.
"""

from __future__ import annotations

import zipfile
from collections import Counter

from savegame.errors import DamagedSourceError

__all__ = ["MAX_MEMBERS", "MAX_RATIO", "check_archive", "open_archive", "read_member"]

MAX_MEMBERS = 1_000_000
"""Most members an archive may have (torch writes one per tensor storage)."""

MAX_RATIO = 200
"""Largest compression ratio a member may claim (deflated weights and JSON stay far below it)."""


def open_archive(path: str) -> zipfile.ZipFile:
    """Open the zip at ``path``, or raise :class:`DamagedSourceError` (truncated, not a zip)."""
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise DamagedSourceError(
            f"{path}: not a readable zip archive ({exc}); the file is truncated or damaged: copy it again"
        ) from None


def check_archive(archive: zipfile.ZipFile, path: str, *, max_total: int) -> None:
    """Refuse an archive whose directory promises more than ``max_total`` bytes, too many members, a
    member name twice, or a member that inflates more than :data:`MAX_RATIO` times its stored size."""
    infos = archive.infolist()
    if len(infos) > MAX_MEMBERS:
        raise DamagedSourceError(f"{path}: {len(infos):,} members in the archive (at most {MAX_MEMBERS:,})")
    names = [info.filename for info in infos]
    if len(set(names)) != len(names):  # readers disagree on which copy counts: what is checked may not be read
        twice = sorted(n for n, count in Counter(names).items() if count > 1)[:5]
        raise DamagedSourceError(f"{path}: members {twice} appear twice in the archive: refused")
    total = 0
    for info in infos:
        total += info.file_size
        if info.compress_type != zipfile.ZIP_STORED and info.file_size > 1 << 20 and (
            info.file_size > MAX_RATIO * max(info.compress_size, 1)
        ):
            raise DamagedSourceError(
                f"{path}: member {info.filename!r} inflates from {info.compress_size:,} to {info.file_size:,} bytes "
                f"(more than {MAX_RATIO} times): refused as a zip bomb"
            )
    if total > max_total:
        raise DamagedSourceError(f"{path}: the archive unpacks to {total:,} bytes (at most {max_total:,})")


def read_member(archive: zipfile.ZipFile, name: str, path: str, *, limit: int) -> bytes:
    """The bytes of member ``name``, at most ``limit`` (whatever the directory says)."""
    try:
        info = archive.getinfo(name)
        if info.file_size > limit:
            raise DamagedSourceError(f"{path}: member {name!r} is {info.file_size:,} bytes (at most {limit:,})")
        with archive.open(info) as member:
            data = member.read(limit + 1)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:  # CRC errors, truncated data
        raise DamagedSourceError(f"{path}: member {name!r} cannot be read ({exc}): the file is damaged") from None
    if len(data) > limit:
        raise DamagedSourceError(f"{path}: member {name!r} unpacks to more than {limit:,} bytes")
    return data
