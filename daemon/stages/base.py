"""What every stage is: one call from a batch of frames to a batch of frames.

Its own module, so that the stages import it without importing the package that builds them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, runtime_checkable

if TYPE_CHECKING:  # a resize-only run never needs torch; the stages that do import it themselves
    import numpy as np
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


class ScalePlan(NamedTuple):
    size: tuple[int, int]  # (width, height) to scale the whole frame to
    window: tuple[int, int, int, int]  # (left, top, width, height) kept of the scaled frame


@runtime_checkable
class ScaledByDecoder(Protocol):
    """A stage a decoder's scaler can do while it converts colours (a resize): when it comes first,
    the cutter asks the decoder for pictures planned so, and runs no tensor code for it."""

    def plan(self, width: int, height: int) -> ScalePlan:
        """Scale a `width` x `height` frame to `size`, then keep `window`."""

    def pad_array(self, image: np.ndarray) -> np.ndarray:
        """A picture scaled per `plan`, finished as the stage would finish it (borders drawn)."""
