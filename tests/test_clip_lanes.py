"""Clips written side by side on their own threads: same frames, same bytes, nothing half-written."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from daemon.clips import Clip
from daemon.encode import X265Encoder, x265_params
from daemon.pipeline import ClipCutter, lane_count
from daemon.source import VideoSource
from daemon.stages import build_stages

from media import CollectedClips, cut, decoded_indices, make_video, settings

CLIPS = [Clip(0, 40), Clip(10, 70), Clip(35, 36), Clip(60, 120), Clip(100, 180), Clip(170, 240)]


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return make_video(tmp_path / "src.mp4", fps=30, frames=240, gop=20, bframes=2)


def test_lanes_write_the_same_frames_and_bytes_whatever_their_number(tmp_path: Path, source: Path) -> None:
    written = {}
    for lanes in (2, 3, 6):
        results = cut(
            source, CLIPS, tmp_path / f"lanes-{lanes}", settings(**{"encode.parallel_clips": lanes})
        )
        for clip in CLIPS:
            path = Path(results[clip].path or "")
            assert decoded_indices(path) == list(range(clip.start_frame, clip.end_frame))
        written[lanes] = {clip: Path(results[clip].path or "").read_bytes() for clip in CLIPS}
    # Single-threaded x265 in every lane: the bytes do not depend on how many lanes there were.
    assert written[2] == written[3] == written[6]


def test_a_stop_mid_video_keeps_finished_clips_and_leaves_no_partial_file(
    tmp_path: Path, source: Path
) -> None:
    # A buffer smaller than one batch: the decoder cannot run ahead and start every clip (queued on
    # the lanes) before the first one is reported.
    config = settings(**{"encode.parallel_clips": 3, "decode.buffer_mb": 0.05})
    sink = CollectedClips()
    stop = threading.Event()

    class StopAfterSomeClips(CollectedClips):
        def clip_finished(self, result: object) -> None:
            sink.clip_finished(result)  # type: ignore[arg-type]
            stop.set()

    cutter = ClipCutter(config, build_stages(config, "cpu"), "cpu")  # type: ignore[arg-type]
    # A stop is taken between clips (clips in progress finish): this layout has gaps.
    clips = [Clip(0, 40), Clip(10, 50), Clip(100, 140), Clip(150, 160), Clip(200, 240)]
    outcome = cutter.run(source, "vid", clips, tmp_path / "out", StopAfterSomeClips(), stop.is_set)
    assert outcome.interrupted
    finished = [r for r in outcome.results if r.error is None]
    assert finished and len(finished) < len(clips)
    on_disk = sorted(p.name for p in (tmp_path / "out" / "vid").iterdir())
    assert on_disk == sorted(Path(r.path or "").name for r in finished)  # no .part, nothing unreported
    for result in finished:
        assert decoded_indices(Path(result.path or "")) == list(range(result.start_frame, result.end_frame))


def test_with_lanes_no_clip_is_encoded_on_the_decoding_thread_and_encoders_go_when_finished(
    tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More clips than lanes, one after another: a new clip waits on a lane behind the one it is
    finishing instead of being encoded by the decoder; no more encoders than lanes hold pictures."""
    threads: set[str] = set()
    holding: list[X265Encoder] = []
    most = 0
    encode, finish = X265Encoder._encode, X265Encoder.finish

    def watched_encode(self: X265Encoder, frame: object) -> None:
        nonlocal most
        threads.add(threading.current_thread().name)
        if self not in holding:
            holding.append(self)
        most = max(most, len(holding))
        encode(self, frame)  # type: ignore[arg-type]

    def watched_finish(self: X265Encoder, expected_frames: int) -> int:
        size = finish(self, expected_frames)
        assert self._container is None and self._stream is None  # libx265 let go of at once
        holding.remove(self)
        return size

    monkeypatch.setattr(X265Encoder, "_encode", watched_encode)
    monkeypatch.setattr(X265Encoder, "finish", watched_finish)
    clips = [Clip(start, start + 30) for start in range(0, 240, 40)]
    results = cut(source, clips, tmp_path / "out", settings(**{"encode.parallel_clips": 2}))
    for clip in clips:
        path = Path(results[clip].path or "")
        assert decoded_indices(path) == list(range(clip.start_frame, clip.end_frame))
    assert threads and all(name.startswith("clip-lane") for name in threads)
    assert most <= 2


def test_the_lane_budget_is_the_workers_share_of_the_cores() -> None:
    cores = len(__import__("os").sched_getaffinity(0))
    assert lane_count(settings(**{"run.workers": 1})) == cores
    assert lane_count(settings(**{"run.workers": cores * 2})) == 1
    assert lane_count(settings(**{"encode.parallel_clips": 5})) == 5
    single = x265_params(settings().encode, single_threaded=True)
    assert "pools=1" in single and "frame-threads=1" in single
    assert "pools=3" in x265_params(settings(**{"encode.threads": 3}).encode, single_threaded=True)


def test_the_decoder_gets_the_workers_share_of_the_cores_not_ffmpegs_every_core(source: Path) -> None:
    cores = len(__import__("os").sched_getaffinity(0))
    for overrides, expected in (
        ({"run.workers": 1}, cores),
        ({"run.workers": cores * 2}, 1),
        ({"run.workers": 1, "decode.threads": 3}, 3),
    ):
        cutter = ClipCutter(settings(**overrides), [], "cpu")
        with cutter.open_source(source) as opened:
            assert isinstance(opened, VideoSource)
            assert opened.stream.codec_context.thread_count == expected, overrides


def test_workers_auto_is_resolved_once_to_a_number() -> None:
    cores = len(__import__("os").sched_getaffinity(0))
    config = settings(**{"run.workers": "auto", "encode.codec": "cpu"})
    assert config.run.workers == max(2, cores // 4)
    assert lane_count(config) == max(1, cores // config.run.workers)


def test_an_upscale_a_large_source_does_not_need_leaves_the_fast_path_on(tmp_path: Path) -> None:
    """With upscale first but not needed (source larger than the output), the clip is the same,
    byte for byte, as with resize alone: the decoder's YUV goes straight to the encoder."""
    source = make_video(tmp_path / "big.mp4", fps=30, frames=30, width=256, height=160)
    outputs = []
    for stages in (["resize"], ["upscale", "resize"]):
        config = settings(**{"stages": stages, "upscale.mode": "auto", "encode.threads": 1})
        result = cut(source, [Clip(0, 30)], tmp_path / "-".join(stages), config)[Clip(0, 30)]
        outputs.append(Path(result.path or "").read_bytes())
    assert outputs[0] == outputs[1]
