"""NV12 <-> RGB in plain torch ops, so the conversion runs wherever the tensors live (GPU or CPU).

NV12 here is one (height * 3 / 2, width) uint8 plane: the luma rows, then the interleaved U/V rows at
half resolution. Encoder input is BT.709 with limited ("MPEG", 16-235) range, as the encoders signal
it; decoded pictures are read with whatever matrix and range their source declares, the way the CPU
path's swscale reads them (daemon.source.declared_colour decides which).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from daemon.geometry import DisplayGeometry

# Luma weights (Kr, Kb) by H.273 matrix code point, for the matrices swscale knows. Anything else is
# read as BT.601, which is also what swscale falls back to.
LUMA_WEIGHTS: dict[int, tuple[float, float]] = {
    1: (0.2126, 0.0722),  # BT.709
    4: (0.30, 0.11),  # FCC
    5: (0.299, 0.114),  # BT.470 BG (BT.601 625 lines)
    6: (0.299, 0.114),  # SMPTE 170M (BT.601 525 lines)
    7: (0.212, 0.087),  # SMPTE 240M
    9: (0.2627, 0.0593),  # BT.2020 non-constant luminance
}
BT709, LIMITED, FULL = 1, 1, 2  # H.273 matrix code point; FFmpeg's MPEG and JPEG range values

# What the encoders get: BT.709; the chroma scales follow from the weights (Cb = (B - Y) / 1.8556, ...).
KR, KB = LUMA_WEIGHTS[BT709]
KG = 1.0 - KR - KB
Y_OFFSET, Y_SCALE = 16.0, 219.0
C_OFFSET, C_SCALE = 128.0, 224.0


def nv12_planes(nv12: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split (..., H*3/2, W) NV12 into luma (..., H, W) and chroma (..., 2, H/2, W/2)."""
    rows, width = nv12.shape[-2:]
    if rows % 3 or width % 2:
        raise ValueError(f"NV12 plane of {rows}x{width} is not (height * 3 / 2) x even width")
    height = rows * 2 // 3
    luma = nv12[..., :height, :]
    chroma = nv12[..., height:, :].reshape(*nv12.shape[:-2], height // 2, width // 2, 2)
    return luma, chroma.movedim(-1, -3)


def crop_nv12(nv12: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """The visible width x height picture of an NV12 surface that may be larger than it.

    Decoders work on whole macroblocks: a 1080-line H.264 picture is coded as 1088 lines, and a
    surface handed out at the coded size has its chroma rows after all 1088 luma rows. Returns a view
    when nothing needs cutting, else a new (height * 3 / 2, width) tensor."""
    rows, surface_width = nv12.shape[-2:]
    if (rows, surface_width) == (height * 3 // 2, width):
        return nv12
    coded_height = rows * 2 // 3
    if rows % 3 or coded_height < height or surface_width < width:
        raise ValueError(f"NV12 surface of {rows}x{surface_width} cannot hold a {width}x{height} picture")
    luma = nv12[..., :height, :width]
    chroma = nv12[..., coded_height : coded_height + height // 2, :width]
    return torch.cat((luma, chroma), dim=-2)


def nv12_to_rgb(nv12: torch.Tensor, matrix: int = BT709, color_range: int = LIMITED) -> torch.Tensor:
    """(..., H*3/2, W) uint8 NV12 -> (..., H, W, 3) uint8 full-range RGB.

    `matrix` is the H.273 matrix code point and `color_range` FFmpeg's range (1 limited, 2 full)."""
    kr, kb = LUMA_WEIGHTS.get(matrix, LUMA_WEIGHTS[5])
    kg = 1.0 - kr - kb
    y_offset, y_scale, c_scale = (0.0, 255.0, 255.0) if color_range == FULL else (Y_OFFSET, Y_SCALE, C_SCALE)
    luma, chroma = nv12_planes(nv12)
    y = (luma.float() - y_offset) / y_scale
    uv = (chroma.float() - C_OFFSET) / c_scale
    # Chroma sits between luma rows; bilinear upsampling keeps edges from stair-stepping.
    flat = uv.reshape(-1, 2, *uv.shape[-2:])
    uv = F.interpolate(flat, scale_factor=2, mode="bilinear", align_corners=False)
    uv = uv.reshape(*chroma.shape[:-2], *luma.shape[-2:])
    u, v = uv[..., 0, :, :], uv[..., 1, :, :]
    r = y + 2 * (1 - kr) * v
    b = y + 2 * (1 - kb) * u
    g = (y - kr * r - kb * b) / kg
    rgb = torch.stack((r, g, b), dim=-1)
    return rgb.mul_(255).round_().clamp_(0, 255).to(torch.uint8)


def rgb_to_nv12(rgb: torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) uint8 RGB, or (N, H, W) uint8 luma-only frames -> (N, H*3/2, W) uint8 NV12."""
    count, height, width = rgb.shape[:3]
    if height % 2 or width % 2:
        raise ValueError(f"{width}x{height}: 4:2:0 needs an even width and height")
    if rgb.ndim == 3:
        # A matte is stored as grey: its value becomes luma, chroma stays neutral.
        y = rgb.float() / 255
        u = v = torch.zeros((count, height // 2, width // 2), device=rgb.device)
    else:
        values = rgb.float().div_(255)
        r, g, b = values[..., 0], values[..., 1], values[..., 2]
        y = KR * r + KG * g + KB * b
        cb = (b - y) / (2 * (1 - KB))
        cr = (r - y) / (2 * (1 - KR))
        # Each chroma sample is the mean of its 2x2 luma block.
        u = F.avg_pool2d(cb.unsqueeze(1), 2).squeeze(1)
        v = F.avg_pool2d(cr.unsqueeze(1), 2).squeeze(1)
    luma = (y * Y_SCALE + Y_OFFSET).round_().clamp_(0, 255).to(torch.uint8)
    chroma = torch.stack((u, v), dim=-1).mul_(C_SCALE).add_(C_OFFSET).round_().clamp_(0, 255)
    chroma = chroma.to(torch.uint8).reshape(count, height // 2, width)
    return torch.cat((luma, chroma), dim=1)


def as_shown(rgb: torch.Tensor, geometry: DisplayGeometry) -> torch.Tensor:
    """A stored (H, W, 3) uint8 picture as a player shows it: widened or narrowed to square pixels,
    then turned upright, as daemon.source's frames are on the CPU."""
    orientation = geometry.orientation
    if geometry.sample_aspect != 1:
        width, height = orientation.stored_size(geometry.size)
        shrinking = width < rgb.shape[1]
        planar = rgb.permute(2, 0, 1).unsqueeze(0).float()
        planar = F.interpolate(
            planar, size=(height, width), mode="bicubic", antialias=shrinking, align_corners=False
        )
        rgb = planar.round_().clamp_(0, 255).to(torch.uint8)[0].permute(1, 2, 0)
    if orientation.transpose:
        rgb = rgb.transpose(0, 1)
    if orientation.flip_rows:
        rgb = rgb.flip(0)
    if orientation.flip_cols:
        rgb = rgb.flip(1)
    return rgb.contiguous()
