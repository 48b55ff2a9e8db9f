"""What a player shows of a stored picture: upright (the display matrix) and with square pixels (the SAR).

A phone stores its video as the sensor sees it and says how to turn it in a display matrix; an
anamorphic source stores narrow pixels and says how wide they are in its sample aspect ratio. Every
player applies both, so a clip must too: the resize rules then work on the picture as it is shown.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import cast

import av
import numpy as np
from av.sidedata.sidedata import SideDataContainer, Type

# Sample aspect ratios beyond these are a broken header, not a picture: they are read as square.
_SANE_ASPECT = (Fraction(1, 8), Fraction(8))


@dataclass(frozen=True)
class Orientation:
    """How to turn a stored picture to show it: transpose it, then flip its rows and columns.

    These three cover the eight ways a display matrix can map a picture onto the screen: the
    quarter turns, each with or without a mirror."""

    transpose: bool = False  # rows become columns: a quarter turn (with one of the flips)
    flip_rows: bool = False  # after the transpose: top to bottom
    flip_cols: bool = False  # after the transpose: left to right

    @classmethod
    def from_display_matrix(cls, matrix: list[int]) -> Orientation:
        """From FFmpeg's 3x3 display matrix (16.16 fixed point, row major).

        It maps a stored pixel (p, q) to the screen at (a*p + c*q, b*p + d*q), with y downwards;
        the nearest quarter turn is taken where it holds some other angle, as players do."""
        a, b, c, d = matrix[0], matrix[1], matrix[3], matrix[4]
        if abs(a) + abs(d) >= abs(b) + abs(c):
            # Screen x follows stored x (sign of a), screen y stored y (sign of d).
            return cls(transpose=False, flip_rows=d < 0, flip_cols=a < 0)
        # Screen x follows stored y (sign of c), screen y stored x (sign of b).
        return cls(transpose=True, flip_rows=b < 0, flip_cols=c < 0)

    @classmethod
    def of_frame(cls, frame: av.VideoFrame) -> Orientation:
        """The frame's own display matrix (the decoder attaches the stream's to every frame)."""
        for side_data in cast(SideDataContainer, frame.side_data):  # PyAV's stub names it wrongly
            if side_data.type == Type.DISPLAYMATRIX:
                matrix = np.frombuffer(bytes(side_data), dtype="<i4")
                if matrix.size == 9:
                    return cls.from_display_matrix([int(value) for value in matrix])
        return cls()

    @property
    def upright(self) -> bool:
        """Shown as stored."""
        return not (self.transpose or self.flip_rows or self.flip_cols)

    def apply(self, picture: np.ndarray) -> np.ndarray:
        """An (H, W, ...) array as shown: a view, turned (copy it where it must be contiguous)."""
        if self.transpose:
            picture = np.swapaxes(picture, 0, 1)
        if self.flip_rows:
            picture = picture[::-1]
        if self.flip_cols:
            picture = picture[:, ::-1]
        return picture

    def stored_size(self, shown: tuple[int, int]) -> tuple[int, int]:
        """The (width, height) to scale the stored picture to, for it to be `shown` once turned."""
        return (shown[1], shown[0]) if self.transpose else shown

    def describe(self) -> str:
        """In a player's words: 'rotated 90° clockwise', 'mirrored', ...; '' when upright."""
        turns = {
            (False, False, False): "",
            (True, False, True): "rotated 90° clockwise",
            (False, True, True): "rotated 180°",
            (True, True, False): "rotated 90° counter-clockwise",
            (False, False, True): "mirrored",
            (False, True, False): "flipped upside down",
            (True, False, False): "rotated 90° clockwise and mirrored",
            (True, True, True): "rotated 90° counter-clockwise and mirrored",
        }
        return turns[(self.transpose, self.flip_rows, self.flip_cols)]


def sample_aspect(value: Fraction | None) -> Fraction:
    """A stream's sample aspect ratio, with unknown (0 or None) and absurd values read as square."""
    if value is None or not (_SANE_ASPECT[0] <= value <= _SANE_ASPECT[1]):
        return Fraction(1)
    return Fraction(value)


@dataclass(frozen=True)
class DisplayGeometry:
    """A stored picture's size, its pixels' shape and its turn: what it is on screen."""

    stored_width: int
    stored_height: int
    sample_aspect: Fraction = Fraction(1)
    orientation: Orientation = Orientation()

    @property
    def plain(self) -> bool:
        """Square pixels, shown as stored."""
        return self.sample_aspect == 1 and self.orientation.upright

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) on screen, in square pixels: a wide pixel widens the picture."""
        width = max(1, round(self.stored_width * self.sample_aspect))
        return self.orientation.stored_size((width, self.stored_height))

    def describe(self) -> str:
        """What is not plain about it, for the log: '' for square pixels shown as stored."""
        parts = []
        if not self.orientation.upright:
            parts.append(self.orientation.describe())
        if self.sample_aspect != 1:
            aspect = self.sample_aspect
            parts.append(f"SAR {aspect.numerator}:{aspect.denominator}")
        if parts:
            width, height = self.size
            parts.append(f"shown {width}x{height}")
        return ", ".join(parts)
