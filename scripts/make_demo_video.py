"""Makes clips/demo.mp4: six seconds of a slow pan over a real photo of a person (skimage's astronaut).

The file is committed; this script documents how it was made and can remake it.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F
from skimage import data

WIDTH, HEIGHT, FPS, SECONDS = 640, 360, 30, 6


DEMO_PATH = Path(__file__).resolve().parent.parent / "clips" / "demo.mp4"


def main(path: Path = DEMO_PATH) -> None:
    photo = torch.from_numpy(data.astronaut()).permute(2, 0, 1).float()[None] / 255  # 512x512
    big = F.interpolate(photo, size=(720, 720), mode="bicubic", align_corners=False).clamp(0, 1)
    frames = FPS * SECONDS
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.options = {"preset": "slow", "crf": "26"}
        stream.time_base = Fraction(1, FPS)
        for index in range(frames):
            # Pan down the picture, from the face to the shoulders, with a slight zoom.
            zoom = 1.0 + 0.15 * index / frames
            crop_w, crop_h = int(720 / zoom), int(720 / zoom * HEIGHT / WIDTH)
            top = int((720 - crop_h) * index / (frames - 1))
            left = (720 - crop_w) // 2
            window = big[:, :, top : top + crop_h, left : left + crop_w]
            image = F.interpolate(window, size=(HEIGHT, WIDTH), mode="bilinear", antialias=True)
            rgb = (image[0].permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


if __name__ == "__main__":
    main()
