"""Optional packages: which settings need which extra, checked before any download.

The core install (`pip install download_and_process`) cuts, resizes and encodes on the CPU without
torch. Model stages and the GPU path need the `models` (or `gpu`) extra; a run that asks for them
where they are missing stops at start-up with the pip line that installs them, not with a traceback
from deep inside a worker.
"""

from __future__ import annotations

import importlib.util

from daemon.config import Settings

PROJECT = "download_and_process"


class MissingExtra(ImportError):
    """A package the settings need is not installed; the message names the pip line."""

    def __init__(self, what: str, package: str, extra: str) -> None:
        self.what, self.package, self.extra = what, package, extra
        super().__init__(f"{what} needs {package}, which is not installed: {pip_line(extra)}")


def pip_line(extra: str) -> str:
    return f"pip install '{PROJECT}[{extra}]'"


def installed(module: str) -> bool:
    """Whether `module` can be imported, found without importing it (torch takes seconds to import)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def stage_packages(settings: Settings) -> list[tuple[str, str, str]]:
    """(what needs it, import name, pip name) for every optional package the settings need."""
    needs: list[tuple[str, str, str]] = []
    for name in settings.stages:
        if name == "resize":
            continue
        needs.append((f"the {name!r} stage", "torch", "torch"))
        if name == "upscale" and settings.upscale.mode != "off":
            needs.append(("the 'upscale' stage", "spandrel", "spandrel"))
        if name == "matte" and not settings.matte.model.lower().endswith((".pt", ".torchscript")):
            needs.append(("the 'matte' stage", "onnxruntime", "onnxruntime"))
    return needs


def require_for_settings(settings: Settings) -> None:
    """Raises MissingExtra for the first package the settings need that is not installed."""
    require_for_stages(settings)
    if settings.run.backend == "ray":
        require("ray", 'run.backend = "ray"', "ray")


def require_for_stages(settings: Settings) -> None:
    """Raises MissingExtra for the first package the configured stages need that is not installed."""
    for what, module, package in stage_packages(settings):
        if not installed(module):
            raise MissingExtra(what, package, "models")


def require(module: str, what: str, extra: str) -> None:
    if not installed(module):
        raise MissingExtra(what, module, extra)
