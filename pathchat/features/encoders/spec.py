"""`EncoderSpec`: everything known about an encoder before any weight is loaded.

The public fields are what a user or the extraction pipeline needs (dimension, tile size, native
magnification, preprocessing, precision, access). The trailing fields tell the builders how to make
the architecture and read its checkpoint; they are data, so a spec stays a frozen, printable value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pathchat.features.encoders.preprocessing import Preprocessing

SOURCES = ("timm", "open_clip", "transformers", "torchvision", "random")
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

#: Output conventions (how backbone outputs become one vector per tile); see `heads.py`.
OUTPUTS = ("pooled", "cls+mean_patch", "feature_map_avg", "hf_cls", "hf_cls+mean_patch", "hf_auto",
           "clip_image_embeds")
#: Builders (how the architecture is made and its checkpoint read); see `builders.py`.
BUILDERS = ("timm", "timm_generic", "conch_v1", "conch_v15", "hf", "hf_generic", "random_vit", "random_cnn")


@dataclass(frozen=True)
class EncoderSpec:
    """One frozen tile encoder: its model, output convention, preprocessing and where weights live."""

    name: str
    source: str  # library that defines the architecture: "timm" | "open_clip" | "transformers" | ... | "random"
    hub_id: str | None  # Hugging Face repo id of the weights; None for random encoders and local folders
    dim: int  # output feature dimension
    input_px: int  # model input size (the crop)
    tile_px: int  # tile size the authors extracted at, in pixels at `magnification`
    magnification: float  # native objective magnification (20.0 means ~0.5 µm/px)
    precision: str  # recommended on GPU: "fp32" | "fp16" | "bf16"
    preprocessing: Preprocessing
    gated: bool  # the hub repo requires accepting terms
    access: str  # one line: where to get the weights, or "open"
    description: str  # one line
    # -- for the builders --
    arch: str = ""  # what is built, for people (e.g. "timm vit_large_patch16_224, ViT-L/16")
    output: str = "pooled"  # output convention, one of OUTPUTS
    builder: str = "timm"  # one of BUILDERS
    build_args: tuple[tuple[str, Any], ...] = ()  # builder keyword arguments, frozen as pairs
    hub_files: tuple[str, ...] = ()  # weight file names in the hub repo (or a snapshot folder), first found wins
    ignore_keys: tuple[str, ...] = ()  # checkpoint key prefixes this encoder does not use (dropped heads, text towers)
    channels_last: bool = False  # a CNN: run in channels_last on CUDA

    def __post_init__(self) -> None:
        problems = []
        if self.source not in SOURCES:
            problems.append(f"source {self.source!r} not in {SOURCES}")
        if self.precision not in PRECISIONS:
            problems.append(f"precision {self.precision!r} not in {tuple(PRECISIONS)}")
        if self.output not in OUTPUTS:
            problems.append(f"output {self.output!r} not in {OUTPUTS}")
        if self.builder not in BUILDERS:
            problems.append(f"builder {self.builder!r} not in {BUILDERS}")
        if self.preprocessing.crop_px != self.input_px:
            problems.append(f"input_px {self.input_px} != preprocessing.crop_px {self.preprocessing.crop_px}")
        if problems:
            raise ValueError(f"EncoderSpec {self.name!r}: " + "; ".join(problems))

    @property
    def kwargs(self) -> dict[str, Any]:
        """`build_args` as a dict (nested pairs stay pairs)."""
        return dict(self.build_args)

    @property
    def torch_dtype(self) -> torch.dtype:
        """The autocast dtype for `precision`."""
        return PRECISIONS[self.precision]
