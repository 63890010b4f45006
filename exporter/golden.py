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


def golden_arrays(spec, model, configs: dict) -> dict:
    """{input.NAME / output.NAME: array} for `spec`: seeded inputs and the torch outputs for them."""
    import torch

    from edgesd.exporter.graphs import graph_for, run_graph

    inputs = golden_inputs(spec, configs)
    graph = graph_for(spec, model)
    dtype = next(graph.parameters()).dtype  # float inputs follow the module's weights
    tensors = [torch.from_numpy(np.ascontiguousarray(inputs[t.name])) for t in spec.inputs]
    tensors = [x.to(dtype) if x.is_floating_point() and x.ndim else x for x in tensors]
    outputs = run_graph(graph, tensors)
    arrays = {f"input.{k}": v for k, v in inputs.items()}
    arrays.update({f"output.{t.name}": o.detach().float().numpy() for t, o in zip(spec.outputs, outputs)})
    return arrays


def write_golden(folder: Path, component: str, arrays: dict) -> dict:
    """Write golden/<component>.npz; return its manifest record {path, sha256}."""
    (Path(folder) / GOLDEN_DIR).mkdir(exist_ok=True)
    path = Path(folder) / golden_path(component)
    np.savez_compressed(path, **arrays)
    return {"path": golden_path(component), "sha256": sha256_file(path)}
