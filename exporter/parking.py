"""Weights kept on disk while the export runs, so the whole model is never in memory.

The UNet is the export's peak: in fp32 it is 3.4 GB for SD1.5 and 10.3 GB for SDXL. Two ways
out of memory, both into flat files in the export's scratch folder:

- Parked (the text encoders, the VAE): as soon as a module is built its parameters go to disk
  and come back whole for its own graphs. LoRA updates aimed at it wait (`defer`) and are
  added in their original order when its weights come back.
- Streamed (the UNet): after the adapters, each layer is cast to fp32, given the LoRA updates
  that waited for it, and written out, one layer at a time. The UNet then runs in torch (for
  the golden I/O and the verification reference) with each layer reading its weights from
  disk as it is called and dropping them after (`running`), and its graph is traced without
  weights and bound to them one at a time (exporter.bind).

Either way the module keeps its structure and its buffers, and its parameters become
placeholders of the right shape and dtype that hold no memory (and fail loudly if written to).
"""

from __future__ import annotations

import contextlib
import gc
import shutil
from pathlib import Path

import numpy as np

from edgesd.runtime.memory import return_freed_memory


def placeholder(shape, dtype, fill: float = 0.0):
    """A tensor of `shape` that holds one element: the shape stays, the memory goes (and an
    in-place write fails, as every element is the same memory)."""
    import torch

    return torch.full((), fill, dtype=dtype).expand(shape)


class WeightFile:
    """Tensors appended to one flat file, read back one at a time with plain reads (a memory
    map's pages would count towards the process's resident memory while it stays open)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.index: dict = {}  # key -> (offset, nbytes, dtype, shape)
        self._out = open(self.path, "wb")

    def put(self, key: str, tensor) -> None:
        import torch

        raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        self.index[key] = (self._out.tell(), raw.nbytes, tensor.dtype, tuple(tensor.shape))
        self._out.write(memoryview(raw))

    def close(self) -> None:
        self._out.close()

    def get(self, key: str):
        import torch

        offset, nbytes, dtype, shape = self.index[key]
        raw = np.fromfile(self.path, dtype=np.uint8, count=nbytes, offset=offset)
        if raw.nbytes != nbytes:
            raise OSError(f"{self.path}: {key} runs past the end of the file")
        return torch.from_numpy(raw).view(dtype).reshape(shape)


class ParkedWeights:
    """The parked and streamed modules' weight files in `scratch`, and the updates waiting for them.

    `streamed` names the modules to stream (`stream`) instead of keeping in memory."""

    def __init__(self, scratch: Path, streamed=()):
        self.scratch = Path(scratch)
        self.streamed = set(streamed)
        self.files: dict = {}  # attr -> WeightFile of a parked module
        self.streams: dict = {}  # attr -> WeightFile of a streamed module
        self.waiting: dict = {}  # attr -> [fn(), ...] to run once its weights are back
        self.waiting_for_layer: dict = {}  # id(layer) -> [fn(), ...] to run as a streamed layer is written

    def _file(self, name: str) -> WeightFile:
        self.scratch.mkdir(parents=True, exist_ok=True)
        return WeightFile(self.scratch / name)

    def park(self, attr: str, module) -> None:
        """Move `module`'s parameters to disk (see the module docstring)."""
        file = self._file(f"{attr}.parked")
        try:
            for name, p in module.named_parameters():
                file.put(name, p.data)
        finally:
            file.close()
        self.files[attr] = file
        for p in module.parameters():
            p.data = placeholder(p.shape, p.dtype)
        gc.collect()
        return_freed_memory()

    def defer(self, attr: str, fn, layer=None) -> bool:
        """Run fn() once `attr`'s weights are back (parked), or as `layer` is written out
        (streamed); False, and nothing kept, if `attr` is neither."""
        if attr in self.files:
            self.waiting.setdefault(attr, []).append(fn)
            return True
        if attr in self.streamed and attr not in self.streams and layer is not None:
            self.waiting_for_layer.setdefault(id(layer), []).append(fn)
            return True
        return False

    def unpark(self, loaded, attrs) -> None:
        """Give the parked modules among `attrs` their weights back (read tensor by tensor), then
        apply what waited for them."""
        for attr in attrs:
            file = self.files.pop(attr, None)
            if file is None:
                continue
            for name, p in getattr(loaded, attr).named_parameters():
                p.data = file.get(name)
            file.path.unlink()
            for fn in self.waiting.pop(attr, ()):
                fn()
        if not self.files and not self.streams:
            self.discard()

    def stream(self, attr: str, module) -> None:
        """Write `module`'s weights to disk layer by layer, floating-point ones as fp32 with the
        updates that waited for each layer added, and leave placeholders (module docstring)."""
        import torch

        names = {id(p): name for name, p in module.named_parameters()}
        file, done = self._file(f"{attr}.streamed"), set()
        try:
            for layer in module.modules():
                params = [p for p in layer.parameters(recurse=False) if id(p) not in done]
                for p in params:
                    if p.is_floating_point():
                        p.data = p.data.to(torch.float32)
                for fn in self.waiting_for_layer.pop(id(layer), ()):
                    fn()
                for p in params:
                    file.put(names[id(p)], p.data)
                    p.data = placeholder(p.shape, p.dtype)
                    done.add(id(p))
        finally:
            file.close()
        if self.waiting_for_layer:
            raise RuntimeError(f"{len(self.waiting_for_layer)} deferred update(s) aim at no layer of {attr}")
        self.streams[attr] = file
        gc.collect()
        return_freed_memory()

    def loaders(self, loaded, attrs) -> dict:
        """{id(parameter): fn() -> np.ndarray} for the streamed modules among `attrs`."""
        out = {}
        for attr, module, file in self._streamed(loaded, attrs):
            for name, p in module.named_parameters():
                out[id(p)] = lambda file=file, name=name: file.get(name).numpy()
        return out

    @contextlib.contextmanager
    def running(self, loaded, attrs):
        """For the block's span, each layer of the streamed modules among `attrs` reads its
        weights from disk when it is called and drops them when it returns."""
        handles = []
        for attr, module, file in self._streamed(loaded, attrs):
            names = {id(p): name for name, p in module.named_parameters()}
            for layer in module.modules():
                params = list(layer.parameters(recurse=False))
                if not params:
                    continue

                def load(layer, args, params=params, file=file, names=names):
                    for p in params:
                        p.data = file.get(names[id(p)])

                def drop(layer, args, output, params=params):
                    for p in params:
                        p.data = placeholder(p.shape, p.dtype)

                handles += [layer.register_forward_pre_hook(load), layer.register_forward_hook(drop)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _streamed(self, loaded, attrs):
        for attr in attrs:
            module = getattr(loaded, attr, None)
            if attr in self.streams and module is not None:
                yield attr, module, self.streams[attr]

    def forget(self, attr: str) -> None:
        """A streamed module is freed: remove its file."""
        file = self.streams.pop(attr, None)
        if file is not None:
            file.path.unlink(missing_ok=True)
        if not self.files and not self.streams:
            self.discard()

    def discard(self) -> None:
        """Remove the scratch folder (modules still parked keep their placeholders)."""
        self.files.clear()
        self.streams.clear()
        self.waiting.clear()
        self.waiting_for_layer.clear()
        shutil.rmtree(self.scratch, ignore_errors=True)
