"""The UTC offsets a time zone has ever used, from its TZif data (for `getHours("Europe/Berlin")`).

The analysis models a local time as the UTC time plus one of the zone's offsets, chosen freely:
every real local time is among these, so claims that no event can do something stay proven;
the calendar (which offset applies when) is not modelled, so such a condition is not exact and
its rule's witnesses are left to the engine to confirm.
"""

from __future__ import annotations

import datetime
import re
import struct
import zoneinfo
from functools import lru_cache
from pathlib import Path

from ..cel.functions import timezone_for

_POSIX_OFFSET = re.compile(r"(?:<[^>]*>|[A-Za-z]{3,})([+-]?)(\d{1,3})(?::(\d{2}))?(?::(\d{2}))?")


def _tzif_bytes(key: str) -> bytes | None:
    try:
        from zoneinfo._common import load_tzdata  # the tzdata package, where zoneinfo finds it

        with load_tzdata(key) as handle:
            return handle.read()
    except Exception:  # noqa: BLE001 - not in tzdata: the system's zoneinfo folders
        pass
    for folder in zoneinfo.TZPATH:
        path = Path(folder) / key
        if path.is_file():
            return path.read_bytes()
    return None


def _posix_offsets(footer: str) -> set[int] | None:
    """Offsets named by a POSIX TZ string (`CET-1CEST,M3.5.0,M10.5.0/3`): std, and dst (std + 1 h
    when not given). None when the string is not understood."""
    if not footer:
        return set()
    spec = footer.split(",")[0]
    matches = list(_POSIX_OFFSET.finditer(spec))
    if not matches or matches[0].start() != 0:
        return None

    def seconds(m: re.Match[str]) -> int:
        value = int(m.group(2)) * 3600 + int(m.group(3) or 0) * 60 + int(m.group(4) or 0)
        return value if m.group(1) == "-" else -value  # POSIX offsets are west-positive

    std = seconds(matches[0])
    rest = spec[matches[0].end() :]
    if not rest:
        return {std}
    dst_match = _POSIX_OFFSET.match(rest)
    if dst_match is not None and dst_match.end() == len(rest):
        return {std, seconds(dst_match)}
    if re.fullmatch(r"<[^>]*>|[A-Za-z]{3,}", rest):
        return {std, std + 3600}
    return None


@lru_cache(maxsize=64)
def zone_offsets(name: str) -> frozenset[int] | None:
    """Every UTC offset (seconds) the zone `name` uses, as the engine resolves the name; None
    when unknown (the condition then stays opaque)."""
    try:
        zone = timezone_for(name)
    except Exception:  # noqa: BLE001 - the engine raises at run time: left opaque
        return None
    if isinstance(zone, datetime.timezone):
        offset = zone.utcoffset(None)
        return frozenset({int(offset.total_seconds())}) if offset is not None else None
    key = getattr(zone, "key", None)
    data = _tzif_bytes(key) if isinstance(key, str) else None
    if data is None or data[:4] != b"TZif":
        return None
    try:
        offsets, footer = _parse_tzif(data)
    except (struct.error, ValueError, IndexError):
        return None
    extra = _posix_offsets(footer)
    if extra is None:
        return None
    return frozenset(offsets | extra)


def _parse_tzif(data: bytes) -> tuple[set[int], str]:
    version = data[4:5]

    def counts(at: int) -> tuple[int, ...]:
        return struct.unpack(">6l", data[at + 20 : at + 44])

    isut, isstd, leap, times, types, chars = counts(0)
    at = 44
    time_size = 4
    if version >= b"2":
        at += times * 4 + times + types * 6 + chars + leap * 8 + isstd + isut
        isut, isstd, leap, times, types, chars = counts(at)
        at += 44
        time_size = 8
    at += times * time_size + times
    offsets = {struct.unpack(">l", data[at + 6 * i : at + 6 * i + 4])[0] for i in range(types)}
    at += types * 6 + chars + leap * (time_size + 4) + isstd + isut
    footer = ""
    if version >= b"2" and data[at : at + 1] == b"\n":
        end = data.index(b"\n", at + 1)
        footer = data[at + 1 : end].decode("ascii")
    return offsets, footer
