"""Tissue detection on real slides and on images whose tissue geometry is known."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from shared_data import CMU, TCGA, blob_image

from pathchat.wsi.slide import InMemorySlide, open_slide
from pathchat.wsi.tissue import TissueParams, detect_tissue, segment_tissue

PINK = (205, 120, 175)
PURPLE = (120, 60, 140)
FAINT = (236, 219, 229)  # HSV saturation 18/255: barely-stained tissue (glass is below 8)


def test_cmu_mask_covers_the_real_tissue_and_not_the_glass():
    with open_slide(CMU) as s:
        mask, _ = detect_tissue(s, 0.499)
        full = s.read_region((0, 0), 0, s.dimensions)
    hsv = cv2.cvtColor(full, cv2.COLOR_RGB2HSV)
    l0_mask = cv2.resize(mask.mask.astype(np.uint8), s.dimensions, interpolation=cv2.INTER_NEAREST).astype(bool)
    # Clearly stained pixels (saturation > 60, not white): measured 99.81% inside the mask; the rest are
    # floating specks smaller than the 0.02 mm² minimum area, removed on purpose.
    stained = (hsv[..., 1] > 60) & (hsv[..., 2] < 220)
    assert (stained & l0_mask).sum() / stained.sum() > 0.99
    # Glass (no pixel within 15 px with saturation >= 15): measured 1.24% inside the mask, all of it the
    # closing's 40 µm smoothing along the tissue border.
    glass = cv2.dilate(hsv[..., 1], np.ones((31, 31), np.uint8)) < 15
    assert (glass & l0_mask).sum() / glass.sum() < 0.02
    # One piece of tissue, 0.660 mm² (40.2% of the 1.1 x 1.5 mm slide).
    assert len(mask.polygons) == 1
    assert mask.tissue_area_um2 / 1e6 == pytest.approx(0.660, abs=0.03)


def test_tcga_scan_area_gaps_are_not_tissue():
    # The TCGA slide has grey scanned rectangles with white unscanned gaps between them.
    with open_slide(TCGA) as s:
        mask, thumb = detect_tissue(s, 0.5)
    hsv = cv2.cvtColor(thumb, cv2.COLOR_RGB2HSV)
    unscanned = (hsv[..., 2] >= 250) & (hsv[..., 1] < 12)
    grey_glass = (hsv[..., 2] < 250) & (hsv[..., 1] < 12)
    assert (unscanned & mask.mask).sum() / unscanned.sum() < 0.005  # measured 0.10%
    assert (grey_glass & mask.mask).sum() / grey_glass.sum() < 0.12  # measured 8.7%: pale spots inside tissue
    assert 0.59 < mask.mask.mean() < 0.69  # measured 0.639
    assert len(mask.polygons) == 1


def _layout(mpp: float):
    """Same physical layout (µm) rendered at `mpp`: strong tissue, faint tissue, a dust speck."""
    px = lambda um: int(round(um / mpp))  # noqa: E731
    boxes = [
        (px(100), px(100), px(600), px(400), PURPLE),
        (px(800), px(100), px(300), px(500), FAINT),
        (px(100), px(700), px(10), px(10), PINK),  # 100 µm²: dust
    ]
    return blob_image(px(1200), px(900), boxes)


@pytest.mark.slow
@pytest.mark.parametrize("mpp", [0.25, 0.5, 1.0])
def test_faint_tissue_survives_and_dust_goes_at_any_magnification(mpp):
    img = _layout(mpp)
    mask, _ = detect_tissue(InMemorySlide(img, mpp=mpp), mpp)
    area_mm2 = mask.tissue_area_um2 / 1e6
    # 600x400 + 300x500 µm = 0.39 mm²; the speck is below the 0.02 mm² minimum.
    assert area_mm2 == pytest.approx(0.39, rel=0.03)
    assert len(mask.polygons) == 2


def test_blank_glass_has_no_tissue():
    img = blob_image(800, 600, [])
    mask, _ = detect_tissue(InMemorySlide(img, mpp=0.5), 0.5)
    assert not mask.mask.any() and mask.polygons == []


def test_small_holes_are_filled_and_large_ones_kept():
    img = blob_image(1000, 1000, [(100, 100, 800, 800, PINK)])
    img[300:310, 300:310] = 243  # 5x5 µm hole at 0.5 µm/px: filled
    img[500:800, 500:800] = 243  # 150x150 µm = 22,500 µm² hole: above max_hole_area_um2, kept
    mask = segment_tissue(img, 1.0, 0.5, (1000, 1000), TissueParams(closing_um=0))
    assert mask.mask[305, 305]
    assert not mask.mask[650, 650]
    assert len(mask.polygons) == 1 and len(mask.polygons[0].holes) == 1


def test_geojson_is_a_closed_polygon_collection_matching_the_mask_area():
    img = blob_image(1000, 800, [(100, 100, 300, 300, PINK), (500, 400, 400, 300, PURPLE)])
    mask, _ = detect_tissue(InMemorySlide(img, mpp=0.5), 0.5)
    gj = mask.to_geojson()
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) == 2
    total = 0.0
    for feat in gj["features"]:
        assert feat["properties"]["objectType"] == "annotation"
        assert feat["properties"]["classification"]["name"] == "Tissue"
        ring = np.array(feat["geometry"]["coordinates"][0])
        assert (ring[0] == ring[-1]).all()
        assert ring[:, 0].min() >= 0 and ring[:, 0].max() <= 1000 and ring[:, 1].max() <= 800
        x, y = ring[:, 0], ring[:, 1]
        total += 0.5 * abs(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))
    assert total == pytest.approx(300 * 300 + 400 * 300, rel=0.03)


def test_tissue_fraction_of_boxes_uses_the_in_slide_area():
    img = blob_image(512, 512, [(0, 0, 256, 512, PINK)])
    mask, _ = detect_tissue(InMemorySlide(img, mpp=0.5), 0.5)
    frac = mask.tissue_fraction(np.array([[0, 0, 256, 256], [256, 0, 512, 256], [128, 0, 384, 256],
                                          [384, 384, 640, 640]]))
    np.testing.assert_allclose(frac, [1.0, 0.0, 0.5, 0.0], atol=0.03)
