"""Typed encoder errors. Each message names the encoder and says what to do about it."""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence

#: Environment variable naming the YAML weights map {encoder name: local weights path}.
WEIGHTS_MAP_ENV = "PATHCHAT_ENCODER_WEIGHTS"


class EncoderError(Exception):
    """Base class: an encoder cannot be resolved, loaded or run."""


class EncoderNotFoundError(EncoderError, KeyError):
    """The name is neither registered nor a generic `hf:<repo>` / `timm:<name>` form."""

    def __init__(self, name: str, known: Sequence[str], what: str = "encoder") -> None:
        self.name = name
        self.close_matches = difflib.get_close_matches(name, list(known), n=5, cutoff=0.4)
        rest = [k for k in known if k not in self.close_matches]
        closest = f"Closest: {', '.join(self.close_matches)}. " if self.close_matches else ""
        generic = " Also accepted: 'hf:<repo or folder>' and 'timm:<model name>'." if what == "encoder" else ""
        self.message = f"unknown {what} {name!r}. {closest}Known: {', '.join(rest)}.{generic}"
        super().__init__(self.message)

    def __str__(self) -> str:  # KeyError would quote the message
        return self.message


class WeightsUnavailableError(EncoderError):
    """Weights cannot be had here: gated, offline with an empty cache, or a missing local file."""

    def __init__(self, name: str, reason: str, *, hub_id: str | None = None,
                 cause: BaseException | None = None) -> None:
        self.name = name
        self.reason = reason
        self.hub_id = hub_id
        access = ""
        if hub_id:
            access = (f" To download: accept the terms at https://huggingface.co/{hub_id} if the model is gated, "
                      "then log in with `huggingface-cli login` (or `hf auth login`, or set HF_TOKEN) and make "
                      "sure HF_HUB_OFFLINE is unset.")
        local = (f" To use a local copy: pass weights=/path/to/file-or-snapshot-folder, or list it in a weights "
                 f"map (YAML `{name}: /path/to/weights`) and set {WEIGHTS_MAP_ENV}=/path/to/map.yaml.")
        because = f" Cause: {type(cause).__name__}: {cause}" if cause is not None else ""
        super().__init__(f"{name}: weights unavailable: {reason}.{access}{local}{because}")


class WeightsMismatchError(EncoderError):
    """A weights file was found but cannot be read, or does not fit the architecture."""

    def __init__(self, name: str, path: str | os.PathLike[str], problem: str) -> None:
        self.name = name
        self.path = os.fspath(path)
        super().__init__(f"{name}: cannot use the weights at {self.path}: {problem}")


class WeightsMapError(EncoderError):
    """The YAML weights map is missing, malformed, or has an entry that does not resolve."""

    def __init__(self, path: str | os.PathLike[str], entry: str | None, problem: str) -> None:
        self.path = os.fspath(path)
        self.entry = entry
        where = f"{self.path}, entry {entry!r}" if entry is not None else self.path
        super().__init__(f"weights map {where}: {problem}")
