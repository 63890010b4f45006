"""The torch-free side: numpy + onnxruntime sessions, tokenizer, prompts, pipelines, CLI."""

from edgesd.runtime.pipeline import GenerationResult, Pipeline

__all__ = ["GenerationResult", "Pipeline"]
