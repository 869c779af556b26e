"""The two KV caches a decoder graph can have (GraphSpec.kv_cache), behind one small interface.

    InPlaceCache   ("in_place", the ort variant: GroupQueryAttention)
                   one buffer per layer and K/V, [B, kv_heads, max_context, head_dim], allocated once by the
                   decoder runner (host memory on the CPU, device memory on a GPU) and bound as the graph's
                   past AND present input/output: each call writes its new rows by position, nothing is
                   copied (gpt-fast's "KV cache written by position"). Rows are right-padded; per-row
                   lengths are fed as seqlens_k / total_sequence_length.
    ConcatCache    ("concat", the standard variant: Attention-23, TensorRT)
                   present = past ++ new, returned by every call and fed back as the next past (on a GPU as
                   device values, without a copy to the host). Rows are left-padded; attention_mask says
                   which positions are real.

Both answer the generation loop the same questions: what to feed for `new` tokens per row (`feed`),
what to bind as outputs (`bindings`), how to take a call's outputs in (`advance`), how many real
tokens each row has (`real_lengths`, for M-RoPE decode positions), and how to cut back to a
prefix (`truncate`, multi-turn chat). An InPlaceCache also gives views of some of its rows (`rows`),
caches of their own over the same memory: the server's continuous batching (batching.py) prefills a
joining request on its row alone and decodes rows 0..hi together.
"""

from __future__ import annotations

import numpy as np

from edgevl.artifact import names
from edgevl.errors import EdgevlError


class InPlaceCache:
    padding = "right"

    def __init__(self, decoder, num_layers: int, batch: int, kv_heads: int, head_dim: int, max_context: int, dtype,
                 static_total: bool = False):
        self.max_context = max_context
        # CUDA graphs replay fixed shapes and values: decode steps then say total = max_context, and
        # GroupQueryAttention bounds each row by seqlens_k alone (checked equal on the CPU).
        self.static_total = static_total
        # A decoder may write a few positions past the new token (ort-cpu's grouped decode steps: spare ones).
        shape = (batch, kv_heads, max_context + decoder.kv_spare_positions, head_dim)
        # np.zeros / device allocations: on the CPU the pages are only committed as rows are written, so
        # memory grows with the context actually used, not with max_context.
        self.buffers = {past: decoder.allocate(shape, dtype) for past, _ in names.kv_names(num_layers)}
        self.lengths = np.zeros(batch, np.int64)          # tokens in the cache, per row
        self._views: dict[tuple[int, int, bool], InPlaceCache] = {}

    @property
    def batch(self) -> int:
        return len(self.lengths)

    def rows(self, start: int, stop: int, by_pointer: bool = False) -> "InPlaceCache":
        """Rows [start, stop) as a cache of their own (continuous batching: a joining request prefills its
        row alone, a decode step runs rows 0..stop): its buffers are views of these buffers (OrtBuffer.rows,
        no copy: a numpy slice on the host, an address offset on a device) and its lengths a view of these
        lengths, so a call on the view writes these rows and advances their lengths. Views are kept, so a
        decode step binds the same addresses every time (CUDA graphs). by_pointer: bind host rows by address
        too, as device rows always are (the CPU tests run that path)."""
        key = (start, stop, by_pointer)
        if key not in self._views:
            view = object.__new__(InPlaceCache)
            view.max_context, view.static_total = self.max_context, self.static_total
            view.buffers = {past: buffer.rows(start, stop, by_pointer) for past, buffer in self.buffers.items()}
            view.lengths = self.lengths[start:stop]         # a numpy view: advance() writes through
            view._views = {}
            self._views[key] = view
        return self._views[key]

    @property
    def length(self) -> int:
        return int(self.lengths.max())

    @property
    def real_lengths(self) -> np.ndarray:
        return self.lengths.copy()

    def feed(self, new: np.ndarray, seq: int) -> dict:
        """Inputs for a call that adds new[b] real tokens to row b (within a [B, seq] block, right-padded)."""
        after = self.lengths + np.asarray(new, np.int64)
        if int(after.max()) > self.max_context:
            raise EdgevlError(f"the sequence would reach {int(after.max())} tokens but the KV cache holds "
                              f"{self.max_context}; raise --max-context or shorten the prompt.")
        total = self.max_context if self.static_total and seq == 1 else max(int(after.max()), seq)
        return {names.SEQLENS_K: (after - 1).astype(np.int32), names.TOTAL_SEQUENCE_LENGTH: np.array(total, np.int32),
                **self.buffers}

    def bindings(self) -> dict:
        """Outputs to write into our buffers: present.* is past_key_values.*, the same memory."""
        return {names.present_for(past): buffer for past, buffer in self.buffers.items()}

    def advance(self, outputs: dict, new: np.ndarray) -> None:
        self.lengths += np.asarray(new, np.int64)

    def truncate(self, length: int) -> None:
        """Keep the first `length` positions of every row (the rest is overwritten by the next call)."""
        np.minimum(self.lengths, length, out=self.lengths)     # in place: row views share the array

    def fill_random(self, length: int, rng: np.random.Generator) -> None:
        """`length` positions of random keys and values in every row (decode timing at a context length)."""
        for buffer in self.buffers.values():
            host = buffer.numpy() if buffer.array is not None else np.zeros(buffer.shape, buffer.numpy().dtype)
            host[:, :, :length] = rng.standard_normal(host[:, :, :length].shape, np.float32)
            if buffer.array is None:
                buffer.ortvalue.update_inplace(host)
        self.lengths[:] = length


class ConcatCache:
    padding = "left"

    def __init__(self, num_layers: int, batch: int, kv_heads: int, head_dim: int, dtype):
        shape = (batch, kv_heads, 0, head_dim)
        self.arrays = {past: np.zeros(shape, dtype) for past, _ in names.kv_names(num_layers)}
        self.mask = np.zeros((batch, 0), np.int64)        # 1 = a real token at this position

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    @property
    def real_lengths(self) -> np.ndarray:
        return self.mask.sum(1)

    def feed(self, new: np.ndarray, seq: int) -> dict:
        """Inputs for a call of `seq` positions per row, the last new[b] of them real (left padding)."""
        return {names.ATTENTION_MASK: np.concatenate([self.mask, _left_padded(new, seq)], axis=1), **self.arrays}

    def bindings(self) -> dict:
        return {}

    def advance(self, outputs: dict, new: np.ndarray) -> None:
        grown = {past: outputs[names.present_for(past)] for past in self.arrays}
        seq = next(iter(grown.values())).shape[2] - self.length
        self.mask = np.concatenate([self.mask, _left_padded(new, seq)], axis=1)
        self.arrays = grown

    def truncate(self, length: int) -> None:
        if length < self.length:
            self.arrays = {k: v[:, :, :length] for k, v in self.arrays.items()}
            self.mask = self.mask[:, :length]

    def fill_random(self, length: int, rng: np.random.Generator) -> None:
        """`length` positions of random keys and values in every row (decode timing at a context length)."""
        for past, array in self.arrays.items():
            b, h, _, d = array.shape
            self.arrays[past] = rng.standard_normal((b, h, length, d), np.float32).astype(array.dtype)
        self.mask = np.ones((len(self.mask), length), np.int64)


def _left_padded(new: np.ndarray, seq: int) -> np.ndarray:
    """[B, seq] int64: 1 at the last new[b] positions of each row."""
    return (np.arange(seq)[None, :] >= seq - np.asarray(new)[:, None]).astype(np.int64)


def make_cache(kind: str, decoder, config, batch: int, max_context: int, dtype):
    """The cache a decoder of GraphSpec.kv_cache `kind` needs, for `batch` rows."""
    if kind == names.IN_PLACE:
        return InPlaceCache(decoder, config.num_hidden_layers, batch, config.num_key_value_heads, config.head_dim,
                            max_context, dtype, static_total=decoder.static_decode)
    return ConcatCache(config.num_hidden_layers, batch, config.num_key_value_heads, config.head_dim, dtype)
