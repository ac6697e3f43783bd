"""Tile reading: pixels, strips, workers, and corrupt tiles."""

from __future__ import annotations

import functools

import cv2
import numpy as np
import openslide
import pytest
from shared_data import CMU, ZEROED

from pathchat.wsi.grid import TilingParams, build_grid
from pathchat.wsi.reader import TileDataset, collate_tiles, iter_tiles, tile_loader
from pathchat.wsi.slide import open_slide, rgba_to_rgb_on_white
from pathchat.wsi.synthetic import SyntheticSlideSpec, TissueRegion, write_synthetic_slide


def _full_grid(path, **params):
    with open_slide(path) as s:
        return build_grid(s, s.mpp, None, TilingParams(min_tissue=0, **params))


@pytest.mark.parametrize("direct_decode", [True, False])
@pytest.mark.parametrize("edge_pixels", ["black", "white"])
def test_tiles_are_pixel_identical_to_openslide_read_region(edge_pixels, direct_decode):
    """Both decoding paths give OpenSlide's pixels in both edge modes: black = the alpha dropped, as
    TRIDENT and CLAM (`read_region(...).convert("RGB")`), white = composited on white."""
    grid = _full_grid(CMU)
    # direct JPEG decoding: CMU's 240-px source tiles straddle the grid; the last row and column stick out
    ds = TileDataset.from_grid(CMU, grid, edge_pixels=edge_pixels,
                               opener=functools.partial(open_slide, direct_decode=direct_decode))
    assert len(ds) == 9 * 12
    osr = openslide.OpenSlide(str(CMU))
    outside = 0
    for i in range(len(ds)):
        item = ds[i]
        x, y = (int(v) for v in item["l0_coords"])
        region = osr.read_region((x, y), 0, (256, 256))
        expected = (np.asarray(region.convert("RGB")) if edge_pixels == "black"
                    else rgba_to_rgb_on_white(np.asarray(region)))
        np.testing.assert_array_equal(item["tile"], expected)
        outside += int((np.asarray(region)[..., 3] == 0).sum())
    # 108 tiles of 256 px cover 2304 x 3072 px of a 2220 x 2967 slide
    assert outside == 2304 * 3072 - 2220 * 2967


def test_tiles_read_from_a_finer_level_are_resized(tmp_path):
    spec = SyntheticSlideSpec(2048, 2048, mpp=0.25, regions=(TissueRegion("tumor", 0, 0, 512, 512),),
                              downsamples=(1, 4))
    path = write_synthetic_slide(tmp_path / "s40.svs", spec)
    grid = _full_grid(path, magnification=20)
    assert (grid.read_level, grid.read_px) == (0, 512)
    ds = TileDataset.from_grid(path, grid)
    item = ds[5]
    x, y = item["l0_coords"]
    with open_slide(path) as s:
        expected = cv2.resize(s.read_region((x, y), 0, (512, 512)), (256, 256), interpolation=cv2.INTER_AREA)
    assert item["tile"].shape == (256, 256, 3)
    np.testing.assert_array_equal(item["tile"], expected)


def test_corrupt_tiles_are_reported_with_coordinates_and_skipped():
    grid = _full_grid(ZEROED)
    failures = []
    tiles = list(iter_tiles(TileDataset.from_grid(ZEROED, grid), batch_size=16, failures=failures))
    assert len(tiles) + len(failures) == len(grid) == 108
    # bytes 600000-699999 hold source tiles of rows y = 1536..2303: measured 20 unreadable 256-px tiles
    assert len(failures) == 20
    assert {f.l0_y for f in failures} == {1536, 1792, 2048}
    assert all("JPEG" in f.error and f"l0 ({f.l0_x}, {f.l0_y})" in f.error for f in failures)
    # every good tile is pixel-identical to the intact slide: nothing was poisoned by the errors
    with open_slide(CMU) as intact:
        for tile, (x, y) in tiles[::7]:
            np.testing.assert_array_equal(tile, intact.read_region((int(x), int(y)), 0, (256, 256), "black"))


def test_two_worker_processes_give_the_same_tiles_in_order():
    grid = _full_grid(CMU)
    ds = TileDataset.from_grid(CMU, grid)
    a = list(tile_loader(ds, batch_size=8, workers=0))
    b = list(tile_loader(ds, batch_size=8, workers=2))
    assert len(a) == len(b) == 14
    for x, y in zip(a, b, strict=True):
        assert torch_equal(x.tiles, y.tiles) and torch_equal(x.l0_coords, y.l0_coords)


def torch_equal(a, b) -> bool:
    return bool((a == b).all()) and a.shape == b.shape


def test_collate_keeps_good_tiles_and_lists_failures():
    good = {"tile": np.ones((4, 4, 3), np.uint8), "l0_coords": np.array([0, 0]), "index": 0, "error": None}
    bad = {"tile": np.zeros((4, 4, 3), np.uint8), "l0_coords": np.array([4, 0]), "index": 1, "error": "boom"}
    batch = collate_tiles([good, bad])
    assert batch.tiles.shape == (1, 4, 4, 3) and batch.indices.tolist() == [0]
    assert [f.to_dict() for f in batch.failed] == [{"index": 1, "l0_x": 4, "l0_y": 0, "error": "boom"}]
    empty = collate_tiles([bad])
    assert empty.tiles.shape == (0, 4, 4, 3)


@pytest.mark.parametrize("workers", [0, 2])
def test_dataset_pickles_without_an_open_handle(workers):
    import pickle

    ds = TileDataset.from_grid(CMU, _full_grid(CMU))
    _ = ds[0]
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._slide is None
    np.testing.assert_array_equal(clone[3]["tile"], ds[3]["tile"])
