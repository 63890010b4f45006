"""edgesd: Stable Diffusion exported to ONNX, run with numpy + onnxruntime.

The repository root is this package; its sub-packages are the top-level folders
(`models`, `exporter`, `runtime`, `schedulers`). `Pipeline` is imported lazily so that
`import edgesd.schedulers` pulls in neither onnxruntime nor torch.
"""

__version__ = "0.1.0"
__all__ = ["Pipeline", "__version__"]


def __getattr__(name):
    if name == "Pipeline":
        try:
            from edgesd.runtime.pipeline import Pipeline
        except AttributeError as e:  # keep it from looking like "no attribute Pipeline"
            raise ImportError(f"edgesd.runtime.pipeline failed to import: {e}") from e
        return Pipeline
    raise AttributeError(f"module 'edgesd' has no attribute {name!r}")
