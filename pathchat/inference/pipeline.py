"""The one inference pipeline: slide (or cached features) + checkpoint -> chat session -> answers.

`Pipeline.from_pretrained(model)` loads a checkpoint (the built-in model when `model` is None) and
the feature recipe it was trained on. `prepare(slide)` finds the slide's features in the feature
cache, a job folder in `pathchat extract`'s layout (so a cohort extracted once is reused), or tiles
and encodes the slide there with that recipe; a features file given directly is checked against
the recipe. `session(slide, region)` returns a `SlideSession`: streamed multi-turn answers with the
KV cache reused, per-tile evidence, and optionally only the tiles inside a level-0 rectangle (the
connector never sees the others, so they cannot change the answer). `answer_batch` answers many
(slide, question) pairs in left-padded batches. Chat, reports, the web UI, the demo and evaluation
all call these; nothing else opens a slide for a model.

Shapes: `bag.features [n, d_enc]`, `bag.coords [n, 2]` level-0 px; `relevance() [n_session]`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch

from pathchat.features.store import FeatureBag, features_path, read_feature_attrs, read_features_h5
from pathchat.inference.builtin import resolve_checkpoint
from pathchat.inference.engine import ChatSession, SamplingParams, generate_batch_ids, prime_prefix
from pathchat.inference.notices import (
    INSUFFICIENT_RESOLUTION_ANSWER,
    NO_TILES_IN_REGION_ANSWER,
    NO_TISSUE_ANSWER,
)
from pathchat.inference.recipe import (
    FeatureRecipe,
    FeatureRecipeError,
    SlideResolutionError,
    check_extracted_features,
    check_slide_resolution,
    recipe_of_model,
)
from pathchat.inference.relevance import answer_relevance
from pathchat.utils.cache import cache_dir

__all__ = ["Pipeline", "ProgressFn", "Region", "SlideFeatures", "SlideSession"]

logger = logging.getLogger(__name__)

#: `(stage, done, total)`: stage is "tiling" or "encoding" (tiles), called while a slide is prepared.
ProgressFn = Callable[[str, int, int], None]
#: A level-0 rectangle `(x, y, width, height)` in pixels.
Region = tuple[int, int, int, int]
_FEATURE_SUFFIXES = (".h5", ".hdf5")


class SlideInputs(TypedDict):
    """One slide's tiles as the model takes them (batch dimension not added)."""

    tile_features: torch.Tensor  # [n, d_enc]
    tile_coords: torch.Tensor | None  # [n, 2] µm
    slide_size_um: torch.Tensor | None  # [2]


@dataclass
class SlideFeatures:
    """One slide ready for the model: its features and where they came from.

    A slide that cannot give the model's resolution has no features: `unassessed(error)` makes its
    stand-in (an empty bag, `resolution_error` set), whose answers are a fixed text without a model call.
    """

    slide_id: str
    bag: FeatureBag
    path: Path | None  # the slide file (None when only a features file was given)
    features_path: Path | None
    recipe: FeatureRecipe  # how the features were made (checked against the model's)
    level0_size: tuple[int, int] | None = None  # (width, height) in level-0 pixels, when recorded
    resolution_error: SlideResolutionError | None = None  # set: too coarse for the model, not assessed

    @classmethod
    def unassessed(cls, error: SlideResolutionError, recipe: FeatureRecipe | None = None) -> SlideFeatures:
        """The stand-in for a slide `Pipeline.prepare` refused as too coarse (`recipe`: the model's)."""
        return cls(slide_id=error.slide_id, bag=error.empty_bag(recipe), path=Path(error.slide), features_path=None,
                   recipe=recipe or FeatureRecipe(encoder="none"), level0_size=error.level0_size,
                   resolution_error=error)

    @property
    def insufficient_resolution(self) -> bool:
        """The slide cannot give the model's resolution: answers say so without calling the model."""
        return self.resolution_error is not None

    @property
    def fixed_answer(self) -> str | None:
        """The answer to every question when no model can be asked (too coarse, no tissue), else None."""
        if self.resolution_error is not None:
            return INSUFFICIENT_RESOLUTION_ANSWER.format(reason=self.resolution_error.reason)
        return NO_TISSUE_ANSWER if self.no_tissue else None

    @property
    def no_tissue(self) -> bool:
        """Tissue detection kept no tile: answers say so without calling the model."""
        return self.resolution_error is None and len(self.bag) == 0

    @property
    def num_tiles(self) -> int:
        return len(self.bag)


def _check_region(region: Sequence[float]) -> Region:
    if len(region) != 4:
        raise ValueError(f"a region is (x, y, width, height) in level-0 pixels, got {tuple(region)}")
    x, y, w, h = (float(v) for v in region)
    if not all(np.isfinite([x, y, w, h])) or w <= 0 or h <= 0:
        raise ValueError(f"a region needs finite x, y and a positive width and height, got {tuple(region)}")
    return int(x), int(y), int(w), int(h)


def tiles_in_region(bag: FeatureBag, region: Region | None) -> np.ndarray:
    """Indices of the tiles whose centre lies inside `region` (all tiles when None)."""
    n = len(bag)
    if region is None:
        return np.arange(n)
    if bag.coords is None:
        raise ValueError(f"slide {bag.slide_id}: its features have no coordinates, so a region cannot be chosen")
    x, y, w, h = region
    half = (bag.patch_size_level0 or 0) / 2.0
    cx = bag.coords[:, 0] + half
    cy = bag.coords[:, 1] + half
    inside = (cx >= x) & (cx < x + w) & (cy >= y) & (cy < y + h)
    return np.flatnonzero(inside)


class SlideSession:
    """A conversation about one slide (or one region of it) with one model.

    Attributes:
        slide: the prepared slide.
        region: the level-0 rectangle the answers are drawn from (None: the whole slide).
        tile_index: `[n]` indices into `slide.bag` of the tiles the model sees.
        tile_coords_l0: `[n, 2]` level-0 (x, y) of those tiles (None when the features have none).
        messages: the conversation so far (role / content dicts, the slide marker left out).
    """

    def __init__(self, pipeline: Pipeline, slide: SlideFeatures, region: Region | None,
                 sampling: SamplingParams, system_prompt: str | None) -> None:
        self.pipeline = pipeline
        self.slide = slide
        self.region = region
        self.sampling = sampling
        self.system_prompt = system_prompt
        self.tile_index = tiles_in_region(slide.bag, region)
        cap = pipeline.max_tiles
        if cap is not None and len(self.tile_index) > cap:
            # the seeded sample training used; chosen here so relevance rows map to these tiles
            from pathchat.model.connectors.mlp import sample_tile_indices

            self.tile_index = self.tile_index[sample_tile_indices(len(self.tile_index), cap,
                                                                  pipeline.tile_sample_seed).numpy()]
        coords = slide.bag.coords
        self.tile_coords_l0 = None if coords is None else coords[self.tile_index]
        self.messages: list[dict[str, str]] = []
        self.model_calls = 0
        self._chat: ChatSession | None = None
        self._relevance: np.ndarray | None = None
        self._fixed_answer = slide.fixed_answer or (NO_TILES_IN_REGION_ANSWER if len(self.tile_index) == 0
                                                    else None)
        self.reset()

    @property
    def calls_model(self) -> bool:
        """False when every answer is a fixed text (too coarse, no tissue, or no tiles in the region)."""
        return self._fixed_answer is None

    def reset(self) -> None:
        """Forget the conversation (and its KV cache); the slide and region stay."""
        self.messages = []
        self._relevance = None
        if self._fixed_answer is not None:
            self._chat = None
            return
        tiles = self.pipeline.tiles_for(self.slide, self.tile_index)
        s = self.sampling
        self._chat = ChatSession(self.pipeline.model, self.pipeline.tokenizer, tiles["tile_features"],
                                 tiles["tile_coords"], slide_size_um=tiles["slide_size_um"],
                                 system_prompt=self.system_prompt, max_new_tokens=s.max_new_tokens,
                                 do_sample=s.do_sample, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)

    def ask(self, question: str, stream: bool = False, max_new_tokens: int | None = None) -> Any:
        """Answer `question` about the slide (region); follow-ups reuse the KV cache.

        Returns:
            The answer text, or with `stream=True` an iterator of text pieces.
        Raises:
            ValueError: an empty question, or a conversation too long for the model (see `ChatSession`).
        """
        if not question or not question.strip():
            raise ValueError("the question is empty")
        pieces = self._stream(question.strip(), max_new_tokens)
        return pieces if stream else "".join(pieces)

    def _stream(self, question: str, max_new_tokens: int | None) -> Iterator[str]:
        if self._chat is None:
            assert self._fixed_answer is not None
            self.messages += [{"role": "user", "content": question},
                              {"role": "assistant", "content": self._fixed_answer}]
            self._relevance = np.zeros(len(self.tile_index), dtype=np.float32)
            yield self._fixed_answer
            return
        self.model_calls += 1
        self._relevance = None
        answer = ""
        try:
            for piece in self._chat.ask(question, max_new_tokens=max_new_tokens, stream=True):
                answer += piece
                yield piece
        finally:
            self.messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]

    def relevance(self) -> np.ndarray:
        """`[n]` per-tile support of the last answer (>= 0, sums to 1; zeros for fixed answers)."""
        if self._relevance is None:
            if self._chat is None or not self._chat.answer_ids:
                raise ValueError("no answer yet: ask a question first")
            self._relevance = self._chat.relevance().float().cpu().numpy()
        return self._relevance

    def top_tiles(self, k: int = 10) -> list[dict[str, Any]]:
        """The `k` most relevant tiles of the last answer: level-0 x, y, size and score."""
        rel = self.relevance()
        if self.tile_coords_l0 is None or rel.size == 0 or float(rel.max()) <= 0:
            return []
        order = np.argsort(-rel, kind="stable")[:k]
        size = int(self.slide.bag.patch_size_level0 or 0)
        return [{"x": int(self.tile_coords_l0[i, 0]), "y": int(self.tile_coords_l0[i, 1]), "size": size,
                 "score": float(rel[i])} for i in order]

    def to_dict(self) -> dict[str, Any]:
        """The conversation with what produced it (for `/save` and the UI's downloads)."""
        return {"slide": self.slide.slide_id,
                "slide_file": str(self.slide.path) if self.slide.path else None,
                "region_level0_xywh": list(self.region) if self.region else None,
                "model": self.pipeline.model_id, "feature_recipe": self.pipeline.recipe.to_dict(),
                "tiles": int(len(self.tile_index)), "messages": list(self.messages)}


@dataclass
class Pipeline:
    """A loaded checkpoint, its feature recipe and a feature cache. Build with `from_pretrained`."""

    model: Any  # PathChatForConditionalGeneration, eval mode
    tokenizer: Any
    checkpoint: Path
    recipe: FeatureRecipe
    feature_job: Path  # job folder of the feature cache (`pathchat extract` layout)
    device: str = "cpu"
    max_tiles: int | None = None  # above it, the seeded tile sample training used
    tile_sample_seed: int = 0
    system_prompt: str | None = None
    max_new_tokens: int = 256
    _encoder: Any = field(default=None, repr=False)

    @classmethod
    def from_pretrained(cls, model: str | os.PathLike[str] | None = None, *, device: str = "cpu",
                        feature_job: str | os.PathLike[str] | None = None, encoder: str | None = None,
                        magnification: float | None = None, tile_size: int | None = None,
                        max_tiles: int | None = None, max_new_tokens: int = 256,
                        system_prompt: str | None = None, progress: bool = True) -> Pipeline:
        """Load `model` (a checkpoint folder; None: the built-in model) and its feature recipe.

        Args:
            feature_job: the feature cache (default `$PATHCHAT_CACHE/features`); a `pathchat extract`
                job folder works as is.
            encoder, magnification, tile_size: the recipe of a checkpoint too old to record one; for a
                checkpoint that records it they must agree with it.
        Raises:
            FileNotFoundError: no such checkpoint.
            FeatureRecipeError: the checkpoint records no recipe and none was given, or the given one
                contradicts it.
        """
        from pathchat.model.pretrained import load_pathchat

        folder = resolve_checkpoint(None if model is None else os.fspath(model), progress=progress)
        net, tokenizer = load_pathchat(folder, device=device, merge_adapter=True)
        recipe = _recipe_for(folder, recipe_of_model(net.config), encoder, magnification, tile_size,
                             getattr(net.config, "feature_dim", None))
        job = Path(feature_job) if feature_job is not None else cache_dir("features")
        prime_prefix(net, tokenizer, system_prompt)  # the first session starts as fast as the later ones
        return cls(model=net, tokenizer=tokenizer, checkpoint=folder, recipe=recipe, feature_job=job,
                   device=device, max_tiles=max_tiles, max_new_tokens=max_new_tokens, system_prompt=system_prompt)

    @property
    def model_id(self) -> str:
        """`<folder name>@<12 hex>`: a hash of the checkpoint's config and manifest (resume keys, reports)."""
        h = hashlib.sha256()
        for name in ("config.json", "pathchat_manifest.json", "adapter_config.json"):
            p = self.checkpoint / name
            if p.is_file():
                h.update(name.encode() + b"\0" + p.read_bytes())
        return f"{self.checkpoint.name}@{h.hexdigest()[:12]}"

    # -- features -----------------------------------------------------------------------------
    def _load_encoder(self) -> Any:
        if self._encoder is None:
            from pathchat.features.encoders import load_encoder

            enc = load_encoder(self.recipe.encoder, device=self.device)
            want = self.recipe.encoder_fingerprint
            if want and enc.fingerprint and enc.fingerprint != want:
                raise FeatureRecipeError(
                    f"encoder {self.recipe.encoder}: the weights here (fingerprint {str(enc.fingerprint)[:12]}) "
                    f"are not the ones the model was trained with ({want[:12]}); point "
                    "PATHCHAT_ENCODER_WEIGHTS at the right weights")
            self._encoder = enc
        return self._encoder

    def prepare(self, slide: str | os.PathLike[str], progress: ProgressFn | None = None) -> SlideFeatures:
        """The slide's features in the model's recipe: from the cache, or tiled and encoded now.

        `slide` is a slide file (or DICOM folder), or a features `.h5` (PathChat, TRIDENT or CLAM).

        Raises:
            FileNotFoundError: no such file.
            SlideResolutionError: the slide's finest level is coarser than the recipe's resolution, or it
                records no resolution (found from its metadata before any tiling); `SlideFeatures.unassessed`
                turns it into a slide whose answers say so.
            FeatureRecipeError: a features file of another recipe (both named).
            SlideError: the slide cannot be read (naming the file and the cause).
        """
        path = Path(slide)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such slide or features file")
        if path.is_file() and path.suffix.lower() in _FEATURE_SUFFIXES:
            return self._from_features_file(path)
        from pathchat.features.extract import ExtractJobConfig, RuntimeOptions, extract_slide, resolve
        from pathchat.utils.batch import fingerprint_slide
        from pathchat.wsi.discovery import discover_slides

        sources = discover_slides([path])
        if len(sources) != 1:
            raise ValueError(f"{path}: holds {len(sources)} slides; give one slide file (or one DICOM series)")
        source = sources[0]
        cfg: ExtractJobConfig = resolve(self.recipe.to_extract_config())
        out = features_path(self.feature_job, cfg.tile.tiling.folder_name, self.recipe.encoder, source.slide_id)
        fingerprint = fingerprint_slide(source)
        source = dataclasses.replace(source, fingerprint=fingerprint)  # extraction reuses it, no second read
        cached = self._cached(out, fingerprint)
        if cached is None:
            if self.recipe.target_mpp is not None:  # a recipe without a resolution takes any slide
                check_slide_resolution(source, cfg.tile)  # before any time goes into tiling
            runtime = RuntimeOptions(batch_size=32, loader_workers=0, device=self.device)
            extract_slide(source, self.feature_job, cfg, self._load_encoder(), runtime, on_progress=progress)
            cached = self._cached(out, fingerprint)
            if cached is None:
                # e.g. a slide coarser than the recipe that the check above let through, tiled natively
                check_extracted_features(self.recipe, read_feature_attrs(out), source.path, str(source.path),
                                         source.slide_id)
                raise RuntimeError(f"{out}: features were written but do not read back for {source.path}")
        bag = cached
        return SlideFeatures(slide_id=source.slide_id, bag=bag, path=source.path, features_path=out,
                             recipe=FeatureRecipe.from_bag(bag), level0_size=_level0_size(bag))

    def _cached(self, out: Path, fingerprint: str) -> FeatureBag | None:
        """The cached features at `out` when they are this slide's, in this recipe."""
        if not out.is_file():
            return None
        try:
            attrs = read_feature_attrs(out)
        except Exception:  # noqa: BLE001 - an unreadable cache entry is simply recomputed
            return None
        if attrs.get("slide_fingerprint") != fingerprint:
            return None
        if self.recipe.mismatches(FeatureRecipe.from_feature_attrs(attrs)):
            return None
        return read_features_h5(out)

    def _from_features_file(self, path: Path) -> SlideFeatures:
        from pathchat.features.importers import read_feature_file

        bag = read_feature_file(path)
        recipe = FeatureRecipe.from_bag(bag)
        self.recipe.check(recipe, str(path))
        return SlideFeatures(slide_id=bag.slide_id, bag=bag, path=None, features_path=path, recipe=recipe,
                             level0_size=_level0_size(bag))

    def tiles_for(self, slide: SlideFeatures, index: np.ndarray | None = None) -> SlideInputs:
        """Model inputs of a slide's tiles (a subset when `index` is given), capped like training."""
        from pathchat.data.slide_features import tiles_from_bag

        bag = slide.bag
        if index is not None and len(index) != len(bag):
            bag = FeatureBag(features=bag.features[index], coords=None if bag.coords is None else bag.coords[index],
                             slide_id=bag.slide_id, encoder=bag.encoder, mpp=bag.mpp,
                             patch_size_level0=bag.patch_size_level0, magnification=bag.magnification,
                             source_format=bag.source_format, attrs=bag.attrs)
        tiles = tiles_from_bag(bag, self.max_tiles, self.tile_sample_seed)
        return {"tile_features": tiles.features, "tile_coords": tiles.coords_um,
                "slide_size_um": tiles.slide_size_um}

    # -- answers ------------------------------------------------------------------------------
    def session(self, slide: SlideFeatures, region: Sequence[float] | None = None,
                max_new_tokens: int | None = None, do_sample: bool = False, temperature: float = 1.0,
                top_p: float = 1.0, top_k: int = 0) -> SlideSession:
        """A conversation about `slide`, or only about the tiles inside the level-0 `region`."""
        sampling = SamplingParams(max_new_tokens or self.max_new_tokens, do_sample, temperature, top_p, top_k)
        return SlideSession(self, slide, None if region is None else _check_region(region), sampling,
                            self.system_prompt)

    def _full_relevance(self, n: int, row: np.ndarray | None) -> np.ndarray:
        """A padded batch row of relevance back on the slide's own `[n]` tile order (0 for unsampled tiles)."""
        full = np.zeros(n, dtype=np.float32)
        if row is None:
            return full
        if self.max_tiles is None or n <= self.max_tiles:
            full[:] = row[:n]
            return full
        from pathchat.model.connectors.mlp import sample_tile_indices

        full[sample_tile_indices(n, self.max_tiles, self.tile_sample_seed).numpy()] = row[: self.max_tiles]
        return full

    @torch.no_grad()
    def answer_batch(self, items: Sequence[tuple[SlideFeatures, str]], max_new_tokens: int | None = None,
                     batch_size: int = 8, relevance: bool = True) -> list[tuple[str, np.ndarray]]:
        """Greedy answers to many one-question (slide, question) items, `batch_size` at a time.

        Returns:
            Per item (answer text, `[n]` tile relevance over the slide's tiles; zeros for fixed answers).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        results: list[tuple[str, np.ndarray] | None] = [None] * len(items)
        live = []
        for i, (slide, _) in enumerate(items):
            fixed = slide.fixed_answer
            if fixed is not None:
                results[i] = (fixed, np.zeros(0, dtype=np.float32))
            else:
                live.append(i)
        max_new = max_new_tokens or self.max_new_tokens
        for start in range(0, len(live), batch_size):
            chunk = live[start:start + batch_size]
            tiles = [self.tiles_for(items[i][0]) for i in chunk]
            batch = [(t["tile_features"], t["tile_coords"], items[i][1]) for t, i in zip(tiles, chunk, strict=True)]
            sizes = [t["slide_size_um"] for t in tiles]
            coords_known = all(t["tile_coords"] is not None for t in tiles)
            if not coords_known:
                batch = [(f, None, q) for f, _, q in batch]
            out = generate_batch_ids(self.model, self.tokenizer, batch, max_new, self.system_prompt, sizes)
            rel = answer_relevance(self.model, **out.relevance_inputs()).cpu().numpy() if relevance else None
            for row, i in enumerate(chunk):
                results[i] = (out.answers[row].strip(), self._full_relevance(items[i][0].num_tiles,
                                                                              None if rel is None else rel[row]))
        return [r for r in results if r is not None]


def _level0_size(bag: FeatureBag) -> tuple[int, int] | None:
    w, h = bag.attrs.get("level0_width"), bag.attrs.get("level0_height")
    try:
        return (int(w), int(h)) if w is not None and h is not None else None
    except (TypeError, ValueError):
        return None


def _recipe_for(folder: Path, recorded: FeatureRecipe | None, encoder: str | None, magnification: float | None,
                tile_size: int | None, feature_dim: Any) -> FeatureRecipe:
    """The checkpoint's recipe, or the one given by hand for an old checkpoint; conflicts are errors."""
    if magnification is not None and not magnification > 0:
        raise ValueError(f"--mag must be a positive number, got {magnification}")
    target_mpp = None if magnification is None else round(10.0 / magnification, 6)
    if recorded is None:
        if encoder is None:
            raise FeatureRecipeError(
                f"{folder}: the checkpoint records no feature recipe (it predates them); give the recipe its "
                "features were made with: --encoder NAME --mag X --tile-size N")
        dim = int(feature_dim) if isinstance(feature_dim, int) else None
        return FeatureRecipe(encoder=encoder, feature_dim=dim, target_mpp=target_mpp or 0.5,
                             tile_px=tile_size or 256, overlap_px=0)
    hand = FeatureRecipe(encoder=encoder or recorded.encoder, target_mpp=target_mpp, tile_px=tile_size)
    diff = recorded.mismatches(hand)
    if diff:
        raise FeatureRecipeError(f"{folder}: the checkpoint was trained on {recorded.describe()}, but "
                                 f"{hand.describe()} was given ({', '.join(diff)} differ); drop the flags "
                                 "to use the checkpoint's own recipe")
    return recorded


def save_conversation(session: SlideSession, path: str | os.PathLike[str]) -> Path:
    """Write `session.to_dict()` as JSON atomically; returns the path."""
    from pathchat.utils.atomic import atomic_write_text

    out = Path(path)
    atomic_write_text(out, json.dumps(session.to_dict(), indent=2, ensure_ascii=False) + "\n")
    return out
