"""Tests for pathchat.wsi.synthetic: files OpenSlide opens, with exactly known tissue ground truth."""

from __future__ import annotations

import itertools
import math

import cv2
import numpy as np
import openslide
import pytest

from pathchat.wsi.synthetic import (
    BACKGROUND_RGB,
    TISSUE_CLASSES,
    SyntheticSlideSpec,
    TissueRegion,
    class_map,
    random_slide_spec,
    render_region,
    tissue_area_um2,
    write_synthetic_slide,
)

MARKER = "SECRET-PATIENT-4711"
# One 200 x 200 um region per class along a row (rect/ellipse alternating), 40 um apart.
ROW_REGIONS = tuple(
    TissueRegion(c, 20 + 240 * i, 50, 200, 200, "rect" if i % 2 == 0 else "ellipse")
    for i, c in enumerate(TISSUE_CLASSES)
)
ROW_SPEC = SyntheticSlideSpec(3584, 1024, mpp=0.5, regions=ROW_REGIONS, private_marker=MARKER)


def _rgb(slide: openslide.OpenSlide, x: int, y: int, w: int, h: int, level: int = 0) -> np.ndarray:
    return np.asarray(slide.read_region((x, y), level, (w, h)).convert("RGB"))


def _centre_px(region: TissueRegion, mpp: float = 0.5) -> tuple[int, int]:
    return int((region.x_um + region.width_um / 2) / mpp), int((region.y_um + region.height_um / 2) / mpp)


@pytest.fixture(scope="module")
def aperio_path(tmp_path_factory):
    return write_synthetic_slide(tmp_path_factory.mktemp("aperio") / "row.svs", ROW_SPEC)


@pytest.fixture(scope="module")
def aperio(aperio_path):
    with openslide.OpenSlide(aperio_path) as slide:
        yield slide


@pytest.mark.slow
def test_aperio_layout(aperio):
    assert aperio.properties["openslide.vendor"] == "aperio"
    assert aperio.level_count == 3
    assert aperio.level_dimensions == ((3584, 1024), (896, 256), (224, 64))
    assert aperio.level_downsamples == pytest.approx((1.0, 4.0, 16.0), abs=1e-3)
    assert float(aperio.properties["openslide.mpp-x"]) == 0.5
    assert float(aperio.properties["openslide.mpp-y"]) == 0.5
    assert float(aperio.properties["openslide.objective-power"]) == 20  # round(10 / 0.5)
    assert {"label", "macro", "thumbnail"} <= set(aperio.associated_images)
    assert aperio.associated_images["label"].size == (400, 320)
    assert max(aperio.associated_images["thumbnail"].size) == 1024


def test_generic_tiff_layout(tmp_path):
    spec = SyntheticSlideSpec(
        1024, 768, mpp=0.25, regions=ROW_REGIONS[:2], vendor="generic-tiff", downsamples=(1, 2, 8)
    )
    with openslide.OpenSlide(write_synthetic_slide(tmp_path / "g.tiff", spec)) as slide:
        assert slide.properties["openslide.vendor"] == "generic-tiff"
        assert slide.level_dimensions == ((1024, 768), (512, 384), (128, 96))
        assert slide.level_downsamples == pytest.approx((1.0, 2.0, 8.0), abs=1e-3)
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.25, rel=1e-6)
        assert float(slide.properties["openslide.mpp-y"]) == pytest.approx(0.25, rel=1e-6)
        assert "openslide.objective-power" not in slide.properties
        assert dict(slide.associated_images) == {}


@pytest.mark.parametrize("vendor", ["aperio", "generic-tiff"])
def test_write_mpp_false_reports_no_resolution(tmp_path, vendor):
    spec = SyntheticSlideSpec(512, 512, regions=ROW_REGIONS[:1], vendor=vendor, write_mpp=False)
    with openslide.OpenSlide(write_synthetic_slide(tmp_path / "nompp.tif", spec)) as slide:
        assert slide.properties["openslide.vendor"] == vendor
        assert "openslide.mpp-x" not in slide.properties
        assert "openslide.mpp-y" not in slide.properties
        assert "openslide.objective-power" not in slide.properties


@pytest.mark.parametrize(("mpp", "power", "expected"), [(0.25, None, 40), (0.5, 25, 25), (1.0, None, 10)])
def test_objective_power(tmp_path, mpp, power, expected):
    spec = SyntheticSlideSpec(256, 256, mpp=mpp, objective_power=power, downsamples=(1,))
    with openslide.OpenSlide(write_synthetic_slide(tmp_path / "p.svs", spec)) as slide:
        assert float(slide.properties["openslide.objective-power"]) == expected
        assert float(slide.properties["openslide.mpp-x"]) == mpp


def test_level_sizes_round_up_and_tiny_levels_dropped(tmp_path):
    spec = SyntheticSlideSpec(1000, 700, downsamples=(1, 4, 16, 1024), vendor="generic-tiff")
    assert spec.levels() == [(1, 1000, 700), (4, 250, 175), (16, 63, 44)]  # 1024 > 700 px: dropped
    with openslide.OpenSlide(write_synthetic_slide(tmp_path / "odd.tiff", spec)) as slide:
        assert slide.level_dimensions == ((1000, 700), (250, 175), (63, 44))


def test_determinism_and_seed(tmp_path):
    spec = SyntheticSlideSpec(768, 512, regions=(TissueRegion("tumor", 10, 10, 300, 200),), seed=3)
    a = write_synthetic_slide(tmp_path / "a.svs", spec)
    b = write_synthetic_slide(tmp_path / "b.svs", spec)
    c = write_synthetic_slide(tmp_path / "c.svs", SyntheticSlideSpec(**{**spec.__dict__, "seed": 4}))
    assert a.read_bytes() == b.read_bytes()
    with openslide.OpenSlide(a) as sa, openslide.OpenSlide(c) as sc:
        diff = np.abs(_rgb(sa, 0, 0, 600, 400).astype(int) - _rgb(sc, 0, 0, 600, 400)).mean()
    assert diff > 10  # different nuclei layout (measured ~40)


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "s.svs"
    target.write_bytes(b"old")
    assert write_synthetic_slide(str(target), SyntheticSlideSpec(256, 256, downsamples=(1,))) == target
    assert target.read_bytes()[:4] in (b"II*\x00", b"II+\x00")
    assert [p.name for p in tmp_path.iterdir()] == ["s.svs"]


def test_pixels_match_render_region_after_jpeg(aperio):
    for region in ROW_REGIONS:
        cx, cy = _centre_px(region)
        x, y = cx - 64, cy - 64
        read = _rgb(aperio, x, y, 128, 128).astype(np.int16)
        exact = render_region(ROW_SPEC, x, y, 128, 128).astype(np.int16)
        # measured MAD at q90 with 4:2:0 YCbCr: 0.4 (faint) .. 4.3 (lymphocytes)
        assert np.abs(read - exact).mean() < 6, region.tissue_class
    # level 1 (downsample 4) is rendered at its own resolution and matches too
    cx, cy = _centre_px(ROW_REGIONS[0])
    read = _rgb(aperio, cx - 128, cy - 128, 64, 64, level=1).astype(np.int16)
    exact = render_region(ROW_SPEC, cx - 128, cy - 128, 64, 64, downsample=4).astype(np.int16)
    assert np.abs(read - exact).mean() < 6


def test_background_is_unsaturated_glass(aperio):
    glass = _rgb(aperio, 0, 600, 3584, 400)  # below all regions (they end at y = 250 um = 500 px)
    sat = cv2.cvtColor(glass, cv2.COLOR_RGB2HSV)[..., 1]
    assert sat.max() < 8  # measured max 2
    assert np.abs(glass.reshape(-1, 3).mean(0) - BACKGROUND_RGB).max() < 2


def test_classes_differ_in_colour_and_faint_is_faint(aperio):
    means, sats = {}, {}
    for region in ROW_REGIONS:
        cx, cy = _centre_px(region)
        rgb = _rgb(aperio, cx - 100, cy - 100, 200, 200)
        means[region.tissue_class] = rgb.reshape(-1, 3).mean(0)
        sats[region.tissue_class] = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1].mean()
    # Measured mean RGB (render, seed 0): tumor (198,139,182), stroma (237,156,185),
    # lymphocytes (166,151,205), fat (251,246,248), necrosis (215,185,196), mucin (198,207,224),
    # faint (240,216,229); closest pairs fat/faint 37, stroma/necrosis 38, necrosis/mucin 40.
    for a, b in itertools.combinations(TISSUE_CLASSES, 2):
        assert np.linalg.norm(means[a] - means[b]) > 25, (a, b)
    assert 20 <= sats["faint"] <= 35  # measured ~26; background < 8
    # nuclei-rich classes are textured, faint is smooth (grey std measured 53 / 59 vs 4)
    grey = {
        c: cv2.cvtColor(render_region(ROW_SPEC, *_centre_px(r), 128, 128), cv2.COLOR_RGB2GRAY).std()
        for c, r in zip(TISSUE_CLASSES, ROW_REGIONS, strict=True)
    }
    assert grey["tumor"] > 30 and grey["lymphocytes"] > 30 and grey["faint"] < 8


def test_render_is_position_deterministic_across_tiles():
    whole = render_region(ROW_SPEC, 100, 100, 512, 256)
    left = render_region(ROW_SPEC, 100, 100, 256, 256)
    right = render_region(ROW_SPEC, 356, 100, 256, 256)
    np.testing.assert_array_equal(whole, np.concatenate([left, right], axis=1))
    # level-16 pixels approximate area-averaged level-0 pixels
    l0 = render_region(ROW_SPEC, 0, 0, 1024, 512).astype(np.float32)
    l16 = render_region(ROW_SPEC, 0, 0, 64, 32, downsample=16).astype(np.float32)
    assert np.abs(cv2.resize(l0, (64, 32), interpolation=cv2.INTER_AREA) - l16).mean() < 8


def test_class_map_geometry():
    spec = SyntheticSlideSpec(
        1000,
        1000,
        mpp=0.5,
        regions=(
            TissueRegion("stroma", 0, 0, 100, 100),  # rect: px 0..199
            TissueRegion("tumor", 200, 200, 100, 50, "ellipse"),  # box px x 400..599, y 400..499
        ),
    )
    cm = class_map(spec, 0, 0, 1000, 1000)
    assert cm.dtype == np.int16 and cm.shape == (1000, 1000)
    stroma, tumor = TISSUE_CLASSES.index("stroma"), TISSUE_CLASSES.index("tumor")
    assert cm[0, 0] == cm[199, 199] == stroma and cm[200, 199] == cm[199, 200] == -1
    assert cm[450, 500] == tumor  # ellipse centre
    assert cm[400, 400] == cm[499, 599] == -1  # box corners are background
    assert cm[450, 400] == cm[400, 500] == tumor  # ellipse touches the box mid-edges
    # downsampled map samples pixel centres: pixel j covers l0 x = (j + 0.5) * 8
    cm8 = class_map(spec, 0, 0, 125, 125, downsample=8)
    assert cm8[24, 24] == stroma and cm8[25, 25] == -1  # 196 px inside, 204 px outside
    np.testing.assert_array_equal(class_map(spec, 400, 400, 200, 100), cm[400:500, 400:600])


def test_later_regions_paint_over_and_areas():
    rect = TissueRegion("stroma", 100, 100, 300, 200)
    ell = TissueRegion("tumor", 500, 100, 400, 250, "ellipse")
    spec = SyntheticSlideSpec(2000, 1000, regions=(rect, ell))
    area = tissue_area_um2(spec)
    assert area["stroma"] == pytest.approx(300 * 200, rel=0.01)
    assert area["tumor"] == pytest.approx(math.pi / 4 * 400 * 250, rel=0.02)
    assert area["fat"] == 0.0 and set(area) == set(TISSUE_CLASSES)

    cover = TissueRegion("lymphocytes", 250, 100, 150, 200)  # covers the right half of the rect
    over = tissue_area_um2(SyntheticSlideSpec(2000, 1000, regions=(rect, cover)))
    assert over["stroma"] == pytest.approx(150 * 200, rel=0.01)
    assert over["lymphocytes"] == pytest.approx(150 * 200, rel=0.01)
    clipped = tissue_area_um2(
        SyntheticSlideSpec(400, 400, regions=(TissueRegion("fat", 150, 150, 100, 100),))
    )
    assert clipped["fat"] == pytest.approx(50 * 50, rel=0.01)  # slide is 200 x 200 um
    # agrees with counting level-0 class-map pixels (0.25 um^2 each)
    cm = class_map(spec, 0, 0, 2000, 1000)
    assert (cm == TISSUE_CLASSES.index("tumor")).sum() * 0.25 == pytest.approx(area["tumor"], rel=0.01)


def test_private_marker_planted_only_when_set(aperio_path, aperio, tmp_path):
    raw = aperio_path.read_bytes()
    assert raw.count(MARKER.encode()) >= 5  # descriptions, Software/Artist/DocumentName tags
    assert aperio.properties["aperio.Filename"] == MARKER
    clean = write_synthetic_slide(
        tmp_path / "clean.svs", SyntheticSlideSpec(**{**ROW_SPEC.__dict__, "private_marker": None})
    )
    assert MARKER.encode() not in clean.read_bytes()
    generic = SyntheticSlideSpec(256, 256, vendor="generic-tiff", private_marker=MARKER, downsamples=(1,))
    assert MARKER.encode() in write_synthetic_slide(tmp_path / "g.tiff", generic).read_bytes()


def test_random_slide_spec():
    a, b = random_slide_spec(5), random_slide_spec(5)
    assert a == b and a.seed == 5 and (a.width_px, a.height_px) == (4096, 4096)
    assert random_slide_spec(6) != a
    for seed in range(20):
        spec = random_slide_spec(seed, 2048, 1024, n_regions=(2, 3), classes=("tumor", "fat"), tile_px=128)
        assert 2 <= len(spec.regions) <= 3 and spec.seed == seed and spec.tile_px == 128
        for r in spec.regions:
            assert r.tissue_class in ("tumor", "fat")
            assert r.x_um >= 0 and r.x_um + r.width_um <= 1024 + 0.1 and r.y_um + r.height_um <= 512 + 0.1
        for r, s in itertools.combinations(spec.regions, 2):  # boxes do not overlap
            assert (
                r.x_um + r.width_um <= s.x_um
                or s.x_um + s.width_um <= r.x_um
                or r.y_um + r.height_um <= s.y_um
                or s.y_um + s.height_um <= r.y_um
            )
        areas = tissue_area_um2(spec)
        expected = sum(
            r.width_um * r.height_um * (math.pi / 4 if r.shape == "ellipse" else 1) for r in spec.regions
        )
        assert sum(areas.values()) == pytest.approx(expected, rel=0.02)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(downsamples=(2, 4)),
        dict(downsamples=(1, 4, 2)),
        dict(vendor="hamamatsu"),
        dict(tile_px=100),
        dict(jpeg_quality=0),
        dict(mpp=0.0),
    ],
)
def test_spec_validation(kwargs):
    with pytest.raises(ValueError):
        SyntheticSlideSpec(256, 256, **kwargs)
    with pytest.raises(ValueError):
        TissueRegion("bone", 0, 0, 1, 1)
