"""Property test: the real cutter on sources of many GOP shapes and time bases, random clip layouts.

Every source frame carries its own index in the picture, so each output frame is checked against
the reference rule (the last frame whose true time is at or before the output frame's moment),
written here independently of the cutter. Each example runs under a time limit, so a loop fails
the example instead of hanging the suite. FUZZ_EXAMPLES sets how many examples run (CI: 40).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.clips import Clip

from media import cut, decoded_indices, make_video, time_limit
from media import settings as cutter_settings

FRAMES = 120
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))


@dataclass(frozen=True)
class Recipe:
    """How a source is made, and the true moment of each frame, from the stream's first frame."""

    name: str
    codec: str = "libx264"
    fps: Fraction = Fraction(30)
    gop: int = 30
    bframes: int = 0
    open_gop: bool = False
    time_base: Fraction | None = None
    start_seconds: Fraction = Fraction(0)
    hidden_frames: bool = False
    timestamps: tuple[Fraction, ...] = field(default=())

    @property
    def suffix(self) -> str:
        return "webm" if self.codec == "libvpx-vp9" else "mp4"

    def true_times(self) -> list[Fraction]:
        if self.timestamps:
            return list(self.timestamps)
        return [Fraction(i) / self.fps for i in range(FRAMES)]

    def make(self, folder: Path) -> Path:
        return make_video(
            folder / f"{self.name}.{self.suffix}",
            fps=float(self.fps),
            frames=FRAMES,
            codec=self.codec,
            gop=self.gop,
            bframes=self.bframes,
            open_gop=self.open_gop,
            time_base=self.time_base,
            start_seconds=self.start_seconds,
            hidden_frames=self.hidden_frames,
            timestamps=[float(t) for t in self.timestamps] if self.timestamps else None,
        )


def _vfr_times() -> tuple[Fraction, ...]:
    """Irregular but increasing moments on a 1/90000 grid: 10 to 70 ms apart."""
    times, now = [], Fraction(0)
    for i in range(FRAMES):
        times.append(now)
        now += Fraction(900 * (1 + (i * 7919) % 7), 90000)
    return tuple(times)


RECIPES = [
    Recipe("one-keyframe", gop=0),
    Recipe("short-gops", gop=5),
    Recipe("b-frames", gop=12, bframes=2),
    Recipe("open-gop", gop=12, bframes=3, open_gop=True),
    Recipe("tb-90000", gop=10, time_base=Fraction(1, 90000)),
    Recipe("tb-15360", gop=10, time_base=Fraction(1, 15360)),
    Recipe("ntsc", fps=Fraction(30000, 1001), gop=10, time_base=Fraction(1, 30000)),
    Recipe("vfr", gop=10, time_base=Fraction(1, 90000), timestamps=_vfr_times()),
    Recipe("late-start", gop=10, time_base=Fraction(1, 90000), start_seconds=Fraction(3, 2)),
    Recipe("webm", codec="libvpx-vp9", gop=10),
    Recipe("webm-hidden", codec="libvpx-vp9", gop=15, hidden_frames=True),
    Recipe("webm-ntsc", codec="libvpx-vp9", fps=Fraction(30000, 1001), gop=10),
    Recipe("webm-one-keyframe", codec="libvpx-vp9", gop=0),
]


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("fuzz-sources")
    return {recipe.name: recipe.make(folder) for recipe in RECIPES}


def reference(clip: Clip, true_times: list[Fraction]) -> list[int] | None:
    """Frames the clip must show at 30 fps, or None when it reaches past the last frame's start."""
    shown = []
    for k in range(clip.end_frame - clip.start_frame):
        moment = Fraction(clip.start_frame + k, 30)
        if moment >= true_times[-1]:
            return None  # on the last frame or past it: its end is the container's say, not ours
        shown.append(max(i for i, t in enumerate(true_times) if t <= moment) if moment >= 0 else 0)
    return shown


clip_strategy = st.builds(
    lambda start, length: Clip(start, start + length),
    st.integers(min_value=0, max_value=FRAMES + 10),
    st.one_of(st.just(1), st.integers(min_value=1, max_value=45)),
)


@settings(
    max_examples=EXAMPLES,
    deadline=None,  # the time limit below is the real one
    derandomize=not os.environ.get("FUZZ_RANDOM"),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)
@given(
    recipe=st.sampled_from(RECIPES),
    clips=st.lists(clip_strategy, min_size=1, max_size=4, unique=True),
    threshold=st.sampled_from([0.0, 0.2, 0.5, 1.0, 100.0]),
    lanes=st.sampled_from([1, 2, 3]),
)
def test_every_output_frame_is_the_one_on_screen_at_its_moment(
    sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory, recipe: Recipe, clips: list[Clip],
    threshold: float, lanes: int,
) -> None:  # fmt: skip
    check(sources, tmp_path_factory.mktemp("fuzz-out"), recipe, clips, threshold, lanes)


# Examples the property found in the cutter before the seek and timestamp fixes, kept as they were.
FOUND = [
    # Off by one: a millisecond stamp read as later than the frame-grid moment it stands for.
    ("webm-hidden", [Clip(52, 85)], 100.0),
    # Looped forever: every seek toward the clip landed on the only keyframe, behind the decoder.
    ("one-keyframe", [Clip(1, 2)], 0.0),
]


@pytest.mark.parametrize(("name", "clips", "threshold"), FOUND)
def test_examples_the_property_found(
    sources: dict[str, Path], tmp_path: Path, name: str, clips: list[Clip], threshold: float
) -> None:
    check(sources, tmp_path, next(r for r in RECIPES if r.name == name), clips, threshold)


def check(
    sources: dict[str, Path], out: Path, recipe: Recipe, clips: list[Clip], threshold: float, lanes: int = 1
) -> None:
    """Cut `clips` (writing up to `lanes` of them at once) and check every output frame."""
    config = cutter_settings(**{"decode.seek_threshold_seconds": threshold, "encode.parallel_clips": lanes})
    with time_limit(30):
        results = cut(sources[recipe.name], clips, out, config)
    true_times = recipe.true_times()
    for clip in clips:
        result = results[clip]
        want = reference(clip, true_times)
        if want is None:
            # Reaching the last frame: written whole and right, or reported as past the end.
            if result.error is not None:
                assert "runs past the end of the source" in result.error, result.error
                continue
            want = [
                max(i for i, t in enumerate(true_times) if t <= Fraction(clip.start_frame + k, 30))
                for k in range(clip.end_frame - clip.start_frame)
            ]
        assert result.error is None, (recipe.name, clip, result.error)
        assert decoded_indices(Path(result.path or "")) == want, (recipe.name, clip, threshold)
