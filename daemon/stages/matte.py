"""Robust Video Matting: an alpha matte per frame, with the model's recurrent state carried within a clip."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from loguru import logger

from daemon import models
from daemon.config import Settings
from daemon.stages.base import FrameBatch

STATE_KEY = "matte_recurrent"
# RVM works best when the frame it looks at is a few hundred pixels across.
_TARGET_SIDE_PX = 512


def auto_downsample_ratio(height: int, width: int) -> float:
    """min(1, 512 / longest side): 0.4 at 1280x720, ~0.27 at 1920x1080, ~0.13 at 3840x2160."""
    return min(1.0, _TARGET_SIDE_PX / max(height, width))


class MattingModel(Protocol):
    def __call__(
        self, frame: torch.Tensor, recurrent: list[Any] | None, ratio: float
    ) -> tuple[torch.Tensor, list[Any]]:
        """One (1, 3, H, W) frame in, its (1, 1, H, W) alpha and the next recurrent state out."""


class OnnxRvm:
    """The ONNX export of RVM through onnxruntime: CUDA execution provider on a GPU, else the CPU."""

    def __init__(self, path: Path, device: torch.device, threads: int = 0) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ImportError("matte needs onnxruntime: pip install onnxruntime or onnxruntime-gpu") from exc
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        providers: list[Any] = ["CPUExecutionProvider"]
        if device.type == "cuda":
            if "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
            else:
                logger.warning("matte: onnxruntime has no CUDA provider here (pip install onnxruntime-gpu)")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped errors
            raise ValueError(f"matte.model: {path}: not a readable ONNX model ({exc})") from exc
        names = {item.name for item in self.session.get_inputs()}
        expected = {"src", "r1i", "r2i", "r3i", "r4i", "downsample_ratio"}
        if names != expected:
            raise ValueError(f"matte.model: {path}: inputs {sorted(names)} are not RVM's {sorted(expected)}")
        self.device = device

    def __call__(
        self, frame: torch.Tensor, recurrent: list[Any] | None, ratio: float
    ) -> tuple[torch.Tensor, list[Any]]:
        zeros = np.zeros((1, 1, 1, 1), np.float32)
        r1, r2, r3, r4 = recurrent or [zeros] * 4
        feeds = {
            "src": frame.detach().float().cpu().numpy(),
            "r1i": r1,
            "r2i": r2,
            "r3i": r3,
            "r4i": r4,
            "downsample_ratio": np.array([ratio], np.float32),
        }
        _, alpha, *state = self.session.run(["fgr", "pha", "r1o", "r2o", "r3o", "r4o"], feeds)
        return torch.from_numpy(alpha).to(self.device), state


class TorchScriptRvm:
    """A TorchScript RVM checkpoint: forward(src, r1, r2, r3, r4, downsample_ratio) -> [fgr, pha, r1..r4]."""

    def __init__(self, path: Path, device: torch.device) -> None:
        try:
            self.module = torch.jit.load(str(path), map_location=device).eval()
        except Exception as exc:  # noqa: BLE001 - torch.jit raises RuntimeError or pickle errors
            raise ValueError(f"matte.model: {path}: not a readable TorchScript model ({exc})") from exc
        self.device = device

    def __call__(
        self, frame: torch.Tensor, recurrent: list[Any] | None, ratio: float
    ) -> tuple[torch.Tensor, list[Any]]:
        state = recurrent or [None] * 4
        _, alpha, *next_state = self.module(frame, *state, ratio)
        return alpha.float(), next_state


def load_matting_model(model: str, device: torch.device, threads: int = 0) -> MattingModel:
    if model == models.BUILTIN_MATTING:
        path = models.rvm_onnx_path()
    else:
        path = Path(model).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"matte.model: {model!r} is neither a file nor the built-in {models.BUILTIN_MATTING!r}; "
                "set matte.model to an RVM .onnx or TorchScript file, or remove 'matte' from stages"
            )
        if not os.access(path, os.R_OK):
            raise FileNotFoundError(f"matte.model: {path}: not readable")
    runner: MattingModel
    if path.suffix.lower() == ".onnx":
        runner = OnnxRvm(path, device, threads)
    else:
        runner = TorchScriptRvm(path, device)
    try:
        with torch.inference_mode():
            alpha, _ = runner(torch.rand(1, 3, 64, 64, device=device), None, 1.0)
    except Exception as exc:  # noqa: BLE001 - onnxruntime and TorchScript raise their own kinds
        raise ValueError(f"matte.model: {path}: fails on a test frame ({exc})") from exc
    if tuple(alpha.shape) != (1, 1, 64, 64):
        raise ValueError(f"matte.model: {path}: a test frame gave alpha of shape {tuple(alpha.shape)}")
    return runner


class Matte:
    """Sets `batch.alpha`; the recurrent state lives in `batch.state`, so every clip starts fresh."""

    name = "matte"

    def __init__(self, model: MattingModel, downsample_ratio: float = 0.0) -> None:
        self.model = model
        self.downsample_ratio = downsample_ratio

    @classmethod
    def from_settings(cls, settings: Settings, device: torch.device) -> Matte:
        config = settings.matte
        return cls(load_matting_model(config.model, device, config.threads), config.downsample_ratio)

    def runs_on(self, width: int, height: int) -> bool:
        return True

    @torch.inference_mode()
    def __call__(self, batch: FrameBatch) -> FrameBatch:
        height, width = batch.rgb.shape[-2:]
        ratio = self.downsample_ratio or auto_downsample_ratio(height, width)
        recurrent = batch.state.get(STATE_KEY)
        alphas = []
        # One frame at a time: the recurrent state of frame i is the input of frame i + 1.
        for frame in batch.rgb.split(1):
            alpha, recurrent = self.model(frame, recurrent, ratio)
            alphas.append(alpha)
        batch.state[STATE_KEY] = recurrent
        batch.alpha = torch.cat(alphas).clamp_(0, 1)
        return batch
