"""The torch side: load a checkpoint, (later: fuse adapters), export ONNX graphs, verify.

Needs the `export` extra (torch, diffusers, transformers, safetensors, onnx).
"""

import logging


class _DropDistributionNotice(logging.Filter):
    """diffusers logs at import that two distributions (optimum, optimum-onnx) provide the package
    `optimum`: true wherever optimum's ONNX exporter is installed, harmless, and it would otherwise
    precede every one-line message of the CLI."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Multiple distributions found for package optimum")


# The logger diffusers creates at import is this one (logging.getLogger by module name).
logging.getLogger("diffusers.utils.import_utils").addFilter(_DropDistributionNotice())
