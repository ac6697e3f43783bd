"""Typed slide errors. Each names the file and the cause so a batch log line is enough to act on."""

from __future__ import annotations

import os


class SlideError(Exception):
    """Base class: something is wrong with one slide file (never with the tool itself)."""

    kind = "slide_error"

    def __init__(self, path: str | os.PathLike[str], cause: str) -> None:
        self.path = os.fspath(path)
        self.cause = cause
        super().__init__(f"{self.path}: {cause}")


class UnsupportedFormatError(SlideError):
    """No reader recognises the file (wrong extension, truncated header, not an image)."""

    kind = "unsupported_format"


class CorruptSlideError(SlideError):
    """The file was recognised but its data cannot be decoded."""

    kind = "corrupt"


class SlideTooLargeError(SlideError):
    """A requested read would allocate more pixels than allowed (decompression-bomb guard)."""

    kind = "too_large"


class MissingResolutionError(SlideError):
    """Neither mpp nor objective power is known and no override was given."""

    kind = "missing_resolution"


class ResolutionTooLowError(SlideError):
    """The slide's finest level is much coarser than the requested tiling resolution."""

    kind = "resolution_too_low"
