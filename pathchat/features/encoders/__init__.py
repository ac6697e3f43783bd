"""Frozen tile encoders: a registry of pathology foundation models with their exact preprocessing.

`load_encoder(name)` returns a `LoadedEncoder` whose `encode(tiles)` maps uint8 `[b, h, w, 3]` tiles
to float32 `[b, dim]` features; `get_encoder_spec(name)` tells, without loading anything, the
dimension, native tile size and magnification, preprocessing and precision. Modules:

- `spec.py`, `preprocessing.py`: the `EncoderSpec` and `Preprocessing` values.
- `registry.py`: the registered entries and the generic `hf:<repo>` / `timm:<name>` forms.
- `builders.py`, `heads.py`, `conch.py`, `tiny.py`: architectures and output conventions.
- `random_weights.py`: seeded, machine-independent random weights.
- `weights.py`, `hub.py`: weights maps, checkpoint files, the hub and offline availability.
- `loading.py`: `load_encoder` and `LoadedEncoder`; `table.py`: the listing for the CLI.
"""

from pathchat.features.encoders.errors import (
    WEIGHTS_MAP_ENV,
    EncoderError,
    EncoderNotFoundError,
    WeightsMapError,
    WeightsMismatchError,
    WeightsUnavailableError,
)
from pathchat.features.encoders.loading import LoadedEncoder, load_encoder
from pathchat.features.encoders.preprocessing import Preprocessing
from pathchat.features.encoders.registry import get_encoder_spec, list_encoders
from pathchat.features.encoders.spec import EncoderSpec
from pathchat.features.encoders.table import encoders_table
from pathchat.features.encoders.weights import load_weights_map, weights_available_offline

__all__ = [
    "WEIGHTS_MAP_ENV",
    "EncoderError",
    "EncoderNotFoundError",
    "EncoderSpec",
    "LoadedEncoder",
    "Preprocessing",
    "WeightsMapError",
    "WeightsMismatchError",
    "WeightsUnavailableError",
    "encoders_table",
    "get_encoder_spec",
    "list_encoders",
    "load_encoder",
    "load_weights_map",
    "weights_available_offline",
]
