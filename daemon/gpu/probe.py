"""What this machine's GPU can do, found out in a child process, and the backends that follows from it.

The probe runs as `python -m daemon.gpu.probe --device N` and prints one JSON line: creating a video
decoder on a machine without a usable device can end the process outright, and that must not be the
worker's process. A child that crashes or hangs is reported as a reason, never as an exception.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from daemon.gpu.driver import driver_problem

if TYPE_CHECKING:
    from daemon.config import Settings

# Data-centre parts built without NVENC: NVENC is never tried there, the reason says why.
NO_NVENC_MODELS = ("A100", "A30", "A800", "H100", "H200", "H800", "H20")


# Where the work runs, as `encode.codec` says it (the key keeps its name; it picks the device for
# decoding, the stages and encoding alike, not a codec): the GPU where it can, the CPU only, or the
# GPU or nothing.
DeviceChoice = Literal["auto", "cpu", "gpu"]


class GpuUnavailable(Exception):
    """encode.codec = "gpu" was asked for on a machine where the GPU path cannot run."""


@dataclass(frozen=True)
class GpuProbe:
    """Plain data about one device; `*_reason` says why a capability is missing ("" when present)."""

    device_id: int
    has_cuda: bool = False
    device_name: str = ""
    nvdec_ok: bool = False
    nvenc_ok: bool = False
    cuda_reason: str = ""
    nvdec_reason: str = ""
    nvenc_reason: str = ""
    free_memory_mb: float | None = None

    @property
    def reasons(self) -> list[str]:
        return [r for r in (self.cuda_reason, self.nvdec_reason, self.nvenc_reason) if r]


@dataclass(frozen=True)
class BackendChoice:
    decode: Literal["nvdec", "cpu"]
    encode: Literal["nvenc", "x265"]
    device: str  # torch device string for the stages: "cuda:N" or "cpu"
    fallbacks: list[str] = field(default_factory=list)  # one line per backend that is not the GPU one

    @property
    def uses_gpu(self) -> bool:
        return self.device != "cpu"

    def describe(self) -> str:
        return f"decode {self.decode}, stages on {self.device}, encode {self.encode}"


def _probe_here(device_id: int) -> GpuProbe:
    """The probe proper; runs in the child process."""
    no_driver = driver_problem()
    if no_driver:
        return GpuProbe(device_id, cuda_reason=no_driver, nvdec_reason=no_driver, nvenc_reason=no_driver)
    try:
        import torch
    except ImportError:
        from daemon.extras import pip_line

        reason = f"torch is not installed, and the GPU path needs it ({pip_line('gpu')})"
        return GpuProbe(device_id, cuda_reason=reason, nvdec_reason=reason, nvenc_reason=reason)

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        reason = "no GPU: the NVIDIA driver sees no CUDA device"
        return GpuProbe(device_id, cuda_reason=reason, nvdec_reason=reason, nvenc_reason=reason)
    if device_id >= count:
        reason = f"no GPU: device {device_id} asked for, {count} present"
        return GpuProbe(device_id, cuda_reason=reason, nvdec_reason=reason, nvenc_reason=reason)
    name = torch.cuda.get_device_name(device_id)
    free_bytes, _total = torch.cuda.mem_get_info(device_id)
    base: dict[str, Any] = {
        "device_id": device_id,
        "has_cuda": True,
        "device_name": name,
        "free_memory_mb": free_bytes / 2**20,
    }
    try:
        import PyNvVideoCodec as nvc  # noqa: N813 - the library's own spelling
    except Exception as exc:  # noqa: BLE001 - any import failure means the same: no video engines
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        reason = f"driver's video codec libraries unusable on {name} ({first})"
        return GpuProbe(**base, nvdec_reason=reason, nvenc_reason=reason)

    nvdec_ok, nvdec_reason = True, ""
    try:
        caps = nvc.GetDecoderCaps(device_id, nvc.cudaVideoCodec.H264, nvc.cudaVideoChromaFormat._420, 8)
        if isinstance(caps, dict) and not caps.get("is_supported", caps.get("num_decoder_engines", 1)):
            nvdec_ok, nvdec_reason = False, f"NVDEC reports no H.264 decode on {name}"
    except (AttributeError, TypeError):
        pass  # no such caps query in this binding: creating a decoder below decides
    except Exception as exc:  # noqa: BLE001
        nvdec_ok, nvdec_reason = False, f"NVDEC capability query failed on {name}: {exc}"
    if nvdec_ok:
        try:
            nvc.CreateDecoder(gpuid=device_id, codec=nvc.cudaVideoCodec.H264, usedevicememory=True)
        except Exception as exc:  # noqa: BLE001
            nvdec_ok, nvdec_reason = False, f"NVDEC decoder cannot be created on {name}: {exc}"

    nvenc_ok, nvenc_reason = False, ""
    if any(model in name.upper().split() or f"{model}-" in name.upper() for model in NO_NVENC_MODELS):
        nvenc_reason = f"no NVENC on this GPU model ({name})"
    else:
        try:
            nvc.CreateEncoder(256, 256, "NV12", False, gpu_id=str(device_id), codec="hevc")
            nvenc_ok = True
        except Exception as exc:  # noqa: BLE001
            nvenc_reason = f"NVENC HEVC encoder cannot be created on {name}: {exc}"
    return GpuProbe(
        **base, nvdec_ok=nvdec_ok, nvdec_reason=nvdec_reason, nvenc_ok=nvenc_ok, nvenc_reason=nvenc_reason
    )


def probe_gpu(device_id: int, timeout_seconds: float = 60.0) -> GpuProbe:
    """What this machine's GPU can do; whatever happens while finding out comes back as a GpuProbe."""
    # Loading the driver library creates no device context, so it is safe here, and on a machine
    # without a driver it answers at once instead of after a child interpreter has started.
    no_driver = driver_problem()
    if no_driver:
        return GpuProbe(device_id, cuda_reason=no_driver, nvdec_reason=no_driver, nvenc_reason=no_driver)
    return probe_in_child(device_id, timeout_seconds)


def probe_in_child(device_id: int, timeout_seconds: float = 60.0) -> GpuProbe:
    """The probe proper, in a fresh child process: a decoder made without a device ends its process."""
    command = [sys.executable, "-m", "daemon.gpu.probe", "--device", str(device_id)]
    # The child must find this package even when it runs from a checkout rather than an install.
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout_seconds, check=False, env=env
        )
    except subprocess.TimeoutExpired:
        reason = f"GPU probe did not answer within {timeout_seconds:g}s"
        return GpuProbe(device_id, cuda_reason=reason, nvdec_reason=reason, nvenc_reason=reason)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        how = f"signal {-done.returncode}" if done.returncode < 0 else f"exit code {done.returncode}"
        tail = done.stderr.strip().splitlines()[-1:] or [""]
        reason = f"GPU probe process died ({how}) {tail[0]}".strip()
        return GpuProbe(device_id, cuda_reason=reason, nvdec_reason=reason, nvenc_reason=reason)
    return GpuProbe(**json.loads(lines[-1]))


def choose_backends(device: DeviceChoice, probe: GpuProbe | None) -> BackendChoice:
    """The backends a worker uses; `probe` is None for device "cpu", which never looks at a GPU.

    Raises GpuUnavailable for device "gpu" without a usable CUDA device.
    """
    if device == "cpu" or probe is None:
        return BackendChoice("cpu", "x265", "cpu", ['encode.codec = "cpu": the GPU is not used'])
    if not probe.has_cuda:
        if device == "gpu":
            raise GpuUnavailable(f'encode.codec = "gpu" but {probe.cuda_reason}')
        return BackendChoice("cpu", "x265", "cpu", [f"CPU decode, stages and encode: {probe.cuda_reason}"])
    fallbacks = []
    if not probe.nvdec_ok:
        fallbacks.append(f"CPU decode, frames uploaded to the GPU: {probe.nvdec_reason}")
    if not probe.nvenc_ok:
        fallbacks.append(f"libx265 encode on the CPU: {probe.nvenc_reason}")
    return BackendChoice(
        "nvdec" if probe.nvdec_ok else "cpu",
        "nvenc" if probe.nvenc_ok else "x265",
        f"cuda:{probe.device_id}",
        fallbacks,
    )


def select_backends(settings: Settings) -> tuple[BackendChoice, str]:
    """(backends, device name) for a worker; probes in a child process unless encode.codec = "cpu"."""
    device: DeviceChoice = settings.encode.codec
    if device == "cpu":
        return choose_backends("cpu", None), ""
    probe = probe_gpu(settings.run.device_id, settings.gpu.probe_timeout_seconds)
    return choose_backends(device, probe), probe.device_name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="probe one GPU; prints a JSON line")
    parser.add_argument("--device", type=int, default=0)
    args = parser.parse_args(argv)
    print(json.dumps(asdict(_probe_here(args.device))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
