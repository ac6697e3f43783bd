"""The feature recipe a checkpoint was trained on, so inference makes (or accepts) only such features.

A model reads tile features, and features from another encoder, magnification or tile size are
another input language: a model fed them still answers, fluently and wrongly. So training writes
the recipe of its features (from the feature files' own attributes) into the checkpoint's
`config.json` as `feature_recipe`, and every inference path compares a slide's features with it:
a mismatch is an error that names both recipes, never a silent use.

The recipe is also enough to compute features for a new slide: `to_extract_config()` gives the
`pathchat extract` settings that reproduce it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = ["FeatureRecipe", "FeatureRecipeError", "SlideResolutionError", "check_extracted_features",
           "check_slide_resolution", "recipe_of_model"]


class FeatureRecipeError(ValueError):
    """Features made another way than the checkpoint expects (both recipes in the message)."""


class SlideResolutionError(FeatureRecipeError):
    """A readable slide that cannot give the model's resolution: level 0 is coarser than the recipe's
    target, or the slide records no resolution at all ("no mpp recorded").

    Its features could only be made at another resolution than the model was trained on, so no model
    is asked about it: reports get the status "insufficient_resolution", chat a fixed answer.

    Attributes:
        slide: the slide file (or DICOM folder).
        slide_id: the slide's id (its file stem unless discovery named it otherwise).
        slide_mpp: level-0 µm per pixel (None: no mpp recorded).
        target_mpp: the µm per pixel of the model's feature recipe.
        level0_size: (width, height) of level 0, when the slide was opened.
    """

    kind = "insufficient_resolution"

    def __init__(self, slide: str | os.PathLike[str], slide_mpp: float | None, target_mpp: float,
                 slide_id: str | None = None, level0_size: tuple[int, int] | None = None) -> None:
        self.slide = os.fspath(slide)
        self.slide_id = slide_id or Path(self.slide).stem
        self.slide_mpp = None if slide_mpp is None else float(slide_mpp)
        self.target_mpp = float(target_mpp)
        self.level0_size = level0_size
        super().__init__(f"{self.slide}: resolution too low for this model: {self.reason}")

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across processes despite the signature
        return (type(self), (self.slide, self.slide_mpp, self.target_mpp, self.slide_id, self.level0_size))

    @property
    def reason(self) -> str:
        """Both resolutions, without the file name (reports may be anonymised)."""
        target = f"{self.target_mpp:g} µm/px ({10.0 / self.target_mpp:g}x)"
        if self.slide_mpp is None:
            return (f"no mpp recorded (the slide records neither µm per pixel nor objective power), so it "
                    f"cannot be read at the {target} the model's features are made at")
        return (f"the slide's finest level is {self.slide_mpp:.4g} µm/px, coarser than the {target} the "
                "model's features are made at")

    def empty_bag(self, recipe: FeatureRecipe | None = None) -> Any:
        """A `FeatureBag` with no tiles that stands for the slide (its mpp and level-0 size recorded)."""
        import numpy as np

        from pathchat.features.store import FeatureBag

        mpp = self.slide_mpp
        attrs: dict[str, Any] = {}
        if self.level0_size is not None:
            attrs.update(level0_width=int(self.level0_size[0]), level0_height=int(self.level0_size[1]))
        dim = (recipe.feature_dim if recipe is not None else None) or 0
        return FeatureBag(features=np.zeros((0, dim), np.float32), coords=np.zeros((0, 2), np.int64),
                          slide_id=self.slide_id, encoder=None if recipe is None else recipe.encoder, mpp=mpp,
                          patch_size_level0=None, magnification=None, source_format="pathchat", attrs=attrs)


def _as_dict(value: Any) -> dict[str, Any] | None:
    if value is None or isinstance(value, dict):
        return value
    if isinstance(value, (str, bytes)):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            return None
        return parsed if isinstance(parsed, dict) else None
    return None


def _opt_float(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _opt_int(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class FeatureRecipe:
    """How a slide's tile features were made.

    Fields left None are unknown (features imported from another tool, or an old checkpoint given
    `--encoder/--mag/--tile-size` by hand); unknown fields are not compared.
    """

    encoder: str  # registry name (`pathchat encoders`)
    feature_dim: int | None = None  # width of one tile feature
    encoder_fingerprint: str | None = None  # hash of the encoder's weights, when the extractor recorded one
    target_mpp: float | None = None  # µm per pixel of the tiles the encoder saw (20x = 0.5)
    tile_px: int | None = None  # tile side at the target resolution, pixels
    overlap_px: int | None = None  # overlap between neighbouring tiles, pixels
    min_tissue: float | None = None  # minimum tissue share of a kept tile
    edge_pixels: str | None = None  # fill of tile pixels past the slide edge ("black" as TRIDENT, or "white")
    tissue: dict[str, Any] | None = field(default=None, compare=False)  # tissue detection settings

    @property
    def magnification(self) -> float | None:
        return None if self.target_mpp is None else 10.0 / self.target_mpp

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureRecipe:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"feature_recipe: unknown keys {unknown}; valid keys: {sorted(known)}")
        if not d.get("encoder"):
            raise ValueError("feature_recipe: 'encoder' is required")
        return cls(**d)

    @classmethod
    def from_feature_attrs(cls, attrs: dict[str, Any], encoder: str | None = None,
                           dim: int | None = None) -> FeatureRecipe:
        """The recipe recorded in a features h5 (PathChat's attributes; TRIDENT's where they match)."""
        name = encoder or attrs.get("encoder")
        if not name:
            raise ValueError("the features record no encoder name; give the recipe by hand (--encoder)")
        mpp = _opt_float(attrs.get("target_mpp"))
        if mpp is None and _opt_float(attrs.get("target_magnification")):
            mpp = 10.0 / float(attrs["target_magnification"])
        tile_px = _opt_int(attrs.get("patch_size"))
        return cls(
            encoder=str(name),
            feature_dim=dim if dim is not None else _opt_int(attrs.get("dim")),
            encoder_fingerprint=(str(attrs["encoder_fingerprint"]) if attrs.get("encoder_fingerprint") else None),
            target_mpp=None if mpp is None else round(mpp, 6),
            tile_px=tile_px,
            overlap_px=_opt_int(attrs.get("overlap")),
            min_tissue=_opt_float(attrs.get("min_tissue")),
            edge_pixels=str(attrs["edge_pixels"]) if attrs.get("edge_pixels") else None,
            tissue=_as_dict(attrs.get("tissue_params")),
        )

    @classmethod
    def from_bag(cls, bag: Any) -> FeatureRecipe:
        """The recipe of a `FeatureBag` (its typed fields first, then its attributes)."""
        attrs = dict(bag.attrs)
        if bag.mpp is not None and bag.patch_size_level0 and "patch_size" not in attrs:
            attrs["patch_size"] = bag.patch_size_level0
        if bag.magnification and "target_magnification" not in attrs:
            attrs["target_magnification"] = bag.magnification
        return cls.from_feature_attrs(attrs, encoder=bag.encoder, dim=bag.dim)

    def mismatches(self, other: FeatureRecipe) -> list[str]:
        """The fields known in both recipes that differ (tolerance 1% for mpp)."""
        out: list[str] = []
        for name in ("encoder", "feature_dim", "encoder_fingerprint", "target_mpp", "tile_px", "overlap_px",
                     "edge_pixels"):
            a, b = getattr(self, name), getattr(other, name)
            if a is None or b is None:
                continue
            if name == "target_mpp":
                if not math.isclose(float(a), float(b), rel_tol=0.01):
                    out.append(name)
            elif a != b:
                out.append(name)
        return out

    def check(self, features: FeatureRecipe, where: str) -> None:
        """Raise unless `features` (a slide's) match this (the checkpoint's) recipe.

        Raises:
            FeatureRecipeError: naming `where` (the feature file), the differing fields and both recipes.
        """
        diff = self.mismatches(features)
        if diff:
            raise FeatureRecipeError(
                f"{where}: these features were made with another recipe than the model's "
                f"(differing: {', '.join(diff)}); model: {self.describe()}; features: {features.describe()}. "
                "Extract features with the model's recipe (the pipeline does this when given the slide "
                "file) or use a model trained on these features")

    def describe(self) -> str:
        parts = [f"encoder={self.encoder}"]
        if self.feature_dim is not None:
            parts.append(f"dim={self.feature_dim}")
        if self.target_mpp is not None:
            parts.append(f"mpp={self.target_mpp:g} ({10.0 / self.target_mpp:g}x)")
        if self.tile_px is not None:
            parts.append(f"tile={self.tile_px}px")
        if self.overlap_px is not None:
            parts.append(f"overlap={self.overlap_px}px")
        if self.edge_pixels is not None:
            parts.append(f"edge={self.edge_pixels}")
        if self.encoder_fingerprint:
            parts.append(f"weights={self.encoder_fingerprint[:12]}")
        return " ".join(parts)

    def to_extract_config(self, pretrained: bool = True) -> Any:
        """`pathchat extract` settings that make features of this recipe."""
        from pathchat.features.extract import ExtractJobConfig
        from pathchat.wsi.grid import TilingParams
        from pathchat.wsi.tile_job import TileJobConfig
        from pathchat.wsi.tissue import TissueParams

        tiling_kwargs: dict[str, Any] = {}
        if self.target_mpp is not None:
            tiling_kwargs["mpp"] = self.target_mpp
        if self.tile_px is not None:
            tiling_kwargs["tile_px"] = self.tile_px
        if self.overlap_px is not None:
            tiling_kwargs["overlap_px"] = self.overlap_px
        if self.min_tissue is not None:
            tiling_kwargs["min_tissue"] = self.min_tissue
        known_tissue = {f.name for f in fields(TissueParams)}
        tissue = TissueParams(**{k: v for k, v in (self.tissue or {}).items() if k in known_tissue})
        extra: dict[str, Any] = {}
        if self.edge_pixels is not None and "edge_pixels" in {f.name for f in fields(TileJobConfig)}:
            extra["edge_pixels"] = self.edge_pixels
        tile = TileJobConfig(tiling=TilingParams(**tiling_kwargs), tissue=tissue, **extra)
        return ExtractJobConfig(encoder=self.encoder, tile=tile, pretrained=pretrained)


def check_slide_resolution(source: Any, tile: Any) -> None:
    """Before any tiling: raise unless the slide can be tiled at the resolution of `tile`.

    Reads only the slide's metadata, through the same `resolve_mpp` as the tiler (so `tile.slide_mpp` /
    `tile.default_slide_mpp` count, and an objective power stands in for a missing mpp), and applies the
    tiler's own test (`pathchat.wsi.grid.coarser_than_target`): the slide is too coarse exactly when the
    tiler would fall back to its native resolution.

    Args:
        source: a `SlideSource` (its `path`, and `slide_id`) or a slide path.
        tile: the extraction's `TileJobConfig`.
    Raises:
        SlideResolutionError: level 0 coarser than the target, or no resolution known at all.
        SlideError: the slide cannot be opened (what extraction would raise).
    """
    import warnings

    from pathchat.wsi.errors import MissingResolutionError
    from pathchat.wsi.grid import coarser_than_target
    from pathchat.wsi.slide import open_slide, resolve_mpp

    path = getattr(source, "path", source)
    slide_id = getattr(source, "slide_id", None)
    target = tile.tiling.target_mpp
    with open_slide(path, max_read_pixels=tile.max_read_pixels) as slide:
        size = tuple(int(v) for v in slide.dimensions)
        try:
            with warnings.catch_warnings():  # extraction gives the objective-power warning itself
                warnings.simplefilter("ignore")
                l0_mpp = resolve_mpp(slide, tile.slide_mpp, tile.default_slide_mpp).mpp
        except MissingResolutionError:
            raise SlideResolutionError(path, None, target, slide_id, (size[0], size[1])) from None
    if coarser_than_target(l0_mpp, tile.tiling):
        raise SlideResolutionError(path, l0_mpp, target, slide_id, (size[0], size[1]))


def check_extracted_features(model: FeatureRecipe, attrs: dict[str, Any], slide: str | os.PathLike[str],
                             where: str, slide_id: str | None = None) -> None:
    """After extraction: raise unless the features just written (their `attrs`) have the model's recipe.

    The fallback behind `check_slide_resolution`: when the tiler fell back to a slide's coarser native
    resolution, the error is a `SlideResolutionError` (the slide's level-0 mpp from the attributes);
    any other difference is a `FeatureRecipeError` naming both recipes (`FeatureRecipe.check`).
    """
    features = FeatureRecipe.from_feature_attrs(attrs)
    if ("target_mpp" in model.mismatches(features) and model.target_mpp is not None
            and features.target_mpp is not None and features.target_mpp > model.target_mpp):
        l0_mpp = _opt_float(attrs.get("mpp"))
        width, height = _opt_int(attrs.get("level0_width")), _opt_int(attrs.get("level0_height"))
        raise SlideResolutionError(slide, l0_mpp if l0_mpp is not None else features.target_mpp, model.target_mpp,
                                   slide_id, None if width is None or height is None else (width, height))
    model.check(features, where)


def recipe_of_model(config: Any) -> FeatureRecipe | None:
    """The `feature_recipe` recorded in a PathChat config (None for checkpoints older than it)."""
    raw = getattr(config, "feature_recipe", None)
    if not raw:
        return None
    return FeatureRecipe.from_dict(dict(raw))


def recipe_of_feature_files(paths: list[Any], sample: int = 8) -> FeatureRecipe:
    """The one recipe of a set of feature files (training writes it into the checkpoint).

    Reads the attributes of up to `sample` files spread over the list.

    Raises:
        FeatureRecipeError: two files were made with different recipes (both named).
        ValueError: no files.
    """
    from pathchat.features.store import read_feature_attrs

    if not paths:
        raise ValueError("no feature files to read a recipe from")
    step = max(1, len(paths) // sample)
    chosen = list(paths)[::step][:sample]
    first_path, first = chosen[0], None
    for path in chosen:
        attrs = read_feature_attrs(path)
        recipe = FeatureRecipe.from_feature_attrs(attrs)
        if first is None:
            first = recipe
            continue
        diff = first.mismatches(recipe)
        if diff:
            raise FeatureRecipeError(f"the training features mix recipes ({', '.join(diff)} differ): "
                                     f"{first_path}: {first.describe()}; {path}: {recipe.describe()}")
    assert first is not None
    return first
