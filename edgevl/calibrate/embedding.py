"""The quantized artifact's embedding table: the decoder's lm_head when they are tied, else its own quantized copy.

Tied embeddings (Qwen2-VL-2B: `tie_word_embeddings`) are ONE matrix: the input embedding and the output
projection. The quantized decoder's lm_head already holds it quantized, row per vocabulary entry
(MatMulNBits: [vocab, blocks, blob] + scales + zero points; a dense Gemm weight [vocab, hidden]), so the
table is a view of those bytes in the decoder's external data and nothing is stored twice. Untied models,
or an lm_head kept in a form without rows per token, get a table of their own at the recipe's precision:
`quantize_rows` writes MatMulNBits' layout, so runtime/embeddings.py reads both alike.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgevl.artifact.manifest import ArrayRef, EmbeddingSpec
from edgevl.artifact.onnx_files import attribute, lm_head, write_npy
from edgevl.calibrate.awq import rtn_quantize_blockwise
from edgevl.runtime.embeddings import EmbeddingTable

TABLE_FILE = "embed_tokens.npy"
BLOCKS_FILE = "embed_tokens.bin"
ALIGN = 4096


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """uint8 values < 2^bits [..., n] -> packed uint8 [..., n * bits / 8] (4 bits: low nibble first)."""
    if bits == 8:
        return q.astype(np.uint8)
    q = q.astype(np.uint8).reshape(*q.shape[:-1], -1, 2)
    return q[..., 0] | (q[..., 1] << 4)


def quantize_rows(table: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[vocab, hidden] float -> MatMulNBits' layout (asymmetric round-to-nearest per block of a row, the math
    of awq.rtn_quantize_blockwise): weight uint8 [vocab, blocks, block * bits / 8], scales float32
    [vocab, blocks], zero points uint8 [vocab, ceil(blocks * bits / 8)]."""
    vocab, hidden = table.shape
    q, scales, zero = rtn_quantize_blockwise(np.asarray(table, np.float32).T, block, bits)   # K-major [blocks, ., N]
    weight = pack(q.transpose(2, 0, 1), bits)                                                # [N, blocks, blob]
    zero = zero.T                                                                            # [N, blocks]
    if bits == 4 and zero.shape[1] % 2:
        zero = np.concatenate([zero, np.zeros((vocab, 1), np.uint8)], axis=1)
    return weight, scales.T.copy(), pack(zero, bits)


def _write_blocks(folder: Path, arrays: dict[str, np.ndarray]) -> dict[str, ArrayRef]:
    """Several arrays in one raw file, each at a page-aligned offset."""
    refs, offset = {}, 0
    with open(Path(folder) / BLOCKS_FILE, "wb") as f:
        for name, array in arrays.items():
            f.write(b"\0" * (offset - f.tell()))
            f.write(np.ascontiguousarray(array).tobytes())
            refs[name] = ArrayRef(BLOCKS_FILE, offset, array.dtype.name, tuple(array.shape))
            offset = -(-f.tell() // ALIGN) * ALIGN
    return refs


def tied_to_lm_head(folder: Path, decoder_file: str, vocab: int, hidden: int) -> EmbeddingSpec | None:
    """The table as the decoder's own lm_head, when its weights have one row per vocabulary entry in external data."""
    node, refs = lm_head(Path(folder) / decoder_file)
    if node.op_type == "MatMulNBits":
        bits, block = attribute(node, "bits", 4), attribute(node, "block_size")
        if attribute(node, "N") != vocab or attribute(node, "K") != hidden or bits not in (4, 8):
            return None
        weight, scales = refs.get(node.input[1]), refs.get(node.input[2])
        zero = refs.get(node.input[3]) if len(node.input) > 3 and node.input[3] else None
        if weight is None or scales is None or (len(node.input) > 3 and node.input[3] and zero is None):
            return None
        blocks = weight.shape[1]
        return EmbeddingSpec("blocks", weight, vocab, hidden, bits=bits, block_size=block,
                             scales=ArrayRef(scales.file, scales.offset, scales.dtype, (vocab * blocks,)),
                             zero_points=zero, tied=True)
    if node.op_type == "Gemm" and attribute(node, "transB", 0):
        weight = refs.get(node.input[1])
        if weight is not None and weight.shape == (vocab, hidden):
            return EmbeddingSpec("dense", weight, vocab, hidden, tied=True)
    return None


def own_table(folder: Path, table: np.ndarray, precision: str, block: int) -> EmbeddingSpec:
    """A table of its own: fp32 / fp16 dense, or int8 / int4 in MatMulNBits' layout."""
    vocab, hidden = table.shape
    if precision in ("fp32", "fp16"):
        dense = table.astype({"fp32": np.float32, "fp16": np.float16}[precision], copy=False)
        return EmbeddingSpec("dense", write_npy(folder, TABLE_FILE, dense), vocab, hidden)
    bits = {"int8": 8, "int4": 4}[precision]
    weight, scales, zero = quantize_rows(table, bits, block)
    refs = _write_blocks(folder, {"weight": weight, "scales": scales.reshape(-1), "zero_points": zero})
    return EmbeddingSpec("blocks", refs["weight"], vocab, hidden, bits=bits, block_size=block, scales=refs["scales"],
                         zero_points=refs["zero_points"])


def compare(reference: EmbeddingTable, table: EmbeddingTable, ids: np.ndarray) -> dict:
    """The quantized table's rows vs fp32's for `ids`: cosine similarity and relative error."""
    ref, got = reference.rows(ids).astype(np.float64), table.rows(ids).astype(np.float64)
    cos = (ref * got).sum(1) / np.maximum(np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1), 1e-30)
    rel = np.linalg.norm(got - ref, axis=1) / np.maximum(np.linalg.norm(ref, axis=1), 1e-30)
    return {"rows": int(len(ids)), "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "rel_error_mean": float(rel.mean()), "rel_error_max": float(rel.max())}
