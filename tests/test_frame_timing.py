"""Which source frame each output frame shows, checked by decoding the outputs."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import pytest

from daemon.clips import Clip

from media import cut, decoded_indices, expected, frame_times, make_video, settings


@pytest.mark.parametrize(
    ("fps", "codec"),
    [(60, "libx264"), (30, "libx264"), (25, "libx264"), (24, "libvpx-vp9")],
)
def test_each_output_frame_shows_the_source_frame_on_screen_at_its_moment(
    tmp_path: Path, fps: int, codec: str
) -> None:
    source = make_video(
        tmp_path / f"src.{'webm' if 'vpx' in codec else 'mp4'}", fps=fps, frames=fps * 6, codec=codec
    )
    clips = [Clip(0, 30), Clip(20, 47), Clip(150, 170)]
    results = cut(source, clips, tmp_path / "out")
    # Frame i was made to be on screen at i/fps; WebM stores that rounded to the millisecond, and
    # the rounded stamp must be read as the moment it stands for.
    times = [Fraction(i, fps) for i in range(fps * 6)]
    for clip in clips:
        result = results[clip]
        assert result.error is None
        assert decoded_indices(Path(result.path or "")) == expected(clip, times), clip


def test_variable_frame_rate_sources_follow_their_timestamps(tmp_path: Path) -> None:
    times = [0.0, 0.01, 0.05, 0.2, 0.21, 0.5, 0.9, 1.0, 1.3, 1.31, 1.32, 2.0, 2.1]
    source = make_video(tmp_path / "vfr.mp4", timestamps=times)
    clip = Clip(0, 60)
    result = cut(source, [clip], tmp_path / "out")[clip]
    shown = decoded_indices(Path(result.path or ""))
    assert shown == expected(clip, frame_times(source))
    assert shown[:7] == [0, 1, 2, 2, 2, 2, 3]  # frames repeat while a frame stays on screen


def test_output_rate_other_than_the_clip_rate(tmp_path: Path) -> None:
    source = make_video(tmp_path / "src.mp4", fps=60, frames=240)
    clip = Clip(30, 90)  # two seconds at 30 fps
    config = settings(**{"output.fps": 24})
    result = cut(source, [clip], tmp_path / "out", config)[clip]
    assert result.frames == 48
    assert decoded_indices(Path(result.path or "")) == expected(clip, frame_times(source), fps=24)


def test_gaps_are_crossed_by_seeking_without_changing_which_frames_are_shown(tmp_path: Path) -> None:
    source = make_video(tmp_path / "src.mp4", fps=30, frames=900)  # 30 s, keyframe every second
    clips = [Clip(10, 20), Clip(600, 615), Clip(870, 900)]
    seeking = cut(source, clips, tmp_path / "seek", settings(**{"decode.seek_threshold_seconds": 1}))
    linear = cut(source, clips, tmp_path / "linear", settings(**{"decode.seek_threshold_seconds": 1000}))
    times = frame_times(source)
    for clip in clips:
        assert decoded_indices(Path(seeking[clip].path or "")) == expected(clip, times)
        assert decoded_indices(Path(linear[clip].path or "")) == expected(clip, times)


def test_a_clip_past_the_end_is_reported_and_never_written(tmp_path: Path) -> None:
    source = make_video(tmp_path / "src.mp4", fps=30, frames=60)
    inside, past = Clip(0, 60), Clip(50, 70)
    results = cut(source, [inside, past], tmp_path / "out")
    assert results[inside].error is None and results[inside].frames == 60
    assert results[past].path is None
    assert "runs past the end of the source" in (results[past].error or "")
    assert sorted(p.name for p in (tmp_path / "out" / "vid").iterdir()) == ["vid_0000000_0000060.hevc"]


def test_output_is_raw_hevc_in_bt709_at_the_target_size(tmp_path: Path) -> None:
    source = make_video(tmp_path / "src.mp4", fps=30, frames=30, width=320, height=240)
    clip = Clip(0, 10)
    result = cut(source, [clip], tmp_path / "out")[clip]
    data = Path(result.path or "").read_bytes()
    assert data[:4] == b"\x00\x00\x00\x01"  # Annex-B start code, no container
    with av.open(result.path or "", format="hevc") as container:
        frame = next(container.decode(video=0))
        assert container.streams.video[0].codec_context.name == "hevc"
        assert (frame.width, frame.height, frame.format.name) == (128, 80, "yuv420p")
        assert frame.colorspace == 1 and frame.color_range == 1  # BT.709, limited range
