"""Synthetic slides with known content, for proving that a trained PathChat reads the slide.

`python -m data_recipes.synthetic build --out DIR` writes slides whose tissue classes, layout, piece
count and tissue amount are known, extracts their features with the library, and writes stage-1
reports, stage-2 multi-turn questions, held-out conversations and evaluation questions whose answers
are computed from the tiles that survived tissue detection. Modules: `layout` (drawing slides with
unambiguous answers), `truth` (answers from the kept tiles), `questions` (questions, reports, letter
balancing), `slides` (parallel slide writing), `build` (the whole build), `probe` (linear probe).
"""

from data_recipes.synthetic.build import BuildConfig, BuildResult, build_dataset
from data_recipes.synthetic.layout import Geometry

__all__ = ["BuildConfig", "BuildResult", "Geometry", "build_dataset"]
