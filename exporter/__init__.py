"""The torch side: load a checkpoint, (later: fuse adapters), export ONNX graphs, verify.

Needs the `export` extra (torch, diffusers, transformers, safetensors, onnx).
"""
