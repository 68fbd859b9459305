"""A worker's spool reused in place: a ring file mapped into the worker and read by the chainer."""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import zlib
from pathlib import Path
from typing import Any

# -- the ring: a spool reused in place -------------------------------------------------------------
#
# Appending to a spool file costs a `write` system call per record and, as the file grows, new
# page-cache pages. A worker's ring (spool/<pid>.ring) is a file of fixed size mapped into the
# worker (MAP_SHARED) and reused in place: a record is stored into the mapping, so it is in the
# kernel's page cache when the store is done (a SIGKILL of the worker loses nothing it stored) and
# the chainer reads it through its own mapping of the same file. No system call, no new pages.
#
#   header (RING_HEADER bytes): magic, data size; written by the chainer only: how far it has
#     chained (a byte count over all laps) with the sequence number of the next frame, in two slots
#     written in turn (generation, position, seq, CRC: a store torn by a kill or caught half done
#     leaves the other slot, the older position, which is the safe side for the worker deciding
#     whether the ring has room); and how far it has chained the worker's overflow spool file
#     (inode, offset, CRC)
#   frames, 8-byte aligned: CRC-32 (u32) of what follows it, length (u32), seq (u64), the record. The chainer takes a frame only when its seq is the next one and its CRC matches:
#     a frame being written (or torn by a kill) is never read, whatever order the stores become
#     visible in; a frame of an earlier lap has an older seq. A frame does not wrap: when it would
#     not fit before the end, a WRAP frame (length 0xFFFFFFFF) is stored there (or, with fewer than
#     16 bytes left, nothing) and the frame goes to the start.
#
# A full ring (the chainer has not caught up) sends records to the worker's spool file
# (<pid>.jsonl), and they keep going there until the chainer has taken everything from both, so a
# worker's records are chained in the order it wrote them (the chainer reads spool files before rings).

RING_MAGIC = b"ppring01"
RING_HEADER = 4096
RING_BYTES = 4 << 20  # the adapter's default (`audit_ring_bytes`); 0: no ring, spool files only
FRAME_HEAD = struct.Struct("<IQ")  # length, seq
FRAME = struct.Struct("<IIQ")  # crc (of what follows it: length, seq, the record), length, seq
_SLOT = struct.Struct("<QQQQ")  # generation, chained bytes, next seq, crc of the first three
_SLOT_HEAD = struct.Struct("<QQQ")
_SLOTS_AT = (16, 48)
_OVERFLOW = struct.Struct("<QQQ")  # inode and chained offset of the overflow spool file, crc
_OVERFLOW_HEAD = struct.Struct("<QQ")
_OVERFLOW_AT = 80
WRAP = 0xFFFFFFFF


class SpoolRing:
    """One worker's ring file, as its writer (the worker) or its reader (the chainer) sees it."""

    def __init__(self, path: Path, fd: int, mapping: mmap.mmap, size: int):
        self.path = path
        self.fd = fd
        self.map = mapping
        self.size = size  # of the data area
        self.inode = os.fstat(fd).st_ino

    @classmethod
    def create(cls, path: Path, size: int) -> SpoolRing:
        """The ring at `path`, made (zero-filled, so no page is allocated later) unless it exists."""
        if not path.exists():
            temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
            try:
                header = bytearray(RING_HEADER)
                header[:16] = RING_MAGIC + struct.pack("<Q", size)
                _SLOT.pack_into(header, _SLOTS_AT[1], 1, 0, 1, zlib.crc32(_SLOT_HEAD.pack(1, 0, 1)))
                os.write(fd, header)
                zeros = bytes(1 << 20)
                for start in range(0, size, len(zeros)):
                    os.write(fd, zeros[: min(len(zeros), size - start)])
            finally:
                os.close(fd)
            os.replace(temporary, path)  # complete before the chainer can see it
        ring = cls.open(path)
        if ring is None:
            raise OSError(f"{path}: not a spool ring")
        return ring

    @classmethod
    def open(cls, path: Path) -> SpoolRing | None:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            head = os.pread(fd, 16, 0)
            size = struct.unpack_from("<Q", head, 8)[0] if len(head) == 16 else 0
            if (
                head[:8] != RING_MAGIC
                or size < 4096
                or size % 8
                or os.fstat(fd).st_size != RING_HEADER + size
            ):
                os.close(fd)
                return None
            mapping = mmap.mmap(
                fd, RING_HEADER + size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            )
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, mapping, size)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.map.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)

    # -- the chainer's values in the header --------------------------------------------------------

    def position(self) -> tuple[int, int, int] | None:
        """(generation, bytes chained, seq of the next frame) of the newest intact slot."""
        best = None
        for at in _SLOTS_AT:
            generation, chained, seq, crc = _SLOT.unpack_from(self.map, at)
            if zlib.crc32(_SLOT_HEAD.pack(generation, chained, seq)) == crc and (
                best is None or generation > best[0]
            ):
                best = (generation, chained, seq)
        return best

    def set_position(self, chained: int, seq: int) -> None:
        current = self.position()
        generation = (current[0] if current else 0) + 1
        _SLOT.pack_into(
            self.map,
            _SLOTS_AT[generation % 2],
            generation,
            chained,
            seq,
            zlib.crc32(_SLOT_HEAD.pack(generation, chained, seq)),
        )

    def chained(self) -> int | None:
        position = self.position()
        return position[1] if position else None

    def overflow(self) -> tuple[int, int] | None:
        inode, done, crc = _OVERFLOW.unpack_from(self.map, _OVERFLOW_AT)
        return (inode, done) if zlib.crc32(_OVERFLOW_HEAD.pack(inode, done)) == crc else None

    def set_overflow(self, inode: int, done: int) -> None:
        _OVERFLOW.pack_into(self.map, _OVERFLOW_AT, inode, done, zlib.crc32(_OVERFLOW_HEAD.pack(inode, done)))

    # -- reading (the chainer) -----------------------------------------------------------------------

    def frames(
        self, into: list[Any] | None = None, bad: list[bytes] | None = None
    ) -> tuple[list[Any], int, int]:
        """The complete records after the chained ones: (records, byte count, seq) after them.

        With `into` (the chainer), each record is added to that list as it is found, keyed for
        sorting: (its time, as far as it sorts; the record; where its ',"time":"' starts), and a
        record without that (not an audit record) to `bad` instead."""
        position = self.position()
        if position is None:
            raise ValueError(f"{self.path.name}: damaged header")
        _generation, total, seq = position
        size, data = self.size, self.map
        records: list[Any] = [] if into is None else into
        add = records.append
        view, unpack, crc32, header = memoryview(data), FRAME.unpack_from, zlib.crc32, RING_HEADER
        limit = total + size
        at = total % size  # where `total` is in the data area
        try:
            while total < limit:
                room = size - at
                if room < 16:
                    total += room
                    at = 0
                    continue
                start = at + header
                crc, length, frame_seq = unpack(data, start)
                if frame_seq != seq:
                    break  # not written yet (an older lap's frame)
                if length == WRAP:
                    if crc32(view[start + 4 : start + 16]) != crc:
                        break
                    total += room
                    at = 0
                    seq += 1
                    continue
                if length > room - 16 or crc32(view[start + 4 : start + 16 + length]) != crc:
                    break  # being written
                record = data[start + 16 : start + 16 + length]
                if into is None:
                    add(record)
                else:
                    cut = record.rfind(b',"time":"')
                    if cut > 0:
                        add((record[cut + 9 : cut + 41], record, cut))
                    elif bad is not None:
                        bad.append(record)
                length = (23 + length) & ~7  # the frame's size
                total += length
                at += length
                seq += 1
        finally:
            view.release()
        return records, total, seq
