"""`make demo`: the main job so far, end to end on built-in data.

Writes three synthetic slides (a 40x Aperio scan without a 20x level, a 20x generic TIFF, a 20x
Aperio with six tissue classes), tiles them at 20x, extracts their features with the tiny random
encoder (the real encoders need weights this demo cannot download), and prints where the QC
pictures, coordinates and features are. Later layers (model, chat) will extend this same demo.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pathchat.features.extract import ExtractJobConfig, RuntimeOptions, extract_slides
from pathchat.features.store import features_path, read_features_h5
from pathchat.utils.atomic import read_jsonl
from pathchat.wsi.synthetic import SyntheticSlideSpec, TissueRegion, random_slide_spec, write_synthetic_slide
from pathchat.wsi.tile_job import TileJobConfig, output_paths, tile_slides


def demo_slides(folder: Path) -> list[Path]:
    """Write the demo slides (deterministic; skipped when already there)."""
    folder.mkdir(parents=True, exist_ok=True)
    specs = {
        "demo_40x_aperio.svs": SyntheticSlideSpec(
            6144, 4096, mpp=0.25, downsamples=(1, 4, 16), seed=1,
            regions=(TissueRegion("tumor", 100, 100, 600, 400, "ellipse"),
                     TissueRegion("stroma", 700, 150, 600, 700),
                     TissueRegion("lymphocytes", 200, 600, 350, 300, "ellipse")),
        ),
        "demo_20x_generic.tiff": SyntheticSlideSpec(
            4096, 3072, mpp=0.5, vendor="generic-tiff", seed=2,
            regions=(TissueRegion("necrosis", 200, 200, 900, 500), TissueRegion("mucin", 1200, 600, 600, 700)),
        ),
        "demo_20x_six_classes.svs": random_slide_spec(
            3, 4096, 4096, mpp=0.5, n_regions=(6, 6),
            classes=("tumor", "stroma", "lymphocytes", "necrosis", "mucin", "faint"),
        ),
    }
    paths = []
    for name, spec in specs.items():
        path = folder / name
        if not path.exists():
            write_synthetic_slide(path, spec)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pathchat.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_job", help="job folder (slides go to OUT/slides)")
    args = parser.parse_args(argv)
    job = Path(args.out)
    print(f"writing synthetic slides to {job / 'slides'} ...")
    slides = demo_slides(job / "slides")
    config = TileJobConfig()
    summary = tile_slides(slides, job, config)
    rows = {r["slide_id"]: r for r in read_jsonl(job / "manifest.jsonl") if r["state"] == "done"}
    print(f"\n{'slide':<26} {'tiles':>6} {'µm/px':>6}  QC picture / coordinates")
    for slide in slides:
        paths = output_paths(job, slide.stem, config.tiling)
        n = rows[slide.stem]["info"]["n_tiles"] if slide.stem in rows else "-"
        mpp = rows[slide.stem]["info"]["mpp"] if slide.stem in rows else float("nan")
        print(f"{slide.stem:<26} {n:>6} {mpp:>6.3g}  {paths['qc']}\n{'':<41}{paths['coords']}")
    print(f"\ntiling: {summary.line()}  (manifest: {job / 'manifest.jsonl'})")

    encoder = "random-vit-tiny"
    extracted = extract_slides(slides, job, ExtractJobConfig(encoder=encoder, tile=config),
                               RuntimeOptions(batch_size=32, loader_workers=1, device="cpu"))
    print(f"\nfeatures ({encoder}):")
    for slide in slides:
        path = features_path(job, config.tiling.folder_name, encoder, slide.stem)
        if path.exists():
            bag = read_features_h5(path)
            print(f"  {slide.stem:<26} {bag.features.shape[0]:>4} x {bag.dim}  {path}")
    print(f"extraction: {extracted.line()}")
    return max(summary.exit_code, extracted.exit_code)


if __name__ == "__main__":
    sys.exit(main())
