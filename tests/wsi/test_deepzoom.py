"""Deep-zoom tiles for the viewer: same pixels as OpenSlide's generator, typed errors outside the pyramid."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared_data import CMU, SLIDES  # noqa: E402

from pathchat.wsi.deepzoom import DeepZoomCache, DeepZoomError, DeepZoomSlide  # noqa: E402
from pathchat.wsi.errors import SlideError  # noqa: E402


def test_geometry_and_dzi_of_a_real_slide():
    dz = DeepZoomSlide(CMU)
    info = dz.info
    assert (info.width, info.height, info.l0_offset, info.mpp) == (2220, 2967, (0, 0), 0.499)
    assert info.level_count == 13  # ceil(log2(2967)) + 1
    xml = dz.dzi_xml()
    assert 'Format="jpeg"' in xml and 'Width="2220"' in xml and 'TileSize="254"' in xml


def test_tiles_match_openslides_generator():
    from openslide import OpenSlide
    from openslide.deepzoom import DeepZoomGenerator

    ref = DeepZoomGenerator(OpenSlide(str(CMU)), tile_size=254, overlap=1, limit_bounds=True)
    dz = DeepZoomSlide(CMU, jpeg_quality=90)
    for level, col, row in [(12, 0, 0), (12, 4, 5), (12, 8, 11), (10, 1, 2), (0, 0, 0)]:
        buf = io.BytesIO()
        ref.get_tile(level, (col, row)).convert("RGB").save(buf, "JPEG", quality=90)
        assert dz.tile_jpeg(level, col, row) == buf.getvalue()  # the same pixels, encoded the same way


@pytest.mark.parametrize("level,col,row", [(-1, 0, 0), (13, 0, 0), (12, 9, 0), (12, 0, 12), (12, -1, 0),
                                           (0, 1, 0), (12, 10**12, 0)])
def test_tiles_outside_the_pyramid_raise_deepzoom_error(level, col, row):
    with pytest.raises(DeepZoomError, match=r"CMU-1-Small-Region\.svs: no (deep-zoom level|tile)"):
        DeepZoomSlide(CMU).tile_jpeg(level, col, row)


def test_unreadable_files_raise_slide_errors():
    for bad in ("broken.svs", "unopenable.tiff", "CMU-1-Small-Region.truncated-1000000.svs"):
        with pytest.raises(SlideError, match=bad.replace(".", r"\.")):
            DeepZoomSlide(SLIDES / "bad" / bad)


def test_corrupt_tile_data_is_a_deepzoom_error_not_a_crash():
    dz = DeepZoomSlide(SLIDES / "bad" / "unreadable.svs")
    with pytest.raises(DeepZoomError, match="cannot read tile"):
        dz.tile_jpeg(dz.info.level_count - 1, 0, 0)


def test_plain_images_and_dicom_open(tmp_path):
    png = tmp_path / "photo.png"
    Image.fromarray(np.full((300, 500, 3), 200, np.uint8)).save(png)
    dz = DeepZoomSlide(png)
    assert (dz.info.width, dz.info.height, dz.info.mpp) == (500, 300, None)
    # column 1 starts at 254 - 1 (overlap) = 253 and runs to the edge: 500 - 253 x 300 - 253
    assert Image.open(io.BytesIO(dz.tile_jpeg(dz.info.level_count - 1, 1, 1))).size == (247, 47)
    dicom = DeepZoomSlide(SLIDES / "dicom" / "boxes")
    assert (dicom.info.width, dicom.info.height) == (16, 16)


def test_cache_keeps_a_few_open_slides():
    cache = DeepZoomCache(capacity=2)
    a = cache.get("a", CMU)
    assert cache.get("a", CMU) is a
    cache.get("b", SLIDES / "aperio" / "small.svs")
    cache.get("c", SLIDES / "generic-tiff" / "boxes.tiff")
    assert cache.get("a", CMU) is not a  # evicted, reopened
