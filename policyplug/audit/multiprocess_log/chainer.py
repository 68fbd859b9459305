"""The timer process's side of a spooled multi-process log: spooled records into the chained log."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import logging
import operator
import os
from pathlib import Path

import orjson

from .locked_log import SharedAuditLog
from .ring import SpoolRing

log = logging.getLogger("policyplug.audit")

OFFSETS_SLOT = 1 << 20  # bytes per slot of the offsets file (two slots; sparse)
READ_CHUNK = 1 << 20  # a spool file is read this much at a time


class SpoolChainer:
    """Timer side: move spooled records into the hash-chained log. One process runs it."""

    def __init__(self, spool_dir: str | Path, log_: SharedAuditLog):
        self.dir = Path(spool_dir)
        self.log = log_
        self.offsets_path = self.dir / "offsets"
        self._offsets: dict[str, int] | None = None  # by inode: a renamed spool file keeps its place
        self._saved: dict[str, int] = {}
        self._generation = 0
        self._offsets_fd: int | None = None
        self._rings: dict[str, SpoolRing] = {}  # by file name, mapped once
        self._first_run = True  # the first batch may repeat what ends the log (see _drop_chained)

    def run_once(self) -> int:
        """Chain every complete new record; returns how many were moved. Spool files are read
        before rings: a worker's records that overflowed into its file were written after those
        in its ring, and any it writes to its ring after them come once both are chained.

        The garbage collector is off meanwhile: a batch holds a few tuples per record (thousands
        every 100 ms), which would set off collections that find nothing (they make no cycles)."""
        enabled = gc.isenabled()
        gc.disable()
        try:
            return self._run_once()
        finally:
            if enabled:
                gc.enable()

    def _run_once(self) -> int:
        try:
            names = os.listdir(self.dir)  # one look at the folder (not a glob per kind of file)
        except OSError:
            return 0
        if self._offsets is None:
            self._offsets = self._load_offsets()
        offsets = self._offsets
        batch: list[tuple[bytes, bytes, int]] = []  # (time, line, where its ',"time":' starts)
        finished: list[Path] = []
        finished_at: dict[Path, tuple[str, int]] = {}  # finished spool files: (inode key, offset)
        seen: set[str] = set()
        spooled: dict[str, tuple[int, int]] = {}  # <pid>.jsonl -> (inode, offset chained after this batch)
        for path in [self.dir / name for name in sorted(names) if name.endswith(".jsonl")]:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                stat = os.fstat(fd)
                key = str(stat.st_ino)
                seen.add(key)
                start = offsets.get(key, 0)
                data = (
                    os.pread(fd, min(stat.st_size - start, READ_CHUNK), start)
                    if stat.st_size > start
                    else b""
                )
                if len(data) == READ_CHUNK and b"\n" not in data:  # one very long line: all of it
                    data = os.pread(fd, stat.st_size - start, start)
            finally:
                os.close(fd)
            done = data.rfind(b"\n") + 1  # what follows the last newline: a line being written
            lines = data.split(b"\n")
            lines.pop()  # (left for next time)
            for line in lines:
                cut = line.rfind(b',"time":"')
                if cut > 0:
                    batch.append((line[cut + 9 : line.find(b'"', cut + 9)], line, cut))
                elif line.strip():  # not a record: kept out of the chain, and said
                    self.log.failed(ValueError(f"{path.name}: not an audit record: {line[:80]!r}"))
            offsets[key] = end = start + done
            spooled[path.name] = (stat.st_ino, end)
            if end >= stat.st_size and not _writer_alive(path):
                finished.append(path)
                seen.discard(key)  # its offset goes with it (below), before the file does
                finished_at[path] = (key, end)
        rings = self._read_rings(names, batch, finished)
        if self._first_run:
            self._first_run = False
            if batch:
                batch = self._drop_chained(batch)
        if batch:
            batch.sort(key=_first)  # by time; stable: one worker's records keep their order
            self.log.append_parts([(line[:cut], line[cut:]) for _time, line, cut in batch])
            self.log.sync()
        # offsets of files gone, and of finished files (removed below): the inode of a removed file
        # can be given to a new spool file at once, which must be read from its start. Saved before
        # the files are removed: a crash in between chains a finished file again (duplicated, not lost)
        for key in [k for k in offsets if k not in seen]:
            del offsets[key]
        if offsets != self._saved:
            self._save_offsets()
        for ring, total, seq in rings:  # chained: the worker may store over them
            if total != ring.chained():
                ring.set_position(total, seq)
            overflow = spooled.get(ring.path.name[: -len(".ring")] + ".jsonl", (0, 0))
            if ring.overflow() != overflow:
                ring.set_overflow(*overflow)
        for path in finished:  # fully chained and nobody writes it any more
            if path.name in self._rings:
                self._rings.pop(path.name).close()
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError:
                if path in finished_at:  # still there: keep its place, not to chain it again
                    key, end = finished_at[path]
                    offsets[key] = end
        if offsets != self._saved:
            self._save_offsets()
        return len(batch)

    def _drop_chained(self, batch: list[tuple[bytes, bytes, int]]) -> list[tuple[bytes, bytes, int]]:
        """The first batch after a start without the records that end the log already.

        A chainer killed after appending a batch but before saving how far it read (an fsync lies in
        between) left that batch to be read again: it is the end of the log, and at most as long as
        this batch. Its records are known by their ids (random, 128 bits), so they are not chained twice."""
        chained = self.log.last_record_ids(len(batch))
        if not chained:
            return batch
        kept = []
        for item in batch:
            try:
                record_id = orjson.loads(item[1])["id"]
            except (ValueError, TypeError, KeyError):
                record_id = None
            if record_id not in chained:
                kept.append(item)
        if len(kept) < len(batch):
            log.warning(
                "audit chainer: %d spooled records were in the log already (chained before a crash, "
                "not chained again)",
                len(batch) - len(kept),
            )
        return kept

    def _read_rings(
        self, names: list[str], batch: list[tuple[bytes, bytes, int]], finished: list[Path]
    ) -> list[tuple[SpoolRing, int, int]]:
        """Add the new records of every ring (of the folder's `names`) to `batch`; (ring, bytes,
        seq) after them."""
        found: list[tuple[SpoolRing, int, int]] = []
        rings = sorted(name for name in names if name.endswith(".ring"))
        bad: list[bytes] = []
        for name in rings:
            ring = self._rings.get(name)
            before = len(batch)
            try:
                if ring is None:
                    ring = SpoolRing.open(self.dir / name)
                    if ring is None:
                        continue  # not a ring (yet): its worker makes it under another name first
                    self._rings[name] = ring
                _records, total, seq = ring.frames(batch, bad)  # keyed into the batch: (time, record, cut)
            except (OSError, ValueError) as exc:
                del batch[before:]
                self.log.failed(ValueError(f"{name}: {exc}"))
                continue
            taken = len(batch) - before + len(bad)
            for record in bad:
                self.log.failed(ValueError(f"{name}: not an audit record: {record[:80]!r}"))
            bad.clear()
            found.append((ring, total, seq))
            if not taken and not _writer_alive(ring.path):
                finished.append(ring.path)  # its worker is gone and everything it stored is chained
        current = set(rings)
        for name in [n for n in self._rings if n not in current]:
            self._rings.pop(name).close()
        for name in names:  # a ring being made by a worker that died doing it: <pid>.ring.<maker>.tmp
            if name.endswith(".tmp") and ".ring." in name:
                maker = name.split(".")[-2]
                path = self.dir / name
                if maker.isdigit() and not _writer_alive(path.with_name(f"{maker}.ring")):
                    with contextlib.suppress(OSError):
                        os.unlink(path)
        return found

    # How far each spool file is chained survives a restart: two slots of one file, written in
    # turn in place (one pwrite, no new file and rename every 100 ms), each with a generation and
    # a checksum; the valid one of the higher generation counts. A write torn by a crash leaves
    # the other slot, the state before: what a crash between chaining and saving gives anyway.

    def _load_offsets(self) -> dict[str, int]:
        best: tuple[int, dict[str, int]] | None = None
        try:
            with open(self.offsets_path, "rb") as f:
                for slot in range(2):
                    f.seek(slot * OFFSETS_SLOT)
                    header = f.readline(200)
                    try:
                        magic, generation, length, digest = header.split()
                        body = f.read(int(length))
                        if magic != b"ppoffsets1" or hashlib.sha256(body).hexdigest().encode() != digest:
                            continue
                        state = {k: int(v) for k, v in orjson.loads(body).items()}
                    except (ValueError, TypeError, AttributeError):
                        continue
                    if best is None or int(generation) > best[0]:
                        best = (int(generation), state)
        except FileNotFoundError:
            pass
        if best is None:
            best = (0, {})
        self._generation = best[0]
        self._saved = dict(best[1])
        return best[1]

    def _save_offsets(self) -> None:
        assert self._offsets is not None
        body = orjson.dumps(self._offsets)
        header = b"ppoffsets1 %d %d %s\n" % (
            self._generation + 1,
            len(body),
            hashlib.sha256(body).hexdigest().encode(),
        )
        if len(header) + len(body) > OFFSETS_SLOT:
            raise ValueError(f"{len(self._offsets)} spool files: too many to keep their offsets")
        if self._offsets_fd is None:
            self._offsets_fd = os.open(self.offsets_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self._generation += 1
        os.pwrite(self._offsets_fd, header + body, (self._generation % 2) * OFFSETS_SLOT)
        self._saved = dict(self._offsets)


_first = operator.itemgetter(0)


def _writer_alive(path: Path) -> bool:
    """Is the worker that writes this spool file still writing it? (<pid>.jsonl or <pid>.ring of a live pid)"""
    parts = path.name.split(".")
    if len(parts) != 2 or not parts[0].isdigit():
        return False  # <pid>.<n>.jsonl: renamed by its worker, complete
    try:
        os.kill(int(parts[0]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
