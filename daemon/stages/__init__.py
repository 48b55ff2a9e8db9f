"""Processing stages between decoder and encoder.

Each stage is one small class with one call signature, `stage(batch) -> batch`, built from the
settings once per worker. Anything a stage must remember from frame to frame (a recurrent model's
state) lives in `batch.state`, a dict that belongs to one clip, so it starts empty at every clip.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from daemon.config import Settings
from daemon.stages.base import FrameBatch, Stage

__all__ = ["FrameBatch", "Stage", "build_stages"]

if TYPE_CHECKING:  # a resize-only run never needs torch; the stages that do import it themselves
    import torch


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
