"""The random-weight model folder (synthetic/random_model.py) loads like a real Qwen2-VL-Instruct one."""

import hashlib
import json

import numpy as np
import pytest

from edgevl.synthetic import pieces
from edgevl.synthetic import random_model as tiny_model
from edgevl.synthetic.architectures import PRESETS, TINY_VOCAB_SIZE


transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

REAL_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "preprocessor_config.json",
}
IMAGE_MESSAGE = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model.write_random_model(tmp_path_factory.mktemp("tiny") / "model", preset="tiny", seed=0)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return transformers.AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def model(model_dir):
    return transformers.Qwen2VLForConditionalGeneration.from_pretrained(model_dir).eval()


def _hashes(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _greedy(model, input_ids, steps=30):
    # Plain greedy: the checkpoint's generation_config asks for top_k=1 sampling
    # with repetition_penalty 1.05, which is not what the runtime compares against.
    with torch.no_grad():
        out = model.generate(
            input_ids,
            max_new_tokens=steps,
            do_sample=False,
            repetition_penalty=1.0,
            eos_token_id=None,
            output_scores=True,
            return_dict_in_generate=True,
        )
    return out.sequences[0, input_ids.shape[1] :].tolist(), torch.cat(out.scores)


def test_folder_has_the_files_of_a_real_checkpoint(model_dir):
    assert REAL_FILES <= {p.name for p in model_dir.iterdir()}


def test_config_is_in_the_hub_layout(model_dir):
    """What published checkpoints have (transformers 4): text settings at the top level, rope_scaling "mrope",
    in_chans; transformers 5 reads it back to the config it was built from."""
    config = json.loads((model_dir / "config.json").read_text())
    assert "text_config" not in config and config["hidden_size"] == 64
    assert config["rope_scaling"] == {"type": "mrope", "mrope_section": [2, 3, 3]}
    assert config["vision_config"]["in_chans"] == 3 and "rope_parameters" not in config["vision_config"]
    loaded = transformers.AutoConfig.from_pretrained(model_dir)
    assert loaded.text_config.num_hidden_layers == PRESETS["tiny"].num_hidden_layers
    assert loaded.vision_config.embed_dim == PRESETS["tiny"].vision_embed_dim


def test_model_loads_with_every_weight(model_dir):
    model, info = transformers.Qwen2VLForConditionalGeneration.from_pretrained(model_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.dtype == torch.float32
    assert model.config.text_config.vocab_size == TINY_VOCAB_SIZE
    assert model.config.text_config.rope_parameters["mrope_section"] == [2, 3, 3]


def test_tokenizer_has_qwen2_vl_special_tokens_in_real_order(tokenizer):
    ids = tokenizer.convert_tokens_to_ids(list(pieces.SPECIAL_TOKENS))
    assert ids == list(range(pieces.BPE_VOCAB_SIZE, pieces.BPE_VOCAB_SIZE + 14))
    assert len(tokenizer) == TINY_VOCAB_SIZE
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.bos_token is None


def test_transformers_and_raw_tokenizers_agree(model_dir, tokenizer):
    # The torch-free runtime reads tokenizer.json with `tokenizers` directly;
    # transformers rebuilds Qwen2's pipeline from vocab + merges. Same ids needed.
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    prompt = tokenizer.apply_chat_template(IMAGE_MESSAGE, tokenize=False, add_generation_prompt=True)
    for text in [prompt, "Hello  world!\n\n 123 café 日本語 <|im_start|>x<|image_pad|>", "\ttabs  and   spaces "]:
        ids = tokenizer(text)["input_ids"]
        assert ids == raw.encode(text).ids
        assert tokenizer.decode(ids) == text


def test_chat_template_renders_image_and_default_system_prompt(tokenizer):
    text = tokenizer.apply_chat_template(IMAGE_MESSAGE, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe this image.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    numbered = tokenizer.apply_chat_template(
        IMAGE_MESSAGE, tokenize=False, add_generation_prompt=True, add_vision_id=True
    )
    assert "Picture 1: <|vision_start|>" in numbered
    video = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "hi"}]}]
    assert "<|vision_start|><|video_pad|><|vision_end|>" in tokenizer.apply_chat_template(video, tokenize=False)


def test_config_ids_equal_the_tokenizer_ids(model_dir, tokenizer):
    config = json.loads((model_dir / "config.json").read_text())
    gen = json.loads((model_dir / "generation_config.json").read_text())
    tid = tokenizer.convert_tokens_to_ids
    assert config["image_token_id"] == tid("<|image_pad|>")
    assert config["video_token_id"] == tid("<|video_pad|>")
    assert config["vision_start_token_id"] == tid("<|vision_start|>")
    assert config["vision_end_token_id"] == tid("<|vision_end|>")
    assert config["eos_token_id"] == tid("<|im_end|>")
    assert config["bos_token_id"] == tid("<|endoftext|>")
    assert config["vision_token_id"] == tid("<|vision_pad|>")
    assert gen["eos_token_id"] == [tid("<|im_end|>"), tid("<|endoftext|>")]
    assert gen["pad_token_id"] == gen["bos_token_id"] == tid("<|endoftext|>")


def test_pil_image_processor_loads_real_values(model_dir):
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    processor = Qwen2VLImageProcessorPil.from_pretrained(model_dir)
    assert (processor.size.shortest_edge, processor.size.longest_edge) == (3136, 12845056)
    assert list(processor.image_mean) == tiny_model.CLIP_MEAN and list(processor.image_std) == tiny_model.CLIP_STD
    assert processor.patch_size == 14 and processor.merge_size == 2 and processor.temporal_patch_size == 2
    image = Image.fromarray(np.zeros((60, 90, 3), np.uint8))
    out = processor(images=image, return_tensors="np")
    assert out["image_grid_thw"].tolist() == [[1, 4, 6]]  # 56x84 px after smart_resize
    assert out["pixel_values"].shape == (24, 3 * 2 * 14 * 14)


def test_image_prompt_runs_through_the_model(model, tokenizer, model_dir):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (56, 84, 3), dtype=np.uint8)
    pixels = Qwen2VLImageProcessorPil.from_pretrained(model_dir)(images=image, return_tensors="pt")
    n_tokens = int(pixels["image_grid_thw"].prod()) // 4  # 2x2 patches merge into one token
    text = tokenizer.apply_chat_template(IMAGE_MESSAGE, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text.replace("<|image_pad|>", "<|image_pad|>" * n_tokens), return_tensors="pt")
    # transformers 5 needs the modality of each token (0 text, 1 image, 2 video)
    # to lay out M-RoPE positions; forward() refuses images without it.
    image_id = model.config.image_token_id
    ids["mm_token_type_ids"] = (ids["input_ids"] == image_id).int()
    with torch.no_grad():
        logits = model(**ids, pixel_values=pixels["pixel_values"], image_grid_thw=pixels["image_grid_thw"]).logits
    assert logits.shape == (1, ids["input_ids"].shape[1], TINY_VOCAB_SIZE)
    assert torch.isfinite(logits).all()


def test_same_seed_same_bytes_and_tokens_other_seed_differs(model_dir, model, tokenizer, tmp_path):
    tiny_model.main([str(tmp_path / "again"), "--seed", "0"])  # the CLI entry point
    assert _hashes(tmp_path / "again") == _hashes(model_dir)
    other = tiny_model.write_random_model(tmp_path / "seed1", seed=1)
    assert _hashes(other)["model.safetensors"] != _hashes(model_dir)["model.safetensors"]

    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is in this picture?"}], tokenize=False)
    input_ids = tokenizer(text, return_tensors="pt")["input_ids"]
    again = transformers.Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "again").eval()
    tokens, scores = _greedy(model, input_ids)
    assert _greedy(again, input_ids)[0] == tokens
    # Not degenerate: a random model with the default 0.02 init loops on a few tokens.
    assert len(set(tokens)) >= 20
    top2 = scores.topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).median() > 0.05


def test_tokenizer_training_is_deterministic_and_fast():
    import time

    start = time.perf_counter()
    first = pieces.train_tokenizer().to_str()
    assert time.perf_counter() - start < 5
    assert pieces.train_tokenizer().to_str() == first
