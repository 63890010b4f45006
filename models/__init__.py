"""Model families, the exporter/runtime ONNX contract and the manifest schema.

Pure Python: importable without torch, onnxruntime or diffusers.
"""

from edgesd.models.contract import ComponentSpec, TensorSpec
from edgesd.models.detect import Detection, detect
from edgesd.models.families import FAMILIES, Family, family_of_configs, get_family, load_configs, sample_size
from edgesd.models.manifest import MANIFEST_FILE, read_manifest, sha256_file, write_manifest

__all__ = [
    "ComponentSpec", "TensorSpec", "Detection", "detect", "FAMILIES", "Family", "family_of_configs",
    "get_family", "load_configs", "sample_size", "MANIFEST_FILE", "read_manifest", "sha256_file",
    "write_manifest",
]
