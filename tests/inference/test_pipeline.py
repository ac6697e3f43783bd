"""The inference pipeline: feature recipe in checkpoints, feature cache, sessions, regions, no tissue."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from inference_fixtures import ENCODER_DIM, RECIPE, save_tiny_checkpoint

from pathchat.features.store import FeatureBag, read_features_h5, write_features_h5
from pathchat.inference import NO_TISSUE_ANSWER, FeatureRecipeError, Pipeline, SlideResolutionError
from pathchat.inference.engine import ChatSession
from pathchat.inference.notices import NO_TILES_IN_REGION_ANSWER
from pathchat.inference.pipeline import save_conversation, tiles_in_region
from pathchat.wsi.synthetic import SyntheticSlideSpec, TissueRegion, write_synthetic_slide


def test_prepare_tiles_encodes_once_then_reuses_the_cache(pipe: Pipeline, slide_file: Path, tmp_path: Path):
    pipe = dataclasses.replace(pipe, feature_job=tmp_path / "cache")  # an empty feature cache
    stages: list[tuple[str, int, int]] = []
    slide = pipe.prepare(slide_file, progress=lambda s, d, t: stages.append((s, d, t)))
    assert slide.num_tiles == 96  # 12 x 8 tiles of 256 px, all tissue
    assert slide.features_path is not None and slide.features_path.is_file()
    assert slide.features_path.parent.name == "features_random-cnn-tiny"
    assert slide.bag.features.shape == (96, ENCODER_DIM)
    assert stages[0] == ("tiling", 0, 1) and stages[-1] == ("encoding", 96, 96)
    assert slide.recipe.mismatches(pipe.recipe) == []
    mtime = slide.features_path.stat().st_mtime_ns
    again = pipe.prepare(slide_file, progress=lambda *a: stages.append(("again", 0, 0)))
    assert ("again", 0, 0) not in stages  # nothing was recomputed
    assert slide.features_path.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(again.bag.features, slide.bag.features)


def test_session_streams_follow_ups_and_relevance(pipe: Pipeline, slide_file: Path, tmp_path: Path):
    slide = pipe.prepare(slide_file)
    session = pipe.session(slide)
    pieces = list(session.ask("What tissue is this?", stream=True))
    assert session.model_calls == 1 and session.messages[-1]["content"] == "".join(pieces)
    rel = session.relevance()
    assert rel.shape == (96,) and rel.min() >= 0 and abs(float(rel.sum()) - 1.0) < 1e-4
    session.ask("And the other half?")
    assert session._chat is not None and session._chat.connector_runs == 1  # follow-up reused the cache
    assert len(session._chat.prefill_lengths) == 2
    chat = session._chat
    first_prompt = chat.render(chat.messages[:1])
    # the follow-up never ran the first prompt (the slide) again
    assert 0 < chat.prefill_lengths[1] <= len(chat.render(chat.messages[:3])) - len(first_prompt)
    top = session.top_tiles(3)
    assert len(top) == 3 and top[0]["score"] >= top[1]["score"] >= top[2]["score"] and top[0]["size"] == 256
    saved = json.loads(save_conversation(session, tmp_path / "chat.json").read_text())
    assert saved["model"] == pipe.model_id and saved["feature_recipe"]["encoder"] == "random-cnn-tiny"
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant", "user", "assistant"]
    session.reset()
    assert session.messages == []


def test_region_answers_ignore_tiles_outside(pipe: Pipeline, checkpoint: Path, slide_file: Path):
    # A model of its own: after other tests used the shared one in this process, its prefill logits were
    # sometimes NaN (not reproduced with a fresh load in 30 tries; cause not found yet, see the issue note).
    pipe = Pipeline.from_pretrained(checkpoint, feature_job=pipe.feature_job, max_new_tokens=6)
    slide = pipe.prepare(slide_file)
    region = (0, 0, 1536, 2048)  # the left (tumour) half
    inside = tiles_in_region(slide.bag, region)
    assert len(inside) == 48
    # Another slide: the same tiles inside the region, random features outside it.
    rng = np.random.default_rng(0)
    altered_features = slide.bag.features.copy()
    outside = np.setdiff1d(np.arange(slide.num_tiles), inside)
    altered_features[outside] = rng.normal(size=(len(outside), ENCODER_DIM)).astype(np.float32) * 5
    altered = type(slide)(slide_id=slide.slide_id, bag=FeatureBag(
        features=altered_features, coords=slide.bag.coords, slide_id=slide.bag.slide_id, encoder=slide.bag.encoder,
        mpp=slide.bag.mpp, patch_size_level0=slide.bag.patch_size_level0, magnification=slide.bag.magnification,
        source_format="pathchat", attrs=slide.bag.attrs), path=None, features_path=None, recipe=slide.recipe)
    a = pipe.session(slide, region=region)
    b = pipe.session(altered, region=region)
    assert a.ask("What is here?") == b.ask("What is here?")
    def prompt_logits(session, slide_features) -> torch.Tensor:
        """The prefill logits of the first question, through the session's own path (ChatSession)."""
        tiles = pipe.tiles_for(slide_features, session.tile_index)
        chat = ChatSession(pipe.model, pipe.tokenizer, tiles["tile_features"], tiles["tile_coords"],
                           slide_size_um=tiles["slide_size_um"], max_new_tokens=1, keep_prefill_logits=True)
        chat.ask("What is here?")
        logits = chat.last_logits[0]
        assert torch.isfinite(logits).all()
        return logits

    torch.testing.assert_close(prompt_logits(a, slide), prompt_logits(b, altered))
    # ... while over the whole slide the same question does see the changed tiles.
    whole = pipe.session(slide)
    assert not torch.allclose(prompt_logits(whole, slide), prompt_logits(whole, altered), atol=1e-4)
    assert a.relevance().shape == (48,)
    empty = pipe.session(slide, region=(10**7, 10**7, 100, 100))
    assert empty.ask("Anything?") == NO_TILES_IN_REGION_ANSWER and empty.model_calls == 0
    with pytest.raises(ValueError, match="positive width"):
        pipe.session(slide, region=(0, 0, -5, 10))


def test_features_of_another_recipe_are_refused_naming_both(pipe: Pipeline, slide_file: Path, tmp_path: Path):
    slide = pipe.prepare(slide_file)
    other = tmp_path / "other.h5"
    bag = read_features_h5(slide.features_path)
    attrs = {k: v for k, v in bag.attrs.items() if isinstance(v, (int, float, str))}
    attrs["patch_size"] = 512
    write_features_h5(other, FeatureBag(features=bag.features, coords=bag.coords, slide_id="other",
                                        encoder=bag.encoder, mpp=bag.mpp, patch_size_level0=bag.patch_size_level0,
                                        magnification=bag.magnification, source_format="pathchat", attrs={}),
                      attrs=attrs)
    with pytest.raises(FeatureRecipeError, match=r"other\.h5.*tile_px.*model: encoder=random-cnn-tiny.*tile=256px.*"
                                                 r"features: .*tile=512px"):
        pipe.prepare(other)
    same = pipe.prepare(slide.features_path)  # the cache file itself is accepted as is
    assert same.num_tiles == 96


def test_no_tissue_slide_gets_the_fixed_answer_without_a_model_call(pipe: Pipeline, tmp_path: Path):
    blank = write_synthetic_slide(tmp_path / "blank.svs", SyntheticSlideSpec(1024, 1024, mpp=0.5))
    slide = pipe.prepare(blank)
    assert slide.no_tissue and slide.num_tiles == 0
    session = pipe.session(slide)
    assert not session.calls_model
    assert session.ask("What tissue is this?") == NO_TISSUE_ANSWER and session.model_calls == 0
    assert pipe.answer_batch([(slide, "What?")])[0][0] == NO_TISSUE_ANSWER


def test_batch_answers_equal_session_answers(pipe: Pipeline, slide_file: Path):
    slide = pipe.prepare(slide_file)
    questions = ["What tissue is this?", "Describe the slide."]
    batch = pipe.answer_batch([(slide, q) for q in questions], batch_size=2)
    for (text, rel), q in zip(batch, questions, strict=True):
        assert text == pipe.session(slide).ask(q).strip()
        assert rel.shape == (96,) and abs(float(rel.sum()) - 1) < 1e-4


def test_old_checkpoint_needs_the_recipe_by_hand(tmp_path: Path):
    old = save_tiny_checkpoint(tmp_path / "old", None)
    with pytest.raises(FeatureRecipeError, match="records no feature recipe.*--encoder NAME --mag X --tile-size N"):
        Pipeline.from_pretrained(old, feature_job=tmp_path / "f")
    pipe = Pipeline.from_pretrained(old, feature_job=tmp_path / "f", encoder="random-cnn-tiny", magnification=20,
                                    tile_size=256)
    assert pipe.recipe.encoder == "random-cnn-tiny" and pipe.recipe.target_mpp == 0.5
    new = save_tiny_checkpoint(tmp_path / "new", RECIPE)
    with pytest.raises(FeatureRecipeError, match=r"trained on encoder=random-cnn-tiny .*tile=256px.*tile=512px"):
        Pipeline.from_pretrained(new, feature_job=tmp_path / "f", tile_size=512)


def test_training_writes_the_feature_recipe(tmp_path: Path):
    from pathchat.inference.recipe import recipe_of_feature_files

    paths = []
    for i, patch in enumerate((256, 256, 512)):
        p = tmp_path / f"s{i}.h5"
        write_features_h5(p, FeatureBag(features=np.zeros((2, 8), np.float32), coords=np.zeros((2, 2), np.int64),
                                        slide_id=f"s{i}", encoder="random-cnn-tiny", mpp=0.25,
                                        patch_size_level0=2 * patch, magnification=20.0, source_format="pathchat",
                                        attrs={}), attrs={"patch_size": patch, "target_mpp": 0.5, "overlap": 0})
        paths.append(p)
    recipe = recipe_of_feature_files(paths[:2])
    assert (recipe.encoder, recipe.feature_dim, recipe.tile_px, recipe.target_mpp) == ("random-cnn-tiny", 8, 256, 0.5)
    with pytest.raises(FeatureRecipeError, match=r"mix recipes \(tile_px differ\).*s0\.h5.*s2\.h5"):
        recipe_of_feature_files(paths)


def test_a_slide_coarser_than_the_recipe_is_refused_naming_both_resolutions(pipe: Pipeline, tmp_path: Path):
    # Was a FeatureRecipeError after tiling at the native 2 µm/px; now its subclass SlideResolutionError,
    # found from the slide's metadata before any tiling (tests/inference/test_low_resolution.py has the rest).
    regions = (TissueRegion("tumor", 0, 0, 1024, 1024),)
    coarse = write_synthetic_slide(tmp_path / "coarse.svs", SyntheticSlideSpec(1024, 1024, mpp=2.0, regions=regions))
    with pytest.raises(SlideResolutionError, match=r"coarse\.svs: resolution too low.* 2 µm/px.* 0\.5 µm/px \(20x\)"):
        pipe.prepare(coarse)


def test_a_tile_cap_samples_once_so_relevance_maps_to_the_sampled_tiles(pipe: Pipeline, slide_file: Path):
    capped = dataclasses.replace(pipe, max_tiles=10)
    slide = capped.prepare(slide_file)
    session = capped.session(slide)
    assert len(session.tile_index) == 10 and len(set(session.tile_index.tolist())) == 10
    session.ask("What tissue is this?")
    assert session.relevance().shape == (10,)
    top = session.top_tiles(3)
    chosen = {tuple(xy) for xy in session.tile_coords_l0.tolist()}
    assert all((t["x"], t["y"]) in chosen for t in top)
    assert capped.session(slide).tile_index.tolist() == session.tile_index.tolist()  # seeded: the same sample
    text, rel = capped.answer_batch([(slide, "What tissue is this?")])[0]
    assert rel.shape == (96,) and abs(float(rel.sum()) - 1) < 1e-4 and int((rel > 0).sum()) <= 10
    np.testing.assert_allclose(rel[session.tile_index].sum(), 1.0, atol=1e-4)  # all of it on the sampled tiles
