"""Writing an output file atomically: a temporary file beside it, flushed to disk, then renamed.

A reader sees the old file or the complete new one, never a partial one; on any failure (disk
full, permissions, an interrupt) the temporary file is removed and OutputError names the cause.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from edgesd.errors import OutputError


def write_atomic(path: str | Path, data: bytes, what: str = "file") -> Path:
    path = Path(path)
    if not path.parent.is_dir():
        raise OutputError(f"{path.parent}: output folder does not exist")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # where a full disk shows on filesystems with delayed allocation
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise OutputError(f"{path}: cannot write the {what} ({e.strerror or e})") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return path


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists (it may belong to another user): a temporary file or folder
    named after a dead process is a leftover that can go."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
