"""Errors the package raises on purpose. Each names the thing that is wrong."""

from __future__ import annotations


class SD35Error(Exception):
    """Base class: an error meant for the user, printed without a traceback by the CLI."""


class CheckpointError(SD35Error):
    """A model file or folder cannot be used: names the file and, where it applies, the keys."""

    def __init__(self, message: str, path: str | None = None, keys: list[str] | None = None):
        self.path = path
        self.keys = list(keys or [])
        text = message
        if path is not None and str(path) not in message:
            text = f"{message} ({path})"
        super().__init__(text)


class InputError(SD35Error, ValueError):
    """A request parameter is invalid (size, sampler name, cfg, prompt...)."""


class DeviceError(SD35Error):
    """The requested device or compute mode is not available."""


class OutputError(SD35Error, OSError):
    """A result cannot be written (output folder missing, not writable, disk full): names the folder."""
