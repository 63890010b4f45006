"""Weights set aside on disk while the UNet is loaded, fused and exported.

The UNet is the export's peak: in fp32 it is 3.4 GB for SD1.5 and 10.3 GB for SDXL, and the
text encoders and the VAE (0.8 GB for SD1.5, 3.6 GB for SDXL) are not needed until their own
graphs. So each is parked as soon as it is built: its parameters go to a safetensors file in
the export's scratch folder, the module keeps its structure and its buffers, and its
parameters become placeholders of the right shape and dtype that hold no memory (and that
fail loudly if written to). LoRA updates aimed at a parked module wait (`defer`) and are added
in their original order when its weights come back.
"""

from __future__ import annotations

import gc
import shutil
from pathlib import Path

from edgesd.runtime.memory import return_freed_memory


class ParkedWeights:
    """The parked modules' weight files in `scratch`, and the updates waiting for them."""

    def __init__(self, scratch: Path):
        self.scratch = Path(scratch)
        self.files: dict = {}  # attr -> safetensors file
        self.waiting: dict = {}  # attr -> [fn(), ...] to run once its weights are back

    def park(self, attr: str, module) -> None:
        """Move `module`'s parameters to disk (see the module docstring)."""
        import torch
        from safetensors.torch import save_file

        self.scratch.mkdir(parents=True, exist_ok=True)
        path = self.scratch / f"{attr}.safetensors"
        save_file({name: p.detach().contiguous() for name, p in module.named_parameters()}, str(path))
        self.files[attr] = path
        for p in module.parameters():
            p.data = torch.empty((), dtype=p.dtype).expand(p.shape)  # the shape stays, the memory goes
        gc.collect()
        return_freed_memory()

    def defer(self, attr: str, fn) -> bool:
        """Run fn() once `attr`'s weights are back; False (and nothing kept) if it is not parked."""
        if attr not in self.files:
            return False
        self.waiting.setdefault(attr, []).append(fn)
        return True

    def unpark(self, loaded, attrs) -> None:
        """Give the parked modules among `attrs` their weights back (read tensor by tensor), then
        apply what waited for them."""
        from edgesd.exporter.checkpoint import read_safetensors

        for attr in attrs:
            path = self.files.pop(attr, None)
            if path is None:
                continue
            params = dict(getattr(loaded, attr).named_parameters())
            for name, tensor in read_safetensors(path, params).items():
                params[name].data = tensor
            path.unlink()
            for fn in self.waiting.pop(attr, ()):
                fn()
        if not self.files:
            self.discard()

    def discard(self) -> None:
        """Remove the scratch folder (modules still parked keep their placeholders)."""
        self.files.clear()
        self.waiting.clear()
        shutil.rmtree(self.scratch, ignore_errors=True)
