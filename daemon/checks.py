"""Start-up checks: everything that can stop a run or the service is tried before any download, and
said in one line naming the setting (exit status 2 from the command line)."""

from __future__ import annotations

from pathlib import Path

from daemon.budget import processing_workers
from daemon.config import ConfigError, Settings


def check_encoder(settings: Settings, backends: str) -> None:
    """Open libx265 once with the configured options and encode one frame, so an option it refuses
    stops the run here, not at every URL after its download."""
    if "encode x265" not in backends:
        return
    import tempfile

    import numpy as np

    from daemon.encode import X265Encoder

    width, height = settings.output.width, settings.output.height
    with tempfile.TemporaryDirectory(prefix="download_and_process-check-") as folder:
        try:
            target = Path(folder) / "check.hevc"
            encoder = X265Encoder(target, width, height, settings.fps, settings.encode, 1)
            try:
                encoder.write(np.zeros((1, height, width, 3), dtype=np.uint8))
                encoder.finish()
            finally:
                encoder.abort()
        except Exception as exc:  # noqa: BLE001 - any refusal is the configuration's, said in one line
            raise ConfigError(
                f"encode: libx265 refuses the configured options (preset {settings.encode.preset!r}, "
                f"x265-params from encode.*): {exc}"
            ) from exc


def check_stages(settings: Settings) -> None:
    """Build every stage once before any download, so a missing model or package stops the run at once."""
    from daemon.extras import MissingExtra, require_for_settings

    try:
        require_for_settings(settings)
    except MissingExtra as exc:
        raise ConfigError(str(exc)) from exc
    if set(settings.stages) <= {"resize"}:
        return  # nothing to load, and no reason to import torch in the supervisor
    from daemon.stages import build_stages

    try:
        build_stages(settings, "cpu")
    except (FileNotFoundError, ImportError, ValueError, NotImplementedError) as exc:
        raise ConfigError(f"stages: {exc}") from exc


def check_gpu(settings: Settings) -> str:
    """The backend the workers will choose, in words; encode.codec = "gpu" without a usable GPU stops
    the run here, before any download (exit 2)."""
    from daemon.gpu.probe import GpuUnavailable, select_backends

    if settings.run.backend == "ray":
        # The workers run on the cluster's nodes, not here: each probes its own GPU.
        return f'chosen on its Ray node (encode.codec = "{settings.encode.codec}")'

    try:
        # Without an NVIDIA driver this answers at once; with one, a child process probes the GPU.
        choice, device_name = select_backends(settings)
    except GpuUnavailable as exc:
        raise ConfigError(str(exc)) from exc
    where = f" on GPU {settings.run.device_id} ({device_name})" if device_name else ""
    return f"{'gpu' if choice.uses_gpu else 'cpu'} ({choice.describe()}{where})"


def loaded_line(
    config: Path | None, settings: Settings, backend: str, output_dir: Path, default_config: Path
) -> str:
    """What this run is about to do, as the first log line: which settings, stages, backend, output."""
    if config is None:
        where = f"built-in defaults (no --config, and no {default_config} in {Path.cwd()})"
    else:
        where = f"config {config.resolve()}"
    cutting = processing_workers(settings)
    at_once = ""
    if settings.run.backend == "local" and not backend.startswith("gpu") and cutting < settings.run.workers:
        at_once = f", {cutting} cutting at once while the others download"
    return (
        f"{where}; stages {', '.join(settings.stages)}; "
        f"{settings.run.workers} worker(s), each {backend}{at_once}; output {output_dir}"
    )


def say_js_runtime(settings: Settings) -> None:
    """Once per run or service, first: which JavaScript runtime yt-dlp will use for YouTube, or
    how to get one."""
    from loguru import logger

    from daemon.download import js_runtime_line

    try:
        found, line = js_runtime_line(settings.download)
    except ImportError:
        return  # a light install without yt-dlp downloads nothing
    if found:
        logger.info(line)
    else:
        logger.warning(line)
