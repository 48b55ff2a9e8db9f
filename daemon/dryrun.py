"""--dry-run: per URL, what a run would fetch and which clips it would make, by the run's own rules.

Nothing is downloaded and nothing is written; the ledger, when there is one, is only read, so
clips already made (or impossible) are named as such, and a source whose id another URL holds is
shown under the distinct id the run would give it.
"""

from __future__ import annotations

from pathlib import Path

from daemon.clips import clip_file_path, read_clip_file
from daemon.config import Settings
from daemon.folders import LEDGER_NAME, state_dir_of
from daemon.ledger_view import LedgerView
from daemon.planning import distinct_video_id, finished_clips
from daemon.urls import UrlList


def dry_run(settings: Settings, url_list: UrlList, clip_dir: Path, output_dir: Path) -> None:
    """Prints the plan on standard output."""
    ledger_path = state_dir_of("run", None, output_dir.resolve(), settings) / LEDGER_NAME
    ledger = LedgerView(ledger_path) if ledger_path.is_file() else None
    try:
        _print_plan(url_list, clip_dir.resolve(), ledger)
    finally:
        if ledger is not None:
            ledger.close()


def _print_plan(url_list: UrlList, clip_dir: Path, ledger: LedgerView | None) -> None:
    for problem in url_list.problems:
        print(f"rejected: {problem}")
    holders: dict[str, str] = {}  # id -> the URL that holds it, as the run would assign them
    fetches = clips_to_make = 0
    for source in url_list.sources:
        row = ledger.url(source.url) if ledger else None
        video_id = row.video_id if row else source.video_id
        if row is None:
            holder = holders.get(video_id) or (
                ledger.url_with_video_id(video_id, source.url) if ledger else None
            )
            if holder is not None and holder != source.url:
                video_id = distinct_video_id(source.video_id, source.url)
        holders.setdefault(video_id, source.url)
        name = f"{source.url} ({video_id})"
        clip_path = clip_file_path(clip_dir, video_id)
        try:
            clip_file = read_clip_file(clip_path, clip_dir)
        except FileNotFoundError:
            print(f"skip  {name}: no clip file {clip_path}")
            continue
        except OSError as exc:
            print(f"fail  {name}: cannot read clip file {clip_path}: {exc}")
            continue
        for problem in clip_file.problems:
            print(f"rejected: {problem}")
        if not clip_file.clips:
            print(f"skip  {name}: no valid clip line in {clip_path}")
            continue
        made, impossible = finished_clips(ledger, video_id) if ledger else (set(), set())
        todo = [clip for clip in clip_file.clips if clip not in made and clip not in impossible]
        if not todo:
            print(f"done  {name}: all {len(clip_file.clips)} clip(s) made")
            continue
        fetches += 1
        clips_to_make += len(todo)
        how = "use  " if source.is_local else "fetch"
        made_before = len(clip_file.clips) - len(todo)
        already = f"; {made_before} already made" if made_before else ""
        print(f"{how} {name}: {len(todo)} clip(s) to make{already}")
        for clip in todo:
            print(f"        {clip.start_frame} {clip.end_frame} -> {video_id}/{clip.file_name(video_id)}")
    print(
        f"dry run: {len(url_list.sources)} URL(s), {fetches} to fetch, {clips_to_make} clip(s) to make; "
        f"{len(url_list.rejected)} list line(s) rejected; nothing fetched"
    )
