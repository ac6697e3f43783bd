"""The registered encoders, one entry each, and the generic `hf:<repo>` / `timm:<name>` forms.

Hub ids, architectures, output conventions, preprocessing, tile sizes and precisions follow the
models' own cards and code, cross-checked against TRIDENT (`trident/patch_encoder_models/load.py`),
which is also where the native tile size / magnification come from (its README's `--patch_size`,
`--mag`). Where a card and TRIDENT differ, the entry's comment says which one is followed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pathchat.features.encoders.errors import EncoderNotFoundError, WeightsUnavailableError
from pathchat.features.encoders.preprocessing import (
    HALF,
    HOPTIMUS_MEAN,
    HOPTIMUS_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    Preprocessing,
)
from pathchat.features.encoders.spec import EncoderSpec

HF_PREFIX = "hf:"
TIMM_PREFIX = "timm:"
_BIN = ("model.safetensors", "pytorch_model.bin")


def _access(repo: str, gated: bool) -> str:
    url = f"https://huggingface.co/{repo}"
    return f"gated: accept the terms at {url}, then `huggingface-cli login`" if gated else f"open: {url}"


def _pre(resize: int, crop: int, mean: tuple[float, float, float], std: tuple[float, float, float],
         interpolation: str) -> Preprocessing:
    return Preprocessing(resize_px=resize, crop_px=crop, mean=mean, std=std, interpolation=interpolation)


def _pairs(**kwargs: Any) -> tuple[tuple[str, Any], ...]:
    return tuple(kwargs.items())


_SWIGLU = "swiglu_packed"  # timm.layers.SwiGLUPacked, resolved by the builder (no timm import here)

_ENTRIES: tuple[EncoderSpec, ...] = (
    EncoderSpec(
        name="uni_v1", source="timm", hub_id="MahmoodLab/UNI", dim=1024, input_px=224, tile_px=256,
        magnification=20.0, precision="fp16",
        # card: Resize(224) (torchvision default bilinear), CenterCrop(224), ImageNet mean/std
        preprocessing=_pre(224, 224, IMAGENET_MEAN, IMAGENET_STD, "bilinear"),
        gated=True, access=_access("MahmoodLab/UNI", True),
        description="UNI (Mahmood lab, 2024): DINOv2 ViT-L/16 on 100k WSIs; class token",
        arch="timm vit_large_patch16_224 (ViT-L/16, LayerScale)", output="pooled", builder="timm",
        build_args=_pairs(model_name="vit_large_patch16_224", kwargs=_pairs(
            img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True)),
        hub_files=_BIN,
    ),
    EncoderSpec(
        name="uni_v2", source="timm", hub_id="MahmoodLab/UNI2-h", dim=1536, input_px=224, tile_px=256,
        magnification=20.0, precision="bf16",
        # TRIDENT: Resize(224), CenterCrop(224), ImageNet (the card resolves timm's pretrained_cfg)
        preprocessing=_pre(224, 224, IMAGENET_MEAN, IMAGENET_STD, "bilinear"),
        gated=True, access=_access("MahmoodLab/UNI2-h", True),
        description="UNI2-h (Mahmood lab, 2025): ViT-H/14 with SwiGLU and 8 registers on 350k WSIs; class token",
        arch="timm vit_giant_patch14_224 re-sized to ViT-H/14 (depth 24, dim 1536, SwiGLU, 8 registers)",
        output="pooled", builder="timm",
        build_args=_pairs(model_name="vit_giant_patch14_224", kwargs=_pairs(
            img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536,
            mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True, mlp_layer=_SWIGLU, act_layer="silu",
            reg_tokens=8, dynamic_img_size=True)),
        hub_files=_BIN,
    ),
    EncoderSpec(
        name="conch_v1", source="timm", hub_id="MahmoodLab/CONCH", dim=512, input_px=448, tile_px=512,
        magnification=20.0, precision="fp32",
        # CONCH repo: image_transform(448) = Resize(448, bicubic), CenterCrop(448), OpenAI CLIP mean/std
        preprocessing=_pre(448, 448, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "bicubic"),
        gated=True, access=_access("MahmoodLab/CONCH", True),
        description="CONCH v1 (Mahmood lab, 2024): CoCa image tower, attention-pooled embedding before the "
                    "contrastive projection",
        arch="CoCa image tower: timm ViT-B/16 @448 + attentional pooler (1 query, 512) + LayerNorm",
        output="pooled", builder="conch_v1", hub_files=("pytorch_model.bin",),
        ignore_keys=("text.", "text_decoder.", "logit_scale"),
    ),
    EncoderSpec(
        name="conch_v15", source="timm", hub_id="MahmoodLab/conchv1_5", dim=768, input_px=448, tile_px=512,
        magnification=20.0, precision="fp16",
        # TRIDENT conchv1_5.py: Resize(448, bilinear), CenterCrop(448), ImageNet mean/std
        preprocessing=_pre(448, 448, IMAGENET_MEAN, IMAGENET_STD, "bilinear"),
        gated=True, access=_access("MahmoodLab/conchv1_5", True),
        description="CONCH v1.5 (Mahmood lab, TITAN's patch encoder): ViT-L/16 @448 with attentional pooler",
        arch="timm ViT-L/16 @448 (LayerScale) + attentional pooler (1 query, 768) + LayerNorm",
        output="pooled", builder="conch_v15", hub_files=("pytorch_model_vision.bin",),
    ),
    EncoderSpec(
        name="virchow2", source="timm", hub_id="paige-ai/Virchow2", dim=2560, input_px=224, tile_px=224,
        magnification=20.0, precision="fp16",
        # hub pretrained_cfg: 224, bicubic, crop_pct 1.0, ImageNet mean/std
        preprocessing=_pre(224, 224, IMAGENET_MEAN, IMAGENET_STD, "bicubic"),
        gated=True, access=_access("paige-ai/Virchow2", True),
        description="Virchow2 (Paige, 2024): ViT-H/14 with SwiGLU and 4 registers; class token + mean patch token",
        arch="timm vit_huge_patch14_224 (SwiGLUPacked + SiLU, 4 registers)", output="cls+mean_patch",
        builder="timm",
        build_args=_pairs(model_name="vit_huge_patch14_224", kwargs=_pairs(
            img_size=224, init_values=1e-5, num_classes=0, reg_tokens=4, mlp_ratio=5.3375, global_pool="",
            dynamic_img_size=True, mlp_layer=_SWIGLU, act_layer="silu")),
        hub_files=_BIN,
    ),
    EncoderSpec(
        name="hoptimus0", source="timm", hub_id="bioptimus/H-optimus-0", dim=1536, input_px=224, tile_px=224,
        magnification=20.0, precision="fp16",
        # card: 224 px tiles at 0.5 µm/px, ToTensor + Normalize(their mean/std); resize as TRIDENT (bilinear)
        preprocessing=_pre(224, 224, HOPTIMUS_MEAN, HOPTIMUS_STD, "bilinear"),
        gated=True, access=_access("bioptimus/H-optimus-0", True),
        description="H-optimus-0 (Bioptimus, 2024): ViT-g/14 with 4 registers; class token",
        arch="timm vit_giant_patch14_reg4_dinov2 (init_values 1e-5, dynamic_img_size False)", output="pooled",
        builder="timm",
        build_args=_pairs(model_name="vit_giant_patch14_reg4_dinov2", kwargs=_pairs(
            img_size=224, init_values=1e-5, dynamic_img_size=False, global_pool="token", num_classes=0)),
        hub_files=_BIN,
    ),
    EncoderSpec(
        name="hoptimus1", source="timm", hub_id="bioptimus/H-optimus-1", dim=1536, input_px=224, tile_px=224,
        magnification=20.0, precision="fp16",
        preprocessing=_pre(224, 224, HOPTIMUS_MEAN, HOPTIMUS_STD, "bilinear"),
        gated=True, access=_access("bioptimus/H-optimus-1", True),
        description="H-optimus-1 (Bioptimus, 2025): ViT-g/14 with 4 registers; class token",
        arch="timm vit_giant_patch14_reg4_dinov2 (init_values 1e-5, dynamic_img_size False)", output="pooled",
        builder="timm",
        build_args=_pairs(model_name="vit_giant_patch14_reg4_dinov2", kwargs=_pairs(
            img_size=224, init_values=1e-5, dynamic_img_size=False, global_pool="token", num_classes=0)),
        hub_files=_BIN,
    ),
    EncoderSpec(
        name="gigapath", source="timm", hub_id="prov-gigapath/prov-gigapath", dim=1536, input_px=224,
        tile_px=256, magnification=20.0, precision="fp16",
        # card: Resize(256, bicubic), CenterCrop(224), ImageNet mean/std
        preprocessing=_pre(256, 224, IMAGENET_MEAN, IMAGENET_STD, "bicubic"),
        gated=True, access=_access("prov-gigapath/prov-gigapath", True),
        description="Prov-GigaPath tile encoder (Providence/Microsoft, 2024): ViT-g/16 DINOv2; class token",
        arch="timm vit_giant_patch14_dinov2 re-sized to patch 16 (dim 1536, depth 40, SwiGLU)",
        output="pooled", builder="timm",
        build_args=_pairs(model_name="vit_giant_patch14_dinov2", kwargs=_pairs(
            img_size=224, in_chans=3, patch_size=16, embed_dim=1536, depth=40, num_heads=24, init_values=1e-5,
            mlp_ratio=5.33334, num_classes=0)),
        hub_files=_BIN,
    ),
    EncoderSpec(
        name="phikon", source="transformers", hub_id="owkin/phikon", dim=768, input_px=224, tile_px=224,
        magnification=20.0, precision="fp32",
        # ViTImageProcessor: resize to 224x224 (bilinear), ImageNet mean/std; TRIDENT the same
        preprocessing=_pre(224, 224, IMAGENET_MEAN, IMAGENET_STD, "bilinear"),
        gated=False, access=_access("owkin/phikon", False),
        description="Phikon (Owkin, 2023): iBOT ViT-B/16 on TCGA; class token of last_hidden_state",
        arch="transformers ViTModel (ViT-B/16, no pooler)", output="hf_cls", builder="hf",
        build_args=_pairs(model_class="ViTModel", config_class="ViTConfig",
                          init_kwargs=_pairs(add_pooling_layer=False),
                          config=_pairs(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                        intermediate_size=3072, image_size=224, patch_size=16, qkv_bias=True)),
        hub_files=_BIN,
    ),
    EncoderSpec(
        name="phikon_v2", source="transformers", hub_id="owkin/phikon-v2", dim=1024, input_px=224, tile_px=224,
        magnification=20.0, precision="fp32",
        # TRIDENT: Resize(224), CenterCrop(224), ImageNet mean/std
        preprocessing=_pre(224, 224, IMAGENET_MEAN, IMAGENET_STD, "bilinear"),
        gated=False, access=_access("owkin/phikon-v2", False),
        description="Phikon-v2 (Owkin, 2024): DINOv2 ViT-L/16 on 460M tiles; class token of last_hidden_state",
        arch="transformers Dinov2Model (ViT-L/16)", output="hf_cls", builder="hf",
        build_args=_pairs(model_class="Dinov2Model", config_class="Dinov2Config", init_kwargs=(),
                          config=_pairs(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                        patch_size=16, image_size=224, mlp_ratio=4, layer_norm_eps=1e-6,
                                        layerscale_value=1e-5, use_swiglu_ffn=False)),
        hub_files=_BIN,
    ),
    EncoderSpec(
        name="plip", source="transformers", hub_id="vinid/plip", dim=512, input_px=224, tile_px=224,
        magnification=20.0, precision="fp16",
        # CLIPImageProcessor: shortest edge 224 (bicubic), CenterCrop(224), OpenAI CLIP mean/std
        preprocessing=_pre(224, 224, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "bicubic"),
        gated=False, access=_access("vinid/plip", False),
        description="PLIP (Huang et al., 2023): CLIP ViT-B/32 tuned on OpenPath; projected image embedding "
                    "(trained on web images, no fixed magnification; 20x assumed)",
        arch="transformers CLIPVisionModelWithProjection (ViT-B/32) = CLIPModel.get_image_features",
        output="clip_image_embeds", builder="hf",
        build_args=_pairs(model_class="CLIPVisionModelWithProjection", config_class="CLIPVisionConfig",
                          init_kwargs=(), config=_pairs(
                              hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              image_size=224, patch_size=32, projection_dim=512, hidden_act="quick_gelu")),
        hub_files=_BIN,
    ),
    EncoderSpec(
        name="midnight", source="transformers", hub_id="kaiko-ai/midnight", dim=3072, input_px=224, tile_px=224,
        magnification=20.0, precision="fp16",
        # card: Resize(224), CenterCrop(224), Normalize(0.5, 0.5)
        preprocessing=_pre(224, 224, HALF, HALF, "bilinear"),
        gated=False, access=_access("kaiko-ai/midnight", False),
        description="Midnight-12k (kaiko.ai, 2025): DINOv2 ViT-g/14 on 12k WSIs; class token + mean patch token",
        arch="transformers Dinov2Model (ViT-g/14, SwiGLU)", output="hf_cls+mean_patch", builder="hf",
        build_args=_pairs(model_class="Dinov2Model", config_class="Dinov2Config", init_kwargs=(),
                          config=_pairs(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24,
                                        patch_size=14, image_size=224, mlp_ratio=4, use_swiglu_ffn=True,
                                        layer_norm_eps=1e-6, layerscale_value=1e-5)),
        hub_files=_BIN,
    ),
    EncoderSpec(
        name="resnet50", source="timm", hub_id="timm/resnet50.tv_in1k", dim=1024, input_px=224, tile_px=256,
        magnification=20.0, precision="fp32",
        # TRIDENT / CLAM: Resize(224, bilinear), CenterCrop(224), ImageNet mean/std
        preprocessing=_pre(224, 224, IMAGENET_MEAN, IMAGENET_STD, "bilinear"),
        gated=False, access=_access("timm/resnet50.tv_in1k", False),
        description="ImageNet ResNet-50 baseline (CLAM, TRIDENT): truncated after layer3, global average pool",
        arch="timm resnet50 features_only out_indices=(3,) + average pool", output="feature_map_avg",
        builder="timm",
        build_args=_pairs(model_name="resnet50", kwargs=_pairs(features_only=True, out_indices=(3,))),
        hub_files=_BIN, ignore_keys=("layer4.", "fc."), channels_last=True,
    ),
    EncoderSpec(
        name="random-vit-tiny", source="random", hub_id=None, dim=192, input_px=224, tile_px=256,
        magnification=20.0, precision="fp32",
        preprocessing=_pre(224, 224, IMAGENET_MEAN, IMAGENET_STD, "bilinear"),
        gated=False, access="open: no weights, deterministic from the seed",
        description="Tiny random ViT (dim 192, depth 2, patch 16) for tests, demos and CI; class token",
        arch="timm VisionTransformer (ViT-Ti width, 2 blocks), deterministic random weights", output="pooled",
        builder="random_vit", build_args=_pairs(embed_dim=192, depth=2, num_heads=3, img_size=224, patch_size=16),
    ),
    EncoderSpec(
        name="random-cnn-tiny", source="random", hub_id=None, dim=64, input_px=224, tile_px=256,
        magnification=20.0, precision="fp32",
        preprocessing=_pre(224, 224, IMAGENET_MEAN, IMAGENET_STD, "bilinear"),
        gated=False, access="open: no weights, deterministic from the seed",
        description="Tiny random CNN (3 strided convs, widths 16/32/64) for tests and CI; average pool",
        arch="3 x (conv3x3 stride 2 + ReLU) + global average pool", output="pooled", builder="random_cnn",
        build_args=_pairs(widths=(16, 32, 64)), channels_last=True,
    ),
)

_BY_NAME: dict[str, EncoderSpec] = {s.name: s for s in _ENTRIES}


def list_encoders() -> list[EncoderSpec]:
    """Registered encoders in a stable order (the generic `hf:` / `timm:` forms are not listed)."""
    return list(_ENTRIES)


def is_known_name(name: str) -> bool:
    """A registered name or a syntactically valid generic form."""
    return name in _BY_NAME or (name.startswith((HF_PREFIX, TIMM_PREFIX)) and name.split(":", 1)[1] != "")


def unknown_encoder(name: str) -> EncoderNotFoundError:
    """The error for a name that is not registered (close matches first)."""
    return EncoderNotFoundError(name, list(_BY_NAME))


def get_encoder_spec(name: str, weights: str | Path | None = None) -> EncoderSpec:
    """The spec of a registered encoder, or of a generic `hf:<repo>` / `timm:<name>` form.

    For `timm:<name>`, the model is created on the meta device (no memory, no download) to read
    `num_features` and timm's data config. For `hf:<repo>`, the config (and preprocessor config if any)
    is read from `weights` when it is a snapshot folder or a file inside one, else from the folder the
    $PATHCHAT_ENCODER_WEIGHTS map gives for the name, else from `<repo>` when that is a local folder,
    else from the hub cache (or the hub itself unless HF_HUB_OFFLINE is set).

    Raises:
        EncoderNotFoundError: unknown name (the message lists close matches), or unknown timm model.
        WeightsUnavailableError: an `hf:` config that cannot be read here.
    """
    if name in _BY_NAME:
        return _BY_NAME[name]
    if name.startswith(TIMM_PREFIX) and len(name) > len(TIMM_PREFIX):
        return _timm_spec(name)
    if name.startswith(HF_PREFIX) and len(name) > len(HF_PREFIX):
        return _hf_spec(name, Path(weights) if weights is not None else None)
    raise unknown_encoder(name)


def _timm_spec(name: str) -> EncoderSpec:
    import timm
    import torch
    from timm.data import resolve_data_config

    model_name = name[len(TIMM_PREFIX):]
    try:
        with torch.device("meta"):
            model: Any = timm.create_model(model_name, pretrained=False, num_classes=0)
    except RuntimeError as e:  # timm: "Unknown model"
        raise EncoderNotFoundError(model_name, timm.list_models(), what="timm model") from e
    cfg = resolve_data_config({}, model=model)
    crop = int(cfg["input_size"][-1])
    crop_pct = float(cfg.get("crop_pct") or 1.0)
    interpolation = cfg.get("interpolation", "bicubic")
    pretrained = getattr(model, "pretrained_cfg", {}) or {}
    hub_id = pretrained.get("hf_hub_id") or None
    hub_file = pretrained.get("hf_hub_filename")
    return EncoderSpec(
        name=name, source="timm", hub_id=hub_id, dim=int(model.num_features), input_px=crop, tile_px=crop,
        magnification=20.0, precision="fp16",
        preprocessing=Preprocessing(
            resize_px=int(math.floor(crop / crop_pct)), crop_px=crop,
            mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),  # type: ignore[arg-type]
            interpolation=interpolation if interpolation in ("bilinear", "bicubic") else "bilinear"),
        gated=False, access=_access(hub_id, False) if hub_id else "timm: no hub copy; pass weights=",
        description=f"timm {model_name} (generic form; not a pathology model; 20x assumed)",
        arch=f"timm {model_name}", output="pooled", builder="timm_generic",
        build_args=(("model_name", model_name),),
        hub_files=(hub_file,) if hub_file else (*_BIN, "open_clip_pytorch_model.bin"),
    )


def _hf_source_dir(repo: str, weights: Path | None) -> Path | None:
    if weights is not None:
        return weights if weights.is_dir() else weights.parent
    local = Path(repo).expanduser()
    return local if local.is_dir() else None


def _hf_spec(name: str, weights: Path | None) -> EncoderSpec:
    from transformers import AutoConfig

    from pathchat.features.encoders.hub import hub_cache_dir, hub_offline

    repo = name[len(HF_PREFIX):]
    if weights is None:  # an offline site may map the name to a snapshot folder
        from pathchat.features.encoders.weights import load_weights_map

        mapped = load_weights_map().get(name)
        weights = Path(mapped) if mapped else None
    folder = _hf_source_dir(repo, weights)
    try:
        if folder is not None:
            config = AutoConfig.from_pretrained(folder, local_files_only=True)
        else:
            config = AutoConfig.from_pretrained(repo, local_files_only=hub_offline(), cache_dir=hub_cache_dir())
    except (OSError, ValueError) as e:
        raise WeightsUnavailableError(name, f"cannot read the config of {folder or repo}",
                                      hub_id=None if folder else repo, cause=e) from e
    dim = getattr(config, "hidden_size", None) or (getattr(config, "hidden_sizes", None) or [None])[-1]
    if not isinstance(dim, int):
        raise WeightsUnavailableError(name, f"config {type(config).__name__} has no hidden_size: "
                                            "only vision backbones returning tokens or a pooled output work")
    pre = _hf_preprocessing(_hf_preprocessor_config(repo, folder), getattr(config, "image_size", None))
    return EncoderSpec(
        name=name, source="transformers", hub_id=None if folder else repo, dim=dim, input_px=pre.crop_px,
        tile_px=pre.crop_px, magnification=20.0, precision="fp16", preprocessing=pre, gated=False,
        access=f"local folder {folder}" if folder else _access(repo, False),
        description=f"transformers AutoModel {repo} (generic form; class token or pooled output; 20x assumed)",
        arch=f"transformers {type(config).__name__}", output="hf_auto", builder="hf_generic",
        build_args=(("repo", repo), ("folder", str(folder) if folder else "")), hub_files=_BIN,
    )


def _hf_preprocessor_config(repo: str, folder: Path | None) -> dict[str, Any] | None:
    if folder is not None:
        path = folder / "preprocessor_config.json"
        return json.loads(path.read_text()) if path.is_file() else None
    from pathchat.features.encoders.hub import cached_hub_file

    cached = cached_hub_file(repo, ("preprocessor_config.json",))
    return json.loads(Path(cached).read_text()) if cached else None


def _hf_preprocessing(pre: dict[str, Any] | None, image_size: Any) -> Preprocessing:
    """Preprocessing from a transformers image-processor config (ImageNet, bicubic, no crop if absent)."""
    default = int(image_size) if isinstance(image_size, int) else 224
    if not pre:
        return Preprocessing(default, default, IMAGENET_MEAN, IMAGENET_STD, "bicubic")

    def edge(value: Any) -> int | None:
        if isinstance(value, int):
            return value
        if isinstance(value, dict):
            return value.get("shortest_edge") or value.get("height")
        return None

    resize = edge(pre.get("size")) or default
    crop = edge(pre.get("crop_size")) if pre.get("do_center_crop", True) else None
    crop = min(crop or resize, resize)
    resample = {2: "bilinear", 3: "bicubic"}.get(pre.get("resample", 3), "bilinear")
    mean = tuple(pre.get("image_mean", IMAGENET_MEAN))
    std = tuple(pre.get("image_std", IMAGENET_STD))
    return Preprocessing(resize, crop, mean, std, resample)  # type: ignore[arg-type]
