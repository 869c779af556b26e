"""Regenerate tests/data/video_reference.npz with transformers' Qwen2VLVideoProcessor.

That processor needs torchvision, which the test environment does not install (a 5.5 GB
CUDA build of torch here), so its outputs on our synthetic frames are recorded once:

    python3 -m venv /tmp/tv && /tmp/tv/bin/pip install torch==2.14.1 torchvision==0.29.1 transformers==5.24.0
    /tmp/tv/bin/python tests/data/make_video_reference.py

The frames come from `synthetic_frames` (numpy only), shared with the tests.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from video_frames import SAMPLING_CASES, SETTINGS, synthetic_frames  # noqa: E402


def main() -> None:
    import torch
    import transformers
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import (
        Qwen2VLVideoProcessor,
    )
    from transformers.video_utils import VideoMetadata

    out = {"transformers_version": np.array(transformers.__version__)}
    for name, (frames_shape, settings) in SETTINGS.items():
        processor = Qwen2VLVideoProcessor(min_pixels=settings["min_pixels"], max_pixels=settings["max_pixels"])
        frames = synthetic_frames(*frames_shape)
        video = torch.from_numpy(frames).permute(0, 3, 1, 2)            # [T, C, H, W] uint8
        result = processor(videos=[video], return_tensors="np", do_sample_frames=False,
                           cap_pixels_per_frame=False)
        out[f"{name}/pixel_values"] = result["pixel_values_videos"].astype(np.float32)
        out[f"{name}/grid"] = np.asarray(result["video_grid_thw"], np.int64)
    processor = Qwen2VLVideoProcessor()
    for i, (total, source_fps, fps) in enumerate(SAMPLING_CASES):
        meta = VideoMetadata(total_num_frames=total, fps=source_fps, duration=total / source_fps)
        out[f"sampling/{i}"] = processor.sample_frames(meta, fps=fps).numpy().astype(np.int64)
    np.savez_compressed(HERE / "video_reference.npz", **out)
    print("wrote", HERE / "video_reference.npz", "with transformers", transformers.__version__)


if __name__ == "__main__":
    main()
