"""PathChat's tiling outputs read the way TRIDENT, CLAM and QuPath read them.

Each test reads our files with the dataset and attribute names the other tool's source reads
(named beside each read), or with the tool's own reader where it is on PyPI (qubalab for QuPath).
Checked against: TRIDENT (mahmoodlab/TRIDENT: `trident/Processor.py` at 0b2f600, `trident/IO.py`
`read_coords` at 0408667, `trident/wsi_objects/WSI.py` `extract_patch_features`,
`trident/wsi_objects/OpenSlideWSI.py` `read_region` at 40a1db7), CLAM (mahmoodlab/CLAM
`dataset_modules/dataset_h5.py` `Whole_Slide_Bag_FP` at 4f9d8ae), qubalab 0.2.1, shapely 2.2,
openslide-python 1.4.7 with OpenSlide 4.0.1.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import openslide
import pytest
import shapely
import shapely.geometry
from qubalab.objects.geojson import geojson_features_from_string
from qubalab.objects.image_feature import ImageFeature
from qubalab.objects.object_type import ObjectType
from shared_data import CMU, SLIDES

from pathchat.cli import main
from pathchat.features.extract import _coords_for
from pathchat.utils.atomic import read_jsonl, sha256_file
from pathchat.utils.batch import fingerprint_slide, params_key
from pathchat.wsi.coords import read_coords_h5
from pathchat.wsi.discovery import discover_slides
from pathchat.wsi.reader import TileDataset
from pathchat.wsi.slide import open_slide, resolve_mpp
from pathchat.wsi.synthetic import SyntheticSlideSpec, TissueRegion, write_synthetic_slide
from pathchat.wsi.tile_job import TileJobConfig, find_coords_file, output_paths, tile_slides
from pathchat.wsi.tissue import detect_tissue

FOLDER = "20x_256px_0px_overlap"


@pytest.fixture(scope="module")
def cmu_job(tmp_path_factory) -> Path:
    """CMU-1-Small-Region tiled with the defaults (20x, 256 px, edge pixels black)."""
    job = tmp_path_factory.mktemp("interop") / "job"
    assert tile_slides([CMU], job, progress=False).done == 1
    return job


def _trident_read_coords(path: Path) -> tuple[dict, np.ndarray]:
    """trident/IO.py `read_coords`: the attributes of the `coords` dataset, and the dataset."""
    with h5py.File(path, "r") as f:
        return dict(f["coords"].attrs), f["coords"][:]


def test_trident_finds_and_reads_the_coords_file(cmu_job):
    # trident/Processor.py run_patch_feature_extraction_job: os.path.join(job_dir, coords_dir, 'patches',
    # f'{wsi.name}_patches.h5'), wsi.name being the slide file's stem; "Coords not found" otherwise.
    path = cmu_job / FOLDER / "patches" / "CMU-1-Small-Region_patches.h5"
    assert path.is_file() and not (cmu_job / FOLDER / "patches" / "CMU-1-Small-Region.h5").exists()
    attrs, coords = _trident_read_coords(path)
    # trident/wsi_objects/WSI.py extract_patch_features: KeyError unless all three are present
    assert attrs["patch_size"] == 256
    assert attrs["level0_magnification"] == pytest.approx(10 / 0.499)
    assert attrs["target_magnification"] == pytest.approx(10 / 0.499)  # within snap tolerance: no resize
    # trident/IO.py coords_to_h5 writes these too; PathChat writes the same names
    assert attrs["patch_size_level0"] == 256 and attrs["overlap"] == 0 and attrs["name"] == "CMU-1-Small-Region"
    assert (attrs["level0_width"], attrs["level0_height"]) == (2220, 2967)
    assert coords.dtype == np.int64 and coords.shape == (50, 2)


def test_clam_reads_patch_level_and_patch_size(cmu_job):
    # CLAM dataset_modules/dataset_h5.py Whole_Slide_Bag_FP.__init__:
    #   self.patch_level = f['coords'].attrs['patch_level']; self.patch_size = f['coords'].attrs['patch_size']
    with h5py.File(cmu_job / FOLDER / "patches" / "CMU-1-Small-Region_patches.h5", "r") as f:
        patch_level = int(f["coords"].attrs["patch_level"])
        patch_size = int(f["coords"].attrs["patch_size"])
        read_px = int(f["coords"].attrs["read_px"])
    assert (patch_level, patch_size, read_px) == (0, 256, 256)  # CLAM's reading covers our tile exactly


def test_resized_tiles_keep_tridents_patch_size_and_name_the_read_size(tmp_path):
    """20x tiles from a 40x slide without a 20x level: 512 px read at level 0, resized to 256."""
    spec = SyntheticSlideSpec(2048, 2048, mpp=0.25, regions=(TissueRegion("tumor", 64, 64, 256, 256),),
                              downsamples=(1, 4), seed=2)
    slide = write_synthetic_slide(tmp_path / "s40.svs", spec)
    assert tile_slides([slide], tmp_path / "job", progress=False).done == 1
    attrs, coords = _trident_read_coords(tmp_path / "job" / FOLDER / "patches" / "s40_patches.h5")
    assert (attrs["patch_size"], attrs["read_px"], attrs["patch_level"], attrs["patch_size_level0"]) == (256, 512, 0, 512)
    # TRIDENT's WSIPatcher: patch_size_src = round(patch_size * dst_pixel_size / src_pixel_size), with
    # pixel size = 10 / magnification: the tile's level-0 side, 512, as PathChat's grid has it
    trident_src = round(attrs["patch_size"] * (10 / attrs["target_magnification"]) / (10 / attrs["level0_magnification"]))
    assert trident_src == attrs["patch_size_level0"] == 512
    assert len(coords) and (np.diff(np.unique(coords[:, 0])) % 512 == 0).all()


def _tool_tiles(path: Path, coords: np.ndarray, level: int, size: int) -> np.ndarray:
    """The pixels TRIDENT and CLAM give their encoders at these coordinates (no resize here):
    TRIDENT OpenSlideWSI.read_region and CLAM Whole_Slide_Bag_FP.__getitem__ both do
    `openslide.OpenSlide(path).read_region(coord, level, (size, size)).convert('RGB')`."""
    osr = openslide.OpenSlide(str(path))
    try:
        return np.stack([np.asarray(osr.read_region((int(x), int(y)), level, (size, size)).convert("RGB"))
                         for x, y in coords])
    finally:
        osr.close()


def test_tiles_are_the_pixels_trident_and_clam_read_edges_included(cmu_job):
    tile_coords = read_coords_h5(cmu_job / FOLDER / "patches" / "CMU-1-Small-Region_patches.h5")
    attrs = tile_coords.attrs
    assert attrs["edge_pixels"] == "black"
    theirs = _tool_tiles(CMU, tile_coords.l0_coords, int(attrs["patch_level"]), int(attrs["patch_size"]))

    def ours(edge_pixels: str) -> np.ndarray:
        ds = TileDataset(CMU, tile_coords.l0_coords, int(attrs["read_level"]), int(attrs["read_px"]),
                         int(attrs["patch_size"]), edge_pixels=edge_pixels)
        try:
            return np.stack([ds[i]["tile"] for i in range(len(ds))])
        finally:
            ds.close()

    black, white = ours("black"), ours("white")
    sticks_out = ((tile_coords.l0_coords + 256) > np.array([2220, 2967])).any(axis=1)
    assert int(sticks_out.sum()) == 5  # the last column and row of the grid reach past the slide
    np.testing.assert_array_equal(black, theirs)  # all 50, the 5 edge tiles included
    same_in_white = [bool(np.array_equal(w, t)) for w, t in zip(white, theirs, strict=True)]
    assert same_in_white == (~sticks_out).tolist()  # white differs exactly on the edge tiles


@pytest.mark.slow
def test_edge_pixels_are_recorded_and_a_job_never_mixes_them(tmp_path):
    spec = SyntheticSlideSpec(1000, 700, mpp=0.5, regions=(TissueRegion("tumor", 300, 150, 200, 200),), seed=3)
    slide = write_synthetic_slide(tmp_path / "edge.svs", spec)
    job = tmp_path / "job"
    black, white = TileJobConfig(), TileJobConfig(edge_pixels="white")
    assert params_key("tile", black.to_dict()) != params_key("tile", white.to_dict())
    assert TileJobConfig.from_dict(black.to_dict()) == black and TileJobConfig.from_dict(white.to_dict()) == white
    with pytest.raises(ValueError, match="--edge-pixels"):
        TileJobConfig(edge_pixels="grey")

    assert main(["tile", str(slide), "--out", str(job), "--edge-pixels", "white", "--no-progress"]) == 0
    coords_file = output_paths(job, "edge", white.tiling)["coords"]
    assert read_coords_h5(coords_file).attrs["edge_pixels"] == "white"
    assert tile_slides([slide], job, white, progress=False).skipped == 1
    # the other mode is another tiling: redone, never read from the white file
    assert tile_slides([slide], job, black, progress=False).done == 1
    assert read_coords_h5(coords_file).attrs["edge_pixels"] == "black"
    # extraction asks for the mode it is configured with: white again re-tiles rather than reuse black
    source = discover_slides([slide])[0]
    _, tile_coords = _coords_for(source, job, white, fingerprint_slide(source))
    assert tile_coords.attrs["edge_pixels"] == "white"


def _make_legacy(job: Path, slide_id: str) -> Path:
    """Turn a white-edged job into what PathChat wrote before TRIDENT's names: `patches/<slide>.h5`
    without `patch_level` and `edge_pixels`, and a manifest row naming that file."""
    new = output_paths(job, slide_id, TileJobConfig().tiling)["coords"]
    legacy = new.with_name(f"{slide_id}.h5")
    new.rename(legacy)
    with h5py.File(legacy, "r+") as f:
        del f["coords"].attrs["patch_level"]
        del f["coords"].attrs["edge_pixels"]
    rows = read_jsonl(job / "manifest.jsonl")
    for row in rows:
        outputs = row.get("outputs", {})
        rel = str(new.relative_to(job))
        if rel in outputs:
            del outputs[rel]
            outputs[str(legacy.relative_to(job))] = sha256_file(legacy)
    (job / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return legacy


@pytest.mark.slow
def test_an_old_job_folder_keeps_working_and_is_not_redone(tmp_path):
    spec = SyntheticSlideSpec(1024, 1024, mpp=0.5, regions=(TissueRegion("tumor", 64, 64, 256, 256),), seed=5)
    slide = write_synthetic_slide(tmp_path / "old.svs", spec)
    job = tmp_path / "job"
    white = TileJobConfig(edge_pixels="white")  # the only behaviour before the option
    tile_slides([slide], job, white, progress=False)
    legacy = _make_legacy(job, "old")
    before = legacy.stat().st_mtime_ns

    assert find_coords_file(job, "old", white.tiling) == legacy
    assert tile_slides([slide], job, white, progress=False).skipped == 1  # the old key, the old file
    source = discover_slides([slide])[0]
    path, tile_coords = _coords_for(source, job, white, fingerprint_slide(source))
    assert path == legacy and legacy.stat().st_mtime_ns == before  # extraction reads it as it is
    # tissue over px 128..640: a 3 x 3 block of 256-px tiles, each at least 25% covered
    assert len(tile_coords.l0_coords) == 9 and "edge_pixels" not in tile_coords.attrs
    assert not output_paths(job, "old", white.tiling)["coords"].exists()

    # the default (black edges) is another tiling: redone under TRIDENT's name
    assert tile_slides([slide], job, progress=False).done == 1
    assert find_coords_file(job, "old", white.tiling) == output_paths(job, "old", white.tiling)["coords"]


def _shared_tissue() -> list[tuple[str, object]]:
    """Tissue masks of every readable shared slide (0.5 µm/px where the file records none)."""
    masks = []
    for source in discover_slides([SLIDES]):
        try:
            with open_slide(source.path) as s:
                masks.append((source.slide_id, detect_tissue(s, resolve_mpp(s, None, 0.5).mpp)[0]))
        except Exception:  # noqa: BLE001 - the bad/ files are tested elsewhere
            continue
    return masks


@pytest.mark.slow
def test_tissue_geojson_is_valid_oriented_and_read_by_qupaths_reader(cmu_job):
    # QuPath's own Python reader (qubalab) on the file `pathchat tile` wrote
    text = (cmu_job / FOLDER / "contours_geojson" / "CMU-1-Small-Region.geojson").read_text()
    features = [ImageFeature.create_from_feature(f) for f in geojson_features_from_string(text)]
    assert len(features) == 1
    feature = features[0]
    assert feature.object_type == ObjectType.ANNOTATION and feature.is_annotation
    assert feature.classification.names == ("Tissue",) and tuple(feature.classification.color) == (0, 160, 60)
    shape = shapely.geometry.shape(feature.geometry)
    assert shape.is_valid  # it was a self-touching ring before
    assert shape.area == pytest.approx(0.402 * 2220 * 2967, rel=0.03)  # the mask's 40.2% of the slide

    # every shared slide: each geometry valid, outer rings counter-clockwise, holes clockwise (RFC 7946)
    n_raw_invalid = n_features = 0
    for slide_id, mask in _shared_tissue():
        n_raw_invalid += sum(not shapely.Polygon(p.exterior, p.holes).is_valid for p in mask.polygons)
        for f in mask.to_geojson()["features"]:
            n_features += 1
            geom = shapely.geometry.shape(f["geometry"])
            assert geom.is_valid, slide_id
            for part in getattr(geom, "geoms", [geom]):
                assert part.exterior.is_ccw and not any(ring.is_ccw for ring in part.interiors), slide_id
            assert f["properties"]["objectType"] == "annotation"
    assert n_features == 88 and n_raw_invalid == 5  # OpenCV's outlines: 5 self-touching before shapely
