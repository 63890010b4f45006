"""A process that imports the exporter once, then forks one `edgesd export` per request.

Used by test_interrupted_export.py to kill real exports at many moments without paying the
exporter's import time (seconds) for each. Protocol, one line each: it prints "ready"; then
for every JSON list of CLI arguments read from stdin it forks a child running
`edgesd.runtime.cli.main(args)`, prints the child's pid, waits for it and prints
"exit <code>" or "signal <number>".
"""

import json
import os
import sys

from edgesd.runtime.cli import main, need_exporter

need_exporter()
import diffusers  # noqa: E402,F401  (what the export imports lazily, loaded before forking)
import transformers  # noqa: E402,F401
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402,F401
from transformers import CLIPTextModel  # noqa: E402,F401

import edgesd.exporter.export  # noqa: E402,F401
import edgesd.exporter.golden  # noqa: E402,F401
import edgesd.exporter.load  # noqa: E402,F401
import edgesd.exporter.onnx_export  # noqa: E402,F401


def serve() -> None:
    print("ready", flush=True)
    for line in sys.stdin:
        args = json.loads(line)
        pid = os.fork()
        if pid == 0:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1), os.dup2(devnull, 2)
            code = 1
            try:
                code = main(args)
            finally:
                os._exit(code if isinstance(code, int) else 1)
        print(pid, flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit {os.WEXITSTATUS(status)}",
              flush=True)


if __name__ == "__main__":
    serve()
