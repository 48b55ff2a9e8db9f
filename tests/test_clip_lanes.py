"""Clips written side by side on their own threads: same frames, same bytes, nothing half-written."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import pytest

from daemon.backends import CPU_BACKENDS, assemble, cpu_parts
from daemon.budget import CpuBudget
from daemon.clips import Clip
from daemon.cutter import ClipCutter
from daemon.cutting import CutJob
from daemon.encode import X265Encoder, X265Encoders, x265_params
from daemon.messages import ClipResult
from daemon.parts import balanced, grouped, separate_parts
from daemon.source import SourceError, VideoSource
from daemon.stages import build_stages
from daemon.timing import FrameSchedule

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

    cutter = ClipCutter(cpu_parts(config, build_stages(config, "cpu")))  # type: ignore[arg-type]
    # A stop is taken between clips (clips in progress finish): this layout has gaps.
    clips = [Clip(0, 40), Clip(10, 50), Clip(100, 140), Clip(150, 160), Clip(200, 240)]
    outcome = cutter.run(CutJob(source, "vid", clips, tmp_path / "out", StopAfterSomeClips(), stop.is_set))
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

    def watched_finish(self: X265Encoder) -> None:
        finish(self)
        assert self._container is None and self._stream is None  # libx265 let go of at once
        holding.remove(self)

    monkeypatch.setattr(X265Encoder, "_encode", watched_encode)
    monkeypatch.setattr(X265Encoder, "finish", watched_finish)
    # Back to back, so one decoder feeds both lanes (clips far apart get a decoder each, below).
    clips = [Clip(start, start + 40) for start in range(0, 240, 40)]
    results = cut(source, clips, tmp_path / "out", settings(**{"encode.parallel_clips": 2}))
    for clip in clips:
        path = Path(results[clip].path or "")
        assert decoded_indices(path) == list(range(clip.start_frame, clip.end_frame))
    assert threads and all(name.startswith("clip-lane") for name in threads)
    assert most <= 2


def test_a_source_begun_on_one_core_writes_its_later_clips_on_lanes_once_cores_are_free(
    tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last source of a run begins while another worker cuts (one core: clips encoded by the
    decoder) and ends alone: the clips that start after the other left are written on lanes."""
    threads: dict[Clip, set[str]] = {}
    encode = X265Encoder._encode

    def watched_encode(self: X265Encoder, frame: object) -> None:
        start = int(self.name.split("_")[1])
        clip = next(c for c in clips if c.start_frame == start)
        threads.setdefault(clip, set()).add(threading.current_thread().name)
        encode(self, frame)  # type: ignore[arg-type]

    monkeypatch.setattr(X265Encoder, "_encode", watched_encode)
    config = settings()
    parts = assemble(config, CPU_BACKENDS, CpuBudget(1, 0, 0, 0), build_stages(config, "cpu"))
    assert parts.lanes == 1
    clips = [Clip(start, start + 40) for start in range(0, 240, 40)]
    asked = []

    def lanes_now() -> int:
        asked.append(len(asked))
        return 1 if len(asked) <= 2 else 2  # the other worker is done after the second clip starts

    whole = cut(source, clips, tmp_path / "whole")
    threads.clear()
    sink = CollectedClips()
    ClipCutter(parts).run(CutJob(source, "vid", clips, tmp_path / "out", sink, lanes_now=lanes_now))
    for result in sink.results:
        clip = Clip(result.start_frame, result.end_frame)
        frames = decoded_indices(Path(result.path or ""))
        assert frames == list(range(clip.start_frame, clip.end_frame))
        assert frames == decoded_indices(Path(whole[clip].path or ""))
    assert len(sink.results) == len(clips) and len(asked) == len(clips)
    decoding = threading.current_thread().name
    assert threads[clips[0]] == threads[clips[1]] == {decoding}  # one core: on the decoding thread
    assert all(threads[clip] and decoding not in threads[clip] for clip in clips[2:])  # on lanes


def test_the_lane_budget_is_the_workers_share_of_the_cores() -> None:
    cores = len(__import__("os").sched_getaffinity(0))
    assert CpuBudget.of_process(settings(**{"run.workers": 1})).lanes == cores
    many = {"run.workers": cores * 2, "run.processing_workers": cores * 2}
    assert CpuBudget.of_process(settings(**many)).lanes == 1
    assert CpuBudget.of_process(settings(**{"encode.parallel_clips": 5})).lanes == 5
    single = x265_params(settings().encode, threads=1)
    assert "pools=1" in single and "frame-threads=1" in single
    assert "pools=3" in x265_params(settings(**{"encode.threads": 3}).encode, threads=1)
    assert "pools" not in x265_params(settings().encode)  # libx265's own choice: the ffmpeg peer's


def test_the_encoders_share_the_workers_cores_whatever_the_lane_count() -> None:
    """libx265 left to itself takes every core in each encoder: with a worker per core, that would
    be cores x cores threads. Each encoder gets the worker's share of the cores over its lanes."""
    cores = len(__import__("os").sched_getaffinity(0))

    def threads(**overrides: object) -> int:
        encoders = cpu_parts(settings(**overrides), []).encoders
        assert isinstance(encoders, X265Encoders)
        return encoders.threads

    assert threads(**{"run.workers": cores}) == 1  # a lane each, one core each
    assert threads(**{"run.workers": 1}) == 1  # a lane per core
    assert threads(**{"run.workers": 1, "encode.parallel_clips": 1}) == cores  # one lane, every core
    assert threads(**{"run.workers": 1, "encode.threads": 3}) == 3


def test_the_decoder_gets_the_workers_share_of_the_cores_not_ffmpegs_every_core(source: Path) -> None:
    cores = len(__import__("os").sched_getaffinity(0))
    for overrides, expected in (
        ({"run.workers": 1}, cores),
        ({"run.workers": cores * 2, "run.processing_workers": cores * 2}, 1),
        ({"run.workers": 1, "decode.threads": 3}, 3),
    ):
        parts = cpu_parts(settings(**overrides), [])
        with parts.open(source) as opened:
            assert isinstance(opened, VideoSource)
            assert opened.stream.codec_context.thread_count == expected, overrides


def test_workers_auto_is_resolved_once_to_a_number() -> None:
    cores = len(__import__("os").sched_getaffinity(0))
    config = settings(**{"run.workers": "auto", "encode.codec": "cpu"})
    assert config.run.workers == 2 * max(2, cores // 4)  # one downloading for each that cuts
    assert CpuBudget.of_process(config).lanes == max(1, cores // max(2, cores // 4))


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


FAR_APART = [Clip(0, 30), Clip(60, 90), Clip(70, 80), Clip(130, 150), Clip(200, 230)]


def keyframes_every(frames: int) -> Callable[[Fraction], Fraction | None]:
    return lambda seconds: Fraction(int(seconds * 30) // frames * frames, 30)


def test_clips_are_cut_into_parts_only_where_a_keyframe_lies_after_everything_before() -> None:
    timelines = FrameSchedule(FAR_APART, Fraction(30), Fraction(30)).timelines
    parts = separate_parts(timelines, keyframes_every(20))
    # 60 starts from keyframe 60, after 29; 70 overlaps 60-90; 130 starts from keyframe 120.
    assert parts == [[Clip(0, 30)], [Clip(60, 90), Clip(70, 80)], [Clip(130, 150)], [Clip(200, 230)]]
    # Keyframes every 100 frames: 60 would start from 0, before 29 (decoded twice); 130 from 100.
    assert separate_parts(timelines, keyframes_every(100)) == [
        [Clip(0, 30), Clip(60, 90), Clip(70, 80)],
        [Clip(130, 150)],
        [Clip(200, 230)],
    ]
    # Back to back: apart only when the second starts on a keyframe; with no index, never.
    touching = FrameSchedule([Clip(0, 50), Clip(50, 80)], Fraction(30), Fraction(30)).timelines
    assert separate_parts(touching, keyframes_every(20)) == [[Clip(0, 50), Clip(50, 80)]]
    assert separate_parts(touching, keyframes_every(25)) == [[Clip(0, 50)], [Clip(50, 80)]]
    assert len(separate_parts(timelines, lambda seconds: None)) == 1


def test_parts_go_longest_first_and_only_when_the_lanes_would_end_close_together() -> None:
    short, long = [Clip(0, 30)], [Clip(100, 200)]
    assert balanced([short, long, short, short, short], 2) == [long, short, short, short, short]
    assert balanced([short, long], 2) is None  # one lane would do 100 of 130 frames
    assert balanced([long], 2) is None


def test_many_parts_are_joined_into_a_few_groups_of_neighbours() -> None:
    parts = [[Clip(start, start + 10)] for start in range(0, 1000, 100)]
    groups = grouped(parts, 4)
    assert len(groups) == 4 and [clip for group in groups for clip in group] == [p[0] for p in parts]
    assert sorted(len(group) for group in groups) == [2, 2, 3, 3]
    assert grouped(parts[:3], 4) == parts[:3]


def test_clips_far_apart_get_a_decoder_per_lane_and_the_same_frames_and_bytes(
    tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[tuple[str, int]] = []
    init = VideoSource.__init__

    def watched_init(self: VideoSource, path: Path, threads: int = 0) -> None:
        init(self, path, threads)
        opened.append((threading.current_thread().name, threads))

    monkeypatch.setattr(VideoSource, "__init__", watched_init)
    one = cut(source, FAR_APART, tmp_path / "one", settings(**{"encode.deterministic": True}))
    assert [name for name, _ in opened] == ["MainThread"]
    opened.clear()
    two = cut(
        source, FAR_APART, tmp_path / "two", settings(**{"encode.parallel_clips": 2, "decode.threads": 2})
    )
    # One look at the index on the cutter's thread, then a single-threaded decoder per part.
    assert opened[0][0] == "MainThread"
    assert sorted(opened[1:]) == [(name, 1) for name, _ in sorted(opened[1:])] and len(opened) == 5
    assert all(name.startswith("clip-lane") for name, _ in opened[1:])
    for clip in FAR_APART:
        path = Path(two[clip].path or "")
        assert decoded_indices(path) == list(range(clip.start_frame, clip.end_frame))
        # Single-threaded libx265 on both sides: the way the clips were cut leaves no trace.
        assert path.read_bytes() == Path(one[clip].path or "").read_bytes()


@pytest.fixture
def slow_encoder(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """20 ms a frame: a clip of 30 frames takes over half a second, so what a stop or an abort
    does to the clips in progress is plain. The event is set once a frame has been encoded."""
    encode = X265Encoder._encode
    encoding = threading.Event()

    def slow(self: X265Encoder, frame: object) -> None:
        encoding.set()
        time.sleep(0.02)
        encode(self, frame)  # type: ignore[arg-type]

    monkeypatch.setattr(X265Encoder, "_encode", slow)
    return encoding


def test_a_failed_part_stops_the_others_and_keeps_what_they_finished(
    tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch, slow_encoder: threading.Event
) -> None:
    seek = VideoSource._seek

    def failing_seek(self: VideoSource, seconds: Fraction) -> None:
        # On a lane (not the cutter's look at the index): the part that starts at 3.333 s fails,
        # once the other part has a clip in progress.
        if 3 < seconds < 4 and threading.current_thread().name.startswith("clip-lane"):
            slow_encoder.wait(10)
            raise SourceError(f"{self.path.name}: cannot seek to {float(seconds):.3f}s: test")
        seek(self, seconds)

    monkeypatch.setattr(VideoSource, "_seek", failing_seek)
    # Parts, longest first: 0-50 and 100-140 start together; 100-140 fails once 0-50 is under way;
    # the other two parts are never started, and 0-50, in progress, is finished.
    clips = [Clip(0, 50), Clip(100, 140), Clip(170, 190), Clip(210, 240)]
    sink = CollectedClips()
    config = settings(**{"encode.parallel_clips": 2})
    cutter = ClipCutter(cpu_parts(config, build_stages(config, "cpu")))  # type: ignore[arg-type]
    with pytest.raises(SourceError, match="cannot seek to 3.333s"):
        cutter.run(CutJob(source, "vid", clips, tmp_path / "out", sink))
    assert [(r.start_frame, r.end_frame, r.error) for r in sink.results] == [(0, 50, None)]
    assert [p.name for p in (tmp_path / "out" / "vid").iterdir()] == ["vid_0000000_0000050.hevc"]


@pytest.mark.usefixtures("slow_encoder")
def test_an_error_on_the_cutters_thread_abandons_every_part_at_once(tmp_path: Path, source: Path) -> None:
    class FailingSink(CollectedClips):
        def frames_encoded(self, count: int) -> None:
            raise KeyboardInterrupt  # as a signal would, on the thread that runs the cutter

    sink = FailingSink()
    config = settings(**{"encode.parallel_clips": 2})
    cutter = ClipCutter(cpu_parts(config, build_stages(config, "cpu")))  # type: ignore[arg-type]
    with pytest.raises(KeyboardInterrupt):
        cutter.run(CutJob(source, "vid", FAR_APART, tmp_path / "out", sink))
    # At the first batch written, every clip in progress was removed, none finished.
    assert sink.results == []
    assert list((tmp_path / "out" / "vid").iterdir()) == []


def test_a_stop_request_while_cutting_in_parts_leaves_the_parts_not_started_pending(
    tmp_path: Path, source: Path, slow_encoder: threading.Event
) -> None:
    stop = threading.Event()

    class StopAtFirstClip(CollectedClips):
        def clip_finished(self, result: ClipResult) -> None:
            super().clip_finished(result)
            stop.set()

    # Parts, longest first: 60-120 and 0-30 start; 0-30 ends (the stop is asked for) and its lane
    # takes 150-170 before the stop is seen; 200-215 is never started.
    clips = [Clip(0, 30), Clip(60, 120), Clip(150, 170), Clip(200, 215)]
    sink = StopAtFirstClip()
    config = settings(**{"encode.parallel_clips": 2})
    cutter = ClipCutter(cpu_parts(config, build_stages(config, "cpu")))  # type: ignore[arg-type]
    outcome = cutter.run(CutJob(source, "vid", clips, tmp_path / "out", sink, stop.is_set))
    assert outcome.interrupted
    made = {(r.start_frame, r.end_frame) for r in outcome.results if r.error is None}
    assert {(0, 30), (60, 120)} <= made and (200, 215) not in made
    assert not [r for r in outcome.results if r.error]
    assert sorted(r.path for r in sink.results) == sorted(r.path for r in outcome.results)
    on_disk = sorted(p.name for p in (tmp_path / "out" / "vid").iterdir())
    assert on_disk == sorted(Path(r.path or "").name for r in outcome.results)  # no .part
    for result in outcome.results:
        assert decoded_indices(Path(result.path or "")) == list(range(result.start_frame, result.end_frame))


def test_a_wrong_index_keeps_one_decoder_for_every_clip(
    tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A seek that lands after the moment asked for would make every part decode from the start
    of the video: one such landing is enough to cut in one pass."""
    seek = VideoSource._seek
    opened: list[str] = []
    init = VideoSource.__init__

    def late_seek(self: VideoSource, seconds: Fraction) -> None:
        seek(self, seconds + 1)

    def watched_init(self: VideoSource, path: Path, threads: int = 0) -> None:
        init(self, path, threads)
        opened.append(threading.current_thread().name)

    monkeypatch.setattr(VideoSource, "_seek", late_seek)
    monkeypatch.setattr(VideoSource, "__init__", watched_init)
    results = cut(source, FAR_APART, tmp_path / "out", settings(**{"encode.parallel_clips": 2}))
    assert opened == ["MainThread", "MainThread"]  # the look at the index, then the one pass
    for clip in FAR_APART:
        assert decoded_indices(Path(results[clip].path or "")) == list(
            range(clip.start_frame, clip.end_frame)
        )
