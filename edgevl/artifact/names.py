"""Names both sides of the artifact contract must agree on: graph kinds, I/O names, symbolic dims, ops.

The exporter writes these names into the graphs and the manifest; the runtime, the
quantizer and the backends read them from here, never from a string literal of their own.
"""

from __future__ import annotations

# ----------------------------------------------------------------------------- graphs
VISION = "vision"
DECODER = "decoder"
GRAPH_KINDS = (VISION, DECODER)

# ----------------------------------------------------------------------------- symbolic dims
NUM_PATCHES = "num_patches"          # vision: patches (14x14 px; Qwen3-VL 16x16) of one attention segment
BATCH = "batch"                      # decoder: rows
SEQUENCE = "sequence"                # decoder: new tokens this call
PAST_SEQUENCE = "past_sequence"      # decoder: tokens already in the KV cache
TOTAL_SEQUENCE = "total_sequence"    # decoder: past + new
MAX_CONTEXT = "max_context"          # in-place decoder: positions of the preallocated KV buffers
NUM_WINDOWS = "num_windows"          # Qwen2.5-VL vision: attention windows of one segment
DIMS = (NUM_PATCHES, BATCH, SEQUENCE, PAST_SEQUENCE, TOTAL_SEQUENCE, MAX_CONTEXT, NUM_WINDOWS)

# ----------------------------------------------------------------------------- vision I/O
PIXEL_VALUES = "pixel_values"
ROTARY_POS_IDS = "rotary_pos_ids"
IMAGE_EMBEDS = "image_embeds"
WINDOW_GATHER = "window_gather"      # Qwen2.5-VL: [num_windows, slots] rows of each window (runtime/inputs/windows.py)
WINDOW_MASK = "window_mask"          # [num_windows, slots] 1 = a slot holds a row
WINDOW_SCATTER = "window_scatter"    # [num_patches] the slot each row went to
POS_EMBED_IDS = "pos_embed_ids"      # Qwen3-VL: [num_patches, 4] int64 rows of the learned position table
POS_EMBED_WEIGHTS = "pos_embed_weights"  # [num_patches, 4] float32 their bilinear weights (runtime/inputs/pos_embed.py)
DEEPSTACK_EMBEDS = "deepstack_embeds"    # Qwen3-VL vision output [levels, num_patches / 4, hidden]; decoder input
                                         # [levels, B, S, hidden] (zeros at text positions and in decode steps)

# ----------------------------------------------------------------------------- decoder I/O
INPUTS_EMBEDS = "inputs_embeds"
POSITION_IDS = "position_ids"
ATTENTION_MASK = "attention_mask"                # concat decoder: [B, past + S], 1 = real token
SEQLENS_K = "seqlens_k"                          # in-place decoder: [B] int32, each row's length after the call - 1
TOTAL_SEQUENCE_LENGTH = "total_sequence_length"  # in-place decoder: [] int32, max length after the call (>= S)
LOGITS = "logits"
NEXT_TOKEN = "next_token"                        # argmax of logits, [B] int64
PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."
KV_KINDS = ("key", "value")


def past_name(layer: int, kind: str) -> str:
    """The decoder input holding layer `layer`'s cached keys or values."""
    return f"{PAST_PREFIX}{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    """The decoder output holding layer `layer`'s keys or values after this call."""
    return f"{PRESENT_PREFIX}{layer}.{kind}"


def kv_names(num_layers: int) -> list[tuple[str, str]]:
    """(past input, present output) for every layer's key and value, in graph order."""
    return [(past_name(i, k), present_name(i, k)) for i in range(num_layers) for k in KV_KINDS]


def present_for(past: str) -> str:
    """The present.* output that replaces a past_key_values.* input after a call."""
    if not past.startswith(PAST_PREFIX):
        raise ValueError(f"{past!r} is not a KV-cache input")
    return PRESENT_PREFIX + past[len(PAST_PREFIX):]


def is_past(name: str) -> bool:
    return name.startswith(PAST_PREFIX)


# ----------------------------------------------------------------------------- graph variants and caches
VARIANTS = ("ort", "standard")      # ort: onnxruntime contrib ops allowed; standard: ONNX-standard ops only
IN_PLACE, CONCAT = "in_place", "concat"
KV_CACHES = (IN_PLACE, CONCAT)      # how a decoder's cache works (GraphSpec.kv_cache)

# ----------------------------------------------------------------------------- custom ops
EDGEVL_DOMAIN = "edgevl"
MROPE = f"{EDGEVL_DOMAIN}.MRoPE"     # how GraphSpec.custom_ops names the op: "<domain>.<op type>"
