"""The dataset's manifest: one row per clip written, from the ledger, as JSON lines, CSV or Parquet.

The file appears whole or not at all: rows go to a temporary file beside it, which is flushed to disk
and then renamed over the target, so a reader never sees half a manifest, and a crash leaves the old
one in place.
"""

from __future__ import annotations

import csv
import hashlib
import json
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from daemon import partfile
from daemon.extras import installed, pip_line
from daemon.ledger_view import LedgerView, WrittenClip

FORMATS = ("jsonl", "csv", "parquet")
# The columns, in order, and their Parquet types.
COLUMNS: dict[str, str] = {
    "video_id": "string",
    "url": "string",
    "start_frame": "int64",
    "end_frame": "int64",
    "path": "string",
    "alpha_path": "string",  # the matte stream beside the clip, when the matte stage wrote one
    "frames": "int64",
    "fps": "float64",
    "width": "int64",
    "height": "int64",
    "bytes": "int64",
    "sha256": "string",
    "source_codec": "string",
    "source_width": "int64",
    "source_height": "int64",
    "source_fps": "float64",
    "made_at": "string",  # ISO 8601, UTC
}


class ManifestError(Exception):
    """Nothing was written; the message says why (no ledger, a missing package, an unwritable file)."""


@dataclass(frozen=True)
class Written:
    rows: int
    problems: list[str]  # clips the ledger lists whose file is gone, left out


def sha256_of(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def manifest_rows(clips: list[WrittenClip]) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows for the clips still on disk; a clip recorded before hashes were kept is hashed now."""
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    for clip in clips:
        path = Path(clip.path)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            problems.append(
                f"{clip.video_id} clip {clip.start_frame} {clip.end_frame}: {path} is gone; left out"
            )
            continue
        alpha = path.with_name(path.name.removesuffix(".hevc") + ".alpha.hevc")
        rows.append(
            {
                "video_id": clip.video_id,
                "url": clip.url,
                "start_frame": clip.start_frame,
                "end_frame": clip.end_frame,
                "path": str(path),
                "alpha_path": str(alpha) if alpha.is_file() else None,
                "frames": clip.frames,
                "fps": clip.fps,
                "width": clip.width,
                "height": clip.height,
                "bytes": clip.bytes if clip.bytes is not None else size,
                "sha256": clip.sha256 or sha256_of(path),
                "source_codec": clip.source_codec,
                "source_width": clip.source_width,
                "source_height": clip.source_height,
                "source_fps": clip.source_fps,
                "made_at": datetime.fromtimestamp(clip.made_at, UTC).isoformat(timespec="seconds"),
            }
        )
    return rows, problems


def _write_jsonl(rows: list[dict[str, Any]], out: IO[str]) -> None:
    for row in rows:
        out.write(json.dumps(row) + "\n")


def _write_csv(rows: list[dict[str, Any]], out: IO[str]) -> None:
    writer = csv.DictWriter(out, fieldnames=list(COLUMNS))
    writer.writeheader()
    writer.writerows(rows)


def _write_parquet(rows: list[dict[str, Any]], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(name, pa.type_for_alias(kind)) for name, kind in COLUMNS.items()])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def write_manifest(ledger_path: Path, target: Path, fmt: str) -> Written:
    if fmt not in FORMATS:
        raise ManifestError(f"--format {fmt}: not one of {', '.join(FORMATS)}")
    if fmt == "parquet" and not installed("pyarrow"):
        raise ManifestError(f"--format parquet needs pyarrow, which is not installed: {pip_line('parquet')}")
    if not ledger_path.is_file():
        raise ManifestError(f"no ledger at {ledger_path}; give --output-dir or --state-dir of a run")
    try:
        ledger = LedgerView(ledger_path)
        try:
            clips = ledger.written_clips()
        finally:
            ledger.close()
    except sqlite3.Error as exc:
        raise ManifestError(f"cannot read the ledger {ledger_path}: {exc}") from exc
    rows, problems = manifest_rows(clips)
    try:
        with partfile.writing(target) as temp:
            if fmt == "parquet":
                _write_parquet(rows, temp)
            else:
                with temp.open("w", encoding="utf-8", newline="") as out:
                    (_write_jsonl if fmt == "jsonl" else _write_csv)(rows, out)
    except OSError as exc:
        raise ManifestError(f"cannot write {target}: {exc}") from exc
    return Written(rows=len(rows), problems=problems)
