"""The `edgesd.json` manifest: what a model folder holds and how it was made.

The exporter writes it, the runtime and the conformance checks read it. A folder without
one (an optimum export) is still loadable; its facts are then inferred from the configs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from edgesd.errors import ModelFolderError

MANIFEST_FILE = "edgesd.json"
FORMAT_VERSION = 1
PRECISIONS = ("fp32", "fp16", "int8")
PREDICTION_TYPES = ("epsilon", "v_prediction")
VARIANTS = ("base", "inpaint")
OPTIMIZATION_TARGETS = ("cpu", "cuda")  # None: graphs as torch exported them

# key -> (type, description). The schema is the documentation.
SCHEMA = {
    "format_version": (int, "manifest format version"),
    "family": (str, "model family: sd1, sd2 or sdxl"),
    "variant": (str, "base or inpaint (9-channel UNet input)"),
    "prediction_type": (str, "epsilon or v_prediction"),
    "sample_size": (int, "default image size in pixels"),
    "precision": (str, "fp32, fp16 or int8 (of the UNet and text encoder; int8: the UNet's weights)"),
    "components": (dict, "name -> {path, sha256, external_data, precision, verification, golden (optional)}"),
    "source": (dict, "{file, sha256, format} of the checkpoint exported"),
    "exporter": (dict, "{version, torch, diffusers, onnx, opset}"),
    "adapters": (list, "LoRA / hypernetwork files baked into the graphs, in order"),
}
# Optional keys (folders exported before they existed lack them): key -> description.
OPTIONAL = {
    "optimization": "cpu or cuda: the target ONNX Runtime's optimizer fused the graphs for; null or absent: none",
    "tiny_vae": "{file, sha256, format, latent_channels} of the TAESD decoder exported as vae_decoder_tiny; "
                "absent: none",
    "deepcache": "{branch, feature, feature_channels, feature_scale}: the UNet's DeepCache cut (models/deepcache.py); "
                 "absent: no unet_shallow graph",
}


def sha256_file(path: str | Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def validate(manifest: dict) -> dict:
    """Check keys, types and enumerated values; raise ModelFolderError naming the problem."""
    if not isinstance(manifest, dict):
        raise ModelFolderError(f"{MANIFEST_FILE} must hold a JSON object")
    for key, (typ, what) in SCHEMA.items():
        if key not in manifest:
            raise ModelFolderError(f"{MANIFEST_FILE} lacks {key!r} ({what})")
        if not isinstance(manifest[key], typ) or isinstance(manifest[key], bool):
            raise ModelFolderError(f"{MANIFEST_FILE}: {key!r} must be a {typ.__name__} ({what})")
    if manifest["format_version"] > FORMAT_VERSION:
        raise ModelFolderError(
            f"{MANIFEST_FILE} has format_version {manifest['format_version']}; this edgesd reads "
            f"up to {FORMAT_VERSION}: upgrade edgesd"
        )
    if manifest.get("optimization") not in (None, *OPTIMIZATION_TARGETS):
        raise ModelFolderError(f"{MANIFEST_FILE}: optimization {manifest['optimization']!r} is not one of "
                               f"{', '.join(OPTIMIZATION_TARGETS)} (or null)")
    if not isinstance(manifest.get("tiny_vae", {}), dict):
        raise ModelFolderError(f"{MANIFEST_FILE}: 'tiny_vae' must be an object ({OPTIONAL['tiny_vae']})")
    deepcache = manifest.get("deepcache")
    if deepcache is not None and (not isinstance(deepcache, dict) or not isinstance(deepcache.get("branch"), int)
                                  or isinstance(deepcache.get("branch"), bool)):
        raise ModelFolderError(f"{MANIFEST_FILE}: deepcache must be an object with an integer 'branch'")
    for key, valid in (("precision", PRECISIONS), ("prediction_type", PREDICTION_TYPES), ("variant", VARIANTS)):
        if manifest[key] not in valid:
            raise ModelFolderError(f"{MANIFEST_FILE}: {key} {manifest[key]!r} is not one of {', '.join(valid)}")
    for name, entry in manifest["components"].items():
        if not isinstance(entry, dict) or "path" not in entry or "sha256" not in entry:
            raise ModelFolderError(f"{MANIFEST_FILE}: component {name!r} needs 'path' and 'sha256'")
        golden = entry.get("golden")  # optional: {path, sha256} of the golden I/O (older folders lack it)
        if golden is not None and (not isinstance(golden, dict) or "path" not in golden or "sha256" not in golden):
            raise ModelFolderError(f"{MANIFEST_FILE}: component {name!r}: 'golden' needs 'path' and 'sha256'")
    return manifest


def read_manifest(folder: str | Path) -> dict | None:
    """The folder's validated manifest, or None when it has none (e.g. an optimum export)."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFolderError(f"{path}: unreadable manifest ({e})") from None
    return validate(manifest)


def write_manifest(folder: str | Path, manifest: dict) -> Path:
    validate(manifest)
    path = Path(folder) / MANIFEST_FILE
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path
