"""Report files that need no model: evidence tiles, heatmap PNG, QuPath GeoJSON, prompt sets."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from pathchat.inference.report_outputs import evidence_geojson, evidence_tiles, heatmap_png
from pathchat.inference.report_prompts import PromptSetError, load_prompt_set


def test_evidence_tiles_are_the_top_scores_in_level0_pixels():
    coords = np.array([[0, 0], [512, 0], [0, 512], [512, 512]])
    scores = np.array([0.1, 0.4, 0.2, 0.3])
    top = evidence_tiles(coords, 512, scores, top_k=3)
    assert [(t["rank"], t["l0_x"], t["l0_y"], t["score"]) for t in top] == [
        (1, 512, 0, 0.4), (2, 512, 512, 0.3), (3, 0, 512, 0.2)]
    geo = evidence_geojson(top)
    assert geo["type"] == "FeatureCollection" and len(geo["features"]) == 3
    ring = geo["features"][0]["geometry"]["coordinates"][0]
    assert ring == [[512, 0], [1024, 0], [1024, 512], [512, 512], [512, 0]]  # closed, level-0 px
    props = geo["features"][0]["properties"]
    assert props["objectType"] == "annotation" and props["measurements"] == {"relevance": 0.4, "rank": 1}
    with pytest.raises(ValueError, match="3 scores for 4 tiles"):
        evidence_tiles(coords, 512, scores[:3])


def test_heatmap_colours_the_relevant_tile_and_has_a_colour_bar():
    thumb = np.full((400, 600, 3), 240, np.uint8)  # 600 x 400 thumbnail of a 6000 x 4000 slide
    coords = np.array([[0, 0], [3000, 2000]])
    png = heatmap_png(thumb, 10.0, coords, 1000, np.array([0.0, 1.0]))
    img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert img.shape[0] == 400 and img.shape[1] > 600  # the colour bar sits to the right
    hot = img[250, 350].astype(int)  # inside the tile at (3000, 2000)-(4000, 3000) level 0
    cold = img[50, 50].astype(int)  # inside the zero-relevance tile
    untouched = img[390, 590].astype(int)  # no tile there: the thumbnail as it was
    viridis_top = cv2.applyColorMap(np.array([[255]], np.uint8), cv2.COLORMAP_VIRIDIS)[0, 0].astype(int)
    viridis_low = cv2.applyColorMap(np.array([[0]], np.uint8), cv2.COLORMAP_VIRIDIS)[0, 0].astype(int)
    np.testing.assert_allclose(hot, 0.45 * 240 + 0.55 * viridis_top, atol=2)
    np.testing.assert_allclose(cold, 0.45 * 240 + 0.55 * viridis_low, atol=2)
    assert untouched.tolist() == [240, 240, 240]


def test_a_tiny_thumbnail_is_enlarged_and_no_tiles_still_renders():
    png = heatmap_png(np.full((16, 16, 3), 200, np.uint8), 1.0, np.zeros((0, 2), int), 16, np.zeros(0))
    img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert img.shape[0] == 384  # 16 px x 24


def test_default_prompt_set_and_its_hash(tmp_path):
    default = load_prompt_set()
    assert [s.name for s in default.sections] == ["specimen_and_tissue", "microscopic_findings", "impression",
                                                  "uncertainty"]
    assert all(s.question and s.max_new_tokens > 0 for s in default.sections)
    same = tmp_path / "same.yaml"
    same.write_text("# reformatted, same content\nname: default\nmax_new_tokens: 160\nsections:\n" + "".join(
        f"- {{name: {s.name}, title: {s.title}, question: \"{s.question}\"}}\n" for s in default.sections))
    assert load_prompt_set(same).sha256 == default.sha256
    changed = tmp_path / "changed.yaml"
    changed.write_text(same.read_text().replace("Summarize", "Summarise"))
    assert load_prompt_set(changed).sha256 != default.sha256


@pytest.mark.parametrize(("text", "problem"), [
    ("sections: []", "non-empty list"),
    ("sections:\n- {name: a, question: q}\n- {name: a, question: r}", "used twice"),
    ("sections:\n- {name: a, question: ''}", "'question' must be a non-empty string"),
    ("sections:\n- {name: a, question: q, colour: red}", "unknown keys ['colour']"),
    ("sections:\n- {name: a, question: q, max_new_tokens: 0}", "positive integer"),
    ("sections: [", "not valid YAML"),
])
def test_bad_prompt_files_name_the_file_and_the_problem(tmp_path, text, problem):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(PromptSetError, match="p.yaml") as info:
        load_prompt_set(path)
    assert problem in str(info.value)
    with pytest.raises(PromptSetError, match="cannot read"):
        load_prompt_set(tmp_path / "missing.yaml")
