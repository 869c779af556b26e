"""The token embedding table: memory-mapped, gathered by token id, dequantized per row when it is quantized.

Two encodings (manifest EmbeddingSpec):

    dense    weight [vocab, hidden] float32 / float16: a row is a slice
    blocks   onnxruntime MatMulNBits' layout, the same bytes its lm_head kernel reads (so a tied table is the
             lm_head itself, stored once): per row n, n_blocks = ceil(hidden / block) blocks of `bits`-bit
             unsigned values q, weight uint8 [vocab, n_blocks, block * bits / 8] (4 bits: element 2i in the
             low nibble of byte i, 2i+1 in the high one), scales [vocab * n_blocks], zero points uint8
             [vocab, ceil(n_blocks * bits / 8)] (4 bits: block 2j low nibble, 2j+1 high; absent: 2^(bits-1));
             value = (q - zero_point) * scale, the padding of the last block cut off.

Only the rows of the tokens used are read from disk. Pure numpy: the runtime's own, no onnxruntime here.
"""

from __future__ import annotations

import numpy as np

from edgevl.artifact.manifest import ArrayRef, EmbeddingSpec


def _memmap(folder_file, ref: ArrayRef) -> np.ndarray:
    return np.memmap(folder_file(ref.file), dtype=np.dtype(ref.dtype), mode="r", offset=ref.offset, shape=ref.shape)


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """uint8 [..., n] -> uint8 [..., n * 8 / bits] (4 bits: low nibble first)."""
    if bits == 8:
        return packed
    return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)


def dequantize_rows(weight: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, bits: int,
                    hidden: int) -> np.ndarray:
    """MatMulNBits-layout rows -> float32 [n, hidden]. weight uint8 [n, blocks, blob]; scales [n, blocks];
    zero_points uint8 [n, packed] or None."""
    n, blocks, _ = weight.shape
    q = unpack(weight, bits).astype(np.float32)                                   # [n, blocks, block]
    if zero_points is None:
        zero = np.full((n, blocks), float(1 << (bits - 1)), np.float32)
    else:
        zero = unpack(zero_points, bits)[:, :blocks].astype(np.float32)           # [n, blocks]
    values = (q - zero[:, :, None]) * scales.astype(np.float32)[:, :, None]
    return values.reshape(n, -1)[:, :hidden]


class EmbeddingTable:
    """Rows of an artifact's embedding table by token id, as `dtype` (the decoder's input type)."""

    def __init__(self, spec: EmbeddingSpec, folder_file, dtype=None):
        """folder_file(name) -> the path of a file the manifest lists (Artifact.file: confined, checked)."""
        self.spec = spec
        self.weight = _memmap(folder_file, spec.weight)
        self.dtype = np.dtype(dtype or spec.dtype)
        if spec.encoding == "blocks":
            blocks = spec.weight.shape[1]
            self.scales = _memmap(folder_file, spec.scales).reshape(spec.vocab, blocks)
            self.zero_points = (_memmap(folder_file, spec.zero_points).reshape(spec.vocab, -1)
                                if spec.zero_points is not None else None)

    @property
    def shape(self) -> tuple[int, int]:
        return self.spec.shape

    def rows(self, ids) -> np.ndarray:
        """ids (any integer shape) -> [*ids.shape, hidden] in `dtype`."""
        ids = np.asarray(ids, np.int64)
        flat = ids.reshape(-1)
        if self.spec.encoding == "dense":
            out = np.asarray(self.weight[flat], dtype=self.dtype)
        else:
            zp = self.zero_points[flat] if self.zero_points is not None else None
            out = dequantize_rows(self.weight[flat], self.scales[flat], zp, self.spec.bits, self.spec.hidden)
            out = out.astype(self.dtype, copy=False)
        return out.reshape(*ids.shape, self.spec.hidden)
