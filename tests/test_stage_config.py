"""Stage settings: order rules, start-up model checks, and the pipeline with models on, end to end."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import torch

from daemon.backends import cpu_parts
from daemon.clips import Clip
from daemon.config import ConfigError, Settings, load_settings
from daemon.cutter import ClipCutter
from daemon.cutting import CutJob
from daemon.stages import FrameBatch, build_stages

from conftest import FAST_CONFIG, ROOT, run_cli
from media import CollectedClips, make_video, stream_info
from server import MediaServer

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_the_code_default_is_resize_only_and_config_toml_turns_the_models_on() -> None:
    assert Settings().stages == ["resize"]
    shipped = load_settings(ROOT / "config.toml")
    assert shipped.stages == ["upscale", "resize", "matte"]
    assert shipped.upscale.mode == "auto" and shipped.matte.alpha_stream
    # config.toml documents every key of every section with its default.
    table = tomllib.loads((ROOT / "config.toml").read_text())
    defaults = Settings().model_dump()
    sections = [name for name, value in defaults.items() if isinstance(value, dict)]
    assert len(sections) >= 10
    for section in sections:
        assert table[section] == defaults[section], section


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        (["resize", "upscale"], "'upscale' must come before 'resize'"),
        (["matte", "upscale", "resize"], "'upscale' must come before 'matte'"),
        (["resize", "composite", "matte"], "'composite' needs 'matte' before it"),
        (["resize", "composite"], "'composite' needs 'matte' before it"),
        (["upscale", "matte"], "'resize' must be one of the stages"),
    ],
)
def test_a_stage_order_that_cannot_work_is_refused(stages: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(None, {"stages": stages})


def test_a_matte_that_would_be_thrown_away_is_refused_when_the_settings_load() -> None:
    with pytest.raises(ConfigError, match="matte.alpha_stream is false and there is no 'composite'"):
        load_settings(None, {"stages": ["resize", "matte"], "matte.alpha_stream": False})
    load_settings(None, {"stages": ["resize", "matte", "composite"], "matte.alpha_stream": False})


ALL_STAGES = ["upscale", "resize", "matte", "composite"]


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ({"upscale.model": "/no/such/model.pth"}, FileNotFoundError, "upscale.model: '/no/such/model.pth'"),
        ({"matte.model": "/no/such/rvm.onnx"}, FileNotFoundError, "matte.model: '/no/such/rvm.onnx'"),
        ({"composite.background": "/no/such.png"}, FileNotFoundError, "composite.background"),
    ],
)
def test_a_stage_without_a_usable_model_fails_when_the_stages_are_built(
    overrides: dict[str, object], error: type[Exception], message: str
) -> None:
    settings = load_settings(None, {"stages": ALL_STAGES, **overrides})
    with pytest.raises(error, match=message):
        build_stages(settings, CPU)


def test_unreadable_model_files_are_refused_with_the_setting_named(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00garbage" * 64)
    with pytest.raises(ValueError, match="upscale.model: .*junk.pth"):
        build_stages(load_settings(None, {"stages": ["upscale", "resize"], "upscale.model": str(junk)}), CPU)
    onnx_junk = tmp_path / "junk.onnx"
    onnx_junk.write_bytes(b"\x00garbage" * 64)
    with pytest.raises(ValueError, match="matte.model: .*junk.onnx: not a readable ONNX model"):
        build_stages(load_settings(None, {"stages": ["resize", "matte"], "matte.model": str(onnx_junk)}), CPU)


def test_upscale_off_loads_no_model_and_passes_frames_through() -> None:
    settings = load_settings(
        None, {"stages": ["upscale", "resize"], "upscale.mode": "off", "upscale.model": "/no/such.pth"}
    )
    upscale, _ = build_stages(settings, CPU)
    frames = torch.rand(1, 3, 8, 8)
    assert upscale(FrameBatch(frames)).rgb is frames


def test_upscale_and_matte_write_a_clip_and_its_alpha_stream_with_equal_frame_counts(tmp_path: Path) -> None:
    source = make_video(tmp_path / "small.mp4", frames=30, width=32, height=24)
    settings = load_settings(
        None,
        {
            "stages": ["upscale", "resize", "matte"],
            "output.width": 64,
            "output.height": 48,
            "encode.preset": "ultrafast",
            "decode.batch_size": 4,
        },
    )
    cutter = ClipCutter(cpu_parts(settings, build_stages(settings, CPU)))
    assert cutter.parts.write_alpha
    sink = CollectedClips()
    outcome = cutter.run(CutJob(source, "vid", [Clip(0, 10), Clip(12, 21)], tmp_path / "out", sink))
    assert [r.error for r in outcome.results] == [None, None]
    for clip, frames in ((Clip(0, 10), 10), (Clip(12, 21), 9)):
        main = tmp_path / "out" / "vid" / clip.file_name("vid")
        alpha = main.with_name(clip.file_name("vid", ".alpha.hevc"))
        assert stream_info(main) == ("hevc", 64, 48, frames)
        assert stream_info(alpha) == ("hevc", 64, 48, frames)
    assert not list((tmp_path / "out").rglob("*.part"))


def test_a_bad_model_path_stops_the_command_with_status_2_before_any_download(
    server: MediaServer, workspace: dict[str, Path], tmp_path: Path
) -> None:
    url = server.add("clip.mp4", make_video(tmp_path / "clip.mp4", frames=10))
    workspace["urls"].write_text(url + "\n")
    (workspace["clips"] / "clip.txt").write_text("0 5\n")
    workspace["config"].write_text(
        FAST_CONFIG.replace('stages = ["resize"]', 'stages = ["upscale", "resize"]')
        + '\n[upscale]\nmodel = "/no/such/sr-model.pth"\n'
    )
    finished = run_cli(workspace, "--workers", "1")
    assert finished.returncode == 2, finished.stderr
    assert "upscale.model: '/no/such/sr-model.pth'" in finished.stderr
    assert server.gets("clip.mp4") == 0
    assert not list(workspace["out"].rglob("*.hevc"))
