"""Tile grids on generated slides whose tissue geometry is known exactly."""

from __future__ import annotations

import numpy as np
import pytest
from shared_data import blob_image

from pathchat.wsi.errors import ResolutionTooLowError
from pathchat.wsi.grid import TilingParams, build_grid
from pathchat.wsi.slide import InMemorySlide, open_slide
from pathchat.wsi.synthetic import SyntheticSlideSpec, TissueRegion, write_synthetic_slide
from pathchat.wsi.tissue import detect_tissue

# 1024 x 1024 µm of glass with two rectangles aligned to a 128 µm grid (one 20x tile of 256 px):
# tumour 512 x 256 µm (4 x 2 tiles at 20x, 8 x 4 at 40x) and stroma 256 x 256 µm (2 x 2, 4 x 4).
REGIONS = (
    TissueRegion("tumor", 128, 128, 512, 256),
    TissueRegion("stroma", 640, 640, 256, 256),
)
EXPECTED = {20: 8 + 4, 40: 32 + 16}


def _synthetic(tmp_path, name, mpp, downsamples, **kw):
    size = round(1024 / mpp)
    spec = SyntheticSlideSpec(size, size, mpp=mpp, regions=REGIONS, downsamples=downsamples, **kw)
    return write_synthetic_slide(tmp_path / f"{name}.svs", spec)


def _tile(path, **params):
    with open_slide(path) as s:
        tissue, _ = detect_tissue(s, s.mpp)
        return build_grid(s, s.mpp, tissue, TilingParams(**params))


@pytest.mark.parametrize(
    ("name", "mpp", "downsamples", "mag"),
    [
        ("scan40x_with20x", 0.25, (1, 2, 8), 20),
        ("scan40x_with20x", 0.25, (1, 2, 8), 40),
        ("scan40x_no20x", 0.25, (1, 4, 16), 20),
        ("scan40x_no20x", 0.25, (1, 4, 16), 40),
        ("scan20x", 0.5, (1, 4), 20),  # a 20x scan at 40x would need upsampling: see the low-resolution test
    ],
)
@pytest.mark.slow
def test_exact_tile_counts_for_known_geometry(tmp_path, name, mpp, downsamples, mag):
    grid = _tile(_synthetic(tmp_path, name, mpp, downsamples), magnification=mag)
    assert len(grid) == EXPECTED[mag]
    tile_um = 256 * 10 / mag
    l0_um = grid.l0_coords * mpp
    # every tile lies inside one of the two rectangles
    inside = [any(r.x_um <= x and x + tile_um <= r.x_um + r.width_um + 1e-6 and
                  r.y_um <= y and y + tile_um <= r.y_um + r.height_um + 1e-6 for r in REGIONS) for x, y in l0_um]
    assert all(inside)
    assert grid.tissue_fraction.min() > 0.9


@pytest.mark.slow
def test_40x_slide_with_and_without_a_20x_level_gives_the_same_grid(tmp_path):
    with_20x = _tile(_synthetic(tmp_path, "a", 0.25, (1, 2, 8)), magnification=20)
    without = _tile(_synthetic(tmp_path, "b", 0.25, (1, 4, 16)), magnification=20)
    np.testing.assert_array_equal(with_20x.l0_coords, without.l0_coords)
    assert (with_20x.read_level, with_20x.read_px) == (1, 256)  # read the 20x level as is
    assert (without.read_level, without.read_px) == (0, 512)  # read 40x and downsample by 2
    assert with_20x.l0_tile_px == without.l0_tile_px == 512
    assert with_20x.mpp == without.mpp == 0.5


@pytest.mark.slow
def test_the_same_tissue_gives_the_same_physical_grid_at_20x_and_40x_scans(tmp_path):
    g40 = _tile(_synthetic(tmp_path, "s40", 0.25, (1, 4)), magnification=20)
    g20 = _tile(_synthetic(tmp_path, "s20", 0.5, (1, 4)), magnification=20)
    np.testing.assert_array_equal(g40.l0_coords * 0.25, g20.l0_coords * 0.5)


def test_slide_smaller_than_one_tile_gives_one_padded_tile(tmp_path):
    spec = SyntheticSlideSpec(200, 150, mpp=0.5, regions=(TissueRegion("tumor", 0, 0, 100, 75),), downsamples=(1,))
    grid = _tile(write_synthetic_slide(tmp_path / "tiny.svs", spec))
    assert len(grid) == 1 and grid.l0_coords.tolist() == [[0, 0]] and grid.grid_shape == (1, 1)


def test_overlap_and_min_tissue_zero_cover_the_whole_slide():
    s = InMemorySlide(blob_image(1000, 600, []), mpp=0.5)
    grid = build_grid(s, 0.5, None, TilingParams(tile_px=256, overlap_px=56, min_tissue=0))
    assert grid.l0_step_px == 200
    assert grid.grid_shape == (5, 3)  # x: 0..800 (last tile 800..1056 pads 56 px); y: 0, 200, 400
    assert len(grid) == 15


def test_snap_tolerance_reads_0499_as_20x_without_resizing():
    s = InMemorySlide(blob_image(600, 600, []), mpp=0.499)
    grid = build_grid(s, 0.499, None, TilingParams(min_tissue=0))
    assert (grid.read_level, grid.read_px, grid.l0_tile_px, grid.mpp) == (0, 256, 256, 0.499)


def test_low_resolution_slides_tile_natively_or_fail_on_request():
    s = InMemorySlide(blob_image(600, 400, []), mpp=16.0)
    with pytest.warns(UserWarning, match="tiling at the native 16 µm/px"):
        grid = build_grid(s, 16.0, None, TilingParams(min_tissue=0))
    assert grid.mpp == 16.0 and grid.grid_shape == (3, 2)
    with pytest.raises(ResolutionTooLowError, match=r"coarser than the requested 0.5 µm/px \(32x upsampling\)"):
        build_grid(s, 16.0, None, TilingParams(low_resolution="error"))


def test_params_are_validated_with_the_flag_name():
    with pytest.raises(ValueError, match="--mag or --mpp, not both"):
        TilingParams(magnification=20, mpp=0.5)
    with pytest.raises(ValueError, match="--overlap"):
        TilingParams(overlap_px=256)
    with pytest.raises(ValueError, match="--min-tissue"):
        TilingParams(min_tissue=1.5)
    assert TilingParams().folder_name == "20x_256px_0px_overlap"
    assert TilingParams(mpp=0.8, tile_px=224, overlap_px=16).folder_name == "12.5x_224px_16px_overlap"
