"""The slide interface on every real slide in shared/data/slides, bad files, and in-memory images."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image
from shared_data import CMU, SLIDES, TCGA, ZEROED

from pathchat.wsi import slide as slide_mod
from pathchat.wsi.errors import (
    CorruptSlideError,
    MissingResolutionError,
    SlideTooLargeError,
    UnsupportedFormatError,
)
from pathchat.wsi.slide import InMemorySlide, open_slide, resolve_mpp

# (relative path, level-0 size, level count, vendor, mpp or None); from shared/data/slides/README.md.
READABLE = [
    ("aperio/CMU-1-Small-Region.svs", (2220, 2967), 1, "aperio", 0.499),
    ("aperio/small.svs", (16, 16), 1, "aperio", 0.499),
    ("aperio/tcga-cr-7395-01a-01-ts1.svs", (4443, 3567), 2, "aperio", None),
    ("generic-tiff/boxes.tiff", (300, 250), 4, "generic-tiff", 352.778),
    ("dicom/boxes/boxes_0.dcm", (16, 16), 1, "dicom", 0.499),
    ("dicom/boxes", (16, 16), 1, "dicom", 0.499),  # the series folder opens as the slide
    ("dicom/camelyon/multiframe_camelyon_challenge_image.dcm", (1152, 700), 1, "dicom", 28.969),
    ("dicom/wsi2dcm/jpeg.dicom", (957, 715), 1, "dicom", 16.783),
]


@pytest.mark.parametrize(("rel", "size", "levels", "vendor", "mpp"), READABLE)
def test_every_readable_slide_opens_with_its_metadata(rel, size, levels, vendor, mpp):
    with open_slide(SLIDES / rel) as s:
        assert s.dimensions == size
        assert s.level_count == levels
        assert s.vendor == vendor
        assert s.mpp == (pytest.approx(mpp, rel=1e-4) if mpp else None)
        region = s.read_region((0, 0), s.level_count - 1, (8, 8))
        assert region.shape == (8, 8, 3) and region.dtype == np.uint8


def test_cmu_centre_region_matches_the_documented_colour():
    # shared README: mean RGBA of the centre 256x256 region is about (140.9, 92.3, 132.6, 255).
    with open_slide(CMU) as s:
        w, h = s.dimensions
        region = s.read_region((w // 2 - 128, h // 2 - 128), 0, (256, 256))
    np.testing.assert_allclose(region.reshape(-1, 3).mean(0), [140.9, 92.3, 132.6], atol=0.6)


def test_boxes_tiff_downsamples_are_not_powers_of_two():
    with open_slide(SLIDES / "generic-tiff/boxes.tiff") as s:
        np.testing.assert_allclose(s.level_downsamples, [1.0, 2.0, 4.016, 8.086], atol=1e-3)
        assert s.best_level_for_downsample(4.0) == 1  # 4.016 is coarser than asked: never chosen
        assert s.best_level_for_downsample(5.0) == 2


def test_info_is_an_allow_list_without_labels_or_descriptions():
    with open_slide(CMU) as s:
        info = s.info.to_dict()
    assert set(info) == {"width", "height", "level_count", "level_dimensions", "level_downsamples", "mpp",
                         "objective_power", "vendor"}
    assert "Aperio" not in repr(info) and "label" not in repr(info)


def test_resolution_order_override_metadata_objective_fallback_error():
    with open_slide(CMU) as s:
        assert resolve_mpp(s) == slide_mod.Resolution(0.499, "metadata")
        assert resolve_mpp(s, override=0.25) == slide_mod.Resolution(0.25, "override")
    img = np.full((32, 32, 3), 255, np.uint8)
    with pytest.warns(UserWarning, match=r"assuming 0.25 µm/px from objective power 40x"):
        assert resolve_mpp(InMemorySlide(img, objective_power=40)).mpp == pytest.approx(0.25)
    with open_slide(TCGA) as s:
        with pytest.raises(MissingResolutionError, match="--slide-mpp") as err:
            resolve_mpp(s)
        assert str(TCGA) in str(err.value)
        assert resolve_mpp(s, fallback=0.5) == slide_mod.Resolution(0.5, "fallback")


@pytest.mark.parametrize(
    ("rel", "error"),
    [
        ("bad/broken.svs", UnsupportedFormatError),
        ("bad/CMU-1-Small-Region.truncated-1000000.svs", CorruptSlideError),
        ("bad/unopenable.tiff", UnsupportedFormatError),
        ("bad/mirax-stub/Mirax2-Fluorescence-1.mrxs", CorruptSlideError),
    ],
)
def test_unopenable_files_raise_typed_errors_naming_the_file(rel, error):
    with pytest.raises(error) as err:
        open_slide(SLIDES / rel)
    assert str(SLIDES / rel) in str(err.value)


def test_unreadable_slide_opens_then_every_read_fails_cleanly():
    with open_slide(SLIDES / "bad/unreadable.svs") as s:
        assert s.dimensions == (16, 16)
        for _ in range(2):  # the poisoned handle is reopened, so the second failure is the same clean error
            with pytest.raises(CorruptSlideError, match="Bogus marker length"):
                s.read_region((0, 0), 0, (16, 16))


def test_a_corrupt_region_does_not_poison_later_reads():
    with open_slide(ZEROED) as bad, open_slide(CMU) as good:
        with pytest.raises(CorruptSlideError, match=r"l0 \(0, 1536\)"):
            bad.read_region((0, 1536), 0, (512, 512))
        w, h = good.dimensions
        centre = ((w // 2 - 128, h // 2 - 128), 0, (256, 256))
        np.testing.assert_array_equal(bad.read_region(*centre), good.read_region(*centre))


def test_thumbnail_of_a_corrupt_slide_names_the_bad_regions():
    with open_slide(ZEROED) as s, pytest.raises(CorruptSlideError, match=r"corrupt image data in 7 region"):
        s.thumbnail(1024)


def test_reads_are_size_checked_before_allocation():
    with open_slide(CMU, max_read_pixels=1000) as s:
        with pytest.raises(SlideTooLargeError, match="exceeds the limit of 1,000 px"):
            s.read_region((0, 0), 0, (100, 100))
        with pytest.raises(ValueError, match="positive"):
            s.read_region((0, 0), 0, (0, 10))
        with pytest.raises(ValueError, match="out of range"):
            s.read_region((0, 0), 3, (10, 10))


def test_plain_images_are_one_level_slides_and_size_checked(tmp_path):
    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[:, :30] = (200, 50, 120)
    Image.fromarray(rgb).save(tmp_path / "photo.png")
    with open_slide(tmp_path / "photo.png") as s:
        assert s.dimensions == (60, 40) and s.level_count == 1 and s.mpp is None
        np.testing.assert_array_equal(s.read_region((0, 0), 0, (60, 40)), rgb)
        # outside the image is white
        assert s.read_region((50, 30), 0, (20, 20))[15, 15].tolist() == [255, 255, 255]
    Image.fromarray(rgb).save(tmp_path / "strip.tif")  # a single-level stripped TIFF: not a WSI for OpenSlide
    with open_slide(tmp_path / "strip.tif") as s:
        assert s.vendor == "image" and s.dimensions == (60, 40)
    with pytest.raises(SlideTooLargeError, match="60x40"):
        slide_mod.open_plain_image(tmp_path / "photo.png", max_image_pixels=100)
    (tmp_path / "fake.png").write_text("not an image")
    with pytest.raises(UnsupportedFormatError, match="fake.png"):
        open_slide(tmp_path / "fake.png")


def test_thumbnail_is_assembled_in_bounded_chunks(monkeypatch):
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (900, 1300, 3), dtype=np.uint8)
    s = InMemorySlide(img, mpp=0.5)
    whole, ds = s.thumbnail(650)
    monkeypatch.setattr(slide_mod, "_THUMBNAIL_CHUNK_PX", 256)
    reads = []
    original = s._read
    monkeypatch.setattr(s, "_read", lambda xy, lv, size, edge: reads.append(size) or original(xy, lv, size, edge))
    chunked, ds2 = s.thumbnail(650)
    assert ds == ds2 == pytest.approx(2.0)
    assert whole.shape == chunked.shape == (450, 650, 3)
    assert max(w * h for w, h in reads) <= 256 * 256
    assert np.abs(whole.astype(int) - chunked.astype(int)).mean() < 1.0


def test_objective_power_fallback_and_transparent_areas_are_white():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = 10
    rgba[:2, :, 3] = 255
    rgb = slide_mod.rgba_to_rgb_on_white(rgba)
    assert rgb[0, 0].tolist() == [10, 10, 10] and rgb[3, 3].tolist() == [255, 255, 255]
    # TRIDENT's and CLAM's `convert("RGB")` drops the alpha instead
    assert slide_mod.rgba_to_rgb(rgba, "black")[3, 3].tolist() == [10, 10, 10]
    np.testing.assert_array_equal(slide_mod.rgba_to_rgb(rgba), rgb)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_mpp(InMemorySlide(rgb, mpp=0.3)).source == "metadata"  # no warning with real mpp


def test_direct_jpeg_decoding_is_pixel_identical_to_openslide(tmp_path):
    from pathchat.wsi.synthetic import SyntheticSlideSpec, TissueRegion, write_synthetic_slide

    spec = SyntheticSlideSpec(1500, 1100, mpp=0.25, downsamples=(1, 2, 8),
                              regions=(TissueRegion("tumor", 20, 20, 200, 150), TissueRegion("lymphocytes", 150, 100, 160, 150)))
    path = write_synthetic_slide(tmp_path / "ycbcr.svs", spec)
    direct = open_slide(path)
    plain = open_slide(path, direct_decode=False)
    regions = [((0, 0), 0, (256, 256)), ((300, 170), 0, (700, 333)), ((1400, 1000), 0, (256, 256)),
               ((512, 256), 1, (256, 256)), ((2, 6), 1, (300, 200)), ((1456, 1088), 2, (40, 40))]
    for l0_xy, level, size in regions:
        for edge in ("white", "black"):  # the last two regions stick out of their level
            np.testing.assert_array_equal(direct.read_region(l0_xy, level, size, edge),
                                          plain.read_region(l0_xy, level, size, edge))
    assert direct.read_region((1400, 1000), 0, (256, 256), "black")[-1, -1].tolist() == [0, 0, 0]
    assert direct.read_region((1400, 1000), 0, (256, 256))[-1, -1].tolist() == [255, 255, 255]
    assert direct._direct is not None and direct._direct.levels == {0, 1, 2}
    assert plain._direct is None
    direct.close()
    plain.close()
    # JPEG 2000 (the TCGA slide) stays with OpenSlide
    with open_slide(TCGA) as s:
        s.read_region((0, 0), 0, (8, 8))
        assert s._direct is None


def test_direct_reader_closes_a_tiff_it_cannot_decode():
    """JPEG 2000 levels are left to OpenSlide; the TIFF opened to look at them is closed at once
    (it used to wait for garbage collection, a ResourceWarning per slide in batch jobs)."""
    import gc

    from pathchat.wsi.tiff_direct import DirectTiffLevels

    with open_slide(TCGA) as s:
        dims = s.level_dimensions
    gc.collect()  # earlier tests' garbage is not this test's business
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert DirectTiffLevels.open(str(TCGA), "aperio", dims) is None
        gc.collect()
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning) and TCGA.name in str(w.message)] == []
