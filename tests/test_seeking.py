"""Seeking across gaps always moves forward, and rounded timestamps pick the frames they stand for."""

from __future__ import annotations

from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import pytest

from daemon.clips import Clip
from daemon.source import StreamClock, VideoSource
from daemon.timing import FrameSchedule
from daemon.walk import FrameWalk

from conftest import run_cli
from media import cut, decoded_indices, expected, make_video, settings, time_limit


class RecordingSource:
    """A real VideoSource that remembers the time of every frame it decodes."""

    def __init__(self, source: VideoSource) -> None:
        self.source = source
        self.decoded: list[Fraction] = []

    @property
    def nominal_frame_seconds(self) -> Fraction:
        return self.source.nominal_frame_seconds

    def keyframe_seconds(self, at_or_before: Fraction) -> Fraction | None:
        return self.source.keyframe_seconds(at_or_before)

    def skip_unreferenced(self, skip: bool) -> None:
        self.source.skip_unreferenced(skip)

    def frames(self, from_seconds: Fraction = Fraction(0)) -> Iterator[object]:
        for frame in self.source.frames(from_seconds):
            self.decoded.append(frame.pts_seconds)
            yield frame


def walk(path: Path, clips: list[Clip], threshold: float = 1.0) -> tuple[FrameWalk, list[Fraction]]:
    """Walk the schedule of `clips`, serving every output slot, as the cutter does."""
    with VideoSource(path) as source:
        recording = RecordingSource(source)
        schedule = FrameSchedule(clips, Fraction(30), Fraction(30))
        frame_walk = FrameWalk(recording, schedule, Fraction(threshold))  # type: ignore[arg-type]
        with time_limit(30):
            for shown in frame_walk:
                schedule.take(shown.frame.pts_seconds, shown.end_seconds, shown.first)
        return frame_walk, recording.decoded


@pytest.mark.parametrize("clip", [Clip(165, 180), Clip(170, 180), Clip(160, 175), Clip(100, 170)])
def test_a_late_clip_of_a_video_with_one_keyframe_is_cut_without_looping(tmp_path: Path, clip: Clip) -> None:
    source = make_video(tmp_path / "one-key.mp4", fps=30, frames=180, gop=0)
    with time_limit(30):
        result = cut(source, [clip], tmp_path / "out")[clip]
    assert result.error is None
    assert decoded_indices(Path(result.path or "")) == list(range(clip.start_frame, clip.end_frame))


def test_the_walk_never_seeks_backwards_and_decodes_each_frame_once(tmp_path: Path) -> None:
    source = make_video(tmp_path / "one-key.mp4", fps=30, frames=300, gop=0)
    frame_walk, decoded = walk(source, [Clip(10, 20), Clip(150, 160), Clip(280, 290)])
    assert frame_walk.seeks == 0 and frame_walk.restarts == 0  # no keyframe to seek to
    assert decoded == sorted(set(decoded))  # strictly increasing: no frame decoded twice

    source = make_video(tmp_path / "short-gops.mp4", fps=30, frames=300, gop=15)
    frame_walk, decoded = walk(source, [Clip(10, 20), Clip(150, 160), Clip(280, 290)])
    assert frame_walk.seeks == 2 and frame_walk.restarts == 0
    assert decoded == sorted(set(decoded))
    assert len(decoded) < 120  # the gaps were skipped, not decoded through


def test_a_gap_without_a_keyframe_in_it_is_decoded_through_not_sought(tmp_path: Path) -> None:
    # Keyframes every 4 s; the gap 2.0 s to 3.7 s holds none, so a seek would land behind us.
    source = make_video(tmp_path / "src.mp4", fps=30, frames=240, gop=120)
    frame_walk, decoded = walk(source, [Clip(50, 60), Clip(110, 115)], threshold=0.5)
    assert frame_walk.seeks == 0
    assert decoded == sorted(set(decoded))


@pytest.mark.parametrize("length", [45, 90])
def test_every_frame_of_a_30_fps_webm_clip_is_the_right_one(tmp_path: Path, length: int) -> None:
    source = make_video(tmp_path / "src.webm", fps=30, frames=200, codec="libvpx-vp9")
    clips = [Clip(0, length), Clip(31, 31 + length)]
    results = cut(source, clips, tmp_path / "out")
    for clip in clips:
        assert decoded_indices(Path(results[clip].path or "")) == list(
            range(clip.start_frame, clip.end_frame)
        )


@pytest.mark.parametrize("container", ["webm", "mp4"])
def test_29_97_fps_sources_keep_the_exact_rule(tmp_path: Path, container: str) -> None:
    codec = "libvpx-vp9" if container == "webm" else "libx264"
    source = make_video(tmp_path / f"src.{container}", fps=30000 / 1001, frames=150, codec=codec)
    true_times = [Fraction(1001 * i, 30000) for i in range(150)]
    clips = [Clip(0, 60), Clip(77, 140)]
    results = cut(source, clips, tmp_path / "out")
    for clip in clips:
        assert decoded_indices(Path(results[clip].path or "")) == expected(clip, true_times), clip


def test_the_clock_reads_rounded_stamps_as_grid_moments_and_leaves_the_rest() -> None:
    webm = StreamClock(Fraction(1, 1000), 0, Fraction(30))
    assert [webm.seconds(ms) for ms in (0, 33, 67, 100)] == [Fraction(i, 30) for i in range(4)]
    assert webm.seconds(50) == Fraction(50, 1000)  # between grid moments: a variable-rate stamp
    exact = StreamClock(Fraction(1, 90000), 0, Fraction(30000, 1001))
    assert exact.seconds(3003 * 7) == Fraction(7 * 1001, 30000)
    assert exact.seconds(3010) == Fraction(3010, 90000)  # seven ticks off the grid: kept
    no_grid = StreamClock(Fraction(1, 1000), 100, None)
    assert no_grid.seconds(167) == Fraction(67, 1000)


def test_the_command_from_the_report_writes_its_clip_in_seconds(workspace: dict[str, Path]) -> None:
    source = make_video(workspace["media"] / "onekey.mp4", fps=30, frames=180, gop=0)
    workspace["urls"].write_text(f"{source}\n")
    (workspace["clips"] / "onekey.txt").write_text("0000165 0000180\n")
    done = run_cli(workspace, "--workers", "1", timeout=120)
    assert done.returncode == 0, done.stderr
    output = workspace["out"] / "onekey" / "onekey_0000165_0000180.hevc"
    assert decoded_indices(output) == list(range(165, 180))


def test_b_frames_in_a_gap_are_not_decoded_and_the_clips_stay_exact(tmp_path: Path) -> None:
    # One keyframe, so nothing to seek to: the gap 0.7 s to 9.3 s is crossed by decoding.
    source = make_video(tmp_path / "b.mp4", fps=30, frames=300, gop=0, bframes=3)
    clips = [Clip(10, 20), Clip(280, 290)]
    frame_walk, decoded = walk(source, clips)
    assert frame_walk.seeks == 0
    assert len(decoded) < 200  # of 300: most B-frames of the gap were dropped undecoded
    # The decoder stops skipping a second ahead of the clip; the few frames already in its pipeline
    # then may still be skipped, but none of those within the last 0.6 s before the clip.
    assert all(Fraction(i, 30) in decoded for i in range(262, 290))
    results = cut(source, clips, tmp_path / "out")
    for clip in clips:
        shown = decoded_indices(Path(results[clip].path or ""))
        assert shown == list(range(clip.start_frame, clip.end_frame))


@pytest.mark.parametrize("threshold", [0.0, 0.5])
def test_a_seek_out_of_a_skipping_gap_decodes_the_clip_start_whole(tmp_path: Path, threshold: float) -> None:
    # B-frames, a keyframe every 10 frames: each gap is skipped through, then left by a seek that
    # lands just before the clip; the frames after the landing must not be dropped as B-frames.
    source = make_video(tmp_path / "b.mp4", fps=30, frames=300, gop=10, bframes=3)
    clips = [Clip(5, 12), Clip(121, 130), Clip(182, 190), Clip(291, 300)]
    config = settings(**{"decode.seek_threshold_seconds": threshold})
    results = cut(source, clips, tmp_path / "out", config)
    for clip in clips:
        shown = decoded_indices(Path(results[clip].path or ""))
        assert shown == list(range(clip.start_frame, clip.end_frame)), clip
