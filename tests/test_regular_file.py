"""policyplug/regular_file.py, the one way the loader and the audit readers open files someone
else may have replaced: only a regular file, no hang on a FIFO, a cap kept while reading."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from policyplug import regular_file
from policyplug.audit import files as audit_files
from policyplug.loader import MAX_FILE_BYTES, ReadProblem, read_regular


def test_a_fifo_device_directory_and_socket_are_refused_without_waiting(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # no writer: a blocking open would wait for ever
    for path, kind in ((fifo, "a FIFO"), (Path("/dev/zero"), "a device"), (tmp_path, "a directory")):
        with pytest.raises(regular_file.NotRegularFile) as caught:
            regular_file.open_regular(path)
        assert caught.value.kind == kind
        assert str(caught.value) == f"it is {kind}, not a regular file"


def test_a_regular_file_is_read_in_full_up_to_the_cap(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 10)
    fd = regular_file.open_regular(path)
    try:
        assert os.get_blocking(fd)
        assert regular_file.read_capped(fd, 10) == b"x" * 10
    finally:
        os.close(fd)
    fd = regular_file.open_regular(path)
    try:
        with pytest.raises(regular_file.TooLarge, match="more than the 9 bytes allowed"):
            regular_file.read_capped(fd, 9)
    finally:
        os.close(fd)


def test_bounded_lines_skip_a_line_over_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "lines"
    path.write_bytes(b"one\n" + b"y" * 100 + b"\nthree")
    lines = list(regular_file.bounded_lines(regular_file.open_regular(path), 10))
    assert lines == [b"one\n", None, b"three"]


def test_each_caller_words_the_refusal_its_own_way(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match=r"fifo: not a regular file \(a FIFO\)$"):
        audit_files.open_regular(fifo)
    with pytest.raises(ReadProblem, match="^it is a FIFO, not a regular file$"):
        read_regular(fifo)
    big = tmp_path / "big"
    with big.open("wb") as file:
        file.truncate(MAX_FILE_BYTES + 1)  # sparse: no disk used
    with pytest.raises(ReadProblem, match=f"^it is more than the {MAX_FILE_BYTES} bytes allowed$"):
        read_regular(big)
