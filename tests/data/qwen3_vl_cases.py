"""The inputs recorded in qwen3_vl_reference.npz (numpy only), shared by the tests and make_qwen3_vl_reference.py.

Images and frames come from `video_frames.synthetic_frames`, so nothing but the processors' outputs is stored.
The hub values are Qwen/Qwen3-VL-2B-Instruct's preprocessor_config.json / video_preprocessor_config.json
(the 4B and 8B ship the same); SMALL_* budgets reach the same branches with outputs small enough to commit.
"""

from __future__ import annotations

HUB_IMAGE_SIZE = {"longest_edge": 16777216, "shortest_edge": 65536}    # 16384 x 32^2, 64 x 32^2 pixels
HUB_VIDEO_SIZE = {"longest_edge": 25165824, "shortest_edge": 4096}     # over all frames: 768 x 32 x 32^2
SMALL_IMAGE_SIZE = {"longest_edge": 24 * 32 * 32, "shortest_edge": 4 * 32 * 32}
SMALL_VIDEO_SIZE = {"longest_edge": 4 * 64 * 96, "shortest_edge": 4096}
HALF = [0.5, 0.5, 0.5]

# The fields of the hub's two processor files that matter here (the rest are transformers' defaults:
# rescale 1/255, bicubic, do_* true).
HUB_IMAGE_CONFIG = {
    "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
    "image_mean": HALF, "image_processor_type": "Qwen2VLImageProcessor", "image_std": HALF,
    "merge_size": 2, "patch_size": 16, "resample": 3, "rescale_factor": 0.00392156862745098,
    "size": HUB_IMAGE_SIZE, "temporal_patch_size": 2, "processor_class": "Qwen3VLProcessor",
}
HUB_VIDEO_CONFIG = {
    "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True, "do_sample_frames": True,
    "fps": 2, "image_mean": HALF, "image_std": HALF, "max_frames": 768, "merge_size": 2, "min_frames": 4,
    "patch_size": 16, "resample": 3, "rescale_factor": 0.00392156862745098, "return_metadata": False,
    "size": HUB_VIDEO_SIZE, "temporal_patch_size": 2, "video_processor_type": "Qwen3VLVideoProcessor",
    "processor_class": "Qwen3VLProcessor",
}

# name -> ((height, width), size): one image through the image processor (torchvision and PIL backends).
IMAGE_CASES = {
    "hub_upscale": ((37, 53), HUB_IMAGE_SIZE),       # under 64 x 32^2 pixels: scaled up (ceil branch)
    "round": ((70, 101), SMALL_IMAGE_SIZE),          # within the budget: sides rounded to multiples of 32
    "upscale": ((25, 30), SMALL_IMAGE_SIZE),         # sides round to 32 x 32 < min pixels: ceil branch
    "downscale": ((300, 410), SMALL_IMAGE_SIZE),     # over max pixels: floor branch (antialiased)
    "tall": ((400, 33), SMALL_IMAGE_SIZE),           # 12.5 x 32 rounds half to even; 1-patch-pair wide
}

# name -> ((frames, height, width), size): all frames given, no sampling (do_sample_frames=False).
VIDEO_PIXEL_CASES = {
    "odd_frames": ((5, 50, 70), HUB_VIDEO_SIZE),     # 5 frames: last one repeated, t = 3
    "min_pixels": ((2, 33, 40), HUB_VIDEO_SIZE),     # 2 x 32 x 32 < 4096: scaled up (ceil branch)
    "tiny_side": ((4, 20, 30), HUB_VIDEO_SIZE),      # a side under 32: scaled up before rounding
    "budget": ((4, 101, 150), SMALL_VIDEO_SIZE),     # t x h x w over the budget: floor branch
}

# name -> ((frames, height, width), cap_pixels_per_frame): hub sizes, only the grid is stored.
# cap None is what a hub config gives in transformers 5.25 (a warning, then uncapped).
VIDEO_GRID_CASES = {
    "768_frames": ((768, 240, 320), None),
    "768_frames_capped": ((768, 240, 320), True),
    "8_frames_1080p": ((8, 1080, 1920), None),
    "8_frames_1080p_capped": ((8, 1080, 1920), True),
    "3_frames": ((3, 64, 64), None),
}

# (total frames, source fps or None, target fps) for Qwen3VLVideoProcessor.sample_frames and the timestamps.
SAMPLING_CASES = [
    (24, 8.0, 2.0),          # 6 frames
    (300, 30.0, 2.0),        # 20 frames
    (61, 29.97, 2.0),        # 4 frames
    (100, 25.0, 1.0),        # another target fps: 4 frames
    (600, 30.0, 0.5),        # 10 frames
    (1000, 24.0, 2.0),       # 83 frames: odd, the last timestamp pairs a frame with itself
    (3, 30.0, 2.0),          # fewer frames than min_frames: all 3
    (2, 30.0, 2.0),          # 2 frames
    (7, 30.0, 2.0),          # 0.47 s: raised to min_frames (4)
    (4, 2.0, 2.0),           # timestamps 0.25 and 1.25: '.1f' rounds half to even -> '0.2', '1.2'
    (11, 4.0, 2.0),          # linspace 2.5 and 7.5: np.round half to even -> 2, 8
    (8, 3.2, 2.0),           # linspace 3.5 -> 4
    (10, 3.0, 2.0),          # 6 frames at uneven steps
    (48, None, 2.0),         # no source fps: transformers assumes 24
    (216000, 30.0, 2.0),     # 2 hours: capped at max_frames (768)
    (50000, 24.0, 2.0),      # capped at 768
    (1537, 1.0, 2.0),        # 3074 wanted, capped at 768 over 1537 frames
]

# (total frames, source fps, height, width): a clip sampled by the processor itself, one video in the prompt.
PROMPT_CASES = [
    (24, 8.0, 48, 64),       # 6 frames -> t = 3
    (3, 30.0, 40, 40),       # 3 frames -> padded to 4, t = 2
    (83, 24.0, 36, 52),      # 6 frames
]

# One conversation with an image and a video, through the hub chat template and the processor.
CHAT_IMAGE = (37, 53)                   # HUB_IMAGE_SIZE: scaled up to 224 x 320 -> 70 image tokens
CHAT_VIDEO = (24, 8.0, 48, 64)          # as PROMPT_CASES[0]
CHAT_MESSAGES = [
    {"role": "user", "content": [
        {"type": "image"},
        {"type": "text", "text": "Compare the picture with the clip."},
        {"type": "video"},
        {"type": "text", "text": "What moves?"},
    ]},
]
