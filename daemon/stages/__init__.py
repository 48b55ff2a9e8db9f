"""Processing stages between decoder and encoder.

Each stage is one small class with one call signature, `stage(batch) -> batch`, built from the
settings once per worker. Anything a stage must remember from frame to frame (a recurrent model's
state) lives in `batch.state`, a dict that belongs to one clip, so it starts empty at every clip.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from daemon.config import Settings

if TYPE_CHECKING:  # a resize-only run never needs torch; the stages that do import it themselves
    import torch


@dataclass
class FrameBatch:
    rgb: torch.Tensor  # (N, 3, H, W) float in [0, 1], on the worker's device
    alpha: torch.Tensor | None = None  # (N, 1, H, W) float in [0, 1] once a matte stage ran
    state: dict[str, Any] = field(default_factory=dict)


class Stage(Protocol):
    name: str

    def __call__(self, batch: FrameBatch) -> FrameBatch: ...

    def runs_on(self, width: int, height: int) -> bool:
        """Whether the stage changes frames of a source this size (the cutter's fast paths skip
        the rest: an upscale that a large source does not need must not cost an RGB round trip)."""


def build_stages(settings: Settings, device: torch.device | str) -> list[Stage]:
    """The configured stages on `device` ("cpu", "cuda:0" or a torch.device).

    Raises MissingExtra when a stage needs a package that is not installed."""
    from daemon.extras import require_for_stages
    from daemon.stages.resize import Resize

    require_for_stages(settings)
    builders: dict[str, Any] = {"resize": Resize.from_settings}
    if any(name != "resize" for name in settings.stages):
        import torch

        from daemon.stages.composite import Composite
        from daemon.stages.matte import Matte
        from daemon.stages.upscale import Upscale

        builders.update(
            upscale=Upscale.from_settings, matte=Matte.from_settings, composite=Composite.from_settings
        )
        device = torch.device(device)
    stages: list[Stage] = []
    for name in settings.stages:
        if name not in builders:
            raise NotImplementedError(f"stage {name!r} is not available in this build")
        stages.append(builders[name](settings, device))
    return stages
