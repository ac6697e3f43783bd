"""Make each encoder's backbone: with deterministic random weights, or from a checkpoint.

One `_make_*` function per builder kind constructs the architecture only. timm and CONCH checkpoints
are loaded into a meta-device skeleton with `assign=True`, so a 1B-parameter model is never
initialised just to be overwritten; keys must match exactly (minus the prefixes a spec declares
unused). transformers checkpoints go through `from_pretrained`, which knows their key renames.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pathchat.features.encoders.errors import WeightsMismatchError, WeightsUnavailableError
from pathchat.features.encoders.hub import hub_cache_dir, hub_offline
from pathchat.features.encoders.random_weights import has_computed_buffers, materialize_random
from pathchat.features.encoders.spec import EncoderSpec


def _timm_layer(value: Any) -> Any:
    if value == "swiglu_packed":
        from timm.layers import SwiGLUPacked

        return SwiGLUPacked
    return value


def _make_timm(spec: EncoderSpec) -> nn.Module:
    import timm

    kwargs = {k: _timm_layer(v) for k, v in dict(spec.kwargs.get("kwargs", ())).items()}
    return timm.create_model(spec.kwargs["model_name"], pretrained=False, **kwargs)


def _make_timm_generic(spec: EncoderSpec) -> nn.Module:
    import timm

    return timm.create_model(spec.kwargs["model_name"], pretrained=False, num_classes=0)


def _make_conch_v1(spec: EncoderSpec) -> nn.Module:
    from pathchat.features.encoders.conch import ConchV1VisionTower

    return ConchV1VisionTower(img_size=spec.input_px)


def _make_conch_v15(spec: EncoderSpec) -> nn.Module:
    from pathchat.features.encoders.conch import ConchV15VisionTower

    return ConchV15VisionTower(img_size=spec.input_px)


def _hf_config(spec: EncoderSpec) -> Any:
    import transformers

    return getattr(transformers, spec.kwargs["config_class"])(**dict(spec.kwargs["config"]))


def _make_hf(spec: EncoderSpec) -> nn.Module:
    import transformers

    cls = getattr(transformers, spec.kwargs["model_class"])
    return cls(_hf_config(spec), **dict(spec.kwargs.get("init_kwargs", ())))


def _make_random_vit(spec: EncoderSpec) -> nn.Module:
    from pathchat.features.encoders.tiny import tiny_vit

    return tiny_vit(**spec.kwargs)


def _make_random_cnn(spec: EncoderSpec) -> nn.Module:
    from pathchat.features.encoders.tiny import TinyConvNet

    return TinyConvNet(**spec.kwargs)


_MAKERS: dict[str, Callable[[EncoderSpec], nn.Module]] = {
    "timm": _make_timm,
    "timm_generic": _make_timm_generic,
    "conch_v1": _make_conch_v1,
    "conch_v15": _make_conch_v15,
    "hf": _make_hf,
    "random_vit": _make_random_vit,
    "random_cnn": _make_random_cnn,
}


def random_backbone(spec: EncoderSpec, seed: int) -> nn.Module:
    """The architecture with deterministic random weights from `seed` (no download, no global RNG use)."""
    if spec.builder == "hf_generic":
        from transformers import AutoConfig, AutoModel

        config = AutoConfig.from_pretrained(_hf_generic_folder(spec), local_files_only=True)
        return materialize_random(lambda: AutoModel.from_config(config), seed)
    return materialize_random(lambda: _MAKERS[spec.builder](spec), seed)


def _hf_generic_folder(spec: EncoderSpec) -> str:
    if spec.kwargs.get("folder"):  # resolved from weights=, the weights map or a local repo path
        return str(spec.kwargs["folder"])
    repo = spec.kwargs["repo"]
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo, allow_patterns=["*.json"], cache_dir=hub_cache_dir(),
                                 local_files_only=hub_offline())
    except Exception as e:
        raise WeightsUnavailableError(spec.name, f"cannot read the config of {repo}", hub_id=repo, cause=e) from e


def _strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state


def _adapt(spec: EncoderSpec, state: dict[str, torch.Tensor], skeleton: nn.Module) -> dict[str, torch.Tensor]:
    state = _strip_prefix(state, "backbone.")  # saved from LoadedEncoder.model
    if spec.builder == "conch_v1":
        from pathchat.features.encoders.conch import adapt_conch_v1_state

        state = adapt_conch_v1_state(state, skeleton)
    elif spec.builder == "conch_v15":
        from pathchat.features.encoders.conch import adapt_conch_v15_state

        state = adapt_conch_v15_state(state, skeleton)
    if spec.ignore_keys:
        state = {k: v for k, v in state.items() if not k.startswith(spec.ignore_keys)}
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def backbone_from_state(spec: EncoderSpec, state: dict[str, torch.Tensor], path: str | Path) -> nn.Module:
    """Build the architecture and load `state` into it; every model tensor must come from `state`.

    Raises:
        WeightsMismatchError: missing or unexpected keys, or shapes that do not fit.
    """
    def make() -> nn.Module:
        return _MAKERS[spec.builder](spec)

    with torch.device("meta"):
        skeleton = make()
    on_meta = not has_computed_buffers(skeleton)
    if not on_meta:
        with torch.random.fork_rng(devices=[]):
            skeleton = make()
    state = _adapt(spec, state, skeleton)
    try:
        result = skeleton.load_state_dict(state, strict=False, assign=on_meta)
    except RuntimeError as e:  # shape mismatches
        raise WeightsMismatchError(spec.name, path, str(e).splitlines()[0] + " ...") from e
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise WeightsMismatchError(spec.name, path, f"{len(missing)} missing keys {missing[:4]}, "
                                                    f"{len(result.unexpected_keys)} unexpected keys "
                                                    f"{result.unexpected_keys[:4]}")
    if on_meta:
        for module in skeleton.modules():  # batch-norm counters are often absent from checkpoints
            for bname, buf in list(module.named_buffers(recurse=False)):
                if buf.is_meta:
                    setattr(module, bname, torch.zeros(buf.shape, dtype=buf.dtype))
    return skeleton


def timm_generic_from_state(spec: EncoderSpec, state: dict[str, torch.Tensor]) -> nn.Module:
    """A generic timm model through timm's own loader, which applies the model's checkpoint filter."""
    import timm

    state = _strip_prefix(state, "backbone.")
    return timm.create_model(spec.kwargs["model_name"], pretrained=True, num_classes=0,
                             pretrained_cfg_overlay={"state_dict": state})


def hf_from_pretrained(spec: EncoderSpec, source: str, local_only: bool, path: str | Path | None = None) -> nn.Module:
    """`from_pretrained` for transformers entries (a hub repo id or a snapshot folder), as float32.

    Checkpoint keys are matched by transformers (which renames legacy keys); any model weight the
    checkpoint lacks is an error here, where transformers would only warn and leave it random.

    Raises:
        WeightsUnavailableError: not reachable, gated, or not cached while offline.
        WeightsMismatchError: the checkpoint misses weights of the model.
    """
    import transformers

    if spec.builder == "hf_generic":
        cls: Any = transformers.AutoModel
        init_kwargs: dict[str, Any] = {}
    else:
        cls = getattr(transformers, spec.kwargs["model_class"])
        init_kwargs = dict(spec.kwargs.get("init_kwargs", ()))
    try:
        model, info = cls.from_pretrained(source, local_files_only=local_only, cache_dir=hub_cache_dir(),
                                          output_loading_info=True, **init_kwargs)
    except (OSError, ValueError) as e:
        raise WeightsUnavailableError(spec.name, f"transformers cannot load {source}",
                                      hub_id=spec.hub_id, cause=e) from e
    missing = [k for k in info.get("missing_keys", ()) if not k.endswith("mask_token")]  # unused at inference
    mismatched = list(info.get("mismatched_keys", ()))
    if missing or mismatched:
        raise WeightsMismatchError(spec.name, path or source, f"{len(missing)} weights missing from the checkpoint "
                                                              f"{missing[:4]}, {len(mismatched)} of the wrong shape "
                                                              f"{mismatched[:4]}")
    return model.float()


def hf_from_single_file(spec: EncoderSpec, file: Path) -> nn.Module:
    """A transformers entry from one weights file: its config is the `config.json` beside it, else the
    registry's; both go into a temporary snapshot folder so transformers reads the file its own way."""
    config_file = file.parent / "config.json"
    with tempfile.TemporaryDirectory(prefix="pathchat-hf-") as tmp:
        folder = Path(tmp)
        if config_file.is_file():
            shutil.copyfile(config_file, folder / "config.json")
        elif spec.builder == "hf":
            _hf_config(spec).save_pretrained(folder)
        else:
            raise WeightsMismatchError(spec.name, file, "a single weights file needs its config.json beside it "
                                                        "(or pass the snapshot folder)")
        target = folder / ("model.safetensors" if file.suffix == ".safetensors" else "pytorch_model.bin")
        try:
            target.symlink_to(file.resolve())
        except OSError:  # no symlinks (some Windows setups): copy
            shutil.copyfile(file, target)
        return hf_from_pretrained(spec, str(folder), local_only=True, path=file)
