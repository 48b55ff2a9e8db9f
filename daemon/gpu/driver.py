"""Whether an NVIDIA driver is there at all: answered without creating a device context, in-process.

Imports nothing of the project, so the settings can ask it (`--workers auto`) from the bottom of the
import graph."""

from __future__ import annotations

import ctypes


def driver_problem() -> str:
    """'' when the CUDA driver library loads, else why not."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        return f"no NVIDIA driver (libcuda.so.1 cannot be loaded: {exc})"
    return ""
