"""The exceptions edgesd raises for problems a user can fix.

Every error meant for a user derives from `EdgesdError`; the CLI prints its message on one
line and exits with status 2. Anything else escaping is a bug in edgesd.
"""

import difflib


class EdgesdError(Exception):
    """Base class of every error edgesd raises on purpose."""


class InvalidArgumentError(EdgesdError, ValueError):
    """A parameter value is out of range or not one of the valid choices."""


class UnknownNameError(InvalidArgumentError, KeyError):
    """A name (sampler, schedule, family, provider...) is not one edgesd knows."""

    def __str__(self):  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class CheckpointError(EdgesdError):
    """A checkpoint or adapter file is missing, unreadable, unsafe or of the wrong kind."""


class ModelFolderError(EdgesdError):
    """An exported model folder is incomplete, inconsistent or tampered with."""


class ExportError(EdgesdError):
    """Exporting failed (for example verification against torch exceeded its tolerance)."""


class OutputError(EdgesdError, OSError):
    """An output file or folder cannot be written (no such folder, not writable, disk full)."""

    def __str__(self):  # OSError would otherwise format (errno, strerror)
        return str(self.args[0]) if self.args else ""


class ProviderError(EdgesdError):
    """The requested ONNX Runtime execution provider is not available."""


class NonFiniteError(EdgesdError, ArithmeticError):
    """A model produced NaN or infinite values (typically fp16 overflow)."""


class MissingDependencyError(EdgesdError, ImportError):
    """An optional dependency (an extra) needed for this command is not installed."""


def unknown_name(kind: str, name: str, valid) -> UnknownNameError:
    """An UnknownNameError that lists the valid names and the closest match."""
    valid = list(valid)
    close = difflib.get_close_matches(str(name), valid, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return UnknownNameError(f"unknown {kind} {name!r}.{hint} Valid: {', '.join(valid)}")
