"""`load_encoder`: resolve where the weights come from, build, wrap, freeze, and fingerprint.

Weights are taken, in order, from `weights=`, the weights map (explicit, else $PATHCHAT_ENCODER_WEIGHTS),
then the hub (cache only when HF_HUB_OFFLINE is set). `pretrained=False` and the random encoders
build deterministic random weights from `seed` instead. The fingerprint names the weights cheaply
(hub id and commit, or file path, size and mtime; a hash of the tensors for random weights up to
256 MiB) so a feature cache can tell when it must recompute.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pathchat.features.encoders.builders import (
    backbone_from_state,
    hf_from_pretrained,
    hf_from_single_file,
    random_backbone,
    timm_generic_from_state,
)
from pathchat.features.encoders.errors import EncoderError, WeightsUnavailableError
from pathchat.features.encoders.heads import make_head
from pathchat.features.encoders.hub import download_hub_file, hub_offline, snapshot_revision
from pathchat.features.encoders.random_weights import state_nbytes, state_sha256
from pathchat.features.encoders.registry import get_encoder_spec
from pathchat.features.encoders.spec import EncoderSpec
from pathchat.features.encoders.weights import (
    file_identity,
    find_weights_file,
    load_weights_map,
    read_state_dict,
)

#: Random weights up to this size are fingerprinted by hashing their bytes; larger ones by their recipe.
HASH_LIMIT_BYTES = 256 * 2**20


@dataclass
class LoadedEncoder:
    """A frozen encoder ready to embed tiles."""

    spec: EncoderSpec
    model: nn.Module  # eval(), requires_grad False, on `device`: [b, 3, input_px, input_px] -> [b, dim]
    device: torch.device
    dtype: torch.dtype  # autocast dtype on CUDA (spec.precision); float32 elsewhere
    fingerprint: str  # encoder name + weights identity; a change means cached features are stale

    @torch.inference_mode()
    def encode(self, tiles: torch.Tensor) -> torch.Tensor:
        """Embed a batch of tiles.

        Args:
            tiles: uint8 `[b, h, w, 3]` RGB tiles, any device (moved to `device`).

        Returns:
            float32 `[b, dim]` on the CPU.

        Raises:
            ValueError: tiles not uint8 `[b, h, w, 3]`.
            EncoderError: the model returned an unexpected shape.
        """
        if tiles.shape[0] == 0:
            return torch.empty(0, self.spec.dim)
        return self.encode_preprocessed(self.spec.preprocessing(tiles.to(self.device, non_blocking=True)))

    @torch.inference_mode()
    def encode_preprocessed(self, x: torch.Tensor) -> torch.Tensor:
        """Embed tiles already passed through `spec.preprocessing` (e.g. in DataLoader workers).

        Args:
            x: float32 `[b, 3, input_px, input_px]`, any device (moved to `device`).
        Returns:
            float32 `[b, dim]` on the CPU.
        """
        if x.shape[0] == 0:
            return torch.empty(0, self.spec.dim)
        x = x.to(self.device, non_blocking=True)
        cuda = self.device.type == "cuda"
        if cuda and self.spec.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        autocast = cuda and self.dtype != torch.float32
        with torch.autocast("cuda", dtype=self.dtype) if autocast else contextlib.nullcontext():
            out = self.model(x)
        if out.shape != (x.shape[0], self.spec.dim):
            raise EncoderError(f"{self.spec.name}: model returned {list(out.shape)}, expected "
                               f"[{x.shape[0]}, {self.spec.dim}]")
        return out.float().cpu()


def load_encoder(name: str, device: str | torch.device = "cpu", weights: str | os.PathLike[str] | None = None,
                 weights_map: dict[str, str] | None = None, pretrained: bool = True, seed: int = 0) -> LoadedEncoder:
    """Load a frozen tile encoder by name.

    Args:
        name: a registered name (`list_encoders()`), `hf:<repo or folder>` or `timm:<model name>`.
        device: where the model runs.
        weights: a local checkpoint (.safetensors, .bin, .pth) or snapshot folder; overrides map and hub.
        weights_map: `{name: local path}`; None reads the YAML named by $PATHCHAT_ENCODER_WEIGHTS.
        pretrained: False builds the architecture with deterministic random weights (tests, CI).
        seed: seed of random weights (random encoders, `pretrained=False`).

    Returns:
        The model wrapped in its output convention, in eval mode, gradients off, on `device`.

    Raises:
        EncoderNotFoundError: unknown name.
        WeightsUnavailableError: no local weights and the hub cannot provide them (gated, offline...).
        WeightsMismatchError: a checkpoint that cannot be read or does not fit the architecture.
        WeightsMapError: a broken weights map.
        EncoderError: `weights=` together with `pretrained=False`.
    """
    device = torch.device(device)
    local = _local_weights(name, weights, weights_map, pretrained)
    spec = get_encoder_spec(name, weights=local)
    if spec.source == "random" or not pretrained:
        backbone = random_backbone(spec, seed)
        fingerprint = _random_fingerprint(spec, backbone, seed)
    elif local is not None:
        backbone = _from_local(spec, local)
        fingerprint = f"{spec.name}|file:{file_identity(local)}"
    else:
        backbone, fingerprint = _from_hub(spec)
    model = make_head(spec.output, backbone).eval().requires_grad_(False).to(device)
    if device.type == "cuda" and spec.channels_last:
        model = model.to(memory_format=torch.channels_last)
    dtype = spec.torch_dtype if device.type == "cuda" else torch.float32
    return LoadedEncoder(spec=spec, model=model, device=device, dtype=dtype, fingerprint=fingerprint)


def _local_weights(name: str, weights: str | os.PathLike[str] | None, weights_map: dict[str, str] | None,
                   pretrained: bool) -> Path | None:
    if weights is not None:
        if not pretrained:
            raise EncoderError(f"{name}: weights={os.fspath(weights)!r} and pretrained=False contradict each other; "
                               "pass one of them")
        path = Path(weights).expanduser()
        if not path.exists():
            raise WeightsUnavailableError(name, f"weights={path} does not exist")
        return path
    if not pretrained:
        return None
    mapping = load_weights_map() if weights_map is None else weights_map
    if name not in mapping:
        return None
    path = Path(mapping[name]).expanduser()
    if not path.exists():
        raise WeightsUnavailableError(name, f"the weights map points it at {path}, which does not exist")
    return path


def _random_fingerprint(spec: EncoderSpec, backbone: nn.Module, seed: int) -> str:
    if state_nbytes(backbone) <= HASH_LIMIT_BYTES:
        return f"{spec.name}|random|seed={seed}|sha256={state_sha256(backbone)}"
    from importlib.metadata import version

    return (f"{spec.name}|random|seed={seed}|arch={spec.arch}|torch={torch.__version__}|timm={version('timm')}"
            f"|transformers={version('transformers')}")


def _from_local(spec: EncoderSpec, local: Path) -> nn.Module:
    if spec.source == "transformers" and local.is_dir():
        return hf_from_pretrained(spec, str(local), local_only=True)
    file = find_weights_file(spec, local) if local.is_dir() else local
    if spec.source == "transformers":
        return hf_from_single_file(spec, file)
    state = read_state_dict(spec.name, file)
    if spec.builder == "timm_generic":
        return timm_generic_from_state(spec, state)
    return backbone_from_state(spec, state, file)


def _from_hub(spec: EncoderSpec) -> tuple[nn.Module, str]:
    if spec.hub_id is None:
        raise WeightsUnavailableError(spec.name, "it has no hub copy; pass weights= or map it to a local file")
    if spec.source == "transformers":
        model = hf_from_pretrained(spec, spec.hub_id, local_only=hub_offline())
        revision = getattr(getattr(model, "config", None), "_commit_hash", None) or "unknown"
        return model, f"{spec.name}|hub:{spec.hub_id}@{revision}"
    path = download_hub_file(spec.name, spec.hub_id, spec.hub_files)
    state = read_state_dict(spec.name, path)
    backbone = (timm_generic_from_state(spec, state) if spec.builder == "timm_generic"
                else backbone_from_state(spec, state, path))
    return backbone, f"{spec.name}|hub:{spec.hub_id}@{snapshot_revision(path)}/{Path(path).name}"
