"""NVDEC decoding and NVENC encoding through PyNvVideoCodec, frames kept on the device throughout.

PyNvVideoCodec is imported only inside these classes: importing it on a machine without the driver's
video libraries raises, and the rest of the project must import everywhere.

Timing follows the CPU path exactly: the container's time base and start time come from PyAV (the
same libavformat), frames are yielded in presentation order with the first of equal timestamps kept,
and a seek restarts at the keyframe at or before the target, falling back to the start if the
container's index lands past it (daemon.source.VideoSource.frames documents the rule).
"""

from __future__ import annotations

import contextlib
from collections.abc import Generator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import torch

from daemon.colour import describe
from daemon.config import EncodeSettings
from daemon.encode import tag_bt709
from daemon.frames import EncodeError, PictureFormat, Pictures
from daemon.geometry import DisplayGeometry
from daemon.gpu.color import as_shown, crop_nv12, nv12_to_rgb, rgb_to_nv12
from daemon.partfile import final_name, scratch_path
from daemon.source import VideoSource, declared_colour

# What NVDEC decodes to NV12 (8-bit 4:2:0), with its size limits: (min w, min h, max w, max h).
# From NVIDIA's NVDEC support matrix for Turing and later; older parts fail at decoder creation
# and the URL is then decoded on the CPU.
NVDEC_LIMITS: dict[str, tuple[int, int, int, int]] = {
    "h264": (48, 16, 4096, 4096),
    "hevc": (144, 144, 8192, 8192),
    "vp9": (128, 128, 8192, 8192),
    "av1": (128, 128, 8192, 8192),
    "vp8": (48, 16, 4096, 4096),
    "mpeg2video": (48, 16, 4080, 4080),
}
NV12_SOURCE_FORMATS = ("yuv420p", "yuvj420p", "nv12")
DEMUXABLE = ("mp4", "mov", "matroska", "webm", "avi", "flv", "mpegts")


class NvdecError(Exception):
    """NVDEC failed on this source; the caller decodes it on the CPU instead."""


def nvdec_unsupported_reason(path: Path) -> str:
    """'' when NVDEC can decode this file's video stream to NV12, else why not (codec, format, size)."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                return "no video stream"
            context = container.streams.video[0].codec_context
            codec, pix_fmt = context.name, context.format.name if context.format else "unknown"
            width, height = context.width, context.height
            colour = describe(context.color_trc, context.color_primaries)
            formats = container.format.name.split(",")
    except (av.error.FFmpegError, OSError) as exc:
        return f"cannot be read: {exc}"
    if codec not in NVDEC_LIMITS:
        return f"codec {codec} is not decoded by NVDEC"
    if pix_fmt not in NV12_SOURCE_FORMATS:
        return f"{codec} {pix_fmt} is not 8-bit 4:2:0"
    if colour:
        # The tone and gamut mapping to BT.709 SDR is FFmpeg's scaler's (daemon.colour), on the CPU.
        return f"{colour}: converted to BT.709 SDR on the CPU"
    min_w, min_h, max_w, max_h = NVDEC_LIMITS[codec]
    if not (min_w <= width <= max_w and min_h <= height <= max_h):
        return f"{codec} {width}x{height} is outside NVDEC's {min_w}x{min_h} to {max_w}x{max_h}"
    if not any(name in DEMUXABLE for name in formats):
        return f"container {container.format.name} is not demuxed for NVDEC"
    return ""


@dataclass
class GpuFrame:
    """One decoded NV12 picture on the device and the moment it appears on screen."""

    nv12: torch.Tensor  # (height * 3 / 2, width) uint8, a copy owned by this frame
    pts_seconds: Fraction
    colour: tuple[int, int]  # (matrix, range) the source declares, as daemon.source.declared_colour reads it
    duration_seconds: Fraction | None = None
    geometry: DisplayGeometry | None = None  # None: square pixels, shown as stored

    @property
    def width(self) -> int:
        """On screen (upright, square pixels), as daemon.source's frames."""
        if self.geometry is not None:
            return self.geometry.size[0]
        return int(self.nv12.shape[1])

    @property
    def height(self) -> int:
        if self.geometry is not None:
            return self.geometry.size[1]
        return int(self.nv12.shape[0]) * 2 // 3

    def to_rgb(self, size: tuple[int, int] | None = None) -> torch.Tensor:
        """RGB on the device, as a player shows it. NvdecSource offers no host format, so the
        cutter never asks for a size here: scaling on the device is the resize stage's job."""
        if size is not None and size != (self.width, self.height):
            raise ValueError("NVDEC frames are scaled by the resize stage, not on conversion")
        rgb = nv12_to_rgb(self.nv12, *self.colour)
        return rgb if self.geometry is None else as_shown(rgb, self.geometry)

    def to_yuv420(self, size: tuple[int, int], window: tuple[int, int, int, int]) -> av.VideoFrame:
        raise NotImplementedError("NVDEC frames stay on the device; NvdecSource offers no YUV420 format")


class NvdecSource:
    """Same interface as daemon.source.VideoSource, decoding with NVDEC on `device_id`."""

    picture_formats = frozenset({PictureFormat.DEVICE_RGB})

    def __init__(self, path: Path, device_id: int) -> None:
        import PyNvVideoCodec as nvc  # noqa: N813

        self._nvc = nvc
        self.path = path
        self.device_id = device_id
        self.device = torch.device("cuda", device_id)
        # PyAV knows the stream's time base, start and rate the CPU path uses; it also finds keyframes.
        self._meta = VideoSource(path)
        context = self._meta.stream.codec_context
        # NVDEC hands back samples, not colours: an SD BT.601 or a full-range source must be read as
        # such, exactly as the CPU decoder's swscale reads it.
        self.colour = declared_colour(context.colorspace, context.color_range, context.height)
        # Stored size, what NVDEC decodes; the frames and this source report the size on screen.
        self.stored_width, self.stored_height = context.width, context.height
        geometry = self._meta.geometry
        self.geometry = None if geometry.plain else geometry
        self.width, self.height = geometry.size

    def __enter__(self) -> NvdecSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._meta.close()

    @property
    def nominal_frame_seconds(self) -> Fraction:
        return self._meta.nominal_frame_seconds

    def frames(self, from_seconds: Fraction = Fraction(0)) -> Generator[GpuFrame, None, None]:
        """Frames from the keyframe the index puts at or before `from_seconds` (see VideoSource)."""
        if from_seconds <= 0:
            return self._decode(None)
        key_seconds = self._meta.keyframe_seconds(from_seconds)
        if key_seconds is None or key_seconds <= 0:
            return self._decode(None)
        return self._decode(key_seconds)

    def keyframe_seconds(self, at_or_before: Fraction) -> Fraction | None:
        return self._meta.keyframe_seconds(at_or_before)

    def skip_unreferenced(self, skip: bool) -> None:
        """NVDEC decodes every picture it is given; gaps cost it little next to the CPU's time."""

    def _decode(self, start_seconds: Fraction | None) -> Generator[GpuFrame, None, None]:
        nvc = self._nvc
        # A fresh demuxer and decoder per (re)start: nothing from before a seek can leak out.
        try:
            demuxer = nvc.CreateDemuxer(str(self.path))
            decoder = nvc.CreateDecoder(
                gpuid=self.device_id,
                codec=demuxer.GetNvCodecId(),
                cudacontext=0,
                cudastream=0,
                usedevicememory=True,
            )
        except Exception as exc:  # noqa: BLE001 - whatever the binding raises, the CPU takes over
            raise NvdecError(f"{self.path.name}: NVDEC decoder cannot be created: {exc}") from exc
        started = start_seconds is None
        clock = self._meta.clock
        last_pts: int | None = None
        try:
            for packet in demuxer:
                if not started:
                    # Packets before the keyframe are skipped undecoded; the keyframe opens its GOP.
                    if packet.pts is None or clock.seconds(int(packet.pts)) != start_seconds:
                        continue
                    started = True
                for decoded in decoder.Decode(packet):
                    frame, last_pts = self._frame(decoded, last_pts)
                    if frame is not None:
                        yield frame
            # An empty packet drains the frames NVDEC still holds for reordering.
            with contextlib.suppress(Exception):
                for decoded in decoder.Decode(nvc.PacketData()):
                    frame, last_pts = self._frame(decoded, last_pts)
                    if frame is not None:
                        yield frame
        except torch.cuda.OutOfMemoryError:
            raise  # the caller's to handle: a smaller batch, not another decoder
        except Exception as exc:  # noqa: BLE001 - the binding's exceptions derive from Exception alone
            raise NvdecError(f"{self.path.name}: NVDEC decoding failed: {exc}") from exc

    def _frame(self, decoded: Any, last_pts: int | None) -> tuple[GpuFrame | None, int | None]:
        pts = int(decoded.getPTS())
        if last_pts is not None and pts <= last_pts:
            return None, last_pts  # duplicate or out-of-order timestamps: the first one wins
        # The decoder reuses its surfaces: the frame gets its own copy (a device-to-device copy),
        # cut to the visible picture where the surface has the coded size. Cutting copies already.
        surface = _device_tensor(decoded, self.device)
        nv12 = crop_nv12(surface, self.stored_width, self.stored_height)
        if nv12 is surface:
            nv12 = surface.clone(memory_format=torch.contiguous_format)
        return GpuFrame(nv12, self._meta.clock.seconds(pts), self.colour, geometry=self.geometry), pts


def _device_tensor(decoded: Any, device: torch.device) -> torch.Tensor:
    """The decoded NV12 surface as a (height * 3 / 2, width) uint8 tensor, without leaving the device."""
    try:
        tensor = torch.from_dlpack(decoded)
    except (TypeError, RuntimeError, BufferError):
        # Bindings whose __dlpack__ takes the stream positionally: the CUDA array interface works there.
        tensor = torch.as_tensor(decoded, device=device)
    if tensor.ndim == 3 and tensor.shape[-1] == 1:
        tensor = tensor[..., 0]
    return tensor


class _DeviceFrame:
    """Hands a torch NV12 tensor to the encoder by CUDA array interface, with no copy to the host."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self._tensor = tensor.contiguous()
        self.__cuda_array_interface__ = self._tensor.__cuda_array_interface__

    def cuda(self) -> _DeviceFrame:
        return self


# PyNvVideoCodec's names for NVENC's tuning modes, from ours (which are ffmpeg's -tune names).
NVENC_TUNING = {
    "hq": "high_quality",
    "uhq": "uhq",
    "ll": "low_latency",
    "ull": "ultra_low_latency",
    "lossless": "lossless",
}


def nvenc_options(settings: EncodeSettings, fps: Fraction, device_id: int) -> dict[str, str]:
    """NVENC settings equivalent to the libx265 ones: capped VBR, the same GOP, BT.709 input."""
    return {
        "codec": "hevc",
        "gpu_id": str(device_id),
        "preset": settings.nvenc_preset.upper(),
        "tuning_info": NVENC_TUNING[settings.nvenc_tuning],
        "rc": "vbr",
        # Constant-quality VBR: cq plays the role of x265's crf, the ceiling and buffer are the same.
        "cq": f"{round(settings.crf)}",
        "bitrate": str(settings.max_bitrate_kbps * 1000),
        "maxbitrate": str(settings.max_bitrate_kbps * 1000),
        "vbvbufsize": str(settings.buffer_kbits * 1000),
        "gop": str(settings.gop),
        "idrperiod": str(settings.gop),
        # An integer option: 29.97 is given as 30, which only informs rate control; a raw stream
        # carries no timestamps, and the clips' frame count and order do not depend on it.
        "fps": str(max(1, round(fps))),
        "repeatspspps": "1",
    }


class NvencEncoder:
    """HEVC through NVENC into the raw Annex-B file it is given (the clip's `.part` file)."""

    # Host pictures are uploaded; YUV frames are the CPU encoder's format.
    accepts = frozenset({PictureFormat.DEVICE_RGB, PictureFormat.HOST_RGB})

    def __init__(
        self, path: Path, width: int, height: int, fps: Fraction, settings: EncodeSettings, device_id: int
    ) -> None:
        import PyNvVideoCodec as nvc  # noqa: N813

        self.path = path  # where the bytes go
        self.name = final_name(path)  # the clip's, for messages
        # NVENC's own bitstream, before its parameter sets are tagged BT.709 into `path`.
        self.untagged_path = scratch_path(path, "nvenc")
        self.device = torch.device("cuda", device_id)
        self.frames_written = 0
        options = nvenc_options(settings, fps, device_id)
        self._encoder = nvc.CreateEncoder(width, height, "NV12", False, **options)
        self._file = open(self.untagged_path, "wb")  # noqa: SIM115 - closed in finish() or abort()

    def _write_bitstream(self, output: Any) -> None:
        # Older bindings return the bytes, newer ones a list of packets (dicts with "data").
        if not output:
            return
        if isinstance(output, bytes | bytearray):
            self._file.write(output)
            return
        for packet in output:
            self._file.write(bytes(packet["data"] if isinstance(packet, dict) else packet))

    def write(self, pictures: Pictures) -> None:
        """(N, H, W, 3) uint8 RGB, or (N, H, W) luma-only, on the host or the device."""
        if isinstance(pictures, list):
            raise EncodeError(f"{self.name}: NVENC takes RGB pictures, not YUV frames")
        images = torch.as_tensor(pictures).to(self.device, non_blocking=True)
        nv12 = rgb_to_nv12(images)
        # The encoder reads on its own stream: the conversion must be complete first.
        torch.cuda.current_stream(self.device).synchronize()
        for picture in nv12:
            self._write_bitstream(self._encoder.Encode(_DeviceFrame(picture)))
            self.frames_written += 1

    def finish(self) -> None:
        self._write_bitstream(self._encoder.EndEncode())
        self._file.close()
        try:
            tag_bt709(self.untagged_path, self.path)
        except (av.error.FFmpegError, OSError) as exc:
            raise EncodeError(f"{self.name}: NVENC output cannot be tagged BT.709: {exc}") from exc
        finally:
            self.untagged_path.unlink(missing_ok=True)

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._file.close()
        self.untagged_path.unlink(missing_ok=True)
