"""The artifact contract, owned in one place (read by everything, written by export and quantize).

    names.py        graph kinds, I/O names, symbolic dims, custom-op names
    manifest.py     Manifest, GraphSpec, TensorSpec, ModelConfig, ...: typed, validated, to/from JSON
    folder.py       the folder on disk: confined paths, hashes, staged writes, Artifact, GraphFile
    onnx_files.py   saving and describing ONNX graphs (needs onnx; never imported by the runtime)
"""

from edgevl.artifact.folder import (
    MANIFEST,
    Artifact,
    GraphFile,
    load_artifact,
    staged_folder,
    write_manifest,
)
from edgevl.artifact.manifest import FORMAT_VERSION, ArrayRef, EmbeddingSpec, GraphSpec, Manifest, ManifestError, Quantization, SourceModel, TensorSpec
from edgevl.artifact.model_config import ModelConfig

__all__ = ["MANIFEST", "FORMAT_VERSION", "ArrayRef", "Artifact", "GraphFile", "load_artifact", "staged_folder", "write_manifest",
           "EmbeddingSpec", "GraphSpec", "Manifest", "ManifestError", "ModelConfig", "Quantization", "SourceModel",
           "TensorSpec"]
