"""Typed slide errors. Each names the file and the cause so a batch log line is enough to act on."""

from __future__ import annotations

import os


class SlideError(Exception):
    """Base class: something is wrong with one slide file (never with the tool itself)."""

    kind = "slide_error"
    #: What the message says first, so a reader tells "not supported" from "damaged" without the kind.
    label = ""

    def __init__(self, path: str | os.PathLike[str], cause: str) -> None:
        self.path = os.fspath(path)
        self.cause = cause
        label = self.label if self.label and not cause.startswith(self.label) else ""
        super().__init__(f"{self.path}: {label}{cause}")


class UnsupportedFormatError(SlideError):
    """No reader recognises the file, or it is a kind of image PathChat does not read (the file may be fine)."""

    kind = "unsupported_format"
    label = "not supported: "


class NotBrightfieldError(UnsupportedFormatError):
    """A fluorescence or multiplex image (grayscale channels), not an RGB brightfield (H&E) slide."""

    kind = "not_brightfield"


class CorruptSlideError(SlideError):
    """The file was recognised but its data cannot be decoded: it is damaged."""

    kind = "corrupt"
    label = "damaged: "


class SlideTooLargeError(SlideError):
    """A requested read would allocate more pixels than allowed (decompression-bomb guard)."""

    kind = "too_large"


class MissingResolutionError(SlideError):
    """Neither mpp nor objective power is known and no override was given."""

    kind = "missing_resolution"


class ResolutionTooLowError(SlideError):
    """The slide's finest level is much coarser than the requested tiling resolution."""

    kind = "resolution_too_low"
