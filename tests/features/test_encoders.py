"""Tile encoder registry: every architecture built with random weights and run, preprocessing against
torchvision, deterministic tiny encoders, local weights, weights maps, offline behaviour and errors.

Nothing here reaches the network: HF_HUB_OFFLINE is set and HF_HOME points at an empty folder.
"""

from __future__ import annotations

import gc
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import save_file
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from pathchat.features.encoders import (
    WEIGHTS_MAP_ENV,
    EncoderError,
    EncoderNotFoundError,
    Preprocessing,
    WeightsMapError,
    WeightsMismatchError,
    WeightsUnavailableError,
    encoders_table,
    get_encoder_spec,
    list_encoders,
    load_encoder,
    load_weights_map,
    weights_available_offline,
)
from pathchat.features.encoders.conch import dino_resample_pos_embed

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
HOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

# As documented by each model (card / code; see registry.py): hub id, dim, resize, crop, (mean, std),
# interpolation, precision, tile px, and the parameter count of the architecture built here (millions;
# cards: UNI2-h 681M, Virchow2 632M, H-optimus 1.1B, Prov-GigaPath 1.13B).
DOCUMENTED = {
    "uni_v1": ("MahmoodLab/UNI", 1024, 224, 224, IMAGENET, "bilinear", "fp16", 256, 303.35),
    "uni_v2": ("MahmoodLab/UNI2-h", 1536, 224, 224, IMAGENET, "bilinear", "bf16", 256, 681.39),
    "conch_v1": ("MahmoodLab/CONCH", 512, 448, 448, CLIP, "bicubic", "fp32", 512, 87.57),
    "conch_v15": ("MahmoodLab/conchv1_5", 768, 448, 448, IMAGENET, "bilinear", "fp16", 512, 306.71),
    "virchow2": ("paige-ai/Virchow2", 2560, 224, 224, IMAGENET, "bicubic", "fp16", 224, 631.24),
    "hoptimus0": ("bioptimus/H-optimus-0", 1536, 224, 224, HOPTIMUS, "bilinear", "fp16", 224, 1134.77),
    "hoptimus1": ("bioptimus/H-optimus-1", 1536, 224, 224, HOPTIMUS, "bilinear", "fp16", 224, 1134.77),
    "gigapath": ("prov-gigapath/prov-gigapath", 1536, 256, 224, IMAGENET, "bicubic", "fp16", 256, 1134.95),
    "phikon": ("owkin/phikon", 768, 224, 224, IMAGENET, "bilinear", "fp32", 224, 85.80),
    "phikon_v2": ("owkin/phikon-v2", 1024, 224, 224, IMAGENET, "bilinear", "fp32", 224, 303.35),
    "plip": ("vinid/plip", 512, 224, 224, CLIP, "bicubic", "fp16", 224, 87.85),
    "midnight": ("kaiko-ai/midnight", 3072, 224, 224, HALF, "bilinear", "fp16", 224, 1134.77),
    "resnet50": ("timm/resnet50.tv_in1k", 1024, 224, 224, IMAGENET, "bilinear", "fp32", 256, 8.54),
    "random-vit-tiny": (None, 192, 224, 224, IMAGENET, "bilinear", "fp32", 256, 1.08),
    "random-cnn-tiny": (None, 64, 224, 224, IMAGENET, "bilinear", "fp32", 256, 0.02),
}
GATED = {"uni_v1", "uni_v2", "conch_v1", "conch_v15", "virchow2", "hoptimus0", "hoptimus1", "gigapath"}


@pytest.fixture(autouse=True)
def offline_hub(tmp_path, monkeypatch):
    """No test may reach the hub: offline mode, an empty cache, no ambient weights map."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.delenv(WEIGHTS_MAP_ENV, raising=False)


def pattern_tiles(b: int, px: int, seed: int = 0) -> torch.Tensor:
    """A fixed uint8 `[b, px, px, 3]` batch (no RNG involved)."""
    n = torch.arange(b * px * px * 3, dtype=torch.int64)
    return ((n * 7919 + seed * 104729 + (n // 977) * 31) % 256).to(torch.uint8).reshape(b, px, px, 3)


def test_registry_lists_every_documented_encoder():
    assert [s.name for s in list_encoders()] == list(DOCUMENTED)
    assert {s.name for s in list_encoders() if s.gated} == GATED


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DOCUMENTED))
def test_every_architecture_builds_and_runs_with_random_weights(name):
    hub_id, dim, resize, crop, (mean, std), interpolation, precision, tile_px, params_m = DOCUMENTED[name]
    spec = get_encoder_spec(name)
    assert (spec.hub_id, spec.dim, spec.input_px, spec.tile_px, spec.precision) == (hub_id, dim, crop, tile_px,
                                                                                    precision)
    assert spec.preprocessing == Preprocessing(resize, crop, mean, std, interpolation)
    assert spec.magnification == 20.0

    encoder = load_encoder(name, pretrained=False)
    assert round(sum(p.numel() for p in encoder.model.parameters()) / 1e6, 2) == params_m
    assert not encoder.model.training and not any(p.requires_grad for p in encoder.model.parameters())
    assert encoder.dtype == torch.float32 and encoder.device == torch.device("cpu")
    features = encoder.encode(pattern_tiles(2, spec.tile_px))
    assert features.shape == (2, dim) and features.dtype == torch.float32
    assert torch.isfinite(features).all()
    assert not torch.allclose(features[0], features[1])  # the two tiles differ, so must their features
    del encoder, features
    gc.collect()


# -- deterministic tiny encoders -------------------------------------------------------------------

# random-vit-tiny, seed 0, on pattern_tiles(2, 256): first four features of each tile
VIT_TINY_EXPECTED = torch.tensor([[-0.366260, -1.051154, -0.576258, 0.833442],
                                  [-0.357698, -1.035183, -0.583433, 0.716229]])


@pytest.mark.slow
def test_random_vit_tiny_is_deterministic():
    a, b = load_encoder("random-vit-tiny"), load_encoder("random-vit-tiny", pretrained=False)
    state_a, state_b = a.model.state_dict(), b.model.state_dict()
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    tiles = pattern_tiles(2, 256)
    out_a, out_b = a.encode(tiles), b.encode(tiles)
    assert torch.equal(out_a, out_b)
    # exact values catch any change of the weight recipe (4 decimals: CPU kernels may differ in the last bits)
    torch.testing.assert_close(out_a[:, :4], VIT_TINY_EXPECTED, atol=1e-4, rtol=0)
    assert a.fingerprint == b.fingerprint and a.fingerprint.startswith("random-vit-tiny|random|seed=0|sha256=")
    other = load_encoder("random-vit-tiny", seed=1)
    assert other.fingerprint != a.fingerprint
    assert not torch.allclose(other.encode(tiles), out_a)


@pytest.mark.slow
def test_random_weights_leave_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_encoder("random-cnn-tiny")
    load_encoder("plip", pretrained=False)  # built for real (it computes position ids), RNG forked
    assert torch.equal(torch.rand(3), expected)


# -- preprocessing ------------------------------------------------------------------------------------

def test_preprocessing_shapes_and_dtype():
    pre = Preprocessing(256, 224, *IMAGENET, interpolation="bicubic")
    out = pre(pattern_tiles(3, 300)[:, :, :280])  # non-square 300 x 280 tiles
    assert out.shape == (3, 3, 224, 224) and out.dtype == torch.float32 and out.is_contiguous()
    with pytest.raises(ValueError, match="uint8"):
        pre(torch.zeros(1, 224, 224, 3))
    with pytest.raises(ValueError, match=r"\[b, h, w, 3\]"):
        pre(torch.zeros(1, 3, 224, 224, dtype=torch.uint8))
    with pytest.raises(ValueError, match="crop_px"):
        Preprocessing(224, 256, *IMAGENET)


@pytest.mark.parametrize("px", [224, 256])
def test_normalisation_of_a_constant_image(px):
    mean, std = IMAGENET
    rgb = (10, 128, 250)
    tiles = torch.tensor(rgb, dtype=torch.uint8).expand(2, px, px, 3).contiguous()
    out = Preprocessing(224, 224, mean, std, "bicubic")(tiles)
    expected = torch.tensor([(v / 255 - m) / s for v, m, s in zip(rgb, mean, std, strict=True)])
    torch.testing.assert_close(out, expected.view(1, 3, 1, 1).expand_as(out), atol=1e-5 if px != 224 else 1e-6,
                               rtol=0)


@pytest.mark.parametrize(("resize", "crop", "interpolation", "shape"), [
    (224, 224, "bicubic", (256, 256)), (224, 224, "bilinear", (256, 256)),
    (256, 224, "bicubic", (256, 320)), (448, 448, "bilinear", (512, 512)),
])
def test_resize_and_crop_match_torchvision(resize, crop, interpolation, shape):
    mean, std = IMAGENET
    tiles = pattern_tiles(2, max(shape))[:, : shape[0], : shape[1]]
    ours = Preprocessing(resize, crop, mean, std, interpolation)(tiles)
    x = tiles.permute(0, 3, 1, 2).float() / 255
    mode = InterpolationMode.BICUBIC if interpolation == "bicubic" else InterpolationMode.BILINEAR
    x = TF.resize(x, [resize], interpolation=mode, antialias=True)
    x = TF.center_crop(x, [crop, crop])
    ref = TF.normalize(x, list(mean), list(std))
    assert ours.shape == ref.shape
    # bilinear on the CPU rounds to whole grey levels (uint8 kernel): at most one level apart
    tol = 1.0 / 255 / min(std) + 1e-4 if interpolation == "bilinear" else 1e-3
    assert (ours - ref).abs().max() < tol


# -- generic forms --------------------------------------------------------------------------------

@pytest.mark.slow
def test_timm_generic_form(tmp_path):
    spec = get_encoder_spec("timm:resnet18")
    assert spec.dim == 512 and spec.source == "timm" and spec.hub_id == "timm/resnet18.a1_in1k"
    assert spec.preprocessing == Preprocessing(235, 224, *IMAGENET, interpolation="bicubic")  # crop_pct 0.95
    encoder = load_encoder("timm:resnet18", pretrained=False)
    tiles = pattern_tiles(2, 224)
    assert encoder.encode(tiles).shape == (2, 512)
    save_file(encoder.model.state_dict(), tmp_path / "resnet18.safetensors")  # loaded through timm's own loader
    reloaded = load_encoder("timm:resnet18", weights=tmp_path / "resnet18.safetensors")
    assert torch.equal(reloaded.encode(tiles), encoder.encode(tiles))
    with pytest.raises(EncoderNotFoundError, match="resnet18"):
        get_encoder_spec("timm:resnet18x")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["vit", "dinov2"])
def test_hf_generic_form_from_a_local_snapshot(tmp_path, monkeypatch, kind):
    from transformers import Dinov2Config, Dinov2Model, ViTConfig, ViTModel

    small: dict[str, Any] = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                                 patch_size=8)
    model = ViTModel(ViTConfig(intermediate_size=37, **small)) if kind == "vit" else Dinov2Model(Dinov2Config(**small))
    folder = tmp_path / "snapshot"
    model.save_pretrained(folder)
    tiles = pattern_tiles(2, 32)
    pixels = get_encoder_spec(f"hf:{folder}").preprocessing(tiles)
    reference = model.eval()(pixel_values=pixels).last_hidden_state[:, 0]

    assert get_encoder_spec(f"hf:{folder}").dim == 32
    by_folder = load_encoder("hf:tiny/model", weights=folder)
    by_map = load_encoder("hf:tiny/model", weights_map={"hf:tiny/model": str(folder)})
    by_file = load_encoder("hf:tiny/model", weights=folder / "model.safetensors")
    for encoder in (by_folder, by_map, by_file):
        assert encoder.spec.dim == 32 and encoder.spec.input_px == 32
        torch.testing.assert_close(encoder.encode(tiles), reference.detach(), atol=1e-5, rtol=1e-5)
    assert by_folder.fingerprint.startswith("hf:tiny/model|file:")
    # an offline site maps the name once; the spec (dim, preprocessing) then resolves without weights=
    (tmp_path / "map.yaml").write_text(f"hf:tiny/model: {folder}\n")
    monkeypatch.setenv(WEIGHTS_MAP_ENV, str(tmp_path / "map.yaml"))
    assert get_encoder_spec("hf:tiny/model").dim == 32
    assert weights_available_offline(get_encoder_spec(f"hf:{folder}"), {})
    assert load_encoder("hf:tiny/model", pretrained=False).encode(tiles).shape == (2, 32)
    torch.testing.assert_close(load_encoder("hf:tiny/model").encode(tiles), reference.detach(), atol=1e-5, rtol=1e-5)


# -- local weights, weights maps, errors ----------------------------------------------------------

def test_unknown_name_lists_close_matches():
    with pytest.raises(EncoderNotFoundError) as info:
        get_encoder_spec("uni_v3")
    assert set(info.value.close_matches[:2]) == {"uni_v1", "uni_v2"}
    message = str(info.value)
    assert message.index("uni_v1") < message.index("Known:") and "hf:<repo" in message
    with pytest.raises(EncoderNotFoundError, match="virchow2"):
        load_encoder("virchow")


@pytest.mark.parametrize("name", ["uni_v1", "conch_v1", "virchow2", "phikon"])
def test_offline_without_weights_says_how_to_get_them(name):
    spec = get_encoder_spec(name)
    with pytest.raises(WeightsUnavailableError) as info:
        load_encoder(name)
    message = str(info.value)
    assert f"https://huggingface.co/{spec.hub_id}" in message
    assert "huggingface-cli login" in message and WEIGHTS_MAP_ENV in message and "weights=" in message
    assert "Cause:" in message


def test_weights_map_errors_name_the_file_and_the_entry(tmp_path, monkeypatch):
    bad_path = tmp_path / "map.yaml"
    bad_path.write_text(yaml.safe_dump({"random-vit-tiny": str(tmp_path), "uni_v1": "/nonexistent/uni.bin"}))
    with pytest.raises(WeightsMapError) as info:
        load_weights_map(bad_path)
    message = str(info.value)
    assert str(bad_path) in message and "'uni_v1'" in message and "/nonexistent/uni.bin" in message

    monkeypatch.setenv(WEIGHTS_MAP_ENV, str(bad_path))  # the same through the environment
    with pytest.raises(WeightsMapError, match="uni_v1"):
        load_encoder("uni_v1")

    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("uni_v9: weights.bin\n")
    with pytest.raises(WeightsMapError, match=r"entry 'uni_v9'.*Closest: uni_v[12], uni_v[12]"):
        load_weights_map(unknown)
    not_a_map = tmp_path / "list.yaml"
    not_a_map.write_text("- uni_v1\n")
    with pytest.raises(WeightsMapError, match="expected a mapping"):
        load_weights_map(not_a_map)
    with pytest.raises(WeightsMapError, match="file not found"):
        load_weights_map(tmp_path / "missing.yaml")
    monkeypatch.delenv(WEIGHTS_MAP_ENV)
    assert load_weights_map() == {}  # no map configured: nothing mapped


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_local_weights_file_through_the_weights_map(tmp_path, monkeypatch, fmt):
    original = load_encoder("resnet50", pretrained=False, seed=3)
    state = {k: v.contiguous() for k, v in original.model.state_dict().items()}
    file = tmp_path / "weights" / f"r50.{fmt}"
    file.parent.mkdir()
    if fmt == "safetensors":
        save_file(state, file)
    else:
        torch.save({"state_dict": {k.removeprefix("backbone."): v for k, v in state.items()}}, file)
    (tmp_path / "map.yaml").write_text(f"resnet50: weights/r50.{fmt}\n")  # relative to the YAML file
    monkeypatch.setenv(WEIGHTS_MAP_ENV, str(tmp_path / "map.yaml"))

    assert load_weights_map() == {"resnet50": str(file.resolve())}
    loaded = load_encoder("resnet50")
    reloaded = loaded.model.state_dict()
    assert reloaded.keys() == state.keys()
    assert all(torch.equal(reloaded[k], state[k]) for k in state)
    tiles = pattern_tiles(2, 256)
    assert torch.equal(loaded.encode(tiles), original.encode(tiles))
    assert loaded.encode(tiles[:0]).shape == (0, 1024)
    assert loaded.fingerprint.startswith(f"resnet50|file:{file.resolve()}|")


@pytest.mark.slow
def test_official_checkpoint_layouts_load(tmp_path):
    """A CONCH v1 CoCa checkpoint (`visual.*` plus text towers) and a full ResNet-50 (layer4, fc) load."""
    conch = load_encoder("conch_v1", pretrained=False, seed=5)
    tower = {f"visual.{k.removeprefix('backbone.')}": v for k, v in conch.model.state_dict().items()}
    tower.update({"visual.proj_contrast": torch.zeros(512, 512), "visual.ln_caption.weight": torch.ones(768),
                  "text.token_embedding.weight": torch.zeros(8, 768), "logit_scale": torch.zeros(())})
    torch.save(tower, tmp_path / "pytorch_model.bin")
    loaded = load_encoder("conch_v1", weights=tmp_path)  # a snapshot folder
    tiles = pattern_tiles(1, 448)
    assert torch.equal(loaded.encode(tiles), conch.encode(tiles))

    import timm

    full = timm.create_model("resnet50", pretrained=False).state_dict()
    save_file(full, tmp_path / "resnet50.safetensors")
    r50 = load_encoder("resnet50", weights=tmp_path / "resnet50.safetensors")
    torch.testing.assert_close(r50.model.state_dict()["backbone.layer3.5.conv3.weight"], full["layer3.5.conv3.weight"])


def test_mismatched_or_contradictory_weights_are_errors(tmp_path):
    small = load_encoder("random-cnn-tiny")
    save_file({k: v.contiguous() for k, v in small.model.state_dict().items()}, tmp_path / "cnn.safetensors")
    with pytest.raises(WeightsMismatchError, match="missing keys"):
        load_encoder("resnet50", weights=tmp_path / "cnn.safetensors")
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsMismatchError, match="weights-only"):
        load_encoder("resnet50", weights=tmp_path / "junk.bin")
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        load_encoder("resnet50", weights=tmp_path / "nope.safetensors")
    with pytest.raises(EncoderError, match="pretrained=False"):
        load_encoder("resnet50", weights=tmp_path / "cnn.safetensors", pretrained=False)


def test_conch_v15_position_embedding_is_resampled_dino_style():
    pe = torch.randn(1, 1 + 14 * 14, 8)
    out = dino_resample_pos_embed(pe, 28)
    assert out.shape == (1, 1 + 28 * 28, 8) and torch.equal(out[:, 0], pe[:, 0])
    assert dino_resample_pos_embed(pe, 14) is pe
    flat = torch.full((1, 1 + 14 * 14, 8), 0.25)
    torch.testing.assert_close(dino_resample_pos_embed(flat, 28), torch.full((1, 1 + 28 * 28, 8), 0.25))


def test_weights_available_offline(tmp_path):
    assert weights_available_offline(get_encoder_spec("random-vit-tiny"), {})
    uni = get_encoder_spec("uni_v1")
    assert not weights_available_offline(uni, {})
    file = tmp_path / "uni.bin"
    file.write_bytes(b"x")
    assert weights_available_offline(uni, {"uni_v1": str(file)})
    assert not weights_available_offline(uni, {"uni_v1": str(tmp_path / "gone.bin")})
    # a file in the hub cache layout (HF_HOME/hub) counts, found without any network access
    snapshot = tmp_path / "hf_home" / "hub" / "models--MahmoodLab--UNI" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "pytorch_model.bin").write_bytes(b"x")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    assert weights_available_offline(uni, {})

    rows = encoders_table({})
    assert [r["name"] for r in rows] == list(DOCUMENTED)
    assert set(rows[0]) == {"name", "dim", "tile_px", "magnification", "source", "precision", "offline"}
    offline = {r["name"]: r["offline"] for r in rows}
    assert offline["random-vit-tiny"] and offline["uni_v1"] and not offline["uni_v2"]


@pytest.mark.slow
def test_import_is_light():
    """No timm / transformers / hub import (nor any network or CUDA probe) when the package is imported."""
    code = ("import sys, pathchat.features.encoders; "
            "assert not {'timm', 'transformers', 'huggingface_hub'} & set(sys.modules), sys.modules.keys()")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
