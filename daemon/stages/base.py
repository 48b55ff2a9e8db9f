"""What every stage is: one call from a batch of frames to a batch of frames.

Its own module, so that the stages import it without importing the package that builds them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

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
