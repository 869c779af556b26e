"""Qwen3-VL graphs against transformers, graph by graph: what the Qwen3-VL export tests share.

The runtime does not run Qwen3-VL artifacts yet, so these helpers feed the ONNX graphs directly with
onnxruntime's CPU EP: the vision graph one image or temporal patch per call (rotary ids and position-table
taps computed by the runtime's numpy functions), the decoder a prompt with visual positions and DeepStack
features, then one decode step, against transformers' visual tower and language model with a cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from edgevl.artifact import names
from edgevl.runtime.inputs.pos_embed import pos_embed_taps
from edgevl.runtime.inputs.rope_index import vision_rotary_position_ids


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def close(ours: np.ndarray, ref: np.ndarray, tol: float = 1e-4) -> float:
    """Assert ours is within tol of ref (relative to ref's largest value past 1); returns the error."""
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    err = float(np.abs(ours - ref).max())
    assert err <= tol * max(1.0, float(np.abs(ref).max())), err
    return err


# ----------------------------------------------------------------------------- vision
def run_vision(vision: ort.InferenceSession, pixel_values: np.ndarray, grid, num_position_embeddings: int,
               merge: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """image_embeds [N/4, H] and deepstack_embeds [levels, N/4, H] for a (t, h, w) grid, one call per temporal
    patch (as the runtime calls it), concatenated."""
    t, h, w = grid
    per = h * w
    rotary = vision_rotary_position_ids((1, h, w), merge)
    ids, weights = pos_embed_taps((1, h, w), num_position_embeddings, merge)
    embeds, levels = [], []
    for k in range(t):
        e, d = vision.run([names.IMAGE_EMBEDS, names.DEEPSTACK_EMBEDS], {
            names.PIXEL_VALUES: pixel_values[k * per:(k + 1) * per], names.ROTARY_POS_IDS: rotary,
            names.POS_EMBED_IDS: ids, names.POS_EMBED_WEIGHTS: weights})
        embeds.append(e)
        levels.append(d)
    return np.concatenate(embeds), np.concatenate(levels, axis=1)


def hf_vision(hf, pixel_values: np.ndarray, grid) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        out = hf.model.visual(torch.from_numpy(pixel_values), grid_thw=torch.tensor([grid]))
    return out.pooler_output.numpy(), np.stack([f.numpy() for f in out.deepstack_features])


def check_vision(graph: Path, hf, grid, num_position_embeddings: int, seed: int) -> None:
    """The vision graph at `graph` on random patches for `grid`: image embeddings and every DeepStack level within
    1e-4 of transformers' visual tower (each level against its own scale)."""
    patch_row = 3 * hf.config.vision_config.temporal_patch_size * hf.config.vision_config.patch_size ** 2
    pixels = np.random.default_rng(seed).standard_normal((int(np.prod(grid)), patch_row)).astype(np.float32)
    embeds, levels = run_vision(session(graph), pixels, grid, num_position_embeddings)
    ref_embeds, ref_levels = hf_vision(hf, pixels, grid)
    close(embeds, ref_embeds)
    assert levels.shape == ref_levels.shape == (len(ref_levels), *ref_embeds.shape)
    for ours, ref in zip(levels, ref_levels):
        close(ours, ref)


# ----------------------------------------------------------------------------- decoder
@dataclass
class Prompt:
    """One row: embeddings with 4 visual positions (a 2x2 merged image at 3..6), 3-D positions as get_rope_index
    makes them, the DeepStack features of those positions, then one decode step."""

    embeds: np.ndarray          # [1, S, H]
    positions: np.ndarray       # [3, 1, S]
    visual: np.ndarray          # [1, S] bool
    features: np.ndarray        # [levels, 4, H]
    step_embed: np.ndarray      # [1, 1, H]
    step_position: np.ndarray   # [3, 1, 1]

    @classmethod
    def make(cls, hidden: int, levels: int, seed: int = 0) -> "Prompt":
        rng = np.random.default_rng(seed)
        seq = 11
        positions = np.zeros((3, 1, seq), np.int64)
        positions[:, 0, :3] = np.arange(3)
        positions[:, 0, 3:7] = [[3, 3, 3, 3], [3, 3, 4, 4], [3, 4, 3, 4]]      # t, h, w of a 2x2 merged grid
        positions[:, 0, 7:] = np.arange(5, 9)
        visual = np.zeros((1, seq), bool)
        visual[0, 3:7] = True
        return cls(rng.standard_normal((1, seq, hidden)).astype(np.float32), positions, visual,
                   rng.standard_normal((levels, 4, hidden)).astype(np.float32),
                   rng.standard_normal((1, 1, hidden)).astype(np.float32), np.full((3, 1, 1), 9, np.int64))

    def dense(self) -> np.ndarray:
        """deepstack_embeds as the decoder takes them: [levels, 1, S, H], zeros at text positions."""
        out = np.zeros((len(self.features), *self.embeds.shape), np.float32)
        out[:, self.visual] = self.features
        return out


def hf_language_model(hf, prompt: Prompt):
    """transformers: prefill logits [1, vocab], decode-step logits, and the cache after the step."""
    from transformers import DynamicCache
    text = hf.model.language_model
    with torch.no_grad():
        out = text(inputs_embeds=torch.from_numpy(prompt.embeds), position_ids=torch.from_numpy(prompt.positions),
                   cache=DynamicCache(config=text.config), use_cache=True,
                   visual_pos_masks=torch.from_numpy(prompt.visual),
                   deepstack_visual_embeds=[torch.from_numpy(f) for f in prompt.features])
        prefill = hf.lm_head(out.last_hidden_state[:, -1]).numpy()
        step = text(inputs_embeds=torch.from_numpy(prompt.step_embed),
                    position_ids=torch.from_numpy(prompt.step_position), cache=out.cache, use_cache=True)
        return prefill, hf.lm_head(step.last_hidden_state[:, -1]).numpy(), step.cache


class Decoder:
    """One decoder graph fed the way its cache kind wants: in place (seqlens_k) or concatenated (attention_mask)."""

    def __init__(self, path: Path, layers: int, kv_heads: int, head_dim: int, capacity: int = 32):
        self.sess = session(path)
        self.inputs = [i.name for i in self.sess.get_inputs()]
        self.outputs = [o.name for o in self.sess.get_outputs()]
        self.in_place = names.SEQLENS_K in self.inputs
        self.kv = names.kv_names(layers)
        self.shape = (1, kv_heads, capacity if self.in_place else 0, head_dim)

    def empty_cache(self) -> dict:
        return {past: np.zeros(self.shape, np.float32) for past, _ in self.kv}

    def run(self, embeds, positions, deepstack, cache: dict, past: int) -> tuple[np.ndarray, dict]:
        """logits [1, vocab] of the last token, and the cache after the call."""
        total = past + embeds.shape[1]
        lengths = ({names.SEQLENS_K: np.array([total - 1], np.int32),
                    names.TOTAL_SEQUENCE_LENGTH: np.array(total, np.int32)} if self.in_place
                   else {names.ATTENTION_MASK: np.ones((1, total), np.int64)})
        out = dict(zip(self.outputs, self.sess.run(None, {
            names.INPUTS_EMBEDS: embeds, names.POSITION_IDS: positions, names.DEEPSTACK_EMBEDS: deepstack,
            **lengths, **cache})))
        return out[names.LOGITS], {past_name: out[present] for past_name, present in self.kv}

    def prefill_and_step(self, prompt: Prompt, deepstack: np.ndarray | None = None):
        """(prefill logits, step logits, cache): the prompt with its DeepStack features, then one token without."""
        levels, _, seq, hidden = prompt.dense().shape
        deepstack = prompt.dense() if deepstack is None else deepstack
        prefill, cache = self.run(prompt.embeds, prompt.positions, deepstack, self.empty_cache(), 0)
        step, cache = self.run(prompt.step_embed, prompt.step_position, np.zeros((levels, 1, 1, hidden), np.float32),
                               cache, seq)
        return prefill, step, cache


def check_decoder(decoder: Decoder, hf, prompt: Prompt) -> None:
    """Prefill and decode-step logits and every layer's keys and values within 1e-4 of transformers'."""
    ref_prefill, ref_step, ref_cache = hf_language_model(hf, prompt)
    prefill, step, cache = decoder.prefill_and_step(prompt)
    close(prefill, ref_prefill)
    close(step, ref_step)
    length = prompt.embeds.shape[1] + 1
    for layer, ref in enumerate(ref_cache.layers):
        close(cache[names.past_name(layer, "key")][:, :, :length], ref.keys.numpy())
        close(cache[names.past_name(layer, "value")][:, :, :length], ref.values.numpy())
