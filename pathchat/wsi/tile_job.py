"""`pathchat tile`: slides -> tissue mask -> tile grid, written in TRIDENT's job layout.

For each slide, under `JOB/<mag>x_<tile>px_<overlap>px_overlap/`:
`patches/<slide>_patches.h5` (coordinates; TRIDENT's name, so its feature job finds them; jobs written
before as `patches/<slide>.h5` are still read and not redone), `visualization/<slide>.png` (QC),
`contours_geojson/<slide>.geojson` (tissue outline for QuPath) and `tissue_masks/<slide>.png`
(the binary mask at thumbnail resolution; `mask_downsample` in the coords attrs maps it to level 0). The batch bookkeeping (manifest,
failures, resume, one process per slide) is `pathchat.utils.batch`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pathchat.utils.atomic import atomic_write_text
from pathchat.utils.batch import BatchRunner, BatchSummary, fingerprint_slide, params_key
from pathchat.utils.checks import check_out_folder, check_positive
from pathchat.wsi.coords import write_coords_h5
from pathchat.wsi.discovery import SlideSource, find_slides_or_fail
from pathchat.wsi.errors import SlideError
from pathchat.wsi.grid import TilingParams, build_grid
from pathchat.wsi.qc import write_mask_png, write_qc_png
from pathchat.wsi.slide import DEFAULT_MAX_READ_PIXELS, open_slide, resolve_mpp
from pathchat.wsi.tissue import TissueParams, detect_tissue

#: TRIDENT's coordinates file name is `<slide>_patches.h5` (trident/Processor.py looks for exactly that).
COORDS_SUFFIX = "_patches.h5"
#: Values of `TileJobConfig.edge_pixels`, the default first.
EDGE_PIXELS = ("black", "white")
EdgePixels = Literal["black", "white"]


@dataclass(frozen=True)
class TileJobConfig:
    """Everything that decides a tiling; a change of any field makes a rerun redo the slides."""

    tiling: TilingParams = field(default_factory=TilingParams)
    tissue: TissueParams = field(default_factory=TissueParams)
    slide_mpp: float | None = None  # level-0 µm/px for every slide, overriding the files
    default_slide_mpp: float | None = None  # level-0 µm/px for slides whose files record none
    max_read_pixels: int = DEFAULT_MAX_READ_PIXELS
    # Tile pixels past the slide edge (and unscanned areas): "black" is what TRIDENT and CLAM feed their
    # encoders (OpenSlide's transparent pixels with the alpha dropped), "white" composites them on white.
    edge_pixels: EdgePixels = "black"

    def __post_init__(self) -> None:
        check_positive("--slide-mpp", self.slide_mpp, unit=" of µm per pixel")
        check_positive("--default-slide-mpp", self.default_slide_mpp, unit=" of µm per pixel")
        check_positive("max_read_pixels", self.max_read_pixels)
        if self.edge_pixels not in EDGE_PIXELS:
            raise ValueError(f"--edge-pixels must be one of {', '.join(EDGE_PIXELS)}, got {self.edge_pixels!r}")

    def to_dict(self) -> dict[str, Any]:
        """The settings as the resume key sees them.

        White was the only behaviour before `edge_pixels` existed, so a white config leaves the field out:
        its key is the one older jobs recorded, and they resume without being redone. `from_dict` reads a
        dict without the field as white for the same reason.
        """
        d = asdict(self)
        if self.edge_pixels == "white":
            del d["edge_pixels"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TileJobConfig:
        return cls(
            tiling=TilingParams(**d["tiling"]),
            tissue=TissueParams(**d["tissue"]),
            slide_mpp=d.get("slide_mpp"),
            default_slide_mpp=d.get("default_slide_mpp"),
            max_read_pixels=d.get("max_read_pixels", DEFAULT_MAX_READ_PIXELS),
            edge_pixels=d.get("edge_pixels", "white"),  # dicts from before the field meant white
        )


def output_paths(job_dir: Path, slide_id: str, tiling: TilingParams) -> dict[str, Path]:
    """Where `tile_one` writes a slide's files (TRIDENT's layout and names)."""
    root = job_dir / tiling.folder_name
    return {
        "coords": root / "patches" / f"{slide_id}{COORDS_SUFFIX}",
        "qc": root / "visualization" / f"{slide_id}.png",
        "geojson": root / "contours_geojson" / f"{slide_id}.geojson",
        "mask": root / "tissue_masks" / f"{slide_id}.png",
    }


def find_coords_file(job_dir: Path, slide_id: str, tiling: TilingParams) -> Path | None:
    """The slide's coordinates file in the job: TRIDENT's name, else the name older jobs used, else None."""
    new = output_paths(job_dir, slide_id, tiling)["coords"]
    legacy = new.with_name(f"{slide_id}.h5")
    return next((p for p in (new, legacy) if p.is_file()), None)


def tile_one(source: SlideSource, job_dir: Path, params: dict[str, Any], state: Any = None) -> dict[str, Any]:
    """Tile one slide into the job folder. Runs inside the per-slide worker process."""
    cfg = TileJobConfig.from_dict(params)
    fingerprint = fingerprint_slide(source)
    with open_slide(source.path, max_read_pixels=cfg.max_read_pixels) as slide:
        resolution = resolve_mpp(slide, cfg.slide_mpp, cfg.default_slide_mpp)
        tissue, thumbnail = detect_tissue(slide, resolution.mpp, cfg.tissue)
        grid = build_grid(slide, resolution.mpp, tissue, cfg.tiling)
        info = slide.info
    paths = output_paths(job_dir, source.slide_id, cfg.tiling)
    write_coords_h5(
        paths["coords"], grid, source.slide_id, info, fingerprint, resolution.source,
        extra_attrs={"tissue_params": cfg.tissue.to_dict(), "tissue_threshold": tissue.threshold,
                     "mask_downsample": tissue.downsample, "min_tissue": cfg.tiling.min_tissue,
                     "edge_pixels": cfg.edge_pixels, "tiling_key": params_key("tile", cfg.to_dict())},
    )
    write_qc_png(paths["qc"], thumbnail, tissue, grid)
    write_mask_png(paths["mask"], tissue)
    atomic_write_text(paths["geojson"], json.dumps(tissue.to_geojson()) + "\n")
    return {
        # a slide without one usable tile is its own outcome, not "done" (see pathchat.utils.batch)
        "state": "done" if len(grid) else "no_tissue",
        "outputs": [str(p) for p in paths.values()],
        "info": {
            "n_tiles": len(grid),
            "mpp": grid.mpp,
            "l0_mpp": resolution.mpp,
            "mpp_source": resolution.source,
            "read_level": grid.read_level,
            "tissue_area_mm2": round(tissue.tissue_area_um2 / 1e6, 4),
            "slide": info.to_dict(),
        },
    }


def tile_slides(
    slides: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    config: TileJobConfig | None = None,
    workers: int = 1,
    timeout_s: float = 1800.0,
    progress: bool = True,
) -> BatchSummary:
    """Tile every slide under `slides` (files or folders, searched recursively) into the job `out`.

    Args:
        slides: slide files, DICOM series folders, or folders to search.
        out: job folder; reruns skip slides already done with the same settings.
        config: tiling, tissue and resolution settings.
        workers: slides processed at the same time, each in its own process.
        timeout_s: a slide still running after this many seconds is killed and recorded as failed.
    Returns:
        The done / no_tissue / skipped / failed counts, the failure rows and the files passed over.
    Raises:
        ValueError: a bad value, `out` an existing file, or no slide at all under `slides`.
    """
    cfg = config or TileJobConfig()
    check_out_folder(out)
    check_positive("--timeout", timeout_s, allow_none=False, unit=" of seconds")
    if workers < 1:
        raise ValueError(f"--workers must be >= 1 (slides processed at once), got {workers}")
    found = find_slides_or_fail(list(slides))
    runner = BatchRunner(out, "tile", tile_one, cfg.to_dict(), workers=workers, timeout_s=timeout_s,
                         progress=progress, expected_errors=(SlideError,))
    summary = runner.run(found.sources)
    summary.ignored = found.ignored
    return summary
