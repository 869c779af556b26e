"""Deterministic synthetic video frames (numpy only), shared by the tests and the reference script.

`write_video` (the tests only) also needs PyAV.
"""

from __future__ import annotations

import numpy as np

# name -> ((num_frames, height, width), video processor pixel budget)
SETTINGS = {
    # 112x168 is already a multiple of 28 within the budget: no resize, so outputs must be identical.
    "no_resize": ((6, 112, 168), {"min_pixels": 3136, "max_pixels": 12845056}),
    # odd size and an odd frame count: resized with bicubic, last frame repeated.
    "resized_odd": ((5, 101, 150), {"min_pixels": 3136, "max_pixels": 128 * 28 * 28}),
}
# (total frames, source fps, target fps) for frame sampling
SAMPLING_CASES = [(24, 8.0, 2.0), (300, 30.0, 2.0), (100, 25.0, 1.0), (7, 30.0, 2.0), (1000, 24.0, 2.0),
                  (61, 29.97, 2.0)]


def synthetic_frames(n: int, height: int, width: int) -> np.ndarray:
    """uint8 [n, height, width, 3]: a moving square over gradients, different every frame."""
    y, x = np.mgrid[0:height, 0:width]
    frames = []
    for i in range(n):
        frame = np.stack([(x * 255 // width + 17 * i) % 256, (y * 255 // height) % 256,
                          ((x + y + 9 * i) * 3) % 256], axis=-1).astype(np.uint8)
        top, left = (7 * i) % max(1, height - 24), (11 * i) % max(1, width - 24)
        frame[top:top + 24, left:left + 24] = (250, 240, 10)
        frames.append(frame)
    return np.stack(frames)


def write_video(path, frames: np.ndarray, fps: int) -> None:
    """Lossless (PNG-coded) video, so decoded frames equal the ones written."""
    import av
    with av.open(str(path), "w") as container:
        stream = container.add_stream("png", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "rgb24"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
