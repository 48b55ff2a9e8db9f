"""HDR and wide-gamut pictures in, BT.709 SDR out: what every clip is, whatever its source.

A PQ or HLG picture read as if it were BT.709 comes out washed out and dull, and BT.2020 colours
read as BT.709 ones come out oversaturated. FFmpeg 8's scaler manages colour itself (libswscale's
port of libplacebo's tone and gamut mapping): told the output's transfer and primaries, it
linearises the source (PQ, or HLG with its reference OOTF), maps its range onto SDR's with the
perceptual intent (the source's mastering display peak, or 10000 nits for PQ and 1000 for HLG
where the stream gives none, onto SDR's 203-nit reference white, with a soft knee for
highlights), maps BT.2020's gamut into BT.709's and encodes with BT.1886. It runs here through
a filter graph per source and size: a plain scale to the output size first, so the costly colour
mapping runs on the smaller picture, then the colour mapping.

Its 3D lookup tables take a few seconds to build, once per graph (per source and output size).
"""

from __future__ import annotations

from fractions import Fraction

import av
import av.error
import av.filter

# H.273 transfer characteristics that carry high dynamic range.
HDR_TRANSFERS = {16: "PQ", 18: "HLG"}
# H.273 colour primaries a BT.709 display shows as they are (BT.601's differ from BT.709's too
# little for players to convert them); 2 is unspecified, read as BT.709.
SDR_PRIMARIES = frozenset({1, 2, 4, 5, 6, 7})
PRIMARY_NAMES = {9: "BT.2020", 10: "XYZ", 11: "DCI-P3", 12: "Display P3", 22: "EBU 3213"}

_OUT_RANGE = {"rgb24": "pc", "yuv420p": "tv"}


class ColourError(Exception):
    """A picture whose colours cannot be converted to BT.709 SDR; the message says which and what
    to change."""


def needs_mapping(transfer: int, primaries: int) -> bool:
    """Whether pictures so tagged must be tone or gamut mapped before they are BT.709 SDR."""
    return transfer in HDR_TRANSFERS or primaries not in SDR_PRIMARIES


def describe(transfer: int, primaries: int) -> str:
    """'transfer PQ, BT.2020 primaries', for the log; '' for SDR BT.709-like pictures."""
    parts = []
    if transfer in HDR_TRANSFERS:
        parts.append(f"transfer {HDR_TRANSFERS[transfer]}")
    if primaries not in SDR_PRIMARIES:
        parts.append(f"{PRIMARY_NAMES.get(primaries, f'primaries {primaries}')} primaries")
    return ", ".join(parts)


class SdrConversion:
    """One source's HDR or wide-gamut frames, scaled and converted to BT.709 SDR.

    Used by one thread at a time, as a source's frames are; keeps its graphs (and their lookup
    tables) for the frames that follow."""

    def __init__(self) -> None:
        self._graphs: dict[tuple[object, ...], av.filter.Graph] = {}

    def convert(self, frame: av.VideoFrame, size: tuple[int, int], pixel_format: str) -> av.VideoFrame:
        """`frame` at `size` (width, height) in `pixel_format` ("rgb24" full range, or "yuv420p"
        limited range), BT.709 SDR."""
        key = (
            frame.width,
            frame.height,
            frame.format.name,
            frame.colorspace,
            frame.color_range,
            frame.color_trc,
            frame.color_primaries,
            size,
            pixel_format,
        )
        try:
            graph = self._graphs.get(key)
            if graph is None:
                graph = self._graphs[key] = _graph(frame, size, pixel_format)
            graph.push(frame)
            converted = graph.vpull()
        except (av.error.FFmpegError, ValueError) as exc:
            self._graphs.pop(key, None)
            what = describe(frame.color_trc, frame.color_primaries) or "its colours"
            raise ColourError(
                f"{what} cannot be converted to BT.709 SDR here ({exc}); "
                "set download.format to pick SDR formats"
            ) from exc
        return converted


def _graph(frame: av.VideoFrame, size: tuple[int, int], pixel_format: str) -> av.filter.Graph:
    graph = av.filter.Graph()
    source = graph.add_buffer(
        width=frame.width, height=frame.height, format=frame.format, time_base=Fraction(1, 1000)
    )
    width, height = size
    # Scaled first (in the source's own encoding, as players scale), so that the colour mapping,
    # which costs far more per pixel, runs on the output's pixels only.
    scale = graph.add("scale", f"w={width}:h={height}:flags=bicubic")
    colour = graph.add(
        "scale",
        "out_color_matrix=bt709:out_transfer=bt709:out_primaries=bt709:"
        f"out_range={_OUT_RANGE[pixel_format]}:intent=perceptual",
    )
    convert = graph.add("format", pixel_format)
    sink = graph.add("buffersink")
    source.link_to(scale)
    scale.link_to(colour)
    colour.link_to(convert)
    convert.link_to(sink)
    graph.configure()
    return graph
