"""synthetic/architectures.py: the presets add up, the big ones build the real architectures (their parameter counts
as Hugging Face lists them), and an unknown preset is a user error."""

import pytest

from edgevl.errors import EdgevlError
from edgevl.synthetic import pieces
from edgevl.synthetic.architectures import PRESETS, build_config, get_preset


transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_shapes_are_consistent(name):
    p = PRESETS[name]
    assert p.hidden_size % p.num_attention_heads == 0
    assert p.num_attention_heads % p.num_key_value_heads == 0  # GQA groups
    assert sum(p.mrope_section) == p.head_dim // 2
    assert p.vision_embed_dim % p.vision_num_heads == 0
    assert p.vision_head_dim % 4 == 0  # the ViT's 2-D rope splits head_dim/2 into h and w halves


# Hugging Face lists Qwen2-VL-2B/7B/72B-Instruct at 2.21B / 8.29B / 73.4B parameters.
@pytest.mark.parametrize("name,billions", [("qwen2-vl-2b", 2.21), ("qwen2-vl-7b", 8.29), ("qwen2-vl-72b", 73.4)])
def test_big_preset_config_builds_the_real_architecture(name, billions):
    ids = pieces.special_token_ids(pieces.train_tokenizer())
    preset = get_preset(name)
    config = build_config(preset, ids)
    assert config.text_config.hidden_size == config.vision_config.hidden_size == preset.hidden_size
    assert config.text_config.rope_parameters["mrope_section"] == list(preset.mrope_section)
    assert config.image_token_id == ids["image_token_id"]
    with torch.device("meta"):  # shapes only, no memory
        model = transformers.Qwen2VLForConditionalGeneration(config)
    count = sum(p.numel() for p in model.parameters())  # a tied lm_head counts once
    assert round(count / 1e9, 2 if billions < 10 else 1) == billions


def test_unknown_preset_is_a_user_error():
    with pytest.raises(EdgevlError, match="qwen2-vl-2b"):
        get_preset("qwen2-vl-3b")
