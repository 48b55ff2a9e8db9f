"""Files that appear whole or not at all: written under a `.part` name beside their final one, then
published (fsync of the data, rename, fsync of the folder), or removed.

The one way the program publishes a file: clips and their mattes, the manifest, the service's
reports and status, the model cache. Whoever writes the bytes (an encoder, a CSV writer) only
writes them into `part_path`; naming, checking, publishing and removing are done here.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PART_SUFFIX = ".part"  # a file being written; renamed to its final name when complete


class IncompleteFile(Exception):
    """A file's writer did not write what was expected of it (a clip's frame count)."""


def part_path(path: Path) -> Path:
    """Where `path` is written until it is complete: beside it, named for this machine and process,
    so writers on several machines sharing one folder never write into each other's file."""
    host = socket.gethostname().split(".")[0] or "host"
    return path.with_name(f"{path.name}.{host}-{os.getpid()}{PART_SUFFIX}")


def final_name(path: Path) -> str:
    """The name the file at `path` is written for: a `.part` path's final name, for messages."""
    if not path.name.endswith(PART_SUFFIX):
        return path.name
    return path.name.removesuffix(PART_SUFFIX).rsplit(".", 1)[0]


def scratch_path(part: Path, tag: str) -> Path:
    """A writer's own scratch file beside `part` (ending in `.part` too, so that what a killed run
    left is removed like any other unfinished file)."""
    return part.with_name(f"{part.name.removesuffix(PART_SUFFIX)}.{tag}{PART_SUFFIX}")


class PartFile:
    """One file on its way to `path`: its bytes go to `part_path` until `publish` or `abort`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.part_path = part_path(path)
        path.parent.mkdir(parents=True, exist_ok=True)

    def expect_frames(self, written: int, expected: int) -> None:
        """Raises IncompleteFile (naming the file) unless `written` frames are the `expected` ones."""
        if written != expected:
            raise IncompleteFile(f"{self.path.name}: {written} frames encoded, {expected} expected")

    def publish(self, durable: bool = True) -> int:
        """Under its final name, durable (fsynced, file and folder) unless it is a note rewritten
        every few seconds that a power cut may roll back; returns its size in bytes."""
        if not durable:
            os.replace(self.part_path, self.path)
            return self.path.stat().st_size
        return publish_together([self])[0]

    def abort(self) -> None:
        """Remove the unfinished file (nothing under the final name is touched)."""
        self.part_path.unlink(missing_ok=True)

    def _sync(self) -> None:
        with open(self.part_path, "rb+") as handle:
            os.fsync(handle.fileno())


def publish_together(files: list[PartFile]) -> list[int]:
    """Files that only make sense together (a clip and its matte) published all, or none: every one
    is made durable before any is renamed, and one that cannot be renamed takes back those renamed
    before it. The folder is fsynced after the renames, so after a power cut each file exists whole
    under its final name or not at all. Returns their sizes in bytes; on failure the `.part` files
    are the caller's to `abort`."""
    for file in files:
        file._sync()
    renamed: list[PartFile] = []
    try:
        for file in files:
            os.replace(file.part_path, file.path)
            renamed.append(file)
    except BaseException:
        for file in renamed:
            file.path.unlink(missing_ok=True)
        raise
    for folder in {file.path.parent for file in files}:
        _sync_folder(folder)
    return [file.path.stat().st_size for file in files]


@contextmanager
def writing(path: Path, durable: bool = True) -> Iterator[Path]:
    """The `.part` path to write `path`'s bytes into; published when the body ends (see
    `PartFile.publish` for `durable`), removed when it raises."""
    file = PartFile(path)
    try:
        yield file.part_path
        file.publish(durable)
    except BaseException:
        file.abort()
        raise


def write_text(path: Path, text: str, durable: bool = True) -> None:
    """`text` (UTF-8) as the whole of `path`, published atomically."""
    with writing(path, durable) as part:
        part.write_text(text, encoding="utf-8")


def _sync_folder(folder: Path) -> None:
    """The rename itself is durable once the folder's entry is on disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
