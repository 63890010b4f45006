"""Golden I/O: seeded inputs and the torch outputs for them, stored with each export.

`edgesd check` re-runs the ONNX graphs on these inputs, on whatever provider the user picks,
and compares with the torch outputs recorded here, with no torch needed at check time. One
small compressed `.npz` per component under `golden/` (batch 1, a 64x48-pixel-sized latent,
a 16-token sequence): a few hundred KB for a full-size SD1.x model, a few KB for the tiny one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgesd.models.manifest import sha256_file
from edgesd.runtime.conformance.inputs import golden_inputs

GOLDEN_DIR = "golden"


def golden_path(component: str) -> str:
    return f"{GOLDEN_DIR}/{component}.npz"


def write_golden(specs, model, configs: dict, folder: Path, components: dict) -> None:
    """Write golden/<component>.npz for each spec; record {path, sha256} in components[name]["golden"]."""
    import torch

    from edgesd.exporter.graphs import graph_for

    (Path(folder) / GOLDEN_DIR).mkdir(exist_ok=True)
    for spec in specs:
        inputs = golden_inputs(spec, configs)
        graph = graph_for(spec, model)
        dtype = next(graph.parameters()).dtype  # float inputs follow the module's weights
        tensors = [torch.from_numpy(np.ascontiguousarray(inputs[t.name])) for t in spec.inputs]
        tensors = [x.to(dtype) if x.is_floating_point() and x.ndim else x for x in tensors]
        with torch.no_grad():
            outputs = graph(*tensors)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        arrays = {f"input.{k}": v for k, v in inputs.items()}
        arrays.update({f"output.{t.name}": o.detach().float().numpy() for t, o in zip(spec.outputs, outputs)})
        path = Path(folder) / golden_path(spec.name)
        np.savez_compressed(path, **arrays)
        components[spec.name]["golden"] = {"path": golden_path(spec.name), "sha256": sha256_file(path)}
