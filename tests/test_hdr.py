"""HDR in, SDR BT.709 out: PQ and HLG sources, made here as 10-bit HEVC with BT.2020 primaries and
patches of known light, come out in the colours of a reference conversion written here from the
standards (BT.2100's PQ and HLG, BT.2087's BT.2020 to BT.709 matrix, BT.2408's 203-nit reference
white as SDR white, BT.1886's display gamma 2.4)."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import yt_dlp

from daemon.clips import Clip
from daemon.config import load_settings
from daemon.download import ytdlp_options
from daemon.source import VideoSource

from media import cut, settings

REFERENCE_WHITE_NITS = 203.0  # BT.2408: HDR reference white, shown as SDR's white

# ST 2084 (PQ) constants.
M1, M2 = 2610 / 16384, 2523 / 4096 * 128
C1, C2, C3 = 3424 / 4096, 2413 / 4096 * 32, 2392 / 4096 * 32
# BT.2100 HLG constants.
HLG_A = 0.17883277
HLG_B = 1 - 4 * HLG_A
HLG_C = 0.5 - HLG_A * np.log(4 * HLG_A)
# BT.2020 luma weights, for its non-constant-luminance Y'CbCr.
KR, KB = 0.2627, 0.0593
# BT.2087: linear BT.709 RGB to linear BT.2020 RGB.
BT709_TO_BT2020 = np.array([[0.6274, 0.3293, 0.0433], [0.0691, 0.9195, 0.0114], [0.0164, 0.0880, 0.8956]])


def pq_encode(nits: np.ndarray) -> np.ndarray:
    """ST 2084's inverse EOTF: display light in nits to the PQ signal, 0..1."""
    y = (np.asarray(nits, float) / 10000) ** M1
    return ((C1 + C2 * y) / (1 + C3 * y)) ** M2


def hlg_encode(scene: np.ndarray) -> np.ndarray:
    """BT.2100's HLG OETF: scene light, 0..1, to the HLG signal."""
    scene = np.asarray(scene, float)
    return np.where(
        scene <= 1 / 12, np.sqrt(3 * scene), HLG_A * np.log(np.maximum(12 * scene - HLG_B, 1e-12)) + HLG_C
    )


def hlg_scene_light(display_nits: np.ndarray, peak_nits: float = 1000.0) -> np.ndarray:
    """The scene light an HLG display of `peak_nits` shows as `display_nits` (BT.2100's OOTF,
    inverted: display = peak * Ys^(gamma - 1) * scene, gamma 1.2 at 1000 nits)."""
    gamma = 1.2 + 0.42 * np.log10(peak_nits / 1000)
    luminance = float(display_nits @ np.array([KR, 1 - KR - KB, KB]))
    if luminance <= 0:
        return np.zeros(3)
    scene_luminance = (luminance / peak_nits) ** (1 / gamma)
    return np.asarray(display_nits) / peak_nits * scene_luminance ** (1 - gamma)


def ycbcr10(signal: np.ndarray) -> tuple[int, int, int]:
    """BT.2020 non-constant-luminance R'G'B' (0..1) to 10-bit limited-range Y'CbCr."""
    r, g, b = np.clip(signal, 0, 1)
    y = KR * r + (1 - KR - KB) * g + KB * b
    return (
        round(64 + 876 * y),
        round(512 + 896 * (b - y) / (2 * (1 - KB))),
        round(512 + 896 * (r - y) / (2 * (1 - KR))),
    )


# Patches as linear BT.709 light, 1.0 = the reference white: greys, and colours well inside BT.709.
PATCHES = [
    (0.0, 0.0, 0.0),
    (0.02, 0.02, 0.02),
    (0.1, 0.1, 0.1),
    (0.25, 0.25, 0.25),
    (0.5, 0.5, 0.5),
    (1.0, 1.0, 1.0),
    (0.4, 0.1, 0.1),
    (0.1, 0.4, 0.1),
    (0.1, 0.1, 0.4),
    (0.5, 0.3, 0.2),  # a skin tone
]
PATCH_WIDTH, HEIGHT = 32, 64


def reference_sdr(patch: tuple[float, float, float]) -> np.ndarray:
    """The reference conversion: SDR white at the reference white, BT.709 primaries, and BT.1886's
    gamma 2.4 (what FFmpeg's BT.709 output transfer is), as 8-bit full-range RGB."""
    return 255 * np.clip(np.array(patch), 0, 1) ** (1 / 2.4)


def make_hdr_source(path: Path, transfer: str, mastering_peak_nits: float | None, patches=PATCHES) -> Path:  # type: ignore[no-untyped-def]
    """10-bit HEVC, BT.2020, PQ or HLG, every frame the same row of patches; PQ sources may carry
    mastering display metadata (SMPTE 2086) with the given peak."""
    width = PATCH_WIDTH * len(patches)
    planes = [np.zeros((HEIGHT, width), np.uint16), np.zeros((HEIGHT // 2, width // 2), np.uint16)]
    planes.append(planes[1].copy())
    for index, patch in enumerate(patches):
        display_nits = BT709_TO_BT2020 @ np.array(patch) * REFERENCE_WHITE_NITS
        if transfer == "pq":
            signal = pq_encode(display_nits)
        else:
            signal = hlg_encode(np.clip(hlg_scene_light(display_nits), 0, 1))
        for plane, value in zip(planes, ycbcr10(signal), strict=True):
            columns = plane.shape[1] // len(patches)
            plane[:, index * columns : (index + 1) * columns] = value
    params = "log-level=error"
    if mastering_peak_nits is not None:
        primaries = "G(8500,39850)B(6550,2300)R(35400,14600)WP(15635,16450)"
        params += f":master-display={primaries}L({round(mastering_peak_nits * 10000)},1)"
    trc = {"pq": 16, "hlg": 18}[transfer]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx265", rate=30)
        stream.width, stream.height, stream.pix_fmt = width, HEIGHT, "yuv420p10le"
        context = stream.codec_context
        context.color_primaries, context.color_trc, context.colorspace, context.color_range = 9, trc, 9, 1
        stream.options = {"x265-params": params, "crf": "8", "preset": "ultrafast"}
        for index in range(24):
            frame = av.VideoFrame(width, HEIGHT, "yuv420p10le")
            for target, values in zip(frame.planes, planes, strict=True):
                rows = np.frombuffer(memoryview(target), np.uint16).reshape(target.height, -1)
                rows[:, : values.shape[1]] = values
            frame.pts = index
            frame.color_primaries, frame.color_trc, frame.colorspace, frame.color_range = 9, trc, 9, 1
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def patch_colours(path: Path, top: int, count: int) -> list[np.ndarray]:
    """Per frame of the clip, the mean RGB of each patch's inside (away from chroma-blurred edges)."""
    frames = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            rgb = frame.to_ndarray(format="rgb24").astype(float)
            frames.append(
                np.array(
                    [
                        rgb[top + 8 : top + HEIGHT - 8, k * PATCH_WIDTH + 8 : (k + 1) * PATCH_WIDTH - 8].mean(
                            axis=(0, 1)
                        )
                        for k in range(count)
                    ]
                )
            )
    return frames


def cut_patches(source: Path, tmp_path: Path, mode: str, count: int) -> list[np.ndarray]:
    """The clip's patches; `crop` at the source's size goes through the YUV path, `pad` into a
    taller picture through the RGB one."""
    width = PATCH_WIDTH * count
    height = HEIGHT if mode == "crop" else HEIGHT + 32
    config = settings(**{"output.width": width, "output.height": height, "output.resize_mode": mode})
    result = cut(source, [Clip(0, 6)], tmp_path / "out", config)[Clip(0, 6)]
    assert result.error is None and result.path is not None
    frames = patch_colours(Path(result.path), (height - HEIGHT) // 2, count)
    assert len(frames) == 6
    return frames


# Measured: the YUV path within 4 levels of the reference on every patch and channel, the RGB path
# within 4.5 (its extra range conversion); 8-bit rounding, 4:2:0 chroma and the encoder included.
TOLERANCE_LEVELS = 6.0


@pytest.mark.parametrize("mode", ["crop", "pad"])
def test_pq_patches_come_out_in_the_reference_colours(tmp_path: Path, mode: str) -> None:
    """Mastered at the reference white's 203 nits, nothing needs compressing: the conversion is
    colorimetric, and every patch must match the reference within TOLERANCE_LEVELS."""
    source = make_hdr_source(tmp_path / "pq.mp4", "pq", mastering_peak_nits=REFERENCE_WHITE_NITS)
    reference = np.array([reference_sdr(patch) for patch in PATCHES])
    for colours in cut_patches(source, tmp_path, mode, len(PATCHES)):
        assert np.abs(colours - reference).max() <= TOLERANCE_LEVELS, np.c_[
            colours.round(), reference.round()
        ]


def test_hlg_comes_out_as_the_same_light_in_pq_does(tmp_path: Path) -> None:
    """HLG is defined by its 1000-nit reference display (BT.2100): an HLG source must come out as
    a PQ source mastered at 1000 nits that carries the light that display shows."""
    hlg = make_hdr_source(tmp_path / "hlg.mp4", "hlg", mastering_peak_nits=None)
    pq = make_hdr_source(tmp_path / "pq1000.mp4", "pq", mastering_peak_nits=1000.0)
    hlg_colours = cut_patches(hlg, tmp_path / "hlg", "crop", len(PATCHES))[0]
    pq_colours = cut_patches(pq, tmp_path / "pq", "crop", len(PATCHES))[0]
    assert np.abs(hlg_colours - pq_colours).max() <= TOLERANCE_LEVELS, np.c_[
        hlg_colours.round(), pq_colours.round()
    ]
    greys = hlg_colours[:6].mean(axis=1)
    assert np.all(np.diff(greys) > 10)  # every grey distinct, darkest to brightest
    red, green, blue = hlg_colours[6], hlg_colours[7], hlg_colours[8]
    assert red[0] > red[1] + 40 and green[1] > green[0] + 40 and blue[2] > blue[0] + 40  # hues kept


def test_pq_highlights_are_tone_mapped_not_clipped(tmp_path: Path) -> None:
    """Mastered at 1000 nits, highlights above the reference white keep their steps, the peak is
    near SDR's white, and the shadows stay close to the reference."""
    nits = [0.5, 5, 20, 100, 203, 400, 700, 1000]
    greys = [(level / REFERENCE_WHITE_NITS,) * 3 for level in nits]
    source = make_hdr_source(tmp_path / "pq.mp4", "pq", mastering_peak_nits=1000.0, patches=greys)
    luma = cut_patches(source, tmp_path, "crop", len(greys))[0].mean(axis=1)
    assert np.all(np.diff(luma) >= 5), luma.round()  # no two levels merge: nothing clipped
    assert luma[-1] >= 235  # the mastering peak is SDR's peak
    assert 120 <= luma[4] <= 235  # the reference white is bright, below the highlights
    shadows = np.array([reference_sdr(patch)[0] for patch in greys[:2]])
    assert np.abs(luma[:2] - shadows).max() <= 12  # shadows barely move


def test_the_source_line_names_the_transfer(tmp_path: Path) -> None:
    source = make_hdr_source(tmp_path / "pq.mp4", "pq", mastering_peak_nits=None, patches=PATCHES[:2])
    with VideoSource(source) as video:
        assert video.info.describe().endswith("transfer PQ, BT.2020 primaries")


def test_the_default_format_prefers_sdr_when_both_are_offered(tmp_path: Path) -> None:
    """yt-dlp's own selector, on a made-up YouTube-like list: the same heights in HDR and SDR."""
    config = load_settings(None, {"output.width": 1280, "output.height": 720})
    options = ytdlp_options(config.download, config.output, tmp_path)
    formats: list[dict[str, object]] = []
    for height in (360, 720, 1080):
        for dynamic_range, vcodec in (("HDR10", "vp09.02.51.10"), ("SDR", "vp09.00.40.08")):
            formats.append(
                {
                    "format_id": f"{height}{dynamic_range}",
                    "url": f"http://x/{height}{dynamic_range}",
                    "ext": "webm",
                    "height": height,
                    "width": height * 16 // 9,
                    "vcodec": vcodec,
                    "acodec": "none",
                    "dynamic_range": dynamic_range,
                }
            )
    info = {"id": "x", "title": "x", "extractor": "test", "extractor_key": "Test", "webpage_url": "http://x/"}
    with yt_dlp.YoutubeDL({**options, "quiet": True, "simulate": True}) as ydl:
        chosen = ydl.process_ie_result({**info, "formats": formats}, download=False)
    assert chosen["format_id"] == "720SDR"
    hdr_only = [f for f in formats if f["dynamic_range"] == "HDR10"]
    with yt_dlp.YoutubeDL({**options, "quiet": True, "simulate": True}) as ydl:
        chosen = ydl.process_ie_result({**info, "formats": hdr_only}, download=False)
    assert chosen["format_id"] == "720HDR10"  # HDR when nothing else is offered: converted to SDR
