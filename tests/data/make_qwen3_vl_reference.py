"""Regenerate tests/data/qwen3_vl_reference.npz with transformers' Qwen3-VL processors.

Qwen3VLVideoProcessor and the default (torchvision) Qwen2VLImageProcessor need torchvision, which the test
environment does not install, so their outputs on synthetic inputs are recorded once, in a throwaway venv:

    python3 -m venv /tmp/tv && /tmp/tv/bin/pip install torch==2.14.1 torchvision==0.29.1 transformers==5.25.0
    /tmp/tv/bin/python tests/data/make_qwen3_vl_reference.py && rm -rf /tmp/tv

The processors are loaded with AutoProcessor from a folder holding the hub's Qwen3-VL-2B-Instruct processor files
(qwen3_vl_cases.py), the real chat template (edgevl/synthetic/assets/qwen3_vl_chat_template.jinja) and a byte-level
tokenizer with no merges (lossless, so decoding input_ids gives back the processor's expanded text exactly).
The inputs are in qwen3_vl_cases.py and video_frames.py (numpy only). Pixel values are stored as the uint8 levels
they were normalized from ((level - 127.5) / 127.5 in float32 gives them back bit for bit; checked here).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
REPO = HERE.parent.parent
TEMPLATE = REPO / "edgevl" / "synthetic" / "assets" / "qwen3_vl_chat_template.jinja"
sys.path.insert(0, str(HERE))
from qwen3_vl_cases import (  # noqa: E402
    CHAT_IMAGE,
    CHAT_MESSAGES,
    CHAT_VIDEO,
    HUB_IMAGE_CONFIG,
    HUB_VIDEO_CONFIG,
    IMAGE_CASES,
    PROMPT_CASES,
    SAMPLING_CASES,
    VIDEO_GRID_CASES,
    VIDEO_PIXEL_CASES,
)
from video_frames import synthetic_frames  # noqa: E402

SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
           "<|image_pad|>", "<|video_pad|>")


def levels(pixel_values: np.ndarray) -> np.ndarray:
    """The uint8 levels behind mean/std-0.5 pixel values; asserts they give the values back exactly."""
    out = np.rint(np.asarray(pixel_values, np.float64) * 127.5 + 127.5)
    assert out.min() >= 0 and out.max() <= 255
    out = out.astype(np.uint8)
    back = (out.astype(np.float32) - np.float32(127.5)) / np.float32(127.5)
    assert np.array_equal(back, pixel_values), "pixel values are not (level - 127.5) / 127.5"
    return out


def write_hub_folder(folder: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "model_max_length": 262144}))
    (folder / "preprocessor_config.json").write_text(json.dumps(HUB_IMAGE_CONFIG))
    (folder / "video_preprocessor_config.json").write_text(json.dumps(HUB_VIDEO_CONFIG))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": TEMPLATE.read_text(encoding="utf-8")}))


def frames_of(total: int, height: int, width: int) -> np.ndarray:
    return synthetic_frames(total, height, width)                     # [T, H, W, 3] uint8


def image_of(height: int, width: int) -> np.ndarray:
    return synthetic_frames(1, height, width)[0]                      # [H, W, 3] uint8


def record_images(out: dict) -> None:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    config = {k: v for k, v in HUB_IMAGE_CONFIG.items() if k not in ("image_processor_type", "processor_class")}
    for name, ((height, width), size) in IMAGE_CASES.items():
        image = image_of(height, width)
        tv = Qwen2VLImageProcessor(**{**config, "size": size})(images=[image], return_tensors="np")
        pil = Qwen2VLImageProcessorPil(**{**config, "size": size})(images=[image], return_tensors="np")
        assert np.array_equal(tv["image_grid_thw"], pil["image_grid_thw"])
        out[f"image/{name}/levels"] = levels(tv["pixel_values"])
        out[f"image/{name}/grid"] = np.asarray(tv["image_grid_thw"], np.int64)
        diff = np.abs(np.rint((tv["pixel_values"] - pil["pixel_values"]) * 127.5))
        print(f"image {name}: {height}x{width} -> grid {tv['image_grid_thw'][0].tolist()}; torchvision vs PIL: "
              f"max {diff.max():.0f} levels, mean {diff.mean():.4f}, {np.mean(diff > 0):.2%} of values differ")


def record_video_pixels(out: dict, video_processor_cls) -> None:
    from transformers.video_utils import VideoMetadata

    config = {k: v for k, v in HUB_VIDEO_CONFIG.items() if k not in ("video_processor_type", "processor_class")}
    for name, ((total, height, width), size) in VIDEO_PIXEL_CASES.items():
        processor = video_processor_cls(**{**config, "size": size})
        result = processor(videos=[frames_of(total, height, width)], do_sample_frames=False,
                           video_metadata=[VideoMetadata(total_num_frames=total, fps=2.0)],
                           cap_pixels_per_frame=False, return_tensors="np")
        out[f"video/{name}/levels"] = levels(result["pixel_values_videos"])
        out[f"video/{name}/grid"] = np.asarray(result["video_grid_thw"], np.int64)
        print(f"video {name}: {total}x{height}x{width} -> grid {result['video_grid_thw'][0].tolist()}")
    processor = video_processor_cls(**config)
    for name, ((total, height, width), cap) in VIDEO_GRID_CASES.items():
        frames = frames_of(1, height, width)[[0] * total]
        kwargs = {} if cap is None else {"cap_pixels_per_frame": cap}
        result = processor(videos=[frames], do_sample_frames=False, return_tensors="np", **kwargs)
        out[f"video_grid/{name}"] = np.asarray(result["video_grid_thw"], np.int64)
        print(f"video grid {name}: {total}x{height}x{width}, cap {cap} -> {result['video_grid_thw'][0].tolist()}")


def record_sampling(out: dict, processor) -> None:
    from transformers.video_utils import VideoMetadata

    video = processor.video_processor
    for i, (total, source_fps, fps) in enumerate(SAMPLING_CASES):
        meta = VideoMetadata(total_num_frames=total, fps=source_fps,
                             duration=None if source_fps is None else total / source_fps)
        indices = np.asarray(video.sample_frames(meta, fps=fps), np.int64)
        times = processor._calculate_timestamps(indices, meta.fps, video.temporal_patch_size)   # meta.fps: 24 if unset
        out[f"sampling/{i}/indices"] = indices
        out[f"sampling/{i}/timestamps"] = np.asarray(times, np.float64)
        out[f"sampling/{i}/text"] = np.asarray([f"<{t:.1f} seconds>" for t in times])
        print(f"sampling {total} @ {source_fps} -> {fps}: {len(indices)} frames, first timestamps "
              f"{[f'{t:.1f}' for t in times[:4]]}")


def record_prompts(out: dict, processor) -> None:
    from transformers.video_utils import VideoMetadata

    wrapper = "<|vision_start|><|video_pad|><|vision_end|>"
    for i, (total, source_fps, height, width) in enumerate(PROMPT_CASES):
        result = processor(text=[f"A{wrapper}B"], videos=[frames_of(total, height, width)],
                           video_metadata=[VideoMetadata(total_num_frames=total, fps=source_fps)],
                           do_sample_frames=True, return_tensors="np")
        text = processor.tokenizer.decode(result["input_ids"][0], skip_special_tokens=False)
        out[f"prompt/{i}/text"] = np.asarray(text)
        out[f"prompt/{i}/grid"] = np.asarray(result["video_grid_thw"], np.int64)
        out[f"prompt/{i}/levels"] = levels(result["pixel_values_videos"])
        out[f"prompt/{i}/mm_token_type_ids"] = np.asarray(result["mm_token_type_ids"][0], np.int64)
        print(f"prompt {i}: {text[:120]}...")


def record_chat(out: dict, processor) -> None:
    from transformers.video_utils import VideoMetadata

    total, source_fps, height, width = CHAT_VIDEO
    rendered = processor.apply_chat_template(CHAT_MESSAGES, tokenize=False, add_generation_prompt=True)
    result = processor(text=[rendered], images=[image_of(*CHAT_IMAGE)], videos=[frames_of(total, height, width)],
                       video_metadata=[VideoMetadata(total_num_frames=total, fps=source_fps)],
                       do_sample_frames=True, return_tensors="np")
    out["chat/template"] = np.asarray(TEMPLATE.read_text(encoding="utf-8"))
    out["chat/messages"] = np.asarray(json.dumps(CHAT_MESSAGES))
    out["chat/rendered"] = np.asarray(rendered)
    out["chat/expanded"] = np.asarray(processor.tokenizer.decode(result["input_ids"][0], skip_special_tokens=False))
    out["chat/image_grid"] = np.asarray(result["image_grid_thw"], np.int64)
    out["chat/video_grid"] = np.asarray(result["video_grid_thw"], np.int64)
    out["chat/mm_token_type_ids"] = np.asarray(result["mm_token_type_ids"][0], np.int64)
    print("chat rendered:", repr(rendered))


def main() -> None:
    import torch
    import torchvision
    import transformers
    from transformers import AutoProcessor

    out = {"transformers_version": np.asarray(transformers.__version__),
           "torch_version": np.asarray(torch.__version__), "torchvision_version": np.asarray(torchvision.__version__)}
    with tempfile.TemporaryDirectory() as folder:
        write_hub_folder(Path(folder))
        processor = AutoProcessor.from_pretrained(folder)
    classes = {"processor": type(processor).__name__, "image": type(processor.image_processor).__name__,
               "video": type(processor.video_processor).__name__, "tokenizer": type(processor.tokenizer).__name__}
    print("loaded from the hub's files:", classes)
    assert classes["processor"] == "Qwen3VLProcessor" and classes["image"] == "Qwen2VLImageProcessor"
    out["classes"] = np.asarray(json.dumps(classes))
    record_images(out)
    record_video_pixels(out, type(processor.video_processor))
    record_sampling(out, processor)
    record_prompts(out, processor)
    record_chat(out, processor)
    np.savez_compressed(HERE / "qwen3_vl_reference.npz", **out)
    print("wrote", HERE / "qwen3_vl_reference.npz", f"({(HERE / 'qwen3_vl_reference.npz').stat().st_size} bytes)",
          "with transformers", transformers.__version__, "torchvision", torchvision.__version__)


if __name__ == "__main__":
    main()
